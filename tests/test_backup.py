"""`orchctl backup` and `orchctl restore`: a round trip taken while the daemon serves, the
manifest checked before anything is restored, and existing files never replaced silently."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from state import artifacts, backups, daemon_lock
from tests.conftest import Workspace, task, wait_for, wait_terminal
from tests.orchctl_support import orchctl

SAVED = ("results", "artifacts", "catalog")


@pytest.mark.slow
async def test_a_backup_taken_while_serving_restores_byte_for_byte(
    workspace: Workspace, serve: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    (workspace.root / "catalog").mkdir()
    (workspace.root / "catalog" / "m1.gguf").write_bytes(b"GGUF" * 1000)
    running = await serve()
    base = str(running.daemon.server.url)
    async with aiohttp.ClientSession() as session:
        plan = {"kind": "plan", "content": {"steps": [1, 2]}}
        async with session.post(f"{base}/v1/artifacts", json=plan) as response:
            assert response.status == 201
        async with session.post(f"{base}/v1/tasks", json=task("b1", max_tokens=4)) as response:
            assert response.status == 202
        await wait_terminal(workspace, "b1")
        async with session.post(f"{base}/v1/catalog/models/m1/verify") as response:
            assert response.status == 200
    await wait_for(lambda: len(list((workspace.root / "artifacts").glob("*.json"))) == 2)

    dest = tmp_path_factory.mktemp("bk") / "2026-05-02"
    ran = orchctl("backup", dest, "--config", workspace.config_path)  # the daemon still runs
    assert ran.code == 0, ran.err
    assert "backed up" in ran.out and "2 artifacts" in ran.out
    manifest = backups.Manifest.model_validate_json((dest / "manifest.json").read_bytes())
    listed = {f.path for f in manifest.files}
    assert {"results/b1.json", "results/b1.events.jsonl", "catalog/m1.gguf"} <= listed
    assert {"state/verifications.json", "orch/last-good.yaml"} <= listed
    for item in manifest.files:
        data = (dest / item.path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == item.sha256 and len(data) == item.size_bytes
    await running.stop()

    def local(logical: str) -> Path:
        root, _, rest = logical.partition("/")
        return workspace.root / {"state": ".orch", "orch": ".orch"}.get(root, root) / rest

    before = {item: local(item).read_bytes() for item in listed}
    times = {item: local(item).stat().st_mtime_ns for item in listed if item.startswith("results/")}
    for name in SAVED:
        shutil.rmtree(workspace.root / name)
    (workspace.root / ".orch" / "verifications.json").unlink()
    (workspace.root / ".orch" / "last-good.yaml").unlink()
    ran = orchctl("restore", dest, "--config", workspace.config_path)
    assert ran.code == 0, ran.err
    n = len(manifest.files)
    assert f"restored {n - 1} files" in ran.out and "1 already there" in ran.out  # .orch/*.json
    assert {item: local(item).read_bytes() for item in listed} == before
    # with their times too: `orchctl tasks` lists newest first by them
    assert {item: local(item).stat().st_mtime_ns for item in times} == times
    again = orchctl("restore", dest, "--config", workspace.config_path)
    assert again.code == 0 and "0 files" in again.out and "already there" in again.out
    # a daemon started since rewrote its record of orch.yaml (applied_at): no conflict
    record = workspace.root / ".orch" / "last-good.yaml.json"
    record.write_text(record.read_text() + " ")
    after_restart = orchctl("restore", dest, "--config", workspace.config_path)
    assert after_restart.code == 0, after_restart.err
    assert record.read_bytes() == before["orch/last-good.yaml.json"]


def _small_backup(workspace: Workspace, dest: Path) -> backups.Manifest:
    store = artifacts.ArtifactStore(workspace.root / "artifacts")
    store.put(artifacts.Artifact(kind="summary", content="all good"), created_at="t")
    (workspace.root / "results").mkdir(exist_ok=True)
    (workspace.root / "results" / "x.json").write_text('{"task_id": "x"}\n')
    (workspace.root / "results" / "x.events.jsonl").write_bytes(b'{"id": 1}\n{"id": 2, "ev')
    ran = orchctl("backup", dest, "--config", workspace.config_path)
    assert ran.code == 0, ran.err
    return backups.Manifest.model_validate_json((dest / "manifest.json").read_bytes())


def test_a_torn_last_line_of_an_event_log_is_left_out(workspace: Workspace, tmp_path: Path) -> None:
    _small_backup(workspace, tmp_path / "bk")
    assert (tmp_path / "bk" / "results" / "x.events.jsonl").read_bytes() == b'{"id": 1}\n'


def test_restore_never_replaces_a_different_file_without_force(
    workspace: Workspace, tmp_path: Path
) -> None:
    dest = tmp_path / "bk"
    _small_backup(workspace, dest)
    mine = workspace.root / "results" / "x.json"
    mine.write_text('{"task_id": "x", "edited": true}\n')
    (workspace.root / "results" / "x.events.jsonl").unlink()
    ran = orchctl("restore", dest, "--config", workspace.config_path)
    assert ran.code == 1 and "differs from the backup" in ran.err and "--force" in ran.err
    assert "edited" in mine.read_text()
    assert not (workspace.root / "results" / "x.events.jsonl").exists()  # nothing restored
    ran = orchctl("restore", dest, "--force", "--config", workspace.config_path)
    assert ran.code == 0 and "1 replaced" in ran.out
    assert mine.read_text() == '{"task_id": "x"}\n'


def test_a_damaged_backup_is_refused_before_anything_is_restored(
    workspace: Workspace, tmp_path: Path
) -> None:
    dest = tmp_path / "bk"
    _small_backup(workspace, dest)
    shutil.rmtree(workspace.root / "artifacts")
    (dest / "results" / "x.json").write_text('{"task_id": "evil"}\n')
    ran = orchctl("restore", dest, "--config", workspace.config_path)
    assert ran.code == 1 and "damaged" in ran.err and "results/x.json" in ran.err
    assert not (workspace.root / "artifacts").exists()


@pytest.mark.parametrize(
    "manifest",
    [
        None,
        "not json",
        {
            "format": 1,
            "created_at": "t",
            "source": "s",
            "version": "v",
            "files": [{"path": "../../etc/passwd", "size_bytes": 1, "sha256": "0" * 64}],
        },
    ],
)
def test_a_folder_that_is_not_a_backup_is_refused(
    workspace: Workspace, tmp_path: Path, manifest: Any
) -> None:
    dest = tmp_path / "bk"
    dest.mkdir()
    if manifest is not None:
        text = manifest if isinstance(manifest, str) else json.dumps(manifest)
        (dest / "manifest.json").write_text(text)
    ran = orchctl("restore", dest, "--config", workspace.config_path)
    assert ran.code == 2 and "manifest" in ran.err


@pytest.mark.parametrize(
    "planted",
    ["state/reload-pending.json", "state/sessions/s9.json", "state/drains.json", "orch/x.yaml"],
)
def test_a_manifest_naming_a_file_no_backup_holds_is_refused(
    workspace: Workspace, tmp_path: Path, planted: str
) -> None:
    """A backup holds only verifications.json of the state folder: a planted
    reload-pending.json, restored, would have the next daemon rewrite orch.yaml."""
    dest = tmp_path / "bk"
    _small_backup(workspace, dest)
    data = b'{"pool_id": "p1", "old": "", "new_sha256": ""}'
    (dest / planted).parent.mkdir(parents=True, exist_ok=True)
    (dest / planted).write_bytes(data)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["files"].append(
        {"path": planted, "size_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    )
    (dest / "manifest.json").write_text(json.dumps(manifest))
    ran = orchctl("restore", dest, "--config", workspace.config_path)
    assert ran.code == 2, ran.err
    assert f"{planted!r} is no file a backup holds" in ran.err, ran.err
    assert not (workspace.root / ".orch" / "reload-pending.json").exists()


def test_a_manifest_listing_a_file_twice_is_refused(workspace: Workspace, tmp_path: Path) -> None:
    dest = tmp_path / "bk"
    _small_backup(workspace, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["files"].append(manifest["files"][0])
    (dest / "manifest.json").write_text(json.dumps(manifest))
    ran = orchctl("restore", dest, "--config", workspace.config_path)
    assert ran.code == 2 and "is listed twice" in ran.err, ran.err


def test_backup_wants_an_empty_folder_and_restore_a_stopped_daemon(
    workspace: Workspace, tmp_path: Path
) -> None:
    dest = tmp_path / "bk"
    _small_backup(workspace, dest)
    ran = orchctl("backup", dest, "--config", workspace.config_path)
    assert ran.code == 2 and f"{dest} is not empty" in ran.err
    ran = orchctl("backup", workspace.config_path, "--config", workspace.config_path)
    assert ran.code == 2 and "orch.yaml is a file, not a folder" in ran.err, ran.err
    (workspace.root / ".orch").mkdir(exist_ok=True)
    lock = daemon_lock.acquire(workspace.root / ".orch", started_at="2026-01-01T00:00:00Z")
    try:
        ran = orchctl("restore", dest, "--config", workspace.config_path)
    finally:
        lock.release()
    assert ran.code == 1 and "stop the daemon" in ran.err


@pytest.mark.parametrize("inside", ["results/bk", "artifacts", "results/../results/x/y"])
def test_a_backup_into_a_folder_it_copies_is_refused_before_anything_is_written(
    workspace: Workspace, inside: str
) -> None:
    """It would copy itself into itself until the path is too long: gigabytes, in the live
    results folder."""
    results = workspace.root / "results"
    results.mkdir(exist_ok=True)
    (results / "r1.json").write_text("{}")
    (workspace.root / "artifacts").mkdir(exist_ok=True)
    before = sorted(p.relative_to(workspace.root) for p in workspace.root.rglob("*"))
    ran = orchctl("backup", workspace.root / inside, "--config", workspace.config_path)
    assert ran.code == 2, ran.err
    assert "which the backup copies (it would copy itself)" in ran.err
    assert sorted(p.relative_to(workspace.root) for p in workspace.root.rglob("*")) == before


@pytest.mark.parametrize("inside", ["spool/incoming/bk", "spool/tmp", "spool/done/x"])
def test_a_backup_into_the_spool_is_refused_before_anything_is_written(
    workspace: Workspace, inside: str
) -> None:
    """The daemon takes what appears in spool/incoming/ as task files: a backup written
    there was taken, refused and moved to spool/failed/ while it was being written."""
    for folder in ("spool/incoming", "spool/tmp", "results"):
        (workspace.root / folder).mkdir(parents=True, exist_ok=True)
    before = sorted(p.relative_to(workspace.root) for p in workspace.root.rglob("*"))
    ran = orchctl("backup", workspace.root / inside, "--config", workspace.config_path)
    assert ran.code == 2, ran.err
    assert "is inside the spool" in ran.err and "hint: back up into a folder outside" in ran.err
    assert sorted(p.relative_to(workspace.root) for p in workspace.root.rglob("*")) == before


def _plant(dest: Path, logical: str, data: bytes) -> None:
    """A file put into a backup with its line in the manifest, as an older backup had it."""
    (dest / logical).write_bytes(data)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["files"].append(
        {"path": logical, "size_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    )
    (dest / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("status", ["queued", "running"])
def test_a_task_still_live_is_left_out_of_a_backup_and_of_a_restore(
    workspace: Workspace, tmp_path: Path, status: str
) -> None:
    """A live task's result without its task file (the spool is not backed up) would say
    `queued` or `running` forever once restored: backup leaves it and its log out, and
    restore leaves out such a result a backup holds all the same."""
    results_dir = workspace.root / "results"
    results_dir.mkdir()
    live = json.dumps({"task_id": "live", "status": status}).encode()
    (results_dir / "live.json").write_bytes(live)
    (results_dir / "live.events.jsonl").write_bytes(b'{"id": 1}\n')
    dest = tmp_path / "bk"
    manifest = _small_backup(workspace, dest)
    listed = {f.path for f in manifest.files}
    assert "results/x.json" in listed and "results/x.events.jsonl" in listed
    assert not {"results/live.json", "results/live.events.jsonl"} & listed
    assert not (dest / "results" / "live.json").exists()

    _plant(dest, "results/live.json", live)
    _plant(dest, "results/live.events.jsonl", b'{"id": 1}\n')
    shutil.rmtree(results_dir)
    ran = orchctl("restore", dest, "--config", workspace.config_path)
    assert ran.code == 0, ran.err
    assert "left out 1 task(s) the backup shows queued or running" in ran.out, ran.out
    assert (results_dir / "x.json").exists()
    assert not (results_dir / "live.json").exists()
    assert not (results_dir / "live.events.jsonl").exists()


def test_a_restore_into_another_folder_keeps_that_folders_own_config_record(
    workspace: Workspace, tmp_path: Path
) -> None:
    """The backup's .orch/last-good.yaml is the record of another folder's orch.yaml (its
    spool, its bind): restored into a folder with an orch.yaml of its own, it became the
    config every verb falls back to there. Into a bare folder, restore says where the
    backup keeps the orch.yaml it was taken with."""
    (workspace.root / ".orch").mkdir(exist_ok=True)
    (workspace.root / ".orch" / "last-good.yaml").write_text("version: 1 # the source's\n")
    dest = tmp_path / "bk"
    _small_backup(workspace, dest)
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(workspace.config_path, other / "orch.yaml")
    ran = orchctl("restore", dest, "--config", other / "orch.yaml")
    assert ran.code == 0, ran.err
    assert (other / "results" / "x.json").is_file()
    assert not (other / ".orch" / "last-good.yaml").exists()
    bare = tmp_path / "bare"
    bare.mkdir()
    ran = orchctl("restore", dest, "--config", bare / "orch.yaml")
    assert ran.code == 2
    assert f"`cp {dest}/orch/last-good.yaml {bare}/orch.yaml`" in ran.err, ran.err
