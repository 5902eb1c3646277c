"""Planning: which replicas to start and drain so the running pools match the desired ones.

The reconcile loop calls `plan` once per pass with plain data it has gathered (what each
pool wants, which replicas exist and in which state, how much VRAM each GPU has free) and
carries out the returned actions. `plan` is pure: no I/O, no clock, and the same input gives
the same output whatever order it comes in.

Rules, in the order they apply:
- Replicas are named `<pool_id>-<n>`, n the smallest number no replica of the pool (in any
  state, Draining included) is using; numbering starts at 0.
- A Draining replica is never drained again and does not count toward its pool's replicas,
  but its memory will come back: new replicas may *wait* for it. Except a reclaim: one that
  was Ready, still runs (its stop has not begun) and has the hash its pool wants again (an
  edit undone, a failed reload rolled back, a file saved in steps) serves again in place of
  a missing replica (`Reclaim`), before any start: its running tasks go on, nothing restarts.
- A replica of a pool no longer desired is drained ("pool removed"); one whose spec hash
  differs from its pool's is drained ("spec changed") and replaced like a missing replica.
  Except a move: a Ready or Starting replica that serves what its pool wants (the same
  service key: model, ctx, slots, flags …) and differs only in where the pool asks for it
  (`devices`) keeps serving where it is while its pool is Unschedulable, named in
  `Unschedulable.kept`: a placement that cannot be met never takes a working replica down.
- Starting, Ready, BackingOff and Failed replicas with the pool's hash count as existing;
  supervision (restarts, circuit breaker) owns the last two. Surplus ones are drained
  ("scaled down"): Failed first, then BackingOff, then Starting, then Ready; within a state
  the one with the fewest tasks running first (a task on an idle replica's neighbour is not
  cut short while the idle one can go), then the highest n.
- Missing replicas are placed biggest footprint first (explicit device lists before `auto`),
  so a large model is not crowded out of the only GPU it fits on by a small one.
  `auto`: the single GPU with the most free VRAM, after `reserve_mib` and after the starts
  already planned in this plan, that fits (ties: lower index). An explicit list is honoured
  exactly: the replica spans all listed GPUs, its footprint split evenly, each must have room.
- A replica that does not fit now but would once the draining replicas have released their
  memory makes its pool *wait* (listed in `Plan.waiting`, no action); one that would not fit
  even then makes the pool `Unschedulable`, with the numbers. Either way the pool's further
  missing replicas are not tried this pass.
- Replicas that are neither drained nor surplus are never named in an action.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from state import ids, statusfile

# The replica states planning sees: the loop's one list (statusfile.ReplicaState); a Stopped
# replica is gone from planning's view.
ReplicaState = statusfile.ReplicaState
REPLICA_STATES: tuple[ReplicaState, ...] = ("Starting", "Ready", "Draining", "BackingOff", "Failed")
# States in which a replica's engine process exists and holds VRAM (BackingOff and Failed
# ones have no process: draining them gives nothing back).
HOLDS_MEMORY: frozenset[ReplicaState] = frozenset({"Starting", "Ready", "Draining"})
# Scale-down order: replicas that serve nothing go first.
_SURPLUS_RANK: Mapping[ReplicaState, int] = {
    "Failed": 0,
    "BackingOff": 1,
    "Starting": 2,
    "Ready": 3,
    "Draining": 4,
}

SPEC_CHANGED = "spec changed"
POOL_REMOVED = "pool removed"
SCALED_DOWN = "scaled down"


@dataclass(frozen=True)
class PoolWant:
    """One desired pool. `devices` None means auto; `vram_mib` is one replica's footprint."""

    pool_id: ids.PoolId
    replicas: int
    devices: tuple[int, ...] | None
    vram_mib: int
    spec_hash: str
    # what a replica serves, placement left out (model, ctx, slots, flags …): a replica with
    # another spec_hash but this key was only moved (`devices` changed)
    service_key: str = ""

    def __post_init__(self) -> None:
        if self.replicas < 0 or self.vram_mib < 0:
            raise ValueError(f"pool {self.pool_id}: replicas and vram_mib must be >= 0")
        if self.devices is not None and (
            not self.devices or len(set(self.devices)) != len(self.devices)
        ):
            raise ValueError(f"pool {self.pool_id}: devices must be None or distinct indices")


@dataclass(frozen=True)
class ReplicaSeen:
    """One replica the daemon knows about (Stopped ones are left out)."""

    replica_id: ids.ReplicaId
    pool_id: ids.PoolId
    spec_hash: str
    devices: tuple[int, ...]
    state: ReplicaState
    vram_mib: int
    service_key: str = ""  # see PoolWant.service_key
    # Draining only: it was Ready and its engine still runs, so it can serve again
    reclaimable: bool = False
    busy_slots: int = 0  # tasks running on it now: a scale-down drains the idle ones first

    def __post_init__(self) -> None:
        if self.state not in REPLICA_STATES:
            raise ValueError(f"replica {self.replica_id}: unknown state {self.state!r}")


@dataclass(frozen=True)
class GpuRoom:
    """One GPU's memory as planning sees it. `free_mib` is free now, with the bookings of
    replicas still loading (not yet visible in NVML) already subtracted by the caller."""

    index: int
    total_mib: int
    free_mib: int


@dataclass(frozen=True)
class Start:
    replica_id: ids.ReplicaId
    pool_id: ids.PoolId
    devices: tuple[int, ...]
    spec_hash: str
    vram_mib: int


@dataclass(frozen=True)
class Drain:
    replica_id: ids.ReplicaId
    pool_id: ids.PoolId
    reason: str


@dataclass(frozen=True)
class Reclaim:
    """A Draining replica whose pool wants its spec again: it stops draining and serves."""

    replica_id: ids.ReplicaId
    pool_id: ids.PoolId


@dataclass(frozen=True)
class Unschedulable:
    """A pool that cannot get all its replicas even once draining replicas release memory.

    `needed_mib` is per GPU (the share of each listed GPU for an explicit list); `best_gpu`
    is the GPU with the most room for `auto`, the listed GPU lacking room (or missing) for an
    explicit list; `best_free_mib` its free memory after reserve and this plan's starts.
    `missing` counts the replicas this pass could not place."""

    pool_id: ids.PoolId
    needed_mib: int
    best_free_mib: int
    best_gpu: int | None
    message: str
    missing: int = 1
    fits_on: tuple[int, ...] = ()  # GPUs outside a pinned list where a replica would fit
    kept: tuple[ids.ReplicaId, ...] = ()  # replicas serving where they were, meanwhile


Action = Start | Drain | Reclaim


@dataclass(frozen=True)
class Plan:
    """Drains first (by pool, then replica number), then reclaims (the same order), then
    starts in placement order."""

    actions: tuple[Action, ...]
    unschedulable: tuple[Unschedulable, ...]
    waiting: tuple[ids.PoolId, ...]

    @property
    def starts(self) -> tuple[Start, ...]:
        return tuple(a for a in self.actions if isinstance(a, Start))

    @property
    def drains(self) -> tuple[Drain, ...]:
        return tuple(a for a in self.actions if isinstance(a, Drain))

    @property
    def reclaims(self) -> tuple[Reclaim, ...]:
        return tuple(a for a in self.actions if isinstance(a, Reclaim))


def share_mib(vram_mib: int, n_devices: int) -> int:
    """What one replica needs on each of its GPUs: its footprint split evenly, rounded up."""
    return math.ceil(vram_mib / n_devices)


def plan(
    pools: Iterable[PoolWant],
    replicas: Iterable[ReplicaSeen],
    gpus: Iterable[GpuRoom],
    *,
    reserve_mib: int,
) -> Plan:
    """The actions that move `replicas` toward `pools` on `gpus`, keeping `reserve_mib` free
    on every GPU; see the module docstring for the rules. Raises ValueError on duplicate
    pool ids, replica ids or GPU indices."""
    pool_list = list(pools)
    wants = {p.pool_id: p for p in pool_list}
    seen = sorted(replicas, key=_replica_key)
    rooms = sorted(gpus, key=lambda g: g.index)
    _check_unique([p.pool_id for p in pool_list], "pool id")
    _check_unique([r.replica_id for r in seen], "replica id")
    _check_unique([g.index for g in rooms], "GPU index")
    kept: set[ids.ReplicaId] = set()
    while True:  # at most once more per pool: `kept` only grows
        result = _plan(wants, seen, rooms, reserve_mib, kept)
        stuck = {u.pool_id for u in result.unschedulable}
        keep = {
            r.replica_id
            for r in seen
            if r.pool_id in stuck and r.replica_id not in kept and _moved(r, wants)
        }
        if not keep:
            return result
        kept |= keep


def _moved(replica: ReplicaSeen, wants: Mapping[ids.PoolId, PoolWant]) -> bool:
    """Whether `replica` serves what its pool wants, only placed where the pool no longer
    asks for it (and is serving, or about to)."""
    want = wants.get(replica.pool_id)
    return (
        want is not None
        and replica.state in ("Ready", "Starting")
        and replica.spec_hash != want.spec_hash
        and bool(want.service_key)
        and replica.service_key == want.service_key
    )


def _plan(
    wants: Mapping[ids.PoolId, PoolWant],
    seen: Sequence[ReplicaSeen],
    rooms: Sequence[GpuRoom],
    reserve_mib: int,
    kept: set[ids.ReplicaId],
) -> Plan:
    avail = {g.index: g.free_mib - reserve_mib for g in rooms}  # room for new replicas now
    releasing = dict.fromkeys(avail, 0)  # what draining replicas will give back
    taken: dict[ids.PoolId, set[str]] = {}
    current: dict[ids.PoolId, list[ReplicaSeen]] = {p: [] for p in wants}
    drains: list[Drain] = []
    reclaimable: dict[ids.PoolId, list[ReplicaSeen]] = {}

    def drain(replica: ReplicaSeen, reason: str) -> None:
        drains.append(Drain(replica.replica_id, replica.pool_id, reason))
        _release(replica, releasing)

    for replica in seen:
        taken.setdefault(replica.pool_id, set()).add(replica.replica_id)
        want = wants.get(replica.pool_id)
        if replica.state == "Draining":
            if want is not None and replica.reclaimable and replica.spec_hash == want.spec_hash:
                reclaimable.setdefault(replica.pool_id, []).append(replica)
            else:
                _release(replica, releasing)
        elif want is None:
            drain(replica, POOL_REMOVED)
        elif replica.replica_id in kept:
            continue  # moved, but the new placement cannot be met: it serves where it is
        elif replica.spec_hash != want.spec_hash:
            drain(replica, SPEC_CHANGED)
        else:
            current[replica.pool_id].append(replica)

    reclaims: list[Reclaim] = []
    for pool_id, draining in sorted(reclaimable.items()):
        for replica in draining:  # already in replica order
            serving = [r for r in current[pool_id] if r.state in ("Ready", "Starting", "Draining")]
            if len(serving) < wants[pool_id].replicas:  # a surplus crashed one is drained
                reclaims.append(Reclaim(replica.replica_id, pool_id))
                current[pool_id].append(replica)
            else:
                _release(replica, releasing)

    missing: dict[ids.PoolId, int] = {}
    for pool_id in sorted(wants):
        have = current[pool_id]
        surplus = len(have) - wants[pool_id].replicas
        for replica in sorted(have, key=_surplus_key)[: max(surplus, 0)]:
            drain(replica, SCALED_DOWN)
        if surplus < 0:
            missing[pool_id] = -surplus

    starts: list[Start] = []
    waiting: list[ids.PoolId] = []
    unschedulable: list[Unschedulable] = []
    for want in sorted((wants[p] for p in missing), key=_placement_key):
        count = missing[want.pool_id]
        for placed in range(count):
            where = _place(want, avail, releasing, reserve_mib)
            if isinstance(where, Unschedulable):
                placed_on = [r.devices for r in current[want.pool_id]]
                placed_on += [s.devices for s in starts if s.pool_id == want.pool_id]
                stays = tuple(
                    r.replica_id for r in seen if r.pool_id == want.pool_id and r.replica_id in kept
                )
                unschedulable.append(
                    dataclasses.replace(_with_missing(where, count - placed, placed_on), kept=stays)
                )
                break
            if where is None:
                waiting.append(want.pool_id)
                break
            share = share_mib(want.vram_mib, len(where))
            for index in where:
                avail[index] -= share
            replica_id = _next_id(want.pool_id, taken.setdefault(want.pool_id, set()))
            starts.append(Start(replica_id, want.pool_id, where, want.spec_hash, want.vram_mib))

    drains.sort(key=lambda d: _id_key(d.pool_id, d.replica_id))
    return Plan(
        actions=(*drains, *reclaims, *starts),
        unschedulable=tuple(sorted(unschedulable, key=lambda u: u.pool_id)),
        waiting=tuple(sorted(waiting)),
    )


def _place(
    want: PoolWant, avail: dict[int, int], releasing: Mapping[int, int], reserve_mib: int
) -> tuple[int, ...] | Unschedulable | None:
    """Devices for one more replica; None to wait for draining memory; or why it cannot."""
    if want.devices is None:
        return _place_auto(want, avail, releasing, reserve_mib)
    return _place_pinned(want, want.devices, avail, releasing, reserve_mib)


def _place_auto(
    want: PoolWant, avail: Mapping[int, int], releasing: Mapping[int, int], reserve_mib: int
) -> tuple[int, ...] | Unschedulable | None:
    need = want.vram_mib
    fitting = [i for i in avail if avail[i] >= need]
    if fitting:
        return (min(fitting, key=lambda i: (-avail[i], i)),)
    if any(avail[i] + releasing[i] >= need for i in avail):
        return None
    if not avail:
        return Unschedulable(
            want.pool_id, need, 0, None, f"needs {need} MiB, but no GPU is visible"
        )
    best = min(avail, key=lambda i: (-(avail[i] + releasing[i]), i))
    free = max(avail[best], 0)
    others = ", ".join(f"GPU {i} {max(avail[i], 0)} MiB" for i in sorted(avail) if i != best)
    message = (
        f"needs {need} MiB; the GPU with the most room, GPU {best}, has {free} MiB free "
        f"after the {reserve_mib} MiB reserve" + (f" (other GPUs: {others})" if others else "")
    )
    if releasing[best]:
        message += f" (and {releasing[best]} MiB that draining replicas will release)"
    return Unschedulable(want.pool_id, need, free, best, message)


def _place_pinned(
    want: PoolWant,
    devices: tuple[int, ...],
    avail: Mapping[int, int],
    releasing: Mapping[int, int],
    reserve_mib: int,
) -> tuple[int, ...] | Unschedulable | None:
    need = share_mib(want.vram_mib, len(devices))
    absent = [d for d in devices if d not in avail]
    if absent:
        present = ", ".join(str(i) for i in avail) or "none"
        return Unschedulable(
            want.pool_id,
            need,
            0,
            absent[0],
            f"devices lists GPU {absent[0]}, which does not exist (GPUs present: {present})",
        )
    if all(avail[d] >= need for d in devices):
        return devices
    if all(avail[d] + releasing[d] >= need for d in devices):
        return None
    short = min(devices, key=lambda d: (avail[d] + releasing[d], d))
    free = max(avail[short], 0)
    where = (
        f"on GPU {short}, which"
        if len(devices) == 1
        else f"on each of GPUs {', '.join(map(str, devices))}; GPU {short}"
    )
    message = f"needs {need} MiB {where} has {free} MiB free after the {reserve_mib} MiB reserve"
    if releasing[short]:
        message += f" (and {releasing[short]} MiB that draining replicas will release)"
    elsewhere = tuple(i for i in sorted(avail) if i not in devices and avail[i] >= want.vram_mib)
    return Unschedulable(want.pool_id, need, free, short, message, fits_on=elsewhere)


def _with_missing(
    u: Unschedulable, missing: int, placed_on: list[tuple[int, ...]]
) -> Unschedulable:
    """Say how many replicas are missing and where the pool's others run or will run, so a
    reader sees why the roomier GPU is not the one named."""
    message = u.message
    total = missing + len(placed_on)
    if total > 1:
        message += f"; {missing} of {total} replicas not placed"
        if placed_on:
            where = ", ".join("GPU " + "+".join(map(str, d)) for d in placed_on)
            message += f" (the {'others take' if len(placed_on) > 1 else 'other takes'} {where})"
    return dataclasses.replace(u, message=message, missing=missing)


def _release(replica: ReplicaSeen, releasing: dict[int, int]) -> None:
    if replica.state not in HOLDS_MEMORY or not replica.devices:
        return
    share = share_mib(replica.vram_mib, len(replica.devices))
    for index in replica.devices:
        if index in releasing:
            releasing[index] += share


def _next_id(pool_id: ids.PoolId, taken: set[str]) -> ids.ReplicaId:
    n = 0
    while f"{pool_id}-{n}" in taken:
        n += 1
    replica_id = ids.ReplicaId(f"{pool_id}-{n}")
    taken.add(replica_id)
    return replica_id


def replica_number(pool_id: str, replica_id: str) -> int | None:
    """n of `<pool_id>-<n>`, or None for an id not made by `plan`."""
    tail = replica_id.removeprefix(f"{pool_id}-")
    return int(tail) if tail != replica_id and tail.isdigit() else None


def _id_key(pool_id: str, replica_id: str) -> tuple[str, int, str]:
    n = replica_number(pool_id, replica_id)
    return (pool_id, -1 if n is None else n, replica_id)


def _replica_key(r: ReplicaSeen) -> tuple[str, int, str]:
    return _id_key(r.pool_id, r.replica_id)


def _surplus_key(r: ReplicaSeen) -> tuple[int, int, int, str]:
    n = replica_number(r.pool_id, r.replica_id)
    return (_SURPLUS_RANK[r.state], r.busy_slots, -(n if n is not None else -1), r.replica_id)


def _placement_key(p: PoolWant) -> tuple[int, int, str]:
    if p.devices is None:
        return (1, -p.vram_mib, p.pool_id)
    return (0, -share_mib(p.vram_mib, len(p.devices)), p.pool_id)


def _check_unique(keys: Sequence[object], what: str) -> None:
    if len(set(keys)) != len(keys):
        twice = sorted({str(k) for k in keys if keys.count(k) > 1})
        raise ValueError(f"plan: {what} given more than once: {', '.join(twice)}")
