"""Result files (results/<task_id>.json): one per task, replaced atomically on every transition."""

from __future__ import annotations

import collections
import functools
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from state import atomic, events, ids
from state.errors import ErrorEnvelope

StatusName = Literal["queued", "running", "succeeded", "failed", "canceled", "rejected"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "canceled", "rejected"})


class GpuRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: int
    uuid: str
    name: str
    simulated: bool = False


class Timings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    accepted_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    queue_ms: int | None = None
    first_token_ms: int | None = None
    decode_time_ms: int | None = None


class Budgets(BaseModel):
    """What a session task's session has left once this task was accepted (HME-020)."""

    model_config = ConfigDict(extra="forbid")

    session_id: str
    turns_remaining: int = Field(description="turns the session may still take after this one")
    tokens_budget_remaining: int | None = Field(
        description="what a next turn of the session may ask for as max_tokens: the budget "
        "less its finished turns' tokens and its live turns' max_tokens (this task's "
        "included); null when orch.yaml sets no token_budget"
    )
    ttl_ms_remaining: int = Field(description="how long the session lives without another use")


class Result(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task_id: str
    session_id: str | None = None
    status: StatusName
    queue_position: int | None = None
    predicted_start_ms: int | None = None
    on_time_probability: float | None = None
    budgets: Budgets | None = Field(None, description="a session task's session budgets")
    kv_warmth: bool | None = None
    pool_id: str | None = None
    replica_id: str | None = None
    gpu: GpuRef | None = None
    engine: str | None = None
    engine_version: str | None = None
    model: str | None = None
    model_digest: str | None = None
    seed: int | None = None
    text: str = ""
    tool_calls: list[dict[str, Any]] | None = Field(
        None, description="chat: the calls the model made, {id, type, function: {name, arguments}}"
    )
    reasoning: str | None = Field(None, description="chat: a thinking model's reasoning text")
    tokens_out: int = 0
    prompt_tokens: int | None = Field(None, description="as the engine counted them")
    finish_reason: str | None = None
    timings: Timings = Field(default_factory=Timings)
    error: ErrorEnvelope | None = None
    config_revision: str | None = None
    events: str | None = None
    source_file: str | None = None
    attempts: int = 0
    labels: dict[str, str] = Field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


class ResultStore:
    """The results/ folder. The reconciler is its only writer; anyone may read.

    The daemon indexes it (`index`) before it takes any task: from then on, a task id with
    no file in results/ at the index and none since (every path of a task's files is asked
    of `path` or `events_path`, which add the id) has none now, and `holds_nothing` says so
    without a lookup. Looked up instead, each new task's id cost two lookups in a folder the
    commit helper writes at the same time, which wait for its renames there: about half of
    what admitting a task cost the loop. A file removed by hand is still looked up (the id
    was indexed); a file put there by hand while the daemon runs is not seen."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._ids: set[str] | None = None  # None: not indexed, every question is looked up
        # per id taken over (`take_over`) and not yet taken by a new task: the last frame id
        # of the earlier task's log, after which the new task's frames are numbered
        self.taken_over: dict[str, int] = {}
        # the ids of the results written last, each with the count of writes when it was:
        # what changed since a reader last looked, without listing the folder
        self.writes = 0
        self.written: collections.OrderedDict[str, int] = collections.OrderedDict()

    def index(self) -> None:
        """List results/ once: the ids any file there may belong to (every prefix of its
        name that ends before a '.', as ids may hold dots: too many is only slower)."""
        ids_seen: set[str] = set()
        try:
            with os.scandir(self.root) as entries:
                for entry in entries:
                    name = entry.name
                    dot = name.find(".", 1)
                    while dot != -1:
                        ids_seen.add(name[:dot])
                        dot = name.find(".", dot + 1)
                    ids_seen.add(name)
        except OSError:  # not listable now: every question is looked up, as before
            self._ids = None
            return
        self._ids = ids_seen

    def holds_nothing(self, task_id: str) -> bool:
        """Whether results/ surely holds no file of `task_id` (see the class): False when it
        may, and the caller looks."""
        return self._ids is not None and task_id not in self._ids

    def path(self, task_id: str) -> Path:
        if self._ids is not None:
            self._ids.add(task_id)
        return _result_path(self.root, task_id)

    def events_path(self, task_id: str) -> Path:
        if self._ids is not None:
            self._ids.add(task_id)
        return self.root / f"{task_id}.events.jsonl"

    def exists(self, task_id: str) -> bool:
        """Whether a result file is (or, once this thread's group commits, will be) there; a
        folder put where it goes is no result (the write it blocks fails, and is retried)."""
        if self.holds_nothing(task_id):
            return False
        return atomic.exists(self.path(task_id), folder=False)

    def read(self, task_id: str) -> Result | None:
        path = self.path(task_id)
        try:
            result = Result.model_validate_json(atomic.read_bytes(path))
        except (OSError, ValidationError, ValueError):
            return None
        return result if result.task_id == task_id else None  # another task's: not its own

    def problem(self, task_id: str) -> str | None:
        """Why results/<id>.json is there but is not a result that can be read (cut short,
        changed by hand, no permission), or None: it is fine, or there is none."""
        try:
            raw = atomic.read_bytes(self.path(task_id))
        except FileNotFoundError:
            return None
        except OSError as exc:
            return f"it cannot be read: {exc.strerror or exc}"
        return damage(raw, task_id)

    def write(self, result: Result) -> None:
        atomic.write_bytes(self.path(result.task_id), encode(result), kind="result")
        self.writes += 1
        self.written[result.task_id] = self.writes
        self.written.move_to_end(result.task_id)
        if len(self.written) > WRITTEN_KEPT:
            self.written.popitem(last=False)

    def written_since(self, count: int) -> list[str] | None:
        """The ids written after the `count`-th write, most recent last; None when more
        were written than are kept (the caller lists the folder instead). Read from
        another thread: a copy, taken whole."""
        if self.writes - count > WRITTEN_KEPT:
            return None
        try:
            kept = list(self.written.items())
        except RuntimeError:  # changed while copied: look again by listing
            return None
        return [task_id for task_id, n in kept if n > count]

    def take_over(self, task_id: str) -> bool:
        """Free `task_id` for a new task when its task was refused at the door or ended with
        an error that said to retry (`id_reusable`), so the task sent again can use the same
        id: its event log goes first, then its result (in this thread's group commit, if
        one is open). True when the id was taken over; any other result keeps its id."""
        result = self.read(task_id)
        if result is None or not id_reusable(result):
            return False
        log = self.events_path(task_id)
        try:  # as the pending and in-flight commits will leave it
            self.taken_over[task_id] = events.last_id(atomic.read_bytes(log))
        except OSError:  # none (a refusal at the door may have none), or unreadable
            self.taken_over[task_id] = 0
        # in order with the writes still pending of the task whose id this was (in this
        # thread's group, or in the groups in flight): the log at once, with the frames
        # still to be appended to it; the result in order with its write still to come
        atomic.remove_log(log)
        atomic.remove(self.path(task_id))
        return True

    def task_ids(self) -> list[str]:
        # no error records here (they are in spool/failed/): an id may end in .error
        return sorted(p.name[: -len(".json")] for p in self.root.glob("*.json"))


def id_reusable(result: Result) -> bool:
    """Whether a new task may take over the id of the task `result` tells of: one refused at
    the door (`rejected`: it never ran, so nothing of it is lost; the client, told why, sends
    it again fixed, under the id it chose), or one that ended with an error saying to retry
    (evicted by drop-lru, its replica lost mid-task: `error.retriable`)."""
    if result.status == "rejected":
        return True
    return result.status == "failed" and result.error is not None and result.error.retriable


WRITTEN_KEPT = 4096  # ids of the last result writes kept (`ResultStore.written_since`)


@functools.lru_cache(maxsize=4096)  # a live task's result is written three times, read more
def _result_path(root: Path, task_id: str) -> Path:
    if not ids.is_safe_id(task_id):
        raise ValueError(f"unsafe task id {task_id!r}")
    return root / f"{task_id}.json"


def encode(result: Result) -> bytes:
    # pydantic's own encoder: json.dumps with an indent runs in pure Python, several times slower
    return result.model_dump_json(indent=2).encode() + b"\n"


def damage(raw: bytes, task_id: str | None = None) -> str | None:
    """Why `raw` is not a result file (cut short, not JSON, not a result; with `task_id`,
    not the result of that task: another task's copied over it), or None. Free text from
    the file may be in it: a caller showing it makes it printable."""
    try:
        result = Result.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "the file"
        text = f"{where}: {first.get('msg', '')}"
        return text if len(text) <= 120 else f"{text[:59]}…{text[-59:]}"
    if task_id is not None and result.task_id != task_id:
        named = result.task_id if len(result.task_id) <= 60 else result.task_id[:59] + "…"
        return f"task_id: it is the result of task {named!r}, not of {task_id!r}"
    return None
