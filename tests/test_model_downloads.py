"""Model refs that download: `hf:` and `https:` resolvers against a local stand-in hub.

Resuming after a cut connection (in this process or a later one), digests, 404s and progress,
all through the files a user would find in the model cache.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from plugins import downloads, resolvers
from tests import model_hub

DATA = bytes(range(256)) * 4096  # 1 MiB
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[model_hub.Hub]:
    monkeypatch.setenv(resolvers.MODELS_ENV, str(tmp_path / "models"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with model_hub.serving() as served:
        monkeypatch.setenv("HF_ENDPOINT", served.url)
        yield served


def test_a_hub_ref_downloads_into_the_model_cache_verified_and_whole(
    hub: model_hub.Hub, tmp_path: Path
) -> None:
    ref = hub.hf("acme/tiny-GGUF", "tiny-q4.gguf", DATA)
    hf = resolvers.HubResolver()
    expected = tmp_path / "models/hf/acme/tiny-GGUF/main/tiny-q4.gguf"
    assert hf(ref, tmp_path) == resolvers.ResolvedModel(expected, None)  # not there yet
    assert hf.fetch(ref, digest=DIGEST) == expected
    assert expected.read_bytes() == DATA
    assert hf(ref, tmp_path).size_mib == 1
    assert list(expected.parent.iterdir()) == [expected]  # no .part or .part.json left
    assert hub.requests == [("/acme/tiny-GGUF/resolve/main/tiny-q4.gguf", None)]
    assert resolvers.verify(expected, DIGEST) is None


def test_a_cut_connection_is_resumed_where_it_stopped_even_by_a_new_process(
    hub: model_hub.Hub, tmp_path: Path
) -> None:
    ref = hub.hf("acme/tiny-GGUF", "tiny.gguf", DATA)
    path = "/acme/tiny-GGUF/resolve/main/tiny.gguf"
    hub.cut_after[path] = 300_000
    with pytest.raises(downloads.Interrupted) as cut:
        resolvers.HubResolver().fetch(ref, digest=DIGEST)
    assert not cut.value.permanent
    target = tmp_path / "models/hf/acme/tiny-GGUF/main/tiny.gguf"
    assert not target.exists() and downloads.partial_bytes(target) == 300_000

    # a fresh resolver, as after a daemon restart: only the rest is asked for
    assert resolvers.HubResolver().fetch(ref, digest=DIGEST).read_bytes() == DATA
    assert hub.requests[-1] == (path, "bytes=300000-")


def test_a_file_that_changed_on_the_server_is_fetched_whole_instead_of_resumed(
    hub: model_hub.Hub, tmp_path: Path
) -> None:
    ref = hub.hf("acme/tiny-GGUF", "tiny.gguf", DATA)
    hub.cut_after["/acme/tiny-GGUF/resolve/main/tiny.gguf"] = 200_000
    with pytest.raises(downloads.Interrupted):
        resolvers.HubResolver().fetch(ref)
    newer = DATA[::-1]
    hub.hf("acme/tiny-GGUF", "tiny.gguf", newer)
    assert resolvers.HubResolver().fetch(ref).read_bytes() == newer  # If-Range did its job


def test_a_digest_mismatch_is_untrusted_and_leaves_no_file(
    hub: model_hub.Hub, tmp_path: Path
) -> None:
    ref = hub.hf("acme/tiny-GGUF", "tiny.gguf", DATA)
    wrong = "sha256:" + "0" * 64
    with pytest.raises(downloads.Untrusted) as refused:
        resolvers.HubResolver().fetch(ref, digest=wrong)
    assert refused.value.permanent
    assert refused.value.message.startswith("UNTRUSTED_ARTIFACT: tiny.gguf")
    assert DIGEST in refused.value.message and wrong in refused.value.message
    assert [p for p in (tmp_path / "models").rglob("*") if p.is_file()] == []


def test_a_missing_file_is_a_permanent_not_found(hub: model_hub.Hub) -> None:
    with pytest.raises(downloads.NotFound) as missing:
        resolvers.HubResolver().fetch("hf:acme/tiny-GGUF/nope.gguf")
    assert missing.value.permanent and "HTTP 404" in missing.value.message


def test_progress_is_reported_as_bytes_done_of_the_whole(hub: model_hub.Hub) -> None:
    ref = hub.hf("acme/tiny-GGUF", "tiny.gguf", DATA * 3)
    seen: list[tuple[int, int | None]] = []
    resolvers.HubResolver().fetch(ref, progress=lambda done, total: seen.append((done, total)))
    assert seen[0] == (0, len(DATA) * 3) and seen[-1] == (len(DATA) * 3, len(DATA) * 3)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and len(seen) >= 3


def test_a_cancelled_download_keeps_its_part_for_later(hub: model_hub.Hub, tmp_path: Path) -> None:
    ref = hub.hf("acme/tiny-GGUF", "tiny.gguf", DATA * 4)
    cancel = threading.Event()

    def stop_after_first_chunk(done: int, total: int | None) -> None:
        if done > 0:
            cancel.set()

    with pytest.raises(downloads.Cancelled):
        resolvers.HubResolver().fetch(ref, progress=stop_after_first_chunk, cancel=cancel)
    target = tmp_path / "models/hf/acme/tiny-GGUF/main/tiny.gguf"
    assert 0 < downloads.partial_bytes(target) < len(DATA) * 4


def test_a_url_ref_downloads_into_a_folder_of_its_own(hub: model_hub.Hub, tmp_path: Path) -> None:
    hub.files["/files/model.gguf"] = DATA
    url = f"{hub.url}/files/model.gguf"
    http = resolvers.UrlResolver("http")
    path = http.fetch(url, digest=DIGEST)
    assert path.read_bytes() == DATA and path.name == "model.gguf"
    assert path.is_relative_to(tmp_path / "models/url/127.0.0.1")
    other = http(f"{hub.url}/elsewhere/model.gguf", tmp_path).path
    assert other is not None and other != path


@pytest.mark.parametrize(
    "ref",
    ["hf:acme/tiny-GGUF", "hf:acme/../x.gguf", "hf:acme/tiny/.hidden/../x", "hf:/x/y"],
)
def test_a_hub_ref_that_names_no_plain_file_is_explained_and_never_fetched(
    hub: model_hub.Hub, tmp_path: Path, ref: str
) -> None:
    hf = resolvers.HubResolver()
    assert hf.check(ref) and "hf:ORG/REPO/FILE" in str(hf.check(ref))
    assert hf(ref, tmp_path) == resolvers.ResolvedModel(None, None)
    assert hub.requests == []


def test_the_hub_endpoint_revision_and_token_come_from_the_ref_and_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.org/")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    monkeypatch.setenv(resolvers.MODELS_ENV, str(tmp_path))
    remote = resolvers.HubResolver().remote("hf:acme/tiny-GGUF@v1.0/sub/tiny.gguf")
    assert remote.url == "https://hub.example.org/acme/tiny-GGUF/resolve/v1.0/sub/tiny.gguf"
    assert remote.headers == {"Authorization": "Bearer hf_secret"}
    assert remote.path == tmp_path / "hf/acme/tiny-GGUF/v1.0/sub/tiny.gguf"
    monkeypatch.delenv("HF_ENDPOINT")
    assert (
        resolvers.HubResolver()
        .remote("hf:a/b/c.gguf")
        .url.startswith("https://huggingface.co/a/b/resolve/main/")
    )


def test_a_file_changed_to_the_same_size_and_mtime_is_hashed_again(tmp_path: Path) -> None:
    """A model file rewritten in place, to the same size, its mtime set back as `cp -p` or
    `touch -r` would: the pinned digest check reads it again and refuses it."""
    path = tmp_path / "m.gguf"
    path.write_bytes(b"a" * 4096)
    pinned = "sha256:" + hashlib.sha256(b"a" * 4096).hexdigest()
    assert resolvers.verify(path, pinned) is None
    before = path.stat()
    with path.open("r+b") as fh:  # the same inode, the same size
        fh.write(b"b")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    problem = resolvers.verify(path, pinned)
    assert problem is not None and problem.startswith("UNTRUSTED_ARTIFACT: m.gguf has digest")
