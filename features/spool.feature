Feature: Dropping task files into the spool
  As a user of the workstation (or an agent working for me)
  I want to drop task files into spool/incoming/ and read what became of them
  So that I never need to talk to the daemon directly, and no task is silently lost

  Background:
    Given a workstation with a simulated 24 GB and a 12 GB GPU
    And this orch.yaml
      """
      version: 1
      gpus: {observer: simulated, inventory: inventory.yaml, reserve_mib: 512}
      queue: {capacity: 16, full_policy: reject}
      timeouts: {ready_s: 10, drain_s: 5, stop_grace_s: 2}
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

  Scenario: A good task file runs, and its file is filed in done/
    When I drop the task file "hello.task.yaml"
      """
      task_id: hello
      model: m1
      prompt: Write a haiku about GPUs
      max_tokens: 6
      """
    Then task "hello" succeeds
    And task "hello" ran on pool "p1"
    And the event log of task "hello" ends with an end frame, finish_reason "length"
    And "hello.task.yaml" is filed in spool/done
    And nothing is left in spool/incoming or spool/active

  Scenario: A malformed file is quarantined with the line and a hint, and serving goes on
    When I drop the task file "typo.task.yaml"
      """
      model: m1
      prompt: summarise the README
      max_tokns: 3
      """
    Then "typo.task.yaml" is quarantined in spool/failed with INVALID_TASK_FILE
    And the error file points at line 3, field "max_tokns"
    And the error file has a hint saying "did you mean 'max_tokens'"
    And task "typo" is rejected with INVALID_TASK_FILE
    When I drop a task "after-the-typo"
    Then task "after-the-typo" succeeds

  Scenario: A file that is not even YAML is quarantined too
    When I drop the task file "broken.task.yaml"
      """
      model: m1
      prompt: [unclosed
      max_tokens: 3
      """
    Then "broken.task.yaml" is quarantined in spool/failed with INVALID_TASK_FILE
    And the error file message mentions "not valid YAML"
    And the error file message mentions "the [ list opened here is not closed"
    And the error file points at line 2
    And the error file has a hint saying "close it"
    When I drop a task "after-the-break"
    Then task "after-the-break" succeeds

  Scenario: A duplicate task_id is refused and the first result is kept
    When I drop a task "dup"
    Then task "dup" succeeds
    When I drop the task file "dup-again.task.yaml"
      """
      task_id: dup
      model: m1
      prompt: something else entirely
      max_tokens: 4
      """
    Then "dup-again.task.yaml" is quarantined in spool/failed with DUPLICATE_TASK_ID
    And the error file has a hint saying "new task_id"
    And task "dup" still has its first result

  Scenario: orchctl submit, then orchctl watch prints the text
    Given a task file "poem.task.yaml" in my working folder
      """
      task_id: poem
      model: m1
      prompt: a poem about reconcilers
      max_tokens: 12
      """
    When I run "orchctl submit poem.task.yaml"
    Then the command exits with 0
    And its output contains "submitted poem"
    When I run "orchctl watch poem"
    Then the command exits with 0
    And its output contains the text of task "poem"
    And its output contains "[end: length, 12 tokens]"
    And task "poem" succeeds
