Feature: The home reference smoke
  As the operator of the workstation, before tagging a release
  I want one command that walks the home checklist against the running daemon
  So that I know which promises hold on this box, and which could not be checked here

  Scenario: orchctl smoke passes on a simulated 24 GB + 12 GB pair and writes its two reports
    Given a workstation with a simulated 24 GB and a 12 GB GPU
    And a model file "big.gguf" holding "a model only the 24 GB card holds"
    And a model file "m1.gguf" holding "a small model"
    And this orch.yaml
      """
      version: 1
      gpus: {observer: simulated, inventory: inventory.yaml, reserve_mib: 512}
      queue: {capacity: 8, full_policy: reject}
      timeouts: {ready_s: 10, drain_s: 2, stop_grace_s: 2}
      models:
        big: {ref: "file:big.gguf", size_mib: 14000}
        m1: {ref: "file:m1.gguf", size_mib: 1000}
      pools:
        - {id: coder, engine: sim, model: big, devices: auto, ctx: 2048, slots: 2, sim: {tokens_per_s: 400, load_s: 0}}
        - {id: chat, engine: sim, model: m1, devices: auto, ctx: 2048, slots: 2, sim: {tokens_per_s: 400, load_s: 0}}
      """
    And the daemon is serving orch.yaml
    And pool "coder" is Ready
    And pool "chat" is Ready
    When I run "orchctl smoke --config orch.yaml --out smoke"
    Then the command exits with 0
    And its output contains "report: smoke"
    And "smoke/smoke_report.md" shows these checks
      | check                                          | result  |
      | a task streams (queued, started, tokens, end)  | passed  |
      | placement across mixed VRAM without pins       | passed  |
      | a cancel stops tokens                          | passed  |
      | a full queue answers 429                       | passed  |
      | catalog verify                                 | passed  |
      | artifact upload                                | passed  |
      | drain and reload                               | passed  |
      | determinism smoke                              | passed  |
      | policy hook and session budgets toggled        | not run |
    And "smoke/smoke_report.md" says "coder (big) on GPU 0, chat (m1) on GPU 1"
    And "smoke/environment.md" says "| 1 | SIMULATED NVIDIA GeForce RTX 3060 | 12288 MiB |"
    And "smoke/environment.md" says "- NVIDIA driver: none: the daemon runs simulated GPUs"
    And "smoke/determinism/determinism.md" says "verdict: **PASS**"
