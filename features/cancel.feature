Feature: Cancel
  As a user who changed their mind
  I want `orchctl cancel ID` to stop a task whether it waits in the queue or is streaming
  So that the result says canceled, the stream ends cleanly, and the GPU slot is free again

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
      pools:
        - id: p1
          engine: sim
          model: m1
          ctx: 2048
          slots: 1
          sim: {tokens_per_s: 20, load_s: 0}
      """
    And the daemon is serving orch.yaml
    And pool "p1" is Ready

  Scenario: Canceling a queued task: it never starts
    When I drop a task "busy" with max_tokens 120
    Then task "busy" is running
    When I drop a task "waiting"
    Then task "waiting" is queued
    When I run "orchctl cancel waiting"
    Then the command exits with 0
    And task "waiting" is canceled
    And the event log of task "waiting" ends with an end frame, finish_reason "canceled"
    And the event log of task "waiting" has no "started" frame
    And the event log of task "waiting" has no "token" frame
    And "waiting.task.yaml" is filed in spool/done
    And task "busy" succeeds

  Scenario: Canceling a streaming task: the stream ends, and the slot is free again
    When I drop a task "chatty" with max_tokens 400
    Then task "chatty" has streamed at least 2 tokens
    When I run "orchctl cancel chatty"
    Then the command exits with 0
    And task "chatty" is canceled
    And task "chatty" produced fewer than 400 tokens
    And the event log of task "chatty" ends with an end frame, finish_reason "canceled"
    When I drop a task "next"
    Then task "next" succeeds
    And task "next" ran on pool "p1"
    And no token frame follows the end frame of task "chatty"
    And "chatty.task.yaml" is filed in spool/done
