Feature: A first hour with orchctl
  A newcomer starts from an empty folder with the README alone: writes a starter config,
  makes the usual mistakes, serves, submits and watches tasks, cancels, tries a second daemon,
  stops with Ctrl-C and reads the status afterwards. Every line they see is plain.

  Scenario: From orchctl init to a clean stop
    When I run "orchctl init --simulate"
    Then it exits 0 and prints
      """
      wrote orch.yaml for a simulated 24 GB + 12 GB workstation
      wrote inventory.yaml
      wrote hello.task.yaml
      """
    And I make the HTTP API pick a free port
    When I write the task file "typo.task.yaml"
      """
      model: startr
      prompt: hello
      max_tokens: 4
      """
    And I run "orchctl validate --config orch.yaml typo.task.yaml"
    Then it exits 2 and prints
      """
      orch.yaml: ok
      typo.task.yaml:1:8: model: unknown model 'startr'; orch.yaml has: starter (hint: name one of those models, or add it under models: in orch.yaml)
      """
    When I run "orchctl validate --config orch.yaml hello.task.yaml"
    Then it exits 0 and prints
      """
      orch.yaml: ok
      hello.task.yaml: ok
      """
    When I run "orchctl submit hello.task.yaml --config orch.yaml --wait"
    Then it exits 3 and its errors say
      """
      orchctl: no daemon is serving this folder: the task will run when `orchctl serve --config orch.yaml` starts
      """
    Given the daemon is serving orch.yaml
    Then task "hello" succeeds
    When I write the task file "second.task.yaml"
      """
      task_id: second
      model: starter
      prompt: hello again
      max_tokens: 4
      """
    And I run "orchctl submit second.task.yaml --config orch.yaml --wait"
    Then it exits 0 and its last line starts with "succeeded: 4 tokens, queued "
    When I run "orchctl watch second --config orch.yaml"
    Then it exits 0 and its last line is "[end: length, 4 tokens]"
    When I run "orchctl submit second.task.yaml --config orch.yaml"
    Then it exits 1 and its errors say
      """
      orchctl: task id 'second' is already used (results/second.json: succeeded) — DUPLICATE_TASK_ID
      hint: give the task a new task_id
      """
    When I run "orchctl cancel ghost --config orch.yaml"
    Then it exits 1 and its errors say
      """
      orchctl: no task 'ghost' is queued, running or finished in this folder
      hint: `orchctl tasks` lists them
      """
    When I run "orchctl watch typo --config orch.yaml"
    Then it exits 1 and its errors say
      """
      orchctl: no task 'typo' in this folder
      """
    When I run "orchctl serve --config orch.yaml"
    Then it exits 2 and its errors mention "another daemon (pid" and "serves this folder since"
    When I press Ctrl-C on the daemon
    Then the daemon exits 0 and its log says "Stopping on SIGINT."
    When I run "orchctl status --config orch.yaml"
    Then it exits 0 and its first line mentions "stopped at"
    And no output of this scenario contains "{'", "None ms", "pid None", "Traceback" or "Value error,"
