"""Downloading one model file over HTTP(S): resumable, verified, renamed into place at the end.

The `hf:` and `https:` resolvers (`plugins.resolvers`) call `download` from a worker thread
(the daemon's `reconciler.fetching`, `orchctl up`); it blocks, so it never runs on an event
loop. The rules it keeps:

- Bytes go to `<file>.part`; a `<file>.part.json` beside it names the URL and the server's
  validator (ETag or Last-Modified). A later call, in this process or after a restart, asks
  for the rest with `Range: bytes=N-` and `If-Range`, so a server whose file changed answers
  with the whole new file instead of a tail that does not fit.
- With a declared digest, the sha256 of the whole file (the resumed part re-read first) must
  match, or the part is deleted and `Untrusted` raised: a bad file never gets the final name.
- The final name appears only by an atomic rename of a complete, verified file.
- Errors say whether trying again can help: `NotFound` and `Untrusted` are permanent, an
  `Interrupted` transfer (cut connection, timeout, 5xx) is resumed by the next call.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

CHUNK = 1 << 20
TIMEOUT_S = 30.0
USER_AGENT = "llama-orch-home (model download)"
Progress = Callable[[int, int | None], None]  # (bytes done, bytes in all or None)


class DownloadError(Exception):
    permanent = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(DownloadError):
    permanent = True


class Refused(DownloadError):
    """401/403 and other answers that another try will not change."""

    permanent = True


class Untrusted(DownloadError):
    """The file's digest is not the declared one (message starts UNTRUSTED_ARTIFACT)."""

    permanent = True


class Interrupted(DownloadError):
    """The transfer stopped part-way; the next call resumes it."""


class Cancelled(Interrupted):
    pass


def part_of(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def partial_bytes(dest: Path) -> int:
    """How much of `dest` an earlier, unfinished download left (0 when none)."""
    try:
        return part_of(dest).stat().st_size
    except OSError:
        return 0


def download(
    url: str,
    dest: Path,
    *,
    digest: str | None = None,
    headers: Mapping[str, str] | None = None,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    timeout_s: float = TIMEOUT_S,
) -> Path:
    """`dest`, downloaded from `url` (resumed when a part is there); see the module rules."""
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part, meta_path = part_of(dest), dest.with_name(dest.name + ".part.json")
    meta = _read_meta(meta_path)
    offset = partial_bytes(dest) if meta.get("url") == url else 0
    if offset == 0:
        part.unlink(missing_ok=True)
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **(headers or {})})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
        if validator := meta.get("etag") or meta.get("last_modified"):
            request.add_header("If-Range", str(validator))
    try:
        response = _opener().open(request, timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:  # the part is stale or already whole: start afresh
            part.unlink(missing_ok=True)
            meta_path.unlink(missing_ok=True)
            raise Interrupted(
                f"{url}: the server refused to resume (HTTP 416); starting over"
            ) from None
        raise _http_error(url, exc.code, exc.reason) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise Interrupted(f"{url}: cannot connect ({reason})") from None
    with response:
        status = response.status
        if status == 200 and offset:  # the server sent the whole file: the part is not used
            offset = 0
        elif status == 206 and not _range_starts_at(response.headers, offset):
            part.unlink(missing_ok=True)
            raise Interrupted(f"{url}: the server resumed at the wrong place; starting over")
        total = _total(response.headers, offset, status)
        _write_meta(meta_path, url, response.headers)
        hasher = hashlib.sha256()
        if offset:
            _hash_into(hasher, part, offset)
        done = offset
        if progress:
            progress(done, total)
        try:
            with part.open("r+b" if offset else "wb") as out:
                out.truncate(offset)
                out.seek(offset)
                while True:
                    if cancel is not None and cancel.is_set():
                        raise Cancelled(f"{url}: download stopped at {done} bytes")
                    chunk = response.read(CHUNK)
                    if not chunk:
                        break
                    out.write(chunk)
                    hasher.update(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, total)
                out.flush()
                os.fsync(out.fileno())
        except (OSError, http.client.HTTPException) as exc:
            raise Interrupted(f"{url}: the transfer broke off after {done} bytes ({exc})") from None
    if total is not None and done < total:
        raise Interrupted(f"{url}: the connection closed after {done} of {total} bytes")
    actual = "sha256:" + hasher.hexdigest()
    if digest is not None and actual != digest:
        part.unlink(missing_ok=True)
        meta_path.unlink(missing_ok=True)
        raise Untrusted(
            f"UNTRUSTED_ARTIFACT: {dest.name} downloaded from {url} has digest {actual}, "
            f"orch.yaml pins {digest}; the file was deleted"
        )
    os.replace(part, dest)
    meta_path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        _fsync_dir(dest.parent)
    return dest


def _http_error(url: str, code: int, reason: Any) -> DownloadError:
    if code == 404:
        return NotFound(f"{url} was not found (HTTP 404)")
    if code in (401, 403):
        return Refused(
            f"{url} refused the download (HTTP {code} {reason}): a gated or private file needs "
            "a token (HF_TOKEN for the Hugging Face hub) and accepted terms"
        )
    if code == 429 or code >= 500:
        return Interrupted(f"{url} answered HTTP {code} {reason}; trying again later")
    return Refused(f"{url} answered HTTP {code} {reason}")


def _opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(_SameHostAuth())


class _SameHostAuth(urllib.request.HTTPRedirectHandler):
    """Follow redirects (the hub sends files from a CDN) without taking the token along to
    another host."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if (
            new is not None
            and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc
        ):
            new.remove_header("Authorization")
        return new


def _range_starts_at(headers: Any, offset: int) -> bool:
    value = headers.get("Content-Range", "")  # "bytes 100-999/1000"
    try:
        return int(value.split()[1].split("-")[0]) == offset
    except (IndexError, ValueError):
        return False


def _total(headers: Any, offset: int, status: int) -> int | None:
    if status == 206:
        _, _, whole = headers.get("Content-Range", "").partition("/")
        if whole.isdigit():
            return int(whole)
    length = headers.get("Content-Length")
    if length is not None and length.isdigit():
        return int(length) + (offset if status == 206 else 0)
    return None


def _hash_into(hasher: Any, part: Path, length: int) -> None:
    with part.open("rb") as fh:
        left = length
        while left > 0:
            chunk = fh.read(min(CHUNK, left))
            if not chunk:
                break
            hasher.update(chunk)
            left -= len(chunk)


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_meta(path: Path, url: str, headers: Any) -> None:
    etag = headers.get("ETag")
    meta = {
        "url": url,
        "etag": etag if etag and not etag.startswith("W/") else None,  # If-Range: strong only
        "last_modified": headers.get("Last-Modified"),
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(meta), encoding="utf-8")
    os.replace(tmp, path)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
