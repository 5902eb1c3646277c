"""`orchctl backup DIR` and `orchctl restore DIR [--force]` (HME-051): the catalog, the
artifacts, the results and orch.yaml's last good copy, with a manifest of sha256 sums.

`cli._parser` registers both verbs through `add_verbs`. What is copied, under which logical
path (`state.backups` has the manifest and the copying):

    catalog/…     paths.catalog (model files and what resolvers keep there)
    artifacts/…   paths.artifacts
    results/…     paths.results: result files first, then event logs
    state/…       <state>/verifications.json (the catalog's verification records)
    orch/…        .orch/last-good.yaml and its .json beside orch.yaml

A backup may run while the daemon serves. It is consistent because every file the daemon
replaces is replaced atomically (each copy is one whole version), event logs are copied
without a torn last line, and results are copied before event logs: the daemon writes a
task's frame before its result, so every result in the backup finds its frames. The
manifest is written last; a folder without one is an unfinished backup.

A restore first checks every file of the backup against the manifest (one bad file: nothing
is restored), refuses while a daemon serves the folder (it holds the daemon's lock until it is
done), skips files that are already there with the same content and refuses to replace
different ones unless `--force`.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydantic

from reconciler import about, cli_common, clocks, configuring
from reconciler.cli_common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Refused
from state import atomic, backups, daemon_lock, desired, verifications

SHOWN_PROBLEMS = 10


def add_verbs(
    verb: Callable[[str, Any, str], argparse.ArgumentParser],
    config: Callable[[argparse.ArgumentParser], None],
) -> None:
    b = verb("backup", cmd_backup, "copy the catalog, artifacts and results into a folder")
    b.add_argument("dir", type=cli_common.path_arg, metavar="DIR", help="a new or empty folder")
    config(b)
    r = verb("restore", cmd_restore, "put a backup made by `orchctl backup` back in place")
    r.add_argument("dir", type=cli_common.path_arg, metavar="DIR", help="the backup's folder")
    config(r)
    r.add_argument(
        "--force", action="store_true", help="replace files that differ from the backup's"
    )


def _roots(folder: cli_common.Folder) -> dict[str, Path]:
    """Where each logical root of a backup lives in this folder."""
    return {
        "catalog": desired.resolve(folder.base, folder.paths.catalog),
        "artifacts": desired.resolve(folder.base, folder.paths.artifacts),
        "results": folder.results.root,
        "state": folder.state_dir,
        "orch": folder.base / configuring.LAST_GOOD.parent,
    }


def _singles() -> dict[str, list[str]]:
    """The roots of which only some files belong in a backup."""
    last_good = configuring.LAST_GOOD.name
    return {"state": [verifications.FILE_NAME], "orch": [last_good, f"{last_good}.json"]}


def _files(root: Path) -> Iterator[Path]:
    """Regular files under `root`, no hidden ones (temporary files) and no links; in a
    folder, result files before event logs."""
    try:
        entries = sorted(root.iterdir(), key=lambda p: (p.name.endswith(".jsonl"), p.name))
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith(".") or entry.is_symlink():
            continue
        if entry.is_dir():
            yield from _files(entry)
        elif entry.is_file():
            yield entry


def _refuse_inside(dest: Path, folder: cli_common.Folder) -> None:
    """A backup written into a folder it copies would copy itself, again and again, until
    the path is too long (gigabytes later, in the live folder): refused before anything."""
    where = dest.resolve()
    singles = _singles()
    for name, root in _roots(folder).items():
        if name in singles:  # only some files of it are copied: a folder in it is safe
            continue
        inside = root.resolve()
        if where == inside or inside in where.parents:
            raise Refused(
                EXIT_USAGE,
                f"{dest} is inside {root}, which the backup copies (it would copy itself)",
                hint=_OUTSIDE,
            )
    spool_root = folder.spool.root.resolve()
    if where == spool_root or spool_root in where.parents:
        # the daemon reads its spool folders name by name: a backup written there would
        # be taken (and refused) as task files while it is being written
        raise Refused(
            EXIT_USAGE,
            f"{dest} is inside the spool {folder.spool.root}, whose folders the daemon takes "
            "files from as they appear",
            hint=_OUTSIDE,
        )


_OUTSIDE = (
    "back up into a folder outside the spool, results, artifacts and catalog folders, "
    "e.g. ../backups/$(date +%F)"
)


def _plan(folder: cli_common.Folder) -> Iterator[tuple[str, Path]]:
    roots, singles = _roots(folder), _singles()
    for name in ("catalog", "artifacts", "results", "state", "orch"):
        root = roots[name]
        if name in singles:
            for single in singles[name]:
                yield f"{name}/{single}", root / single
            continue
        for path in _files(root):
            yield f"{name}/{path.relative_to(root).as_posix()}", path


def cmd_backup(args: argparse.Namespace) -> int:
    folder = cli_common.open_folder(args.config)
    dest: Path = args.dir
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise Refused(
            EXIT_USAGE,
            f"{dest} is a file, not a folder" if not dest.is_dir() else f"{dest} is not empty",
            hint="back up into a new or empty folder, e.g. backups/$(date +%F)",
        )
    _refuse_inside(dest, folder)
    dest.mkdir(parents=True, exist_ok=True)
    listed: list[backups.BackupFile] = []
    live: set[str] = set()  # results/<id> of tasks still queued or running
    for logical, source in _plan(folder):
        if not backups.safe_path(logical):
            cli_common.warn(f"skipped {cli_common.printable(logical)}: not a plain name")
            continue
        if _log_of(logical) in live:
            continue
        copied = backups.copy(source, dest / logical, whole_lines=logical.endswith(".jsonl"))
        if copied is None:
            continue
        if _live_result(logical, dest / logical):  # read as copied: the version kept
            (dest / logical).unlink()
            live.add(logical.removesuffix(".json"))
            continue
        sha, size = copied
        listed.append(backups.BackupFile(path=logical, size_bytes=size, sha256=sha))
    manifest = backups.Manifest(
        created_at=clocks.rfc3339(time.time()),
        source=str(folder.config_path.resolve()),
        version=about.version(),
        files=listed,
    )
    atomic.write_json(dest / backups.MANIFEST, manifest.model_dump(mode="json"))
    counts = Counter(f.path.split("/", 1)[0] for f in listed)
    what = ", ".join(f"{counts[r]} {r}" for r in backups.ROOTS if counts[r]) or "nothing"
    total = sum(f.size_bytes for f in listed)
    print(f"backed up {len(listed)} files ({_size(total)}: {what}) into {dest}")
    if live:
        print(
            f"left out {len(live)} task(s) still queued or running (a backup keeps finished "
            "work; their task files are in the spool, which it does not hold)"
        )
    print(f"manifest: {dest / backups.MANIFEST}")
    return EXIT_OK


def _load_manifest(source: Path) -> backups.Manifest:
    path = source / backups.MANIFEST
    try:
        raw = path.read_bytes()
    except OSError:
        raise Refused(
            EXIT_USAGE,
            f"{path} cannot be read: {source} is not a backup, or an unfinished one",
            hint="give the folder `orchctl backup DIR` wrote",
        ) from None
    try:
        manifest = backups.Manifest.model_validate_json(raw)
    except pydantic.ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(map(str, first["loc"]))
        why = first["msg"].removeprefix("Value error, ")
        raise Refused(
            EXIT_USAGE,
            f"{path} is not a backup manifest: {where + ': ' if where else ''}{why}",
        ) from None
    # only what `backup` writes: of the state folder and orch.yaml's records, the few files a
    # backup holds (any other file there is the daemon's own bookkeeping: a planted one would
    # be acted on at its next start), and each path once
    singles, seen = _singles(), set[str]()
    for n, item in enumerate(manifest.files):
        root, _, rest = item.path.partition("/")
        if root in singles and rest not in singles[root]:
            raise Refused(
                EXIT_USAGE,
                f"{path} is not a backup manifest: files.{n}.path: {item.path!r} is no file a "
                f"backup holds ({', '.join(f'{root}/{name}' for name in singles[root])} only)",
                hint="give the folder `orchctl backup DIR` wrote, unchanged",
            )
        if item.path in seen:
            raise Refused(
                EXIT_USAGE,
                f"{path} is not a backup manifest: files.{n}.path: {item.path!r} is listed twice",
                hint="give the folder `orchctl backup DIR` wrote, unchanged",
            )
        seen.add(item.path)
    return manifest


def _live_result(logical: str, path: Path) -> bool:
    """Whether `path`, the result file `logical` names, is of a task still queued or
    running. Such a result is no finished work, and without its task file (the spool is not
    in a backup) nothing would ever run or end it: restored, it would say `queued` forever."""
    if not (logical.startswith("results/") and logical.endswith(".json")):
        return False
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False  # not a result the daemon wrote: copied as it is
    return isinstance(data, dict) and data.get("status") in LIVE


def _log_of(logical: str) -> str:
    """results/<id> for the event log results/<id>.events.jsonl ("" for any other file)."""
    return logical.removesuffix(EVENTS) if logical.endswith(EVENTS) else ""


LIVE = ("queued", "running")
EVENTS = ".events.jsonl"


def _damage(source: Path, manifest: backups.Manifest) -> list[str]:
    problems = []
    for item in manifest.files:
        found = backups.digest(source / item.path)
        if found is None:
            problems.append(f"{item.path}: missing from the backup")
        elif found != (item.sha256, item.size_bytes):
            problems.append(f"{item.path}: its content differs from the manifest's sha256")
    return problems


def cmd_restore(args: argparse.Namespace) -> int:
    source: Path = args.dir
    config: Path = args.config
    if not config.is_file() and not (config.parent / configuring.LAST_GOOD).is_file():
        kept = source / "orch" / configuring.LAST_GOOD.name
        if kept.is_file():  # after a disk loss: the backup holds the last orch.yaml applied
            raise Refused(
                EXIT_USAGE,
                f"{config} not found: restore puts the files where this folder's orch.yaml "
                "says they go",
                hint=f"the backup holds the last orch.yaml applied where it was taken: "
                f"`cp {kept} {config}` (check its paths:), then restore again",
            )
    folder = cli_common.open_folder(config)
    manifest = _load_manifest(source)
    damaged = _damage(source, manifest)
    if damaged:
        _show(damaged)
        raise Refused(
            EXIT_FAILED,
            f"the backup in {source} is damaged: {len(damaged)} of {len(manifest.files)} "
            "files do not match its manifest; nothing was restored",
        )
    roots = _roots(folder)
    folder.state_dir.mkdir(parents=True, exist_ok=True)
    try:
        folder.results.root.mkdir(parents=True, exist_ok=True)
        lock = daemon_lock.acquire(
            folder.state_dir,
            started_at=clocks.rfc3339(time.time()),
            shared=(folder.results.root,),  # a daemon of another config may write there
        )
    except daemon_lock.Held as held:
        raise Refused(
            EXIT_FAILED,
            f"a daemon ({'pid ' + str(held.pid) if held.pid else 'an unknown pid'}) serves this "
            "folder; nothing was restored",
            hint="stop the daemon first: it must not serve while its files are replaced",
        ) from None
    live = {
        item.path.removesuffix(".json")
        for item in manifest.files
        if _live_result(item.path, source / item.path)
    }
    # restored into another folder that has an orch.yaml of its own: that one is what its
    # daemon applies and records at its start, while the backup's record of the other
    # orch.yaml (its paths, its bind) would be the config every verb falls back to here
    own_config = config.is_file() and not _same_file(config, Path(manifest.source))
    try:
        todo, conflicts, same = [], [], 0
        for item in manifest.files:
            if item.path.removesuffix(".json") in live or _log_of(item.path) in live:
                continue
            root, _, rest = item.path.partition("/")
            if root == "orch" and own_config:
                continue
            target = roots[root] / rest
            found = backups.digest(target)
            if found is None and (target.exists() or target.is_symlink()):
                conflicts.append((item, target, "is not a regular file"))
            elif found is None:
                todo.append((item, target))
            elif found == (item.sha256, item.size_bytes):
                same += 1
            elif root == "orch":  # the daemon's own record of orch.yaml, rewritten at each
                todo.append((item, target))  # start: no one's work is in it to keep
            else:
                conflicts.append((item, target, "differs from the backup"))
        if conflicts and not args.force:
            _show([f"{folder.shown(t)}: {why}" for _, t, why in conflicts])
            raise Refused(
                EXIT_FAILED,
                f"{_count(len(conflicts))} here differ from the backup; nothing was restored",
                hint="rerun with --force to replace them with the backup's copies",
            )
        replaced = [(item, target) for item, target, _ in conflicts]
        for item, target in todo + replaced:
            if target.is_symlink() or target.is_dir():
                raise Refused(EXIT_FAILED, f"{folder.shown(target)} is in the way; remove it")
            copied = backups.copy(source / item.path, target)
            if copied != (item.sha256, item.size_bytes):
                raise Refused(
                    EXIT_FAILED, f"{item.path} changed in the backup while it was restored"
                )
    finally:
        lock.release()
    print(
        f"restored {_count(len(todo) + len(replaced))} from {source} "
        f"({len(replaced)} replaced, {same} already there)"
    )
    if live:
        print(
            f"left out {len(live)} task(s) the backup shows queued or running: their task "
            "files are not in it, so nothing would run or end them here"
        )
    return EXIT_OK


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _show(lines: list[str]) -> None:
    for line in lines[:SHOWN_PROBLEMS]:
        cli_common.warn(line)
    if len(lines) > SHOWN_PROBLEMS:
        cli_common.warn(f"... and {len(lines) - SHOWN_PROBLEMS} more")


def _size(n: int) -> str:
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n / (1024 * 1024):.1f} MiB"


def _count(n: int) -> str:
    return f"{n} file" if n == 1 else f"{n} files"
