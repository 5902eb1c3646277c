"""The determinism suite's report (HME-041): determinism.md for people and
determinism.json for scripts, from what the suite ran (`Run`, its `Lane`s) and the `Verdict`
that `determinism.compare` reached.

`cli_determinism.write_bundle` calls `render_markdown` and `as_json`; this module decides
nothing. The rules it keeps: pure (no I/O, text and plain dicts out); the JSON keeps
every field scripts read (`passed`, `problems`, `same_replica`, `cross_replica`, `latency`,
`failed_tasks`); a value every lane agrees on is written once, else as the sorted list.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from reconciler import determinism


@dataclass(frozen=True)
class Lane:
    pool_id: str
    model: str
    engine: str
    engine_version: str | None
    model_digest: str | None
    replicas: tuple[str, ...]
    gpus: tuple[str, ...]
    model_digest_source: str | None = None  # "declared" in orch.yaml, or measured by a verify


@dataclass(frozen=True)
class Run:
    """What the suite ran: for the report's header and run_config."""

    run_id: str
    url: str
    seeds: tuple[int, ...]
    max_tokens: int
    runs: int
    started_at: str
    took_s: float
    lanes: tuple[Lane, ...]
    gpus: tuple[dict[str, Any], ...]  # status.json's GPU rows


def as_json(run: Run, verdict: determinism.Verdict) -> dict[str, Any]:
    return {
        "run_id": run.run_id,
        "url": run.url,
        "started_at": run.started_at,
        "took_s": round(run.took_s, 3),
        "passed": verdict.passed,
        "problems": verdict.problems,
        "not_run": verdict.not_run,
        "seeds": list(run.seeds),
        "max_tokens": run.max_tokens,
        "temperature": determinism.TEMPERATURE,
        "runs": run.runs,
        "prompts": list(determinism.PROMPTS),
        "engine_version": _one(lane.engine_version for lane in run.lanes),
        "model_digest": _one(lane.model_digest for lane in run.lanes),
        "gpus": list(run.gpus),
        "gpu_names": sorted({g.get("name", "?") for g in run.gpus}),
        "lanes": [
            {
                "pool_id": lane.pool_id,
                "model": lane.model,
                "engine": lane.engine,
                "engine_version": lane.engine_version,
                "model_digest": lane.model_digest,
                "model_digest_source": lane.model_digest_source,
                "replicas": list(lane.replicas),
                "gpus": list(lane.gpus),
            }
            for lane in run.lanes
        ],
        "same_replica": [_pair_json(c) for c in verdict.same],
        "cross_replica": [_pair_json(c) for c in verdict.cross],
        "distinct_streams_across_seeds": verdict.distinct_per_lane,
        "latency": [
            {
                "device": row.device,
                "n": row.n,
                "first_token_ms": {"p50": _r(row.ttft_p50_ms), "p95": _r(row.ttft_p95_ms)},
                "tokens_per_s": {"p50": _r(row.tps_p50), "p95": _r(row.tps_p95)},
            }
            for row in verdict.latency
        ],
        "failed_tasks": [
            {"task_id": s.task_id, "lane": s.lane, "status": s.status, "error": s.error}
            for s in verdict.failed
        ],
    }


def _one(values: Iterable[str | None]) -> str | list[str] | None:
    """One value when every lane agrees, else the sorted list of them."""
    found = sorted({v for v in values if v})
    return found[0] if len(found) == 1 else (found or None)


def _pair_json(c: determinism.PairCount) -> dict[str, Any]:
    first = c.first
    return {
        "a": c.a,
        "b": c.b,
        "gpus": list(c.gpus),
        "matched": c.matched,
        "mismatched": c.mismatched,
        "first_divergence": None
        if first is None
        else {"seed": first.seed, "token_index": first.index, "a": first.a, "b": first.b},
        "mismatched_seeds": [d.seed for d in c.divergences],
    }


def render_markdown(run: Run, verdict: determinism.Verdict) -> str:
    lines = [
        "# Determinism suite",
        "",
        f"- run `{run.run_id}` against {run.url}, started {run.started_at}, took "
        f"{run.took_s:.1f} s",
        f"- verdict: **{'PASS' if verdict.passed else 'FAIL'}**"
        + (f" ({'; '.join(verdict.problems)})" if verdict.problems else ""),
        f"- not run on: {'; '.join(verdict.not_run)}"
        if verdict.not_run
        else "- ran on every Ready replica and GPU",
        f"- seeds: {len(run.seeds)} ({_span(run.seeds)}), {run.runs} runs, max_tokens "
        f"{run.max_tokens}, temperature {determinism.TEMPERATURE}, "
        f"{len(determinism.PROMPTS)} fixed prompts",
        f"- GPUs: {', '.join(_gpu_line(g) for g in run.gpus) or 'none reported'}",
        "",
        "## Lanes (each task pinned to its pool; lanes ran concurrently, seeds one at a time)",
        "",
        "| pool | model | engine | engine_version | model digest | replicas | GPUs |",
        "|---|---|---|---|---|---|---|",
    ]
    for lane in run.lanes:
        lines.append(
            f"| {lane.pool_id} | {lane.model} | {lane.engine} | {lane.engine_version or '?'} | "
            f"{_digest(lane)} | {', '.join(lane.replicas)} | "
            f"{', '.join(lane.gpus)} |"
        )
    lines += [
        "",
        "## The same replica across runs (must be byte-identical)",
        "",
        "| replica | GPU | matched | mismatched | first diverging token |",
        "|---|---|---|---|---|",
    ]
    for c in verdict.same:
        lines.append(f"| {c.a} | {c.gpus[0]} | {c.matched} | {c.mismatched} | {_first(c)} |")
    if not verdict.same:
        lines.append("| (none) | | | | |")
    lines += [
        "",
        "## Across replicas and GPUs (run 1; reported, not required)",
        "",
        "| lane A | lane B | GPUs | matched | mismatched | first diverging token |",
        "|---|---|---|---|---|---|",
    ]
    for c in verdict.cross:
        lines.append(
            f"| {c.a} | {c.b} | {c.gpus[0]} / {c.gpus[1]} | {c.matched} | {c.mismatched} | "
            f"{_first(c)} |"
        )
    if not verdict.cross:
        lines.append("| (one lane only, or no lanes of one model, engine and digest) | | | | | |")
    lines += [
        "",
        "Distinct streams across seeds (run 1): "
        + ", ".join(
            f"{lane} {n}/{len(run.seeds)}" for lane, n in verdict.distinct_per_lane.items()
        ),
        "",
        "## Latency per device (first token: the daemon's start on the replica to the first "
        "token; tokens/s: tokens over decode time)",
        "",
        "| device | tasks | first token p50 | first token p95 | tokens/s p50 | tokens/s p95 |",
        "|---|---|---|---|---|---|",
    ]
    for row in verdict.latency:
        lines.append(
            f"| {row.device} | {row.n} | {_ms(row.ttft_p50_ms)} | {_ms(row.ttft_p95_ms)} | "
            f"{_rate(row.tps_p50)} | {_rate(row.tps_p95)} |"
        )
    if verdict.failed:
        lines += ["", "## Tasks that did not succeed", ""]
        lines += [f"- `{s.task_id}` ({s.lane}): {s.status} {s.error or ''}" for s in verdict.failed]
    return "\n".join(lines) + "\n"


def _digest(lane: Lane) -> str:
    if not lane.model_digest:
        return "none declared, none verified"
    source = f" ({lane.model_digest_source})" if lane.model_digest_source else ""
    return f"`{lane.model_digest}`{source}"


def _first(c: determinism.PairCount) -> str:
    return c.first.describe() if c.first else "—"


def _span(values: Sequence[int]) -> str:
    return f"{values[0]}..{values[-1]}" if values else "none"


def _gpu_line(g: dict[str, Any]) -> str:
    name = str(g.get("name"))
    if g.get("simulated") and "SIMULATED" not in name.upper():
        name += " (simulated)"
    return f"GPU {g.get('index')} {name} {g.get('vram_total_mib', '?')} MiB"


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f} ms"


def _rate(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
