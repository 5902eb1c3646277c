Feature: Catalog flows
  As an operator who keeps model files on the workstation
  I want to see every model with its file, check files against their digests, and swap or
  drain a pool over HTTP
  So that a corrupted file is never served, and a swap that fails undoes itself

  Background:
    Given a workstation with a simulated 24 GB and a 12 GB GPU
    And a model file "m1.gguf" holding "weights v1"
    And a model file "m2.gguf" holding "other weights"
    And this orch.yaml
      """
      # The BDD workstation. The daemon may edit this file on reload: keep the comments.
      version: 1
      gpus: {observer: simulated, inventory: inventory.yaml, reserve_mib: 512}
      queue: {capacity: 16, full_policy: reject}
      timeouts: {ready_s: 10, drain_s: 2, stop_grace_s: 2}
      models:
        m1:
          ref: "file:m1.gguf"    # pinned: the daemon checks the file before serving it
          digest: sha256:88eaddfe1f4c7f1f59dd7b69ec68696897f48f92e00e4f49b564818268b33e80
          size_mib: 1000
        m2:
          ref: file:m2.gguf      # not pinned
          size_mib: 1000
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
          slots: 2
          sim: {tokens_per_s: 400, load_s: 0}
      """
    And the daemon is serving orch.yaml
    And pool "p1" is Ready
    And pool "p2" is Ready

  Scenario: The catalog lists every model with its file, and a verify checks the digest
    Then the catalog lists model "m1" with its file of 11 bytes
    When I verify model "m1"
    Then the verification is "pass"
    When I verify model "m2"
    Then the verification is "warn"
    And the answer says "proceeding with warnings"

  Scenario: A model file that no longer matches its digest is refused until it matches again
    When the model file "m1.gguf" now holds "weights v1, bit-rotted"
    And I verify model "m1"
    Then the verification is "fail"
    When I POST a task "refused" for model "m1"
    Then the answer is 400 with UNTRUSTED_ARTIFACT
    And the answer says "failed verification"
    And task "refused" is rejected with UNTRUSTED_ARTIFACT
    When I POST a task "other-model" for model "m2"
    Then the answer is 202
    When the model file "m1.gguf" now holds "weights v1"
    And I verify model "m1"
    Then the verification is "pass"
    When I POST a task "trusted-again" for model "m1"
    Then the answer is 202
    And task "trusted-again" succeeds

  Scenario: A reload swaps a pool onto another file by editing one line of orch.yaml
    Given a model file "m2-v2.gguf" holding "newer weights"
    And I keep a copy of orch.yaml
    When I POST to "/v1/pools/p2/reload" the JSON
      """
      {"model_ref": "file:m2-v2.gguf"}
      """
    Then the answer is 200
    And the answer's "model_ref" is "file:m2-v2.gguf"
    And orch.yaml differs from the copy only in the line with "file:m2-v2.gguf"
    And pool "p2" is Ready
    When I POST a task "on-v2" for model "m2"
    Then task "on-v2" succeeds

  Scenario: A reload onto a file that does not match the pinned digest is rolled back
    Given a model file "impostor.gguf" holding "not the pinned weights"
    And I keep a copy of orch.yaml
    When I POST to "/v1/pools/p1/reload" the JSON
      """
      {"model_ref": "file:impostor.gguf"}
      """
    Then the answer is 409 with RELOAD_FAILED
    And the answer says "restored byte for byte"
    And orch.yaml is byte for byte the copy
    And pool "p1" becomes Ready

  Scenario: A drained pool refuses work until it is reloaded
    When I POST to "/v1/pools/p1/drain" the JSON
      """
      {"deadline_ms": 500}
      """
    Then the answer is 202
    And pool "p1" is drained
    When I POST a task "while-drained" for model "m1"
    Then the answer is 503 with POOL_UNAVAILABLE
    And the answer says "drained on request"
    When I POST to "/v1/pools/p1/reload"
    Then the answer is 200
    And pool "p1" is Ready
    When I POST a task "back" for model "m1"
    Then task "back" succeeds
