Feature: Session eviction
  As an agent that talks to a model in turns
  I want a session to end at its turn limit or after it sat idle past its TTL, with a typed error
  So that I know to start a new session instead of silently losing my context

  Background:
    Given a workstation with a simulated 24 GB and a 12 GB GPU
    And this orch.yaml
      """
      version: 1
      gpus: {observer: simulated, inventory: inventory.yaml, reserve_mib: 512}
      queue: {capacity: 16, full_policy: reject}
      sessions: {ttl_s: 1, max_turns: 2}
      timeouts: {ready_s: 10, drain_s: 2, stop_grace_s: 2}
      models:
        m1: {ref: "file:m1.gguf", size_mib: 1000}
      pools:
        - id: p1
          engine: sim
          model: m1
          ctx: 2048
          slots: 2
          sim: {tokens_per_s: 400, load_s: 0}
      """
    And the daemon is serving orch.yaml
    And pool "p1" is Ready

  Scenario: A third turn is refused once the session used its two turns
    When I drop a task "turn-1" in session "chat-a"
    Then task "turn-1" succeeds
    When I drop a task "turn-2" in session "chat-a"
    Then task "turn-2" succeeds
    When I drop a task "turn-3" in session "chat-a"
    Then task "turn-3" is rejected with SESSION_TURNS_EXCEEDED
    And the error of task "turn-3" is retriable
    And the error of task "turn-3" has a hint saying "new session_id"
    And the error message of task "turn-3" mentions "chat-a"
    And the event log of task "turn-3" ends with an error frame of SESSION_TURNS_EXCEEDED
    And "turn-3.task.yaml" is filed in spool/failed

  Scenario: A session idle past its TTL is expired, and a new session id works
    When I drop a task "first" in session "chat-b"
    Then task "first" succeeds
    When more time than the session TTL passes
    And I drop a task "too-late" in session "chat-b"
    Then task "too-late" is rejected with SESSION_EXPIRED
    And the error of task "too-late" is retriable
    And the error of task "too-late" has a hint saying "new session_id"
    And the event log of task "too-late" ends with an error frame of SESSION_EXPIRED
    When I drop a task "once-more" in session "chat-b"
    Then task "once-more" is rejected with SESSION_EXPIRED
    When I drop a task "fresh" in session "chat-c"
    Then task "fresh" succeeds
