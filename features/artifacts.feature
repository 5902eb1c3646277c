Feature: Artifact uploads
  As an agent working on this workstation from my dev box
  I want to store plans, diffs and summaries and fetch them back by URL
  So that my work and the transcripts of my tasks outlive my session

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
          slots: 2
          sim: {tokens_per_s: 400, load_s: 0}
      """
    And the daemon is serving orch.yaml

  Scenario: A plan is stored once, whatever the number of uploads, and served back as it was
    When I upload the artifact
      """
      {"kind": "plan", "content": {"goal": "fix the login bug", "steps": ["reproduce", "fix"]},
       "tags": ["agent-7"], "metadata": {"repo": "webapp"}}
      """
    Then the answer is 201
    When I upload the same artifact again
    Then the answer is 200
    And both uploads got the same id
    And 1 artifact file is stored
    When I download it from its url
    Then the body is the document I uploaded, and its sha256 is the id

  Scenario: A diff names its plan as parent; a parent that is not stored is refused
    When I upload the artifact
      """
      {"kind": "plan", "content": "step 1: write the test"}
      """
    And I upload a diff whose parent is that artifact
    Then the answer is 201
    When I POST to "/v1/artifacts" the JSON
      """
      {"kind": "diff", "content": "+x",
       "parent": "sha256:0000000000000000000000000000000000000000000000000000000000000000"}
      """
    Then the answer is 400 with INVALID_PARAMS
    And the answer says "parent"

  Scenario: What is not an artifact gets the error envelope, and an unknown id a 404
    When I POST to "/v1/artifacts" the JSON
      """
      {"kind": "poem", "content": "roses are red"}
      """
    Then the answer is 400 with INVALID_PARAMS
    And the answer says "kind"
    When I GET "/v1/artifacts/sha256:1111111111111111111111111111111111111111111111111111111111111111"
    Then the answer is 404 with NOT_FOUND
    And 0 artifact files are stored

  Scenario: Every finished task leaves its transcript as a trace artifact
    Given pool "p1" is Ready
    When I drop a task "traced" in session "agent-7"
    Then task "traced" succeeds
    And task "traced" has a trace artifact ending with an end frame
    And the trace says pool "p1" and engine "sim"
