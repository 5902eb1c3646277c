"""`orchctl determinism [--url URL] [--seeds 64] [--out DIR]`: the determinism suite
(HME-041) against a running daemon, over its HTTP API.

Every Ready pool is a lane; its tasks are pinned to it (`placement: pin`), and each lane runs
its seeds one at a time (one sequence per replica, as llama.cpp's single-slot determinism
needs) while all lanes run at once, each on its own GPU where the pools are placed so. The
whole corpus runs twice; `determinism.compare` then checks the same replica across the runs
(byte-identical, or exit 1) and counts matches across replicas and GPUs. The bundle in
`--out` holds determinism.md, determinism.json and every stream (streams.ndjson).

`run_suite` is also what `orchctl smoke` runs with a few seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from reconciler import api_client, cli_common, cli_sse, cli_watch, determinism, determinism_report
from reconciler.cli_common import EXIT_ENV, EXIT_FAILED, EXIT_OK, EXIT_USAGE, Refused
from state import desired

RETRIES = 5  # a 429 or 503 at admission is waited out this often


def add_verb(verb: Any, config: Any) -> None:
    d = verb("determinism", cmd_determinism, "run the seed corpus on every pool, compare streams")
    d.add_argument(
        "--seeds",
        type=cli_common.positive,
        default=determinism.DEFAULT_SEEDS,
        help=f"how many seeds of the corpus ({determinism.FIRST_SEED} onwards)",
    )
    d.add_argument("--max-tokens", type=cli_common.positive, default=32, help="tokens per task")
    d.add_argument(
        "--pool",
        action="append",
        metavar="POOL",
        help="only this pool (repeat for several; default: every Ready pool)",
    )
    d.add_argument(
        "--out",
        type=cli_common.path_arg,
        help="the report folder (default: proof/determinism/RUN beside orch.yaml)",
    )
    add_connection(d, config)


def add_connection(parser: argparse.ArgumentParser, config: Any) -> None:
    parser.add_argument(
        "--url",
        type=cli_common.http_url,
        help="the daemon's HTTP API (default: the address in .orch/status.json of --config)",
    )
    config(parser)
    parser.add_argument(
        "--token-env",
        default="AUTH_TOKEN",
        help="environment variable holding the API token, when the API needs one",
    )


def client_for(args: argparse.Namespace) -> api_client.Client:
    """The daemon at `--url`, else the one serving `--config`'s folder."""
    url = args.url
    if url and not url.startswith(("http://", "https://")):
        raise Refused(
            EXIT_USAGE,
            f"--url {url!r} is not an http:// URL",
            hint="give the daemon's address, e.g. --url http://127.0.0.1:8080",
        )
    if not url:
        url = cli_watch.source_url(cli_common.open_folder(args.config), None)
    if not url:
        raise Refused(
            EXIT_ENV,
            f"no daemon is serving {args.config}",
            hint=f"start one with `orchctl serve --config {args.config}`, or pass --url",
        )
    token = cli_sse.token_from(args.token_env)
    if token is None and not args.url:  # this folder's daemon: read its token where it does
        token = _folder_token(args.config)
    try:
        client = api_client.Client(url, token)
        probe = client.get("/v1/status")
    except api_client.Unreachable as exc:
        raise Refused(EXIT_ENV, f"cannot reach the daemon: {exc}") from None
    if probe.status in (401, 403):  # a daemon answered: the token is what is missing
        given = "the token given" if token else "no token"
        raise Refused(
            EXIT_USAGE,
            f"{url} refused {given}: {probe.said()}",
            hint=f"export the daemon's API token in ${args.token_env or 'AUTH_TOKEN'} (or name "
            "the variable holding it with --token-env)",
        )
    if probe.status != 200:
        raise Refused(EXIT_ENV, f"{url}/v1/status answered {probe.said()}")
    return client


def _folder_token(config_path: Path) -> str | None:
    """The API token of the daemon serving `config_path`'s folder, read where it reads it
    (auth.token_file, or the variable auth.token_env names); None when there is none to
    read (the daemon then needs none, or the caller gives it)."""
    loaded = desired.load_desired(config_path)
    if loaded.value is None:
        return None
    auth = loaded.value.auth
    if auth.token_file:
        try:
            text = desired.resolve(config_path.parent, auth.token_file).read_text("utf-8")
        except (OSError, UnicodeDecodeError):
            return None
        return text.strip() or None
    return os.environ.get(auth.token_env) or None


def cmd_determinism(args: argparse.Namespace) -> int:
    if args.seeds < 1 or args.max_tokens < 1:
        raise Refused(EXIT_USAGE, "--seeds and --max-tokens must be 1 or more")
    # unique per run, also for two runs started in the same second (their task ids)
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    if args.out is not None:  # before the suite runs, not after: its results would be lost
        cli_common.report_folder(args.out, keep=False)
    client = client_for(args)
    try:
        run, verdict, streams = run_suite(
            client,
            seeds=determinism.seeds(args.seeds),
            max_tokens=args.max_tokens,
            pools=args.pool,
            run_id=run_id,
            progress=lambda line: print(line, file=sys.stderr, flush=True),
        )
    except api_client.Unreachable as exc:
        raise Refused(
            EXIT_ENV,
            f"the daemon stopped answering during the suite: {exc}",
            hint="start it again (`orchctl serve`) and run the suite again",
        ) from None
    out = args.out or Path(args.config).parent / "proof" / "determinism" / run_id
    written = write_bundle(out, run, verdict, streams)
    print(summary(verdict))
    print(f"report: {written}")
    return EXIT_OK if verdict.passed else EXIT_FAILED


def summary(verdict: determinism.Verdict) -> str:
    same = sum(c.matched for c in verdict.same), sum(c.mismatched for c in verdict.same)
    cross = sum(c.matched for c in verdict.cross), sum(c.mismatched for c in verdict.cross)
    word = "PASS" if verdict.passed else "FAIL: " + "; ".join(verdict.problems)
    line = (
        f"{word}: same replica {same[0]} matched, {same[1]} differed; "
        f"across replicas {cross[0]} matched, {cross[1]} differed"
    )
    if verdict.not_run:
        line += "\nnot run on (not checked): " + "; ".join(verdict.not_run)
    return line


def run_suite(
    client: api_client.Client,
    *,
    seeds: list[int],
    max_tokens: int,
    run_id: str,
    pools: list[str] | None = None,
    runs: int = 2,
    progress: Any = None,
) -> tuple[determinism_report.Run, determinism.Verdict, list[determinism.Stream]]:
    """Run the corpus `runs` times on every lane at once; compare; describe what ran."""
    status = _json(client.get("/v1/status"), "/v1/status")
    lanes = _lanes(status, pools)
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    began = time.monotonic()
    streams: list[determinism.Stream] = []
    with ThreadPoolExecutor(max_workers=len(lanes), thread_name_prefix="lane") as pool:
        for run in range(1, runs + 1):
            jobs = [
                pool.submit(_lane, client, lane, run, seeds, max_tokens, run_id) for lane in lanes
            ]
            for lane, job in zip(lanes, jobs, strict=True):
                done = job.result()
                streams.extend(done)
                if progress:
                    ok = sum(s.ok for s in done)
                    progress(f"run {run}: {lane['id']}: {ok} of {len(done)} tasks succeeded")
    verdict = determinism.compare(streams, runs=runs)
    verdict.not_run = not_run(status, lanes, streams)
    measured = _measured_digests(client)
    described = determinism_report.Run(
        run_id=run_id,
        url=client.base_url,
        seeds=tuple(seeds),
        max_tokens=max_tokens,
        runs=runs,
        started_at=started_at,
        took_s=time.monotonic() - began,
        lanes=tuple(_describe(lane, streams, status, measured) for lane in lanes),
        gpus=tuple(status.get("gpus") or ()),
    )
    return described, verdict, streams


def _json(answer: api_client.Answer, what: str) -> dict[str, Any]:
    body = answer.json
    if answer.status != 200 or not isinstance(body, dict):
        raise Refused(EXIT_ENV, f"{what} answered {answer.said()}")
    return body


def _lanes(status: dict[str, Any], only: list[str] | None) -> list[dict[str, Any]]:
    ready = [
        p
        for p in status.get("pools", [])
        if p.get("state") == "Ready" and any(r["state"] == "Ready" for r in p.get("replicas", []))
    ]
    if only:
        unknown = sorted(set(only) - {p["id"] for p in ready})
        if unknown:
            raise Refused(
                EXIT_USAGE,
                f"no Ready pool {', '.join(unknown)} to run on",
                hint="`orchctl status` shows the pools and their states",
            )
        ready = [p for p in ready if p["id"] in only]
    if not ready:
        raise Refused(EXIT_ENV, "the daemon has no Ready pool to run the suite on")
    return ready


def _lane(
    client: api_client.Client,
    lane: dict[str, Any],
    run: int,
    seeds: list[int],
    max_tokens: int,
    run_id: str,
) -> list[determinism.Stream]:
    """The corpus on one pool, as many seeds at once as it has Ready replicas, so placement
    spreads them over every replica (a seed whose second run lands on another replica than
    its first is a cross-replica pair). No seed runs in a session: a session's turns reuse
    the slot's KV cache, and a warm slot samples other text than a cold one (llama-server
    evaluates a cached prefix in other batch shapes), where the suite checks that a lone
    prompt's seed gives the same text whatever its slot held before."""
    width = max(1, sum(r.get("state") == "Ready" for r in lane.get("replicas", [])))

    def one(seed: int) -> determinism.Stream:
        return one_task(
            client,
            task_id=f"det-{run_id}-{lane['id']}-r{run}-s{seed}"[:128],
            lane=lane["id"],
            model=lane["model"],
            run=run,
            seed=seed,
            max_tokens=max_tokens,
        )

    if width == 1:
        return [one(seed) for seed in seeds]
    with ThreadPoolExecutor(max_workers=width, thread_name_prefix="seed") as pool:
        return list(pool.map(one, seeds))


def not_run(
    status: dict[str, Any], lanes: list[dict[str, Any]], streams: list[determinism.Stream]
) -> list[str]:
    """The Ready replicas of the lanes no stream ran on, and the GPUs none did (with why)."""
    served = {s.replica_id for s in streams if s.ok}
    out = [
        f"replica {r['id']} of pool {lane['id']} (no seed landed there)"
        for lane in lanes
        for r in lane.get("replicas", [])
        if r.get("state") == "Ready" and r["id"] not in served
    ]
    replicas = [r for p in status.get("pools", []) for r in p.get("replicas", [])]
    used = {g for r in replicas if r["id"] in served for g in r.get("gpu", [])}
    ready = {g for r in replicas if r.get("state") == "Ready" for g in r.get("gpu", [])}
    for gpu in status.get("gpus") or ():
        if gpu.get("index") not in used:
            why = "no seed landed there" if gpu.get("index") in ready else "no Ready replica there"
            out.append(f"GPU {gpu.get('index')} {gpu.get('name')} ({why})")
    return out


def one_task(
    client: api_client.Client,
    *,
    task_id: str,
    lane: str,
    model: str,
    run: int,
    seed: int,
    max_tokens: int,
    session_id: str | None = None,
) -> determinism.Stream:
    """Submit one corpus task pinned to `lane`, read its stream to the end, then its result."""
    body: dict[str, Any] = {
        "task_id": task_id,
        "model": model,
        "prompt": determinism.prompt_for(seed),
        "max_tokens": max_tokens,
        "seed": seed,
        "priority": "interactive",
        "sampling": {"temperature": determinism.TEMPERATURE},
        "placement": {"mode": "pin", "pin_pool": lane},
        "labels": {"suite": "determinism"},
    }
    if session_id is not None:
        body["session_id"] = session_id
    base = determinism.Stream(lane=lane, run=run, seed=seed, task_id=task_id, status="rejected")
    for attempt in range(RETRIES + 1):
        answer = client.post("/v1/tasks", body)
        if answer.status == 202:
            break
        if answer.status not in (429, 503) or attempt == RETRIES:
            return _replace(base, error=answer.said())
        time.sleep(_retry_after_s(answer))
        body["task_id"] = task_id = f"{task_id[:120]}-a{attempt + 1}"
        base = _replace(base, task_id=task_id)
    tokens: list[str] = []
    finish, error = None, None
    for frame in client.frames(task_id):
        if frame.event == "token":
            tokens.append(str(frame.data.get("t", "")))
        elif frame.event == "end":
            finish = frame.data.get("finish_reason")
        elif frame.event == "error":
            error = f"{frame.data.get('code')}: {frame.data.get('message')}"
    result = client.get(f"/v1/tasks/{task_id}").json or {}
    timings = result.get("timings") or {}
    return determinism.Stream(
        lane=lane,
        run=run,
        seed=seed,
        task_id=task_id,
        status=str(result.get("status") or ("failed" if error else "unknown")),
        tokens=tuple(tokens),
        finish_reason=finish,
        replica_id=result.get("replica_id"),
        gpu=gpu_name(result.get("gpu")),
        model=result.get("model"),
        engine=result.get("engine"),
        engine_version=result.get("engine_version"),
        model_digest=result.get("model_digest"),
        first_token_ms=timings.get("first_token_ms"),
        decode_ms=timings.get("decode_time_ms"),
        error=error,
    )


def _replace(stream: determinism.Stream, **changes: Any) -> determinism.Stream:
    import dataclasses

    return dataclasses.replace(stream, **changes)


def _retry_after_s(answer: api_client.Answer) -> float:
    try:
        return min(5.0, max(0.1, int(answer.headers.get("x-backoff-ms", "500")) / 1000))
    except ValueError:
        return 0.5


def gpu_name(gpu: Any) -> str | None:
    if not isinstance(gpu, dict):
        return None
    name = str(gpu.get("name"))
    if gpu.get("simulated") and "SIMULATED" not in name.upper():
        name += " (simulated)"
    return f"GPU {gpu.get('index')} {name}"


def _measured_digests(client: api_client.Client) -> dict[str, str]:
    """model → the sha256 its last catalog verify measured, where that is still current:
    the digest of a model orch.yaml pins none for."""
    answer = client.get("/v1/catalog/models")
    body = answer.json if answer.status == 200 else None
    found = {}
    for m in body.get("models", []) if isinstance(body, dict) else []:
        record = m.get("last_verification") or {}
        if m.get("verification_current") and record.get("actual_digest"):
            found[m["id"]] = str(record["actual_digest"])
    return found


def _describe(
    lane: dict[str, Any],
    streams: list[determinism.Stream],
    status: dict[str, Any],
    measured: dict[str, str],
) -> determinism_report.Lane:
    mine = [s for s in streams if s.lane == lane["id"] and s.ok]
    names = {g["index"]: g for g in status.get("gpus", [])}
    gpus = sorted(
        {
            gpu_name(names[i]) or f"GPU {i}"
            for r in lane.get("replicas", [])
            if r["state"] == "Ready"
            for i in r.get("gpu", [])
            if i in names
        }
    )
    declared = next((s.model_digest for s in mine if s.model_digest), None)
    return determinism_report.Lane(
        pool_id=lane["id"],
        model=lane["model"],
        engine=lane["engine"],
        engine_version=next((s.engine_version for s in mine if s.engine_version), None),
        model_digest=declared or measured.get(lane["model"]),
        model_digest_source="declared"
        if declared
        else ("measured by the last catalog verify" if lane["model"] in measured else None),
        replicas=tuple(sorted({s.replica_id for s in mine if s.replica_id})),
        gpus=tuple(gpus),
    )


def write_bundle(
    out: Path,
    run: determinism_report.Run,
    verdict: determinism.Verdict,
    streams: list[determinism.Stream],
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "determinism.md").write_text(determinism_report.render_markdown(run, verdict), "utf-8")
    data = determinism_report.as_json(run, verdict)
    (out / "determinism.json").write_text(json.dumps(data, indent=2) + "\n", "utf-8")
    with open(out / "streams.ndjson", "w", encoding="utf-8") as fh:
        for s in sorted(streams, key=lambda s: (s.lane, s.run, s.seed)):
            row = {"lane": s.lane, "run": s.run, "seed": s.seed, "task_id": s.task_id}
            row |= {"replica_id": s.replica_id, "gpu": s.gpu, "status": s.status}
            row |= {"tokens": list(s.tokens), "finish_reason": s.finish_reason}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out
