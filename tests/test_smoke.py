"""`orchctl smoke` against a real daemon on the simulated workstation: every check of the home
checklist over HTTP, the two report files, and the exit code when a check fails or cannot run."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from reconciler import api_client, cli
from tests.conftest import INVENTORY, Workspace, config, wait_for

SIM = {"tokens_per_s": 400, "load_s": 0.0, "first_token_ms": 2}


def mixed_vram(**overrides: Any) -> dict[str, Any]:
    """A model only the 24 GB card holds and a small one, both `devices: auto`: the daemon
    places the big one on GPU 0 and the small one where most VRAM is left, GPU 1."""
    models = {
        "big": {"ref": "file:big.gguf", "size_mib": 14000},
        "m1": {"ref": "file:m1.gguf", "size_mib": 1000},
    }
    pools = [
        {"id": pid, "engine": "sim", "model": model, "devices": "auto", "replicas": 1,
         "ctx": 2048, "slots": 2, "sim": dict(SIM)}
        for pid, model in (("coder", "big"), ("chat", "m1"))
    ]  # fmt: skip
    return config(models=models, pools=pools) | overrides


async def orchctl(*argv: str) -> int:
    return await asyncio.to_thread(cli.main, list(argv))


def rows(report: str) -> dict[str, tuple[str, str]]:
    """smoke_report.md's table: check → (result, what was seen)."""
    found = {}
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        if len(cells) == 4 and cells[1] in ("passed", "failed", "not run"):
            found[cells[0]] = (cells[1], cells[3])
    return found


async def test_the_whole_checklist_passes_on_the_simulated_pair(
    workspace: Workspace, serve: Any, tmp_path: Path, capsys: Any
) -> None:
    (workspace.root / "m1.gguf").write_bytes(b"small model")
    (workspace.root / "big.gguf").write_bytes(b"big model")
    workspace.write_config(mixed_vram())
    running = await serve()
    assert running.daemon.server is not None
    out = tmp_path / "smoke"
    code = await orchctl("smoke", "--url", running.daemon.server.url, "--out", str(out))
    said = capsys.readouterr()
    assert code == 0, said.out + said.err
    found = rows((out / "smoke_report.md").read_text())
    assert list(found) == [
        "a task streams (queued, started, tokens, end)",
        "placement across mixed VRAM without pins",
        "a cancel stops tokens",
        "a full queue answers 429",
        "catalog verify",
        "artifact upload",
        "drain and reload",
        "determinism smoke",
        "policy hook and session budgets toggled",
    ]
    assert {name: r for name, (r, _) in found.items()} == {
        **{name: "passed" for name in found},
        "policy hook and session budgets toggled": "not run",
    }, found
    seen = {name: detail for name, (_, detail) in found.items()}
    assert (
        "coder (big) on GPU 0, chat (m1) on GPU 1"
        in seen["placement across mixed VRAM without pins"]
    )
    assert (
        "GPU 0 SIMULATED NVIDIA GeForce RTX 3090: coder"
        in seen["placement across mixed VRAM without pins"]
    )
    assert (
        "GPU 1 SIMULATED NVIDIA GeForce RTX 3060: chat"
        in seen["placement across mixed VRAM without pins"]
    )
    assert "got 429 ADMISSION_REJECT, Retry-After" in seen["a full queue answers 429"]
    assert seen["catalog verify"].startswith("verified 2 model file(s): big warn in ")
    assert "a pinned task got 503 POOL_UNAVAILABLE" in seen["drain and reload"]
    assert "same replica 8 matched, 0 differed" in seen["determinism smoke"]
    assert "no policy hook" in seen["policy hook and session budgets toggled"]
    assert (
        "verdict: **PASS**: 8 passed, 0 failed, 1 not run" in (out / "smoke_report.md").read_text()
    )
    assert (
        "[determinism/determinism.md](determinism/determinism.md)"
        in (out / "smoke_report.md").read_text()
    )
    det = json.loads((out / "determinism" / "determinism.json").read_text())
    lanes = {lane["pool_id"]: lane for lane in det["lanes"]}
    # no digest is pinned in orch.yaml: the one the catalog verify measured is reported
    assert lanes["chat"]["model_digest"] == "sha256:" + hashlib.sha256(b"small model").hexdigest()
    assert lanes["chat"]["model_digest_source"] == "measured by the last catalog verify"

    env = (out / "environment.md").read_text()
    assert "| 0 | SIMULATED NVIDIA GeForce RTX 3090 | 24576 MiB |" in env
    assert "| 1 | SIMULATED NVIDIA GeForce RTX 3060 | 12288 MiB |" in env
    assert "- NVIDIA driver: none: the daemon runs simulated GPUs" in env
    assert "- kernel: Linux " in env and "- OS: " in env and "unknown: no /etc" not in env
    assert "- coder: engine sim sim-" in env
    # the smoke leaves no task behind: the queue it filled was canceled (status.json shows it
    # by the next pass, at most PASS_AFTER_END_S after the last task's end)
    await wait_for(
        lambda: (q := workspace.status()["queue"])["depth"] == 0 and q["running"] == 0,
        2,
        "an empty queue and nothing running in status.json",
    )


async def test_a_failed_check_is_exit_1_and_what_cannot_run_is_named(
    workspace: Workspace, serve: Any, tmp_path: Path, capsys: Any, monkeypatch: Any
) -> None:
    """One GPU (no mixed VRAM to place on), a spare model file that does not match its pinned
    digest (catalog verify fails), and a daemon that offers no artifact routes."""
    (workspace.root / "inventory.yaml").write_text(yaml.safe_dump({"gpus": INVENTORY["gpus"][:1]}))
    (workspace.root / "spare.gguf").write_bytes(b"not what was pinned")
    cfg = config(queue={"capacity": 4, "full_policy": "reject"})
    cfg["models"]["spare"] = {
        "ref": "file:spare.gguf",
        "digest": "sha256:" + hashlib.sha256(b"the real file").hexdigest(),
    }
    workspace.write_config(cfg)
    running = await serve()
    assert running.daemon.server is not None
    real_offered = api_client.Client.offered

    def offered(self: api_client.Client) -> set[tuple[str, str]] | None:
        routes = real_offered(self)
        assert routes is not None and ("POST", "/v1/artifacts") in routes
        return {r for r in routes if not r[1].startswith("/v1/artifacts")}

    monkeypatch.setattr(api_client.Client, "offered", offered)
    out = tmp_path / "smoke"
    code = await orchctl("smoke", "--url", running.daemon.server.url, "--out", str(out))
    said = capsys.readouterr()
    assert code == 1, said.out + said.err
    report = (out / "smoke_report.md").read_text()
    found = rows(report)
    assert found["catalog verify"][0] == "failed"
    assert found["catalog verify"][1].startswith("spare: ")
    assert found["placement across mixed VRAM without pins"] == (
        "not run",
        "the daemon shows 1 GPU(s) of 1 size(s); mixed-VRAM placement needs GPUs of two sizes",
    )
    assert found["artifact upload"] == ("not run", "the daemon does not offer POST /v1/artifacts")
    for name in ("a task streams (queued, started, tokens, end)", "a cancel stops tokens"):
        assert found[name][0] == "passed", found[name]
    assert found["a full queue answers 429"][0] == "passed"
    assert "verdict: **FAIL**" in report
    assert "FAILED   catalog verify: spare: " in said.out
    # a stale bundle from an earlier run in this folder is never linked as this run's
    (out / "determinism").mkdir(exist_ok=True)
    (out / "determinism" / "determinism.json").write_text('{"run_id": "an-earlier-run"}')
    from reconciler import cli_smoke, smoke_harness

    assert not cli_smoke._bundle_of_this_run(
        smoke_harness.Smoke(api_client.Client(running.daemon.server.url), "now", out)
    )


async def test_a_model_that_ends_its_answers_early_leaves_cancel_and_429_not_run(
    workspace: Workspace, serve: Any, tmp_path: Path, capsys: Any, monkeypatch: Any
) -> None:
    """A real small model stops on its own (EOS) within milliseconds: the cancel arrives
    after the end, and no queue fills. That is not the daemon failing: both checks say so
    as not run, with the reason, never FAILED."""
    from reconciler import smoke_harness

    workspace.write_config(config(queue={"capacity": 4, "full_policy": "reject"}))
    running = await serve()
    assert running.daemon.server is not None
    real_task = smoke_harness.Smoke.task

    def ends_at_once(self: Any, label: str, model: str, **fields: Any) -> dict[str, Any]:
        body = real_task(self, label, model, **fields)
        if label in ("cancel", "fill"):
            body["stop"] = [" "]  # the sim's every word starts with one: it ends at once
        return body

    monkeypatch.setattr(smoke_harness.Smoke, "task", ends_at_once)
    out = tmp_path / "smoke"
    await orchctl("smoke", "--url", running.daemon.server.url, "--out", str(out))
    said = capsys.readouterr()
    found = rows((out / "smoke_report.md").read_text())
    cancel = found["a cancel stops tokens"]
    assert cancel[0] == "not run", cancel
    assert "ended each of 3 tasks on its own before the cancel reached it" in cancel[1]
    full = found["a full queue answers 429"]
    assert full[0] == "not run" and "the queue never filled" in full[1], full
    assert "FAILED   a cancel" not in said.out and "FAILED   a full queue" not in said.out


async def test_no_daemon_is_exit_3_and_writes_nothing(tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "smoke"
    code = await orchctl("smoke", "--url", "http://127.0.0.1:9", "--out", str(out))
    assert code == 3 and not out.exists()
    assert "cannot reach the daemon" in capsys.readouterr().err


async def test_an_out_folder_that_cannot_be_written_is_refused_before_anything_runs(
    tmp_path: Path, capsys: Any
) -> None:
    (tmp_path / "afile").write_text("x")
    code = await orchctl(
        "smoke", "--url", "http://127.0.0.1:9", "--out", str(tmp_path / "afile" / "x")
    )
    assert code == 2  # not 3: the folder is checked before the daemon is asked
    assert "cannot take the report: Not a directory" in capsys.readouterr().err


async def test_the_drain_check_takes_an_idle_pool_and_ends_no_users_task(
    workspace: Workspace, serve: Any, tmp_path: Path, capsys: Any
) -> None:
    """A user's long task runs on `coder` while the smoke runs: the drain-and-reload check
    drains the idle pool, and the user's task ends as it would have."""
    cfg = mixed_vram()
    cfg["pools"][0]["sim"] = dict(SIM, tokens_per_s=50)
    workspace.write_config(cfg)
    running = await serve()
    assert running.daemon.server is not None
    from tests.conftest import task, wait_terminal

    workspace.submit("user.task.yaml", task("user", model="big", max_tokens=400))
    await wait_for(lambda: (workspace.result("user") or {}).get("status") == "running", 10, "u")
    out = tmp_path / "smoke"
    await orchctl("smoke", "--url", running.daemon.server.url, "--out", str(out))
    capsys.readouterr()
    found = rows((out / "smoke_report.md").read_text())
    result, seen = found["drain and reload"]
    assert result == "passed" and seen.startswith("drained chat "), seen
    assert (await wait_terminal(workspace, "user", 30))["status"] == "succeeded"


async def test_placement_that_put_everything_on_one_gpu_is_not_reported_as_passed(
    workspace: Workspace, serve: Any, tmp_path: Path, capsys: Any
) -> None:
    cfg = mixed_vram()
    for pool in cfg["pools"]:
        pool["devices"] = [0]
    workspace.write_config(cfg)
    running = await serve()
    assert running.daemon.server is not None
    out = tmp_path / "smoke"
    await orchctl("smoke", "--url", running.daemon.server.url, "--out", str(out))
    capsys.readouterr()
    result, seen = rows((out / "smoke_report.md").read_text())[
        "placement across mixed VRAM without pins"
    ]
    assert result == "not run" and seen.startswith("every Ready replica is on GPU 0"), seen
