"""The artifact registry: content-addressed ids, idempotent stores that never rewrite a file,
the HTTP routes through a real socket, and the trace every finished task leaves behind."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import threading
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from state import artifacts
from tests.conftest import Workspace, config, task, wait_for, wait_terminal

PLAN: dict[str, Any] = {
    "kind": "plan",
    "content": {"steps": ["read the bug", "write the fix"], "é": 1.5},
    "tags": ["agent-7"],
    "metadata": {"repo": "demo"},
}


def _doc(**fields: Any) -> artifacts.Artifact:
    return artifacts.Artifact.model_validate(PLAN | fields)


def test_the_id_is_the_sha256_of_the_canonical_document_with_defaults_filled_in() -> None:
    short = artifacts.Artifact.model_validate({"kind": "other", "content": [1, "a"]})
    spelled = artifacts.Artifact.model_validate(
        {"metadata": {}, "parent": None, "tags": [], "content": [1, "a"], "kind": "other"}
    )
    data = artifacts.canonical(short)
    assert data == artifacts.canonical(spelled)
    assert data == b'{"content":[1,"a"],"kind":"other","metadata":{},"parent":null,"tags":[]}'
    assert artifacts.id_of(data) == "sha256:" + hashlib.sha256(data).hexdigest()


def test_storing_a_document_twice_keeps_the_first_file_untouched(tmp_path: Path) -> None:
    store = artifacts.ArtifactStore(tmp_path / "artifacts")
    first, created = store.put(_doc(), created_at="2026-01-01T00:00:00Z")
    assert created
    path = store.path(first.id)
    before = (path.read_bytes(), path.stat().st_mtime_ns, path.stat().st_ino)
    again, created = store.put(_doc(), created_at="2026-02-02T00:00:00Z")
    assert not created and again == first and again.created_at == "2026-01-01T00:00:00Z"
    assert (path.read_bytes(), path.stat().st_mtime_ns, path.stat().st_ino) == before
    assert path.name == first.id.removeprefix("sha256:") + ".json"


def test_concurrent_stores_of_one_document_write_one_file(tmp_path: Path) -> None:
    store = artifacts.ArtifactStore(tmp_path)
    outcomes: list[bool] = []
    threads = [
        threading.Thread(target=lambda: outcomes.append(store.put(_doc(), created_at="t")[1]))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == [False] * 7 + [True]
    assert [p.name for p in tmp_path.iterdir()] == [
        store.path(artifacts.id_of(artifacts.canonical(_doc()))).name
    ]


def test_documents_that_cannot_be_stored_are_refused_with_the_reason(tmp_path: Path) -> None:
    store = artifacts.ArtifactStore(tmp_path)
    with pytest.raises(artifacts.ArtifactProblem, match=r"^content\.x: a number JSON cannot"):
        store.put(_doc(content={"x": float("nan")}), created_at="t")
    with pytest.raises(artifacts.ArtifactProblem, match=r"^metadata\.a\[1\]: a number JSON"):
        store.put(_doc(metadata={"a": [1, float("-inf")]}), created_at="t")
    with pytest.raises(artifacts.ArtifactProblem, match="lone surrogate"):
        store.put(_doc(content="\ud800"), created_at="t")
    huge = "x" * (artifacts.MAX_DOCUMENT_BYTES + 1)
    with pytest.raises(artifacts.ArtifactProblem, match="at most"):
        store.put(_doc(content=huge), created_at="t")
    assert list(tmp_path.iterdir()) == []


def test_a_batch_is_stored_together_and_each_document_gets_its_own_outcome(
    tmp_path: Path,
) -> None:
    """The daemon's own documents (traces) as plain JSON: each gets the id and the record
    file `put` would give it, one already stored keeps its first record, one that cannot be
    stored is refused and the rest are still stored."""
    store = artifacts.ArtifactStore(tmp_path)
    kept, _ = store.put(_doc(), created_at="2026-01-01T00:00:00Z")
    before = store.path(kept.id).read_bytes()
    batch = [
        dict(PLAN),  # stored already: its first record is kept
        PLAN | {"kind": "summary", "metadata": {"seed": 7, "error": None}},
        PLAN | {"content": {"x": float("nan")}},  # refused, the rest still stored
        PLAN | {"kind": "summary", "metadata": {"seed": 7, "error": None}},  # twice: one file
    ]
    outcomes = store.put_json_many(batch, created_at="2026-02-02T00:00:00Z")
    assert outcomes[0] == (kept.id, False) and store.path(kept.id).read_bytes() == before
    note_id, created = outcomes[1]  # type: ignore[misc]
    note = store.get(note_id)
    assert created and note is not None and note.created_at == "2026-02-02T00:00:00Z"
    assert note == store.put(_doc(**batch[1]), created_at="later")[0]  # the same id as `put`
    assert note_id == artifacts.id_of(artifacts.canonical(note.document))
    assert isinstance(outcomes[2], artifacts.ArtifactProblem)
    assert "number JSON cannot carry" in str(outcomes[2])
    assert outcomes[3] == (note_id, False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        store.path(i).name for i in (kept.id, note_id)
    )  # no temporary file left
    layout = json.loads(store.path(note_id).read_bytes())  # laid out as `put` writes it
    assert list(layout) == ["id", "created_at", "size_bytes", "document"]
    assert layout["size_bytes"] == len(artifacts.canonical(note.document))


def test_a_tampered_file_is_not_served(tmp_path: Path) -> None:
    store = artifacts.ArtifactStore(tmp_path)
    record, _ = store.put(_doc(), created_at="t")
    path = store.path(record.id)
    path.write_text(path.read_text().replace("write the fix", "rm -rf /"))
    assert store.get(record.id) is None


def test_a_torn_file_is_replaced_when_the_document_is_stored_again(tmp_path: Path) -> None:
    store = artifacts.ArtifactStore(tmp_path)
    record, _ = store.put(_doc(), created_at="t1")
    path = store.path(record.id)
    path.write_bytes(path.read_bytes()[:50])  # a crash, a full disk, a careless edit
    assert store.get(record.id) is None
    again, stored = store.put(_doc(), created_at="t2")
    assert stored and store.get(record.id) == again and again.created_at == "t2"
    path.write_bytes(b"{}")
    (batch,) = store.put_json_many([dict(PLAN)], created_at="t3")
    assert batch == (record.id, True) and store.get(record.id).created_at == "t3"  # type: ignore[union-attr]


def test_a_file_where_the_folder_should_be_is_an_error_naming_it(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    root.write_text("x")
    with pytest.raises(NotADirectoryError) as raised:
        artifacts.ArtifactStore(root).put(_doc(), created_at="t")
    assert raised.value.filename == str(root) and "is not a folder" in str(raised.value)


# -- over HTTP -------------------------------------------------------------------------------


def _url(running: Any) -> str:
    return str(running.daemon.server.url)


@pytest.mark.slow
async def test_post_get_and_idempotence_over_http(workspace: Workspace, serve: Any) -> None:
    base = _url(await serve())
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/v1/artifacts", json=PLAN) as response:
            assert response.status == 201
            ref = await response.json()
            assert response.headers["Location"] == f"/v1/artifacts/{ref['id']}"
        assert ref["kind"] == "plan" and ref["tags"] == ["agent-7"] and ref["created_at"]
        assert ref["digest"] == ref["id"] and ref["id"].startswith("sha256:")
        assert ref["url"] == f"{base}/v1/artifacts/{ref['id']}"
        async with session.post(f"{base}/v1/artifacts", json=PLAN) as response:
            assert response.status == 200 and await response.json() == ref
        async with session.get(ref["url"]) as response:
            body = await response.read()
            assert response.status == 200
            assert response.headers["X-Artifact-Created-At"] == ref["created_at"]
        assert "sha256:" + hashlib.sha256(body).hexdigest() == ref["id"]
        assert json.loads(body) == PLAN | {"parent": None}
        bare = ref["id"].removeprefix("sha256:")
        async with session.get(f"{base}/v1/artifacts/{bare}") as response:
            assert response.status == 200 and await response.read() == body
        for given in (f'"{ref["id"]}"', f'"other", W/"{ref["id"]}"', "*"):
            cached = {"If-None-Match": given}
            async with session.get(ref["url"], headers=cached) as response:
                assert response.status == 304 and await response.read() == b"", given
                assert response.headers["ETag"] == f'"{ref["id"]}"'
        async with session.get(ref["url"], headers={"If-None-Match": '"other"'}) as response:
            assert response.status == 200
        child = {"kind": "diff", "content": "--- a\n+++ b\n", "parent": ref["id"]}
        async with session.post(f"{base}/v1/artifacts", json=child) as response:
            assert response.status == 201 and (await response.json())["parent"] == ref["id"]
        async with session.get(f"{base}/v1/artifacts?kind=diff") as response:
            listed = (await response.json())["artifacts"]
            assert [a["kind"] for a in listed] == ["diff"]
    stored = list((workspace.root / "artifacts").glob("*.json"))
    assert len(stored) == 2


@pytest.mark.slow
async def test_a_broken_artifacts_folder_is_answered_naming_it(
    workspace: Workspace, serve: Any
) -> None:
    base = _url(await serve())
    folder = workspace.root / "artifacts"
    shutil.rmtree(folder, ignore_errors=True)
    folder.write_text("x")  # something else where the folder should be
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{base}/v1/artifacts", json=PLAN) as response,
    ):
        body = await response.json()
    assert response.status == 500 and str(folder) in body["message"], body
    assert "is not a folder" in body["message"] and "paths.artifacts" in body["hint"]


@pytest.mark.slow
async def test_bad_artifact_requests_get_the_envelope(workspace: Workspace, serve: Any) -> None:
    base = _url(await serve())
    missing = "sha256:" + "0" * 64
    cases: list[tuple[str, str, Any, int, str]] = [
        ("GET", f"/v1/artifacts/{missing}", None, 404, "no artifact"),
        ("GET", "/v1/artifacts/sha256:xyz", None, 400, "not an artifact id"),
        ("POST", "/v1/artifacts", {"kind": "poem", "content": 1}, 400, "kind"),
        ("POST", "/v1/artifacts", {"kind": "plan"}, 400, "content"),
        ("POST", "/v1/artifacts", [PLAN], 400, "JSON object"),
        ("POST", "/v1/artifacts", PLAN | {"colour": "red"}, 400, "colour"),
        ("POST", "/v1/artifacts", PLAN | {"parent": missing}, 400, "parent"),
        ("POST", "/v1/artifacts", PLAN | {"tags": ["a\nb"]}, 400, "tags[0]"),
        ("POST", "/v1/artifacts", PLAN | {"tags": ["ok", "\u0085x"]}, 400, "tags[1]"),
        ("GET", "/v1/artifacts?limit=0", None, 400, "limit"),
        ("GET", "/v1/artifacts?limit=abc", None, 400, "?limit='abc': limit must be a whole"),
        ("GET", "/v1/artifacts?kind=bogus", None, 400, "?kind='bogus' is not an artifact kind"),
    ]
    async with aiohttp.ClientSession() as session:
        for method, path, body, status, text in cases:
            async with session.request(method, base + path, json=body) as response:
                answer = await response.json()
                assert response.status == status, (path, answer)
                assert set(answer) >= {"code", "message", "retriable", "hint"}
                assert text in answer["message"], answer
        async with session.get(f"{base}/v1/artifacts?kind=bogus") as response:
            assert (await response.json())["hint"] == "one of: plan, diff, trace, summary, other"
        nan = b'{"kind": "plan", "content": NaN}'
        headers = {"Content-Type": "application/json"}
        async with session.post(f"{base}/v1/artifacts", data=nan, headers=headers) as response:
            answer = await response.json()
            assert response.status == 400, answer
            assert answer["message"] == (
                "request body:1:29: content: NaN is not a JSON number (JSON has no NaN or Infinity)"
            ), answer
        big = io.BytesIO(b'{"kind": "plan", "content": "' + b"x" * 1_100_000 + b'"}')
        async with session.post(f"{base}/v1/artifacts", data=big, headers=headers) as response:
            answer = await response.json()
            assert response.status == 413 and answer["code"] == "PAYLOAD_TOO_LARGE"
    assert not list((workspace.root / "artifacts").glob("*.json"))


@pytest.mark.slow
async def test_urls_use_server_public_url_when_it_is_set(workspace: Workspace, serve: Any) -> None:
    workspace.write_config(
        config(server={"bind": "127.0.0.1:0", "public_url": "http://devbox.lan:9000/orch/"})
    )
    base = _url(await serve())
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{base}/v1/artifacts", json=PLAN) as response,
    ):
        ref = await response.json()
    assert ref["url"] == f"http://devbox.lan:9000/orch/v1/artifacts/{ref['id']}"


@pytest.mark.slow
async def test_every_finished_task_leaves_a_trace_artifact(
    workspace: Workspace, serve: Any
) -> None:
    base = _url(await serve())
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{base}/v1/tasks", json=task("tr1", max_tokens=5, session_id="s-9", seed=7)
        ) as response:
            assert response.status == 202
        result = await wait_terminal(workspace, "tr1")
        await wait_for(
            lambda: list((workspace.root / "artifacts").glob("*.json")), 10, "the trace file"
        )
        async with session.get(f"{base}/v1/artifacts?tag=task:tr1&kind=trace") as response:
            refs = (await response.json())["artifacts"]
        [ref] = refs
        assert set(ref["tags"]) == {"sse", "task:tr1", "session:s-9"}
        async with session.get(ref["url"]) as response:
            trace = await response.json()
    frames = trace["content"]["frames"]
    logged = [f.model_dump(mode="json") for f in workspace.frames("tr1")]
    assert frames == logged and frames[-1]["event"] == "end"
    meta = trace["metadata"]
    assert meta["pool"] == "p1" and meta["replica"] == result["replica_id"]
    assert meta["engine"] == "sim" and meta["seed"] == 7 and meta["tokens_out"] == 5
    assert meta["status"] == "succeeded" and meta["error"] is None


def test_a_filtered_listing_reads_each_artifact_once_not_at_every_listing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An artifact never changes (its id is its content's digest): a listing by kind or tag
    that matches none of them read every file again, each time (large ones took seconds)."""
    store = artifacts.ArtifactStore(tmp_path)
    for n in range(5):
        store.put(artifacts.Artifact(kind="plan", content=f"step {n}", tags=["a"]), created_at="t")
    store.put(artifacts.Artifact(kind="summary", content="done", tags=["b"]), created_at="t")
    assert [r.document.kind for r in store.newest(kind="summary")] == ["summary"]
    reads: list[str] = []
    get = store.get
    monkeypatch.setattr(
        store, "get", lambda artifact_id: reads.append(artifact_id) or get(artifact_id)
    )
    assert list(store.newest(tags=frozenset({"nomatch"}))) == []
    assert [r.document.kind for r in store.newest(kind="summary")] == ["summary"]
    assert len(reads) == 1  # the matching one alone, to return it
    assert len(list(store.newest(tags=frozenset({"a"})))) == 5
