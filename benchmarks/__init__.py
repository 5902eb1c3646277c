"""Benchmarks of llama-orch home on the simulated workstation (`make bench`).

`python -m benchmarks` runs, each in a fresh temporary workspace with an in-process daemon
(`reconciler.daemon.Daemon`, real `sim` engine child processes, the simulated 24 GB + 12 GB
GPU pair), and stops the daemon cleanly afterwards:

- `converge`: config edit → every pool Ready, for 1, 8 and 32 pools; and a catalog swap
  (one pool of 8 changes model → that pool Ready again with the new spec).
- `intake`: 1,000 task files dropped into spool/incoming at once → every result written.
- `latency`: task file landing in incoming/ → its `started` frame, on an idle Ready replica.
- `calibration`: a bursty mixed workload → predicted start and on-time probability (from
  each task's `queued` frame) against what happened (mean absolute error, Brier score).

One table goes to stdout; every number, raw samples included, to bench-results/bench.json.
"""
