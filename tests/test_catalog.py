"""The model catalog: listing the models of orch.yaml with their files, verifying a file
against its declared digest, and a failed check blocking admission until it passes or the
digest is fixed (through a real socket, and the pure rules underneath)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from plugins import resolvers
from reconciler import admission, cataloging, clocks
from state import desired, tasks, verifications
from state.errors import ErrorCode
from tests.conftest import Workspace, config, task, wait_for, wait_terminal

GOOD = b"GGUF weights, version 1"
DIGEST = "sha256:" + hashlib.sha256(GOOD).hexdigest()


def _record(status: verifications.Outcome, **fields: Any) -> verifications.Verification:
    values: dict[str, Any] = {
        "model": "m1",
        "ref": "file:m1.gguf",
        "path": "/x/m1.gguf",
        "declared_digest": DIGEST,
        "actual_digest": "sha256:" + "1" * 64,
        "status": status,
        "message": "m1.gguf has another digest",
        "checked_at": "2026-01-01T00:00:00Z",
    }
    return verifications.Verification.model_validate(values | fields)


def _models(**m1: Any) -> dict[str, desired.ModelSpec]:
    return {"m1": desired.ModelSpec.model_validate({"ref": "file:m1.gguf", "digest": DIGEST} | m1)}


def test_a_failed_check_blocks_only_while_the_model_is_declared_as_it_was_checked() -> None:
    book = verifications.VerificationBook(models={"m1": _record("fail")})
    assert set(verifications.blocking(book, _models())) == {"m1"}
    assert not verifications.blocking(book, _models(digest="sha256:" + "2" * 64))  # digest fixed
    assert not verifications.blocking(book, _models(ref="file:m1-v2.gguf"))  # another file
    assert not verifications.blocking(book, {})  # the model was removed
    for status in ("pass", "warn"):
        ok = verifications.VerificationBook(models={"m1": _record(status)})
        assert not verifications.blocking(ok, _models())


def test_a_failed_check_no_longer_blocks_once_another_file_is_in_its_place(
    tmp_path: Path,
) -> None:
    """The daemon downloaded the file again (or the user put the right one back): the
    failure was of the old file, and a pinned digest is checked again at every start. A
    file gone is no other file: the failure stands until one is there."""
    bad = tmp_path / "m1.gguf"
    bad.write_bytes(b"GGUF weights, bit-rotted")
    record = _record(
        "fail", path=str(bad), file_id=verifications.file_id(bad.stat()), size_bytes=24
    )
    book = verifications.VerificationBook(models={"m1": record})
    assert set(verifications.blocking(book, _models())) == {"m1"}
    bad.unlink()
    assert set(verifications.blocking(book, _models())) == {"m1"}  # gone: still blocked
    fresh = tmp_path / "m1.gguf.part"
    fresh.write_bytes(GOOD)
    fresh.rename(bad)  # a download finished
    assert not verifications.blocking(book, _models())


def test_admission_refuses_a_blocked_model_with_untrusted_artifact() -> None:
    state = desired.DesiredState.model_validate(config())
    target = admission.Target("m1", None)  # type: ignore[arg-type]
    views = {"p1": admission.PoolView("p1", "m1", "Ready", None, 2048, None)}
    one = tasks.TaskFile.model_validate(task("t"))
    assert admission.check(one, target, state=state, pools=views, blocked={}) is None
    refused = admission.check(one, target, state=state, pools=views, blocked={"m1": "bad file"})
    assert refused is not None and refused.code == ErrorCode.UNTRUSTED_ARTIFACT
    assert "bad file" in refused.message and "/v1/catalog/models/m1/verify" in refused.hint


def test_a_damaged_records_file_is_said_lost_not_silently_emptied(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = verifications.path_in(tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"models": {"m1": ')  # cut short: a fail record that blocked m1
    caplog.set_level("WARNING", logger="llama_orch")
    found = {"file": resolvers.FileResolver()}
    catalog = cataloging.Catalog.open(tmp_path, found, clocks.RealClock())
    assert catalog.book.models == {}
    lost = [r for r in caplog.records if getattr(r, "orch_event", "") == "catalog.records_lost"]
    assert len(lost) == 1 and str(path) in lost[0].getMessage()
    assert "verify the models again" in lost[0].getMessage()


async def test_records_survive_a_restart(tmp_path: Path) -> None:
    (tmp_path / "m1.gguf").write_bytes(b"rotten")
    state = desired.DesiredState.model_validate(
        config(models={"m1": {"ref": "file:m1.gguf", "digest": DIGEST}})
    )
    found = {"file": resolvers.FileResolver()}
    catalog = cataloging.Catalog.open(tmp_path / ".orch", found, clocks.RealClock())
    record = await catalog.verify("m1", state, tmp_path)
    assert record.status == "fail" and record.actual_digest != DIGEST
    again = cataloging.Catalog.open(tmp_path / ".orch", found, clocks.RealClock())
    assert "has digest" in again.blocked(state)["m1"]


# -- over HTTP -------------------------------------------------------------------------------


def _url(running: Any) -> str:
    return str(running.daemon.server.url)


@pytest.mark.slow
async def test_listing_shows_every_model_with_its_file_and_last_check(
    workspace: Workspace, serve: Any
) -> None:
    (workspace.root / "m1.gguf").write_bytes(GOOD)
    base = _url(await serve())
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/v1/catalog/models") as response:
            assert response.status == 200
            listed = await response.json()
        rows = {m["id"]: m for m in listed["models"]}
        assert set(rows) == {"m1", "old"}
        m1 = rows["m1"]
        assert m1["ref"] == "file:m1.gguf" and m1["exists"] and m1["size_bytes"] == len(GOOD)
        assert m1["local_path"] == str(workspace.root / "m1.gguf") and m1["pools"] == ["p1"]
        assert m1["last_verification"] is None and not m1["blocked"]
        assert rows["old"]["state"] == "Retired" and not rows["old"]["exists"]
        async with session.post(f"{base}/v1/catalog/models/m1/verify") as response:
            assert response.status == 200
            record = await response.json()
        assert record["status"] == "warn" and "no digest" in record["message"]
        assert record["actual_digest"] == DIGEST and not record["blocked"]
        async with session.get(f"{base}/v1/catalog/models/m1") as response:
            assert (await response.json())["last_verification"]["status"] == "warn"
        async with session.post(f"{base}/v1/catalog/models/old/verify") as response:
            record = await response.json()
        assert record["status"] == "fail" and "does not exist" in record["message"]
        for path, status, code in [
            ("/v1/catalog/models/nope/verify", 404, "MODEL_UNKNOWN"),
            ("/v1/catalog/models/nope", 404, "MODEL_UNKNOWN"),
            ("/v1/catalog/models/a..b/verify", 400, "INVALID_PARAMS"),
        ]:
            method = "POST" if path.endswith("verify") else "GET"
            async with session.request(method, base + path) as response:
                assert response.status == status and (await response.json())["code"] == code


async def test_a_verification_is_not_current_once_its_file_was_replaced_or_rewritten(
    workspace: Workspace, serve: Any
) -> None:
    """A record names the digest of the file it read: once another file is there (renamed
    over it, or written in place, even at the same size), the digest shown is not the served
    file's, and `orchctl determinism` must not attribute streams to it."""
    model = workspace.root / "m1.gguf"
    model.write_bytes(GOOD)
    base = _url(await serve())

    async def current() -> bool:
        async with session.get(f"{base}/v1/catalog/models/m1") as response:
            return bool((await response.json())["verification_current"])

    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/v1/catalog/models/m1/verify") as response:
            assert (await response.json())["actual_digest"] == DIGEST
        assert await current()
        other = workspace.root / "m1.gguf.new"
        other.write_bytes(GOOD.replace(b"1", b"2"))  # the same size, other bytes
        other.replace(model)
        assert not await current()
        async with session.post(f"{base}/v1/catalog/models/m1/verify") as response:
            assert response.status == 200
        assert await current()
        with model.open("r+b") as f:  # rewritten in place
            f.write(b"X")
        assert not await current()


async def test_a_file_that_is_no_gguf_fails_the_verify_of_a_model_llama_server_loads(
    workspace: Workspace, serve: Any
) -> None:
    """A verify that said `warn` (no digest) of a text file left the user thinking it would
    do, while its llamacpp pool failed to load it; the sim's stub files are still fine."""
    cfg = config()
    cfg["models"]["text"] = {"ref": "file:text.gguf", "size_mib": 100}
    cfg["pools"].append({"id": "real", "engine": "llamacpp", "model": "text", "devices": [1]})
    workspace.write_config(cfg)
    (workspace.root / "text.gguf").write_text("not a gguf\n")
    (workspace.root / "m1.gguf").write_text("a sim stub\n")
    running = await serve(ready=False)  # pool real cannot start here: no llama-server
    await wait_for(lambda: running.daemon.server is not None, 10, "the HTTP face")
    base = _url(running)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/v1/catalog/models/text/verify") as response:
            record = await response.json()
        async with session.post(f"{base}/v1/catalog/models/m1/verify") as response:
            stub = await response.json()
    assert record["status"] == "fail" and "is not a GGUF file" in record["message"], record
    assert "pool real (llamacpp) cannot load it" in record["message"]
    assert stub["status"] == "warn", stub


@pytest.mark.slow
async def test_a_mismatch_blocks_admission_until_a_verify_passes(
    workspace: Workspace, serve: Any
) -> None:
    model_file = workspace.root / "m1.gguf"
    model_file.write_bytes(GOOD)
    workspace.write_config(config(models={"m1": {"ref": "file:m1.gguf", "digest": DIGEST}}))
    base = _url(await serve())
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/v1/catalog/models/m1/verify") as response:
            assert (await response.json())["status"] == "pass"
        async with session.post(f"{base}/v1/tasks", json=task("before")) as response:
            assert response.status == 202
        model_file.write_bytes(b"GGUF weights, bit-rotted")  # the file changes under us
        async with session.post(f"{base}/v1/catalog/models/m1/verify") as response:
            record = await response.json()
        assert record["status"] == "fail" and record["blocked"]
        assert DIGEST in record["message"] and record["actual_digest"] != DIGEST
        async with session.post(f"{base}/v1/tasks", json=task("blocked")) as response:
            refused = await response.json()
            assert response.status == 400 and refused["code"] == "UNTRUSTED_ARTIFACT"
        assert "failed verification" in refused["message"] and "verify" in refused["hint"]
        assert workspace.result("blocked")["status"] == "rejected"  # type: ignore[index]
        async with session.get(f"{base}/v1/catalog/models/m1") as response:
            assert (await response.json())["blocked"] is True
        # a blocked model does not look ready anywhere: its pool's reason says why
        await wait_for(
            lambda: "tasks refused (UNTRUSTED_ARTIFACT)" in (_pool_reason(workspace) or ""), 10
        )
        async with session.get(f"{base}/v1/models") as response:
            assert (await response.json())["data"][0]["ready"] is False
        model_file.write_bytes(GOOD)
        async with session.post(f"{base}/v1/catalog/models/m1/verify") as response:
            record = await response.json()
        assert record["status"] == "pass" and not record["blocked"]
        async with session.post(f"{base}/v1/tasks", json=task("after")) as response:
            assert response.status == 202
        async with session.get(f"{base}/v1/models") as response:
            assert (await response.json())["data"][0]["ready"] is True
    await wait_for(lambda: _pool_reason(workspace) is None, 10, "the reason cleared")
    saved = verifications.load(workspace.root / ".orch" / "verifications.json")
    assert saved.models["m1"].status == "pass"


async def test_a_replica_that_gave_up_on_a_bad_file_starts_again_once_it_verifies(
    workspace: Workspace, serve: Any
) -> None:
    """The hint says: put the right file in place, then verify. Doing so brings a pool whose
    replica refused the damaged file (Failed, UNTRUSTED_ARTIFACT) back, without a restart."""
    model_file = workspace.root / "m1.gguf"
    model_file.write_bytes(b"GGUF weights, bit-rotted")
    workspace.write_config(config(models={"m1": {"ref": "file:m1.gguf", "digest": DIGEST}}))
    running = await serve(ready=False)
    await wait_for(lambda: _pool_state(workspace) == "Failed", 10, "p1 Failed")
    async with aiohttp.ClientSession() as session:
        (workspace.root / "folder.gguf").mkdir()
        model_file.unlink()
        model_file.symlink_to(workspace.root / "folder.gguf")
        url = f"{_url(running)}/v1/catalog/models/m1/verify"
        async with session.post(url) as response:
            record = await response.json()
        assert record["status"] == "fail" and "is a folder, not a model file" in record["message"]
        model_file.unlink()
        model_file.write_bytes(GOOD)
        async with session.post(url) as response:
            assert (await response.json())["status"] == "pass"
    await wait_for(lambda: _pool_state(workspace) == "Ready", 10, "p1 Ready again")
    workspace.submit("back.task.yaml", task("back"))
    assert (await wait_terminal(workspace, "back"))["status"] == "succeeded"


def _pool_state(ws: Workspace) -> str:
    state: str = ws.status()["pools"][0]["state"]
    return state


def _pool_reason(ws: Workspace) -> str | None:
    reason: str | None = ws.status()["pools"][0]["reason"]
    return reason
