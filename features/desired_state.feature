Feature: Editing the desired state
  As the owner of the workstation
  I want to edit orch.yaml while the daemon runs and have it converge to what I wrote
  So that changing models and pools needs no restart, and a typo never takes serving down

  Background:
    Given a workstation with a simulated 24 GB and a 12 GB GPU
    And this orch.yaml
      """
      version: 1
      gpus: {observer: simulated, inventory: inventory.yaml, reserve_mib: 512}
      queue: {capacity: 16, full_policy: reject}
      timeouts: {ready_s: 10, drain_s: 2, stop_grace_s: 2}
      models:
        m1: {ref: "file:m1.gguf", size_mib: 1000}
        m2: {ref: "file:m2.gguf", size_mib: 1500}
        m3: {ref: "file:m3.gguf", size_mib: 800}
      pools:
        - id: p1
          engine: sim
          model: m1
          ctx: 2048
          slots: 2
          sim: {tokens_per_s: 400, load_s: 0}
        - id: p2
          engine: sim
          model: m2
          ctx: 2048
          slots: 1
          sim: {tokens_per_s: 400, load_s: 0}
      """
    And the daemon is serving orch.yaml
    And pool "p1" is Ready
    And pool "p2" is Ready
    And I note the replica pids

  Scenario: Swapping a pool's model replaces that pool's replica only
    When I change pool "p1" to serve model "m3"
    Then pool "p1" has replaced its replica
    And pool "p1" serves model "m3"
    And pool "p2" keeps its replica
    When I drop a task "on-m3" for model "m3"
    Then task "on-m3" succeeds
    And task "on-m3" ran on pool "p1"

  Scenario: Adding a pool brings it up next to the others
    When I add this pool to orch.yaml
      """
      id: p3
      engine: sim
      model: m3
      ctx: 1024
      slots: 1
      sim: {tokens_per_s: 400, load_s: 0}
      """
    Then pool "p3" becomes Ready
    And "orchctl status" shows pool "p3" as Ready
    And every replica keeps its pid
    When I drop a task "via-p3" for pool "p3"
    Then task "via-p3" succeeds
    And task "via-p3" ran on pool "p3"

  Scenario: Broken YAML is reported with file:line, and the last good state keeps serving
    When I edit orch.yaml, replacing "slots: 1" with "slots: 1: oops"
    Then the status shows the config error at the line with "oops"
    And every replica keeps its pid
    When I drop a task "still-served"
    Then task "still-served" succeeds
    And every replica keeps its pid

  Scenario: orchctl status shows the config error while the last good state serves
    When I edit orch.yaml, replacing "slots: 1" with "slots: 1: oops"
    Then "orchctl status" reports the config error at the line with "oops"
    And "orchctl status" shows pool "p1" as Ready

  Scenario: A pool too big for any GPU is Unschedulable, with the numbers
    When I add these models to orch.yaml
      """
      huge: {ref: "file:huge.gguf", size_mib: 40000}
      """
    And I add this pool to orch.yaml
      """
      id: big
      engine: sim
      model: huge
      ctx: 2048
      slots: 1
      """
    Then pool "big" becomes Unschedulable
    And its reason gives the MiB it needs and the most any GPU has free
    And "orchctl status" shows pool "big" as Unschedulable
    And every replica keeps its pid
    When I drop a task "too-big" for model "huge"
    Then task "too-big" is rejected with POOL_UNAVAILABLE
    And the error message of task "too-big" mentions "Unschedulable"
