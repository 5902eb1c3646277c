Feature: Backpressure
  As a user sharing the workstation's GPUs with batch jobs
  I want a bounded queue with a clear policy for when it is full
  So that overload is answered at once, with a reason and a time to retry, never by hanging

  Background:
    Given a workstation with a simulated 24 GB and a 12 GB GPU
    And this orch.yaml
      """
      version: 1
      gpus: {observer: simulated, inventory: inventory.yaml, reserve_mib: 512}
      queue: {capacity: 2, full_policy: reject}
      timeouts: {ready_s: 10, drain_s: 2, stop_grace_s: 2}
      models:
        m1: {ref: "file:m1.gguf", size_mib: 1000}
      pools:
        - id: p1
          engine: sim
          model: m1
          ctx: 2048
          slots: 1
          sim: {tokens_per_s: 20, load_s: 0}
      """

  Scenario: Policy reject: a newcomer meeting a full queue is rejected, retriable
    Given the daemon is serving orch.yaml
    And pool "p1" is Ready
    When I drop a task "slow" with max_tokens 60
    Then task "slow" is running
    When I drop a task "q1"
    Then task "q1" is queued
    When I drop a task "q2"
    Then task "q2" is queued
    And the queue holds 2 of 2 tasks
    When I drop a task "q3"
    Then task "q3" is rejected with ADMISSION_REJECT
    And the error of task "q3" is retriable, with retry_after_ms set
    And the error of task "q3" has the policy label "reject"
    And the error of task "q3" has a hint saying "retry in"
    And the event log of task "q3" ends with an error frame of ADMISSION_REJECT
    And "q3.task.yaml" is filed in spool/failed
    And task "q1" is queued
    And task "q2" is queued
    And task "slow" is running

  Scenario: Policy drop-lru: the oldest batch task makes room for the newcomer
    Given I edit orch.yaml, replacing "full_policy: reject" with "full_policy: drop-lru"
    And the daemon is serving orch.yaml
    And pool "p1" is Ready
    When I drop a task "slow" with max_tokens 80
    Then task "slow" is running
    When I drop a task "b1"
    Then task "b1" is queued
    When I drop a task "b2"
    Then task "b2" is queued
    And the queue holds 2 of 2 tasks
    When I drop a task "b3"
    Then task "b1" is failed with QUEUE_FULL_DROP_LRU
    And the error of task "b1" is retriable, with retry_after_ms set
    And the error of task "b1" has the policy label "drop-lru"
    And the event log of task "b1" ends with an error frame of QUEUE_FULL_DROP_LRU
    And the event log of task "b1" has no "started" frame
    And "b1.task.yaml" is filed in spool/failed
    And task "b3" is queued
    And task "slow" succeeds
    And task "b2" succeeds
    And task "b3" succeeds
    And "b3.task.yaml" is filed in spool/done
