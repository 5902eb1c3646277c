"""Taking task files into the loop: each pass's batch claimed from spool/incoming/, and every
claimed file (a new one, or one `recovery` hands back after a restart) parsed and admitted.

The daemon makes one `Taker` over its spool, results, dispatcher and config and calls
`claim_batch` once per pass; `recovery.recover` calls `take` and `refuse_duplicate`. A file is
parsed by `intake`; one that does not parse, or reuses a task id that has a result or runs now,
is quarantined with its reason, and any other is admitted to the dispatcher as a new run.
Nothing a file holds, and no bug in taking it, stops the loop: an unexpected error quarantines
that file as INTERNAL.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from reconciler import cancelling, clocks, configuring, dispatch, intake, logs, streaming, tasking
from state import failpoints, ids, loading, pending, results, spool, tasks
from state.errors import ErrorCode

log = logs.get("daemon")

INTAKE_PER_PASS = 64
# A claimed file that does not parse, ends mid-line and changed less than this long ago is
# taken for one still being written in place, and read again by the next recovery pass.
IN_PLACE_GRACE_S = 2.0
ENDS_EARLY = "the file ends before"  # what state.parsing says of a syntax error at the end


@dataclass(frozen=True)
class Taker:
    the_spool: spool.Spool
    store: results.ResultStore
    dispatcher: dispatch.Dispatcher
    config: configuring.AppliedConfig
    clock: clocks.Clock
    wake: Callable[[], None]
    # when this daemon began (wall clock): a task file of an OpenAI request delivered before
    # it answered a connection that ended with the daemon before (`_orphaned`)
    born: float = 0.0

    # the rest of a burst's listing, oldest first: the next passes claim from it instead of
    # listing (and stat-ing) every waiting file again for each batch
    backlog: list[str] = field(default_factory=list)
    # files put off as half written: name -> (size, mtime_ns, since: monotonic s) when put
    # off, since when it has been unchanged
    half_read: dict[str, tuple[int, int, float]] = field(default_factory=dict)
    # incoming/ names a writer held open when last looked at (said once each)
    writers_seen: set[str] = field(default_factory=set)
    # incoming/ names the watcher saw closed after writing (written in place, not renamed
    # or linked in whole), with the time.monotonic() of the last close: a writer that
    # closes the file between its parts (`>` then `>>`, `echo >>` in a loop) reopens it by
    # name, so a file claimed between two parts would be cut in two
    written_in_place: dict[str, float] = field(default_factory=dict)
    # the cancel requests and incoming/ names `claim_canceled` last looked through
    canceled_seen: list[tuple[frozenset[str], tuple[str, ...]]] = field(default_factory=list)

    def claim_batch(self) -> None:
        """Claim and take up to INTAKE_PER_PASS files from incoming/, oldest first."""
        if not self.backlog:
            self.backlog.extend(spool.incoming_names(self.the_spool))
            if self.written_in_place:  # names gone from incoming/ (removed, renamed away)
                there = set(self.backlog)
                for name in [n for n in list(self.written_in_place) if n not in there]:
                    self.written_in_place.pop(name, None)
        names = self._not_being_written(self.backlog[:INTAKE_PER_PASS])
        del self.backlog[:INTAKE_PER_PASS]
        if self.backlog:
            # a burst of files: take a batch, dispatch it, come straight back for the rest,
            # so work starts (and status and cancels move) while the burst is admitted;
            # files that arrive meanwhile are newer, so they come after it anyway
            self.wake()
        claimed = intake.claim_all(  # one fsync per spool folder for the whole batch
            the_spool=self.the_spool,
            store=self.store,
            names=names,
            clock=self.clock,
            revision=self.config.revision,
        )
        # listed after the claims: a request written before its task file is among them
        cancels = _names_in(self.the_spool.cancel)
        for path in claimed:
            failpoints.hit("after_claim")
            self.take(path, new=True, cancels=cancels)
        self.announce()

    def _not_being_written(self, names: list[str]) -> list[str]:
        """`names` less the files a writer still holds open (written in place): each is
        taken once its writer closes it (the close wakes the loop; the resync looks too),
        not its first part now. Said once per file."""
        taken, waiting, held_open = [], set(), set()
        now, written = time.monotonic(), self.written_in_place
        for name in names:
            closed_at = written.get(name)
            if spool.being_written(self.the_spool.incoming / name):
                held_open.add(name)
            elif closed_at is not None and now - closed_at < IN_PLACE_GRACE_S:
                waiting.add(name)  # written in place: taken once unchanged for the grace
            else:
                written.pop(name, None)
                taken.append(name)
        waiting |= held_open
        # said of a file held open only: one closed and settling is taken within 2 s
        for name in sorted(held_open - self.writers_seen):
            logs.emit(
                log,
                "task.writer_open",
                f"{spool.shown(name)} is still open for writing: it is taken once its writer "
                "closes it. Write task files elsewhere (spool/tmp/) and rename them into "
                "spool/incoming/, or use `orchctl submit`, so that half of one is never read.",
                file=spool.shown(name),
            )
        seen = self.writers_seen
        seen.difference_update(taken)  # closed now: a later writer of that name is said again
        if len(seen) > 4096:  # names removed while open, never taken: forgotten, not kept
            seen.clear()
        seen.update(held_open)
        return taken

    def wake_in_s(self) -> float | None:
        """When the next file written in place will have been still for the grace period
        (the loop looks again then), or None."""
        now = time.monotonic()
        # (a copy: the watcher's thread adds to the map; one that settled is taken by the
        # next pass, or waits for its writer to close it, which wakes the loop itself)
        settling = [t + IN_PLACE_GRACE_S - now for t in list(self.written_in_place.values())]
        ahead = [left for left in settling if left > 0]
        return min(ahead) + 0.01 if ahead else None

    def claim_canceled(self) -> None:
        """While the daemon drains, nothing new is taken, except a file in incoming/ whose
        task a cancel request names: it is taken (queued, never started) so the cancel is
        carried out now, as promised, not at the next start. The listing is read again
        only when the requests or incoming/ changed."""
        requests = set(spool.cancel_requests(self.the_spool)) - set(self.dispatcher.runs)
        names = spool.incoming_names(self.the_spool) if requests else []
        seen = (frozenset(requests), tuple(names))
        if not names or seen in self.canceled_seen:
            return
        self.canceled_seen[:] = [seen]
        incoming = self.the_spool.incoming
        wanted = [name for name in names if pending.task_id_of(incoming / name) in requests]
        for path in intake.claim_all(
            the_spool=self.the_spool,
            store=self.store,
            names=wanted,
            clock=self.clock,
            revision=self.config.revision,
        ):
            self.take(path, new=True)
        self.announce()

    def announce(self) -> None:
        """Write the `queued` frames of the tasks just taken (`dispatch.Dispatcher.announce`);
        one whose write failed is handled as a failed take of its file."""
        for run, exc in self.dispatcher.announce():
            self._failed(self.the_spool.active / run.file_name, exc)

    def take(
        self,
        path: Path,
        *,
        recovered: results.Result | None = None,
        new: bool = False,
        cancels: frozenset[str] | None = None,
    ) -> None:
        """Parse one claimed file and admit it, or quarantine it with the reason. `new`: just
        claimed from incoming/ (not a file recovery hands back, whose log may be its own).
        `cancels`: the names in spool/cancel/, listed once for a batch (None: looked up)."""
        try:
            parsed = intake.parse_claimed(path)
            if not isinstance(parsed, intake.Parsed):
                if self._half_written(path, parsed):
                    return
                data = _peek(path)
                intake.quarantine(
                    the_spool=self.the_spool,
                    store=self.store,
                    path=path,
                    problems=parsed,
                    clock=self.clock,
                    task_id=intake.claimed_task_id(path, data),
                    revision=self.config.revision,
                    take_over=new,
                )
                return
            self.half_read.pop(path.name, None)  # whole now, if it was put off
            used = self._used_by(parsed.task_id, recovered=recovered, new=new)
            if used is not None:
                self.refuse_duplicate(path, parsed.task_id, used)
                return
            run = tasking.new_run(
                parsed.task_id,
                parsed.task,
                parsed.file_name,
                store=self.store,
                revision=self.config.revision,
                clock=self.clock,
                recovered=recovered,
            )
            if cancelling.waiting_for(
                self.the_spool, run.task_id, run.file_name, self.clock.now(), cancels
            ):
                self.dispatcher.cancel_taken(run)
                return
            if tasks.connection_bound(parsed.task) and self._orphaned(path):
                self.dispatcher.cancel_taken(run, orphaned=True)
                return
            self.dispatcher.admit(run, recovered=recovered is not None)
        except Exception as exc:  # never let one file take the daemon down
            self._failed(path, exc)

    def _orphaned(self, path: Path) -> bool:
        """Whether the task file at `path` was delivered before this daemon began: a task of
        an OpenAI-compatible request then answered a connection of the daemon before, which
        ended with it (after a crash as after a stop), and nobody can receive its answer."""
        try:
            return os.stat(path).st_mtime < self.born
        except OSError:
            return False

    def _half_written(self, path: Path, problems: list[loading.LoadError] | None = None) -> bool:
        """Whether a claimed file that does not parse looks like one still being written in
        place (cut off mid-line, or empty, and changed within IN_PLACE_GRACE_S): then it is
        left in active/, where the writer's descriptor still points, and the recovery pass
        reads it again (every SESSION_SWEEP_S); refused once it has stayed the same for
        IN_PLACE_GRACE_S."""
        try:
            st = os.lstat(path)
        except OSError:
            return False
        before = self.half_read.pop(path.name, None)
        seen, now = (st.st_size, st.st_mtime_ns), time.monotonic()
        # unchanged since it was put off IN_PLACE_GRACE_S ago (or changed longer ago than
        # that, by its time): what it says is meant. Read again sooner (the recovery pass may
        # come a moment after the put-off), it is put off again, not refused.
        since = before[2] if before is not None and before[:2] == seen else now
        age = time.time() - st.st_mtime
        if (
            not stat.S_ISREG(st.st_mode)
            or age > IN_PLACE_GRACE_S
            or now - since > IN_PLACE_GRACE_S
            or not _cut_short(path, problems)
        ):
            return False
        self.half_read[path.name] = (*seen, since)
        if before is not None:  # said when it was first put off
            return True
        logs.emit(
            log,
            "task.take_deferred",
            f"{spool.shown(path.name)} does not parse yet and was written {age:.2f} s ago: "
            "it is read again in a few seconds. Write task files elsewhere (spool/tmp/) and "
            "rename them into spool/incoming/, or use `orchctl submit`, so that half of one "
            "is never read.",
            level=30,
            file=spool.shown(path.name),
        )
        return True

    def write_failed(self, task_id: str, exc: Exception) -> None:
        """A task's writes failed at their commit (`tasking.Books.write_failed`). One still
        queued (its queued frame or result never reached the disk) is held back as a failed
        take: out of the queue, its file left in active/ for the recovery pass, which takes
        it again afresh. A running or finished one is handled where it waits on its commit,
        or by the recovery pass."""
        run = self.dispatcher.runs.get(ids.TaskId(task_id))
        if run is None or task_id not in self.dispatcher.queue:
            return
        self.dispatcher.queue.remove(run.task_id)
        del self.dispatcher.runs[run.task_id]
        self._failed(self.the_spool.active / run.file_name, exc)

    def _failed(self, path: Path, exc: Exception) -> None:
        if streaming.storage_failure(exc, task_file=path):
            # a full disk or a folder of the daemon's it may not write: not the task's fault;
            # left in active/, the recovery pass retries it every few seconds
            logs.emit(
                log,
                "task.take_deferred",
                f"Could not take {path.name}: {exc}. It waits in spool/active/ and is taken "
                "again every 5 s: free disk space, or give the daemon's user write access "
                "to that path (and remove anything put where its file goes).",
                level=40,
            )
            return
        log.error("could not take %s", path.name, exc_info=exc)
        with contextlib.suppress(Exception):
            self._refuse(
                path,
                ErrorCode.INTERNAL,
                message=f"internal error {type(exc).__name__}: {exc}",
                hint="this is a bug; please report it with the log",
            )

    def _used_by(self, task_id: str, *, recovered: results.Result | None, new: bool) -> str | None:
        """What already holds `task_id` (said in the refusal), or None when it is free."""
        if task_id in self.dispatcher.runs:
            return f"(see results/{task_id}.json)"
        if self.store.holds_nothing(task_id):  # no lookups: most new tasks' ids
            return None
        if (
            recovered is None
            and self.store.exists(task_id)
            and not self.store.take_over(task_id)  # a retry after a 429 may reuse it
        ):
            return f"(see results/{task_id}.json)"
        if new and task_id not in self.store.taken_over:  # (a log taken over is going)
            # an earlier task's frames with no result beside them (its result file was
            # removed by hand): the id is that task's; a new one would append to its log
            log_path = self.store.events_path(task_id)
            try:
                st = os.stat(log_path)
            except OSError:
                logged = False
            else:  # a folder in the log's place is a blocked path, not a log: the task waits
                logged = stat.S_ISREG(st.st_mode) and st.st_size > 0
            if logged:
                return f"(its event log results/{log_path.name} is there)"
        return None

    def refuse_duplicate(self, path: Path, task_id: str, used: str = "by another file") -> None:
        self._refuse(
            path,
            ErrorCode.DUPLICATE_TASK_ID,
            field="task_id",
            message=f"task id {task_id!r} is already used {used}",
            hint="give the task a new task_id",
            task_id=task_id,
        )

    def _refuse(
        self,
        path: Path,
        code: ErrorCode,
        *,
        message: str,
        hint: str,
        field: str | None = None,
        task_id: str | None = None,
    ) -> None:
        """Quarantine a claimed file for a reason that is not a parse error; the field, when
        the file names it, is located (the refusal is rare: the file is read again for it)."""
        line, column = _located(path, field) if field is not None else (None, None)
        problem = loading.LoadError(f"spool/active/{path.name}", line, column, field, message, hint)
        intake.quarantine(
            the_spool=self.the_spool,
            store=self.store,
            path=path,
            clock=self.clock,
            code=code,
            task_id=task_id,
            problems=[problem],
        )


def _names_in(folder: Path) -> frozenset[str] | None:
    """The names in `folder`; None when it cannot be listed (each is then looked up)."""
    try:
        return frozenset(os.listdir(folder))
    except OSError:
        return None


def _located(path: Path, field: str) -> tuple[int | None, int | None]:
    """Where a top-level `field` of the file at `path` is written, (None, None) when it is not
    (a task id taken from the file name)."""
    text, _ = loading.read_text(path)
    if text is None:
        return None, None
    data, node, errs = loading.parse_document(text, path.name)
    if errs or node is None or not isinstance(data, dict) or field not in data:
        return None, None
    return loading.locate(node, (field,))


def _cut_short(path: Path, problems: list[loading.LoadError] | None = None) -> bool:
    """Whether a task file reads as what a writer caught half-way leaves: empty, or where
    the YAML or JSON parser ran into the end of the text (mid-line, or at a line's end
    inside a quoted string, a bracket or an object not closed yet); a whole document that
    is refused for what it says, however bad, is meant as written: refused at once."""
    if not path.name.endswith(tasks.TASK_SUFFIXES) or spool.name_problem(path.name):
        return False
    raw, _, _ = loading.read_bytes(path)
    if raw is None:
        return False
    if not raw:
        return True
    if raw.endswith(b"\n") and not path.name.endswith(".json"):
        # a YAML file whole to its last line: cut short only where the parse of it met the
        # end of the text with something still open (parsing again a big file refused for
        # what it says would hold up the files behind it)
        return problems is None or any(ENDS_EARLY in p.message for p in problems)
    text, _ = loading.decode_utf8(raw, path.name)
    if text is None:  # cut inside a multi-byte character, or not UTF-8 at all
        return len(raw) > 1 and raw[-1] >= 0x80
    try:
        if path.name.endswith(".json"):
            json.loads(text)
        else:
            for _ in yaml.parse(text, Loader=yaml.SafeLoader):
                pass
    except json.JSONDecodeError as exc:
        return exc.msg.startswith("Unterminated") or exc.pos >= len(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        return mark is not None and mark.index >= len(text)
    except (ValueError, RecursionError, yaml.YAMLError):
        return False
    return False


def _peek(path: Path) -> object:
    text, _ = loading.read_text(path)
    if text is None:
        return None
    data, _, errs = loading.parse_document(text, path.name)
    return None if errs else data
