Feature: Watching a task over SSE
  A client follows a task's events over GET /v1/tasks/{id}/events. The stream is the task's
  event log: a client that reconnects with Last-Event-ID continues where it stopped, with no
  gap and no duplicate, also after the task ended and after the daemon restarted.

  Background:
    Given a workstation with a simulated 24 GB and a 12 GB GPU
    And this orch.yaml
      """
      version: 1
      gpus: {observer: simulated, inventory: inventory.yaml}
      models:
        m1: {ref: "file:m1.gguf", size_mib: 1000}
      pools:
        - {id: p1, engine: sim, model: m1, ctx: 2048, slots: 1, sim: {tokens_per_s: 40}}
      """
    And the daemon is serving orch.yaml
    And pool "p1" is Ready

  Scenario: A stream read to the end is the task's event log
    When I drop a task "s1" with max_tokens 12
    And I read the event stream of task "s1" to the end
    Then the stream has the frames of the event log of task "s1", in order
    And the first event carries a retry interval and the last is an end frame

  Scenario: A client that drops in the middle resumes with no gap and no duplicate
    When I drop a task "s2" with max_tokens 30
    And I read 5 events of the stream of task "s2" and hang up
    And I read the event stream of task "s2" to the end, resuming after the last event I saw
    Then together the two reads have the frames of the event log of task "s2", each once

  Scenario: Resuming after a daemon restart continues from the log
    When I drop a task "s3" with max_tokens 6
    And task "s3" succeeds
    And I read 4 events of the stream of task "s3" and hang up
    And I restart the daemon
    And I read the event stream of task "s3" to the end, resuming after the last event I saw
    Then together the two reads have the frames of the event log of task "s3", each once
