"""`orchctl determinism` against a real daemon on the simulated 24 GB + 12 GB pair, and the
pure comparison underneath it (`reconciler.determinism`)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from reconciler import api_client, cli, determinism
from tests.conftest import Workspace, config, task, wait_terminal

# the corpus of the two-GPU run: a few seeds in `make test`, the full 64 in `make proof`
SEEDS = 64 if os.environ.get("ORCH_PROOF") else 6


def two_gpu_lanes(**sim: Any) -> dict[str, Any]:
    """The reference determinism layout: one model, pool A on GPU 0 and pool B on GPU 1,
    one slot each (OC-TEST-7002)."""
    options = {"tokens_per_s": 2000, "load_s": 0.0, "first_token_ms": 2} | sim
    pools = [
        {"id": pid, "engine": "sim", "model": "m1", "devices": [gpu], "replicas": 1,
         "ctx": 512, "slots": 1, "sim": dict(options)}
        for pid, gpu in (("lane-a", 0), ("lane-b", 1))
    ]  # fmt: skip
    return config(pools=pools)


async def orchctl(*argv: str) -> int:
    """The CLI in a thread: the daemon under test runs on this event loop."""
    return await asyncio.to_thread(cli.main, list(argv))


async def suite(running: Any, out: Path, *, seeds: int) -> tuple[int, dict[str, Any]]:
    """`orchctl determinism` against the daemon under test; its exit code and its JSON."""
    assert running.daemon.server is not None
    url = running.daemon.server.url
    code = await orchctl("determinism", "--url", url, "--seeds", str(seeds), "--out", str(out))
    return code, json.loads((out / "determinism.json").read_text())


async def test_the_suite_finds_both_gpus_byte_identical_and_writes_its_report(
    workspace: Workspace, serve: Any, tmp_path: Path, capsys: Any
) -> None:
    workspace.write_config(two_gpu_lanes())
    running = await serve()
    out = tmp_path / "report"
    code, data = await suite(running, out, seeds=SEEDS)
    said = capsys.readouterr()
    assert code == 0, said
    assert said.out.startswith(
        f"PASS: same replica {2 * SEEDS} matched, 0 differed; across replicas {SEEDS}"
    )
    print(said.out.strip())  # the summary line, shown by `make proof`
    assert data["passed"] and data["seeds"] == list(range(1001, 1001 + SEEDS))
    assert data["gpu_names"] == [
        "SIMULATED NVIDIA GeForce RTX 3060",
        "SIMULATED NVIDIA GeForce RTX 3090",
    ]
    assert data["engine_version"] and data["engine_version"].startswith("sim")
    assert [(p["a"], p["matched"], p["mismatched"]) for p in data["same_replica"]] == [
        ("lane-a-0", SEEDS, 0),
        ("lane-b-0", SEEDS, 0),
    ]
    [cross] = data["cross_replica"]
    assert (cross["a"], cross["b"], cross["matched"], cross["mismatched"]) == (
        "lane-a",
        "lane-b",
        SEEDS,
        0,
    )
    assert cross["gpus"] == [
        "GPU 0 SIMULATED NVIDIA GeForce RTX 3090",
        "GPU 1 SIMULATED NVIDIA GeForce RTX 3060",
    ]
    devices = {row["device"]: row for row in data["latency"]}
    assert set(devices) == set(cross["gpus"])
    for row in devices.values():
        assert row["n"] == 2 * SEEDS and row["first_token_ms"]["p50"] is not None
        assert row["tokens_per_s"]["p95"] > 0
    # different seeds gave different text on each lane
    assert data["distinct_streams_across_seeds"] == {"lane-a": SEEDS, "lane-b": SEEDS}
    markdown = (out / "determinism.md").read_text()
    assert "verdict: **PASS**" in markdown
    assert f"| lane-a-0 | GPU 0 SIMULATED NVIDIA GeForce RTX 3090 | {SEEDS} | 0 | — |" in markdown
    streams = [json.loads(line) for line in (out / "streams.ndjson").read_text().splitlines()]
    assert len(streams) == 4 * SEEDS and all(s["status"] == "succeeded" for s in streams)
    # the two lanes really ran at once: some task of B started before A's corpus ended
    results = {s["task_id"]: workspace.result(s["task_id"]) for s in streams}
    a_end = max(r["timings"]["finished_at"] for t, r in results.items() if "-lane-a-r1-" in t)
    b_start = min(r["timings"]["started_at"] for t, r in results.items() if "-lane-b-r1-" in t)
    assert b_start < a_end


async def test_a_replica_that_changes_its_stream_fails_the_suite_with_exit_1(
    workspace: Workspace, serve: Any, tmp_path: Path, capsys: Any, monkeypatch: Any
) -> None:
    """A replica whose second run differs from its first (as a server batching several
    sequences can) fails the suite: here lane B's second run is sent another prompt."""
    workspace.write_config(two_gpu_lanes())
    running = await serve()
    real_post = api_client.Client.post

    def post(self: api_client.Client, path: str, body: Any = None, **kw: Any) -> Any:
        if path == "/v1/tasks" and "-lane-b-r2-s1002" in body["task_id"]:
            body = body | {"prompt": body["prompt"] + " Then stop."}
        return real_post(self, path, body, **kw)

    monkeypatch.setattr(api_client.Client, "post", post)
    out = tmp_path / "report"
    code, data = await suite(running, out, seeds=3)
    said = capsys.readouterr()
    assert code == 1, said
    assert said.out.startswith("FAIL: replica lane-b-0 gave different streams for the same seed")
    by = {p["a"]: p for p in data["same_replica"]}
    assert (by["lane-a-0"]["mismatched"], by["lane-b-0"]["mismatched"]) == (0, 1)
    first = by["lane-b-0"]["first_divergence"]
    assert first["seed"] == 1002 and first["a"] != first["b"]
    assert "verdict: **FAIL**" in (out / "determinism.md").read_text()


async def test_no_daemon_is_exit_3(tmp_path: Path, capsys: Any) -> None:
    code = await orchctl("determinism", "--url", "http://127.0.0.1:9", "--seeds", "1")
    assert code == 3
    assert "cannot reach the daemon" in capsys.readouterr().err


# -- the pure comparison ----------------------------------------------------------------------


def _stream(lane: str, run: int, seed: int, tokens: list[str], **kw: Any) -> determinism.Stream:
    fields: dict[str, Any] = {
        "replica_id": f"{lane}-0",
        "gpu": f"GPU {lane}",
        "model": "m",
        "engine_version": "v1",
        "finish_reason": "length",
    } | kw
    return determinism.Stream(lane, run, seed, f"{lane}-{run}-{seed}", "succeeded",
                              tuple(tokens), **fields)  # fmt: skip


def test_the_first_diverging_token_is_named_with_both_texts() -> None:
    verdict = determinism.compare(
        [
            _stream("a", 1, 1, ["x", "y", "z"]),
            _stream("a", 2, 1, ["x", "y", "Z"]),
            _stream("b", 1, 1, ["x", "y"]),
            _stream("b", 2, 1, ["x", "y"]),
        ]
    )
    assert not verdict.passed
    same = {c.a: c for c in verdict.same}
    assert same["a-0"].first == determinism.Divergence(1, 2, "z", "Z")
    assert same["b-0"].mismatched == 0
    [cross] = verdict.cross
    assert cross.first == determinism.Divergence(1, 2, "z", None)
    assert cross.first.describe() == 'seed 1, token 2: "z" vs (end)'


def test_lanes_of_another_engine_version_are_not_compared() -> None:
    verdict = determinism.compare(
        [_stream("a", r, 1, ["x"]) for r in (1, 2)]
        + [_stream("b", r, 1, ["y"], engine_version="v2") for r in (1, 2)]
    )
    assert verdict.passed and verdict.cross == []


def test_a_failed_task_fails_the_suite() -> None:
    ok = _stream("a", 1, 1, ["x"])
    bad = determinism.Stream("a", 2, 1, "t", "failed", error="WORKER_RESET: died")
    verdict = determinism.compare([ok, bad])
    assert not verdict.passed and verdict.failed == [bad]


@given(st.lists(st.text(max_size=3), max_size=8), st.lists(st.text(max_size=3), max_size=8))
def test_streams_diverge_exactly_when_their_bytes_differ(a: list[str], b: list[str]) -> None:
    x, y = _stream("a", 1, 1, a), _stream("a", 2, 1, b)
    found = determinism.diverge(1, a, b)
    assert (found is None) == (x.canonical() == y.canonical())
    if found is not None:
        assert a[: found.index] == b[: found.index]


def test_percentiles_interpolate_between_ranks() -> None:
    assert determinism.percentile([10, 20, 30, 40], 50) == 25
    assert determinism.percentile([1.0], 95) == 1.0
    assert determinism.percentile([], 50) is None


async def test_every_replica_of_a_pool_runs_seeds_and_a_gpu_with_nothing_is_named(
    workspace: Workspace, serve: Any, tmp_path: Path, capsys: Any
) -> None:
    """A pool of two replicas (one slot each) on GPU 0, nothing on GPU 1: the seeds spread
    over both replicas, each seed's second run on the replica of its first; GPU 1 is named
    as not run, never counted as checked."""
    options = {"tokens_per_s": 2000, "load_s": 0.0, "first_token_ms": 2}
    pools = [
        {"id": "two", "engine": "sim", "model": "m1", "devices": [0], "replicas": 2,
         "ctx": 512, "slots": 1, "sim": options}
    ]  # fmt: skip
    workspace.write_config(config(pools=pools))
    running = await serve()
    code, data = await suite(running, tmp_path / "r", seeds=6)
    said = capsys.readouterr().out
    assert code == 0, said
    replicas = {p["a"] for p in data["same_replica"]}
    assert replicas == {"two-0", "two-1"}, data["same_replica"]
    assert sum(p["matched"] for p in data["same_replica"] + data["cross_replica"]) == 6
    assert data["not_run"] == ["GPU 1 SIMULATED NVIDIA GeForce RTX 3060 (no Ready replica there)"]
    assert "not run on (not checked): GPU 1" in said


def test_a_seed_whose_runs_landed_on_two_replicas_is_a_cross_replica_pair() -> None:
    def stream(run: int, replica: str, text: str) -> determinism.Stream:
        return determinism.Stream(
            lane="p", run=run, seed=7, task_id=f"t{run}", status="succeeded",
            tokens=(text,), replica_id=replica, gpu="GPU 0", model="m", engine_version="v",
        )  # fmt: skip

    verdict = determinism.compare([stream(1, "p-0", "a"), stream(2, "p-1", "b")])
    [pair] = verdict.cross
    assert (pair.a, pair.b, pair.matched, pair.mismatched) == ("p-0", "p-1", 0, 1)
    assert pair.first is not None and pair.first.seed == 7


async def test_bad_options_are_refused_before_anything_runs(tmp_path: Path, capsys: Any) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert await orchctl("determinism", "--url", "foo", "--seeds", "1") == 2
    assert "is not an http:// URL" in capsys.readouterr().err
    code = await orchctl(
        "determinism", "--url", "http://127.0.0.1:9", "--seeds", "1", "--out", str(afile)
    )
    assert code == 2 and "is a file, not a folder" in capsys.readouterr().err
    # a folder that cannot be made: said before the suite runs (no daemon is asked at all)
    under = afile / "sub"
    code = await orchctl("determinism", "--url", "http://127.0.0.1:9", "--out", str(under))
    assert code == 2 and "cannot take the report: Not a directory" in capsys.readouterr().err


async def test_the_default_report_folder_is_beside_orch_yaml_not_the_working_folder(
    workspace: Workspace, serve: Any, capsys: Any
) -> None:
    """Every command works on the folder of its --config: the report too (it went under
    whatever folder the command was run from)."""
    workspace.write_config(two_gpu_lanes())
    await serve()
    code = await orchctl("determinism", "--config", str(workspace.config_path), "--seeds", "1")
    said = capsys.readouterr().out
    assert code == 0, said
    written = Path(said.splitlines()[-1].removeprefix("report: "))
    assert written.resolve().is_relative_to((workspace.root / "proof" / "determinism").resolve())
    assert (written / "determinism.json").is_file()


async def test_a_daemon_that_wants_a_token_is_an_auth_refusal_not_no_daemon(
    workspace: Workspace, serve: Any, capsys: Any, monkeypatch: Any
) -> None:
    """A 401 comes from a daemon that answered: said as the token it wants, exit 2, with
    the error whole and the fix. Run on the folder (`--config`), the suite reads the token
    where the daemon does (auth.token_file) and runs."""
    monkeypatch.delenv("AUTH_TOKEN", raising=False)
    token = workspace.root / "api.token"
    token.write_text("0123456789abcdef0123456789abcdef\n")
    token.chmod(0o600)
    cfg = two_gpu_lanes()
    cfg["auth"] = {"token_file": "api.token", "optional_on_loopback": False}
    workspace.write_config(cfg)
    running = await serve()
    assert running.daemon.server is not None
    url = running.daemon.server.url
    code = await orchctl(
        "determinism", "--url", url, "--seeds", "1", "--out", str(workspace.root / "o1")
    )
    said = capsys.readouterr().err
    assert code == 2, said
    assert "refused no token: 401 MISSING_TOKEN: " in said and "$AUTH_TOKEN" in said, said
    code = await orchctl(
        "determinism", "--config", str(workspace.config_path), "--seeds", "1",
        "--out", str(workspace.root / "o2"),
    )  # fmt: skip
    assert code == 0, capsys.readouterr()


async def test_a_prompt_gives_the_same_text_on_a_cold_slot_and_on_a_warm_one(
    workspace: Workspace, serve: Any
) -> None:
    """The task contract: same seed + prompt, same text, retries too. An engine that serves
    the prompt's start from its slot's KV cache evaluates the rest in other batch shapes, and
    with temperature > 0 samples other text (llama-server does; so does the sim): a lone
    prompt task is sent without `cache_prompt`, so its first run (a fresh slot) and its
    repeats (a slot that holds it) agree. A session's turns do reuse the cache."""
    workspace.write_config(two_gpu_lanes())
    await serve()
    same = {"prompt": "the cat sat", "seed": 7, "max_tokens": 12, "sampling": {"temperature": 0.9}}
    texts = []
    for i in range(3):  # one at a time on one slot: the first cold, then warm
        workspace.submit(f"d{i}.task.yaml", task(f"d{i}", pool="lane-a", **same))
        result = await wait_terminal(workspace, f"d{i}")
        assert result["status"] == "succeeded" and result["replica_id"] == "lane-a-0"
        texts.append(result["text"])
    assert texts[0] == texts[1] == texts[2] and texts[0]
    turns = []
    for i in range(2):  # a session's second turn runs warm
        name = f"s{i}"
        workspace.submit(f"{name}.task.yaml", task(name, pool="lane-a", session_id="conv", **same))
        turns.append((await wait_terminal(workspace, name))["text"])
    assert turns[1] != texts[0]
