"""The reliability run (issue 17's guarantees 2 and 3), one command, on a real `shoplens serve`:

    flock var/heavy.lock .venv/bin/python -m bench.reliability                    # both parts, ~8 min
    .venv/bin/python -m bench.reliability --only ingest-kill                       # no model, ~20 s
    flock var/heavy.lock .venv/bin/python -m bench.reliability --only load --clients 50 --seconds 300

**load**: the embedded model behind the API, on a copy of the workspace's dataset. First an idle
phase (one client, requests that need no model) gives the fast path's own latency; then
`--clients` concurrent clients mix fast requests (next-item with ``wait_s=0``, churn without the
model, reading a user's events, posting events) with model requests (next-item and churn with
the model) for `--seconds`, and the model server is SIGKILLed at `--kill-model-at`. Reported: HTTP
5xx (must be 0), transport errors, the fast path's p95 under load / idle (must be <= 2), what model
requests got (model answer, labelled degraded answer, 503 with Retry-After), how long after the
kill /readyz and the first model answer came back (must be <= 60 s), and every acknowledged event
read back through the API (0 lost).

**ingest-kill**: writers post batches of events; the API process is SIGKILLed mid-stream; then
``PRAGMA integrity_check`` on the store, every acknowledged batch wholly present, every batch in
flight wholly present or wholly absent (no half-stored batch), and after a restart the API serves
the events and takes new ones.

Results: a table on stdout and ``runs/reliability-<UTC time>/result.json``; exit 1 when a
guarantee is not met. docs/reliability.md keeps the latest figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import sqlite3
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from agent.settings import PROJECT_ROOT, Settings, load_settings
from bench.fault import _copy_workspace, _users_and_items
from bench.server import children, kill_model_server, read_back, serve
from bench.stats import load_average, ratio, summarize
from eval.runs import git_commit, run_folder, timestamp

KEY, OP_KEY = "reliability-key", "reliability-operator-key"
FAST_KINDS = ("next_fast", "churn_fast", "events_read", "events_write")
MODEL_KINDS = ("next_model", "churn_model")
# Each client's mix: mostly the fast path, as a recommender calls it; a fifth needs the model.
MIX: tuple[tuple[str, float], ...] = (("next_fast", 0.40), ("churn_fast", 0.10), ("events_read", 0.10),
                                      ("events_write", 0.20), ("next_model", 0.10), ("churn_model", 0.10))
P95_RATIO_MAX = 2.0       # issue 17: fast-path p95 under load within 2x of idle
MODEL_BACK_MAX_S = 60.0   # issue 17: model answers back within 60 s of a kill -9
err = Console(stderr=True)


def server_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a served copy: this run's keys, no rate limit (one key drives every
    client), the models and data of `settings`."""
    return {**os.environ, "SHOPLENS_API_KEYS": KEY, "SHOPLENS_OPERATOR_KEYS": OP_KEY,
            "SHOPLENS_RATE_LIMIT_RPS": "0", "SHOPLENS_MODELS_DIR": str(settings.models_dir),
            "SHOPLENS_DATA_DIR": str(settings.data_dir), "SHOPLENS_LLM_PROFILE": settings.llm_profile, **extra}


def _event(eid: str, user: str, item: str) -> dict[str, Any]:
    return {"event_id": eid, "user_id": user, "item_id": item, "event_type": "view",
            "timestamp": "2011-12-10T12:00:00Z"}


# ---- ingest-kill ------------------------------------------------------------------------------
async def _post_batches(url: str, dataset: str, users: Sequence[str], items: Sequence[str], *, writers: int,
                        batch: int, seed: int, sent: dict[str, list[dict[str, Any]]], acked: set[str],
                        stop: asyncio.Event) -> None:
    """Writers post batches until `stop` or the server is gone, filling `sent` (every batch sent,
    by batch id) and `acked` (the batches answered 200 with `stored + duplicates` = the whole
    batch) in place, so a watcher sees the acknowledgements as they come."""
    rng = random.Random(seed)

    async def writer(w: int, client: httpx.AsyncClient) -> None:
        i = 0
        while not stop.is_set():
            bid = f"ik{seed}-{w}-{i}"
            evs = [_event(f"{bid}-{j}", rng.choice(users), rng.choice(items)) for j in range(batch)]
            sent[bid] = evs
            try:
                r = await client.post("/v1/events", json={"dataset": dataset, "events": evs})
            except httpx.HTTPError:
                return  # the server is gone: this batch was in flight, not acknowledged
            if r.status_code == 200:
                body = r.json()
                if body["stored"] + body["duplicates"] == batch:
                    acked.add(bid)
            i += 1

    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
        await asyncio.gather(*(writer(w, client) for w in range(writers)))


def ingest_kill(workspace: Path, env: Mapping[str, str], dataset: str, users: Sequence[str], items: Sequence[str],
                *, writers: int = 4, batch: int = 200, kill_after_acks: int = 5, seed: int = 0,
                ready_path: str = "/healthz") -> dict[str, Any]:
    """Post batches of `batch` events from `writers` concurrent clients to a served `workspace`,
    SIGKILL the API process once `kill_after_acks` batches are acknowledged, check the SQLite
    store, restart the API and read the events back.

    Args:
        workspace: a workspace whose store is SQLite (``<workspace>/shoplens.sqlite3``) holding `dataset`.
        env: the served process's environment (keys: `KEY`).
        users, items: ids the events use (new user ids are fine; items from the catalogue).
        ready_path: what must answer 200 before the writers start (``/healthz`` needs no model).

    Returns:
        batches sent / acknowledged / in flight, events acknowledged, ``acked_missing`` (events of
        acknowledged batches not stored: must be 0), ``in_flight_stored_whole`` (batches
        committed whose answer the kill cut off: a client retry is deduplicated), ``half_stored`` (batches partly stored: must
        be 0), ``integrity`` (``PRAGMA integrity_check``: must be "ok"), ``orphans`` (processes the
        killed API left), ``readback_missing`` (acknowledged events the restarted API does not
        return: must be 0) and ``post_after_restart`` (HTTP status of a new batch).
    """
    log = workspace / "reliability-serve.log"
    out: dict[str, Any] = {"writers": writers, "batch": batch}
    sent: dict[str, list[dict[str, Any]]] = {}
    acked: set[str] = set()
    with serve(workspace, env, log, ready_path=ready_path) as srv:

        async def run() -> None:
            stop = asyncio.Event()
            task = asyncio.create_task(_post_batches(srv.url, dataset, users, items, writers=writers, batch=batch,
                                                     seed=seed, sent=sent, acked=acked, stop=stop))
            t0 = time.perf_counter()
            # kill once enough batches are acknowledged, while the writers are mid-request
            while not task.done() and len(acked) < kill_after_acks and time.perf_counter() - t0 < 120:
                await asyncio.sleep(0.05)
            left = children(srv.proc.pid)
            os.kill(srv.proc.pid, signal.SIGKILL)
            out["killed_after_s"] = round(time.perf_counter() - t0, 2)
            stop.set()
            await asyncio.to_thread(srv.proc.wait)
            for pid in left:  # the model server, if any: an orchestrator's kill takes the whole group
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            out["orphans"] = len(left)
            await task

        asyncio.run(run())
    db = workspace / "shoplens.sqlite3"
    with sqlite3.connect(db) as conn:
        out["integrity"] = conn.execute("PRAGMA integrity_check").fetchone()[0]
        stored = {r[0] for r in conn.execute("SELECT event_id FROM events WHERE dataset = ? AND event_id LIKE ?",
                                             (dataset, f"ik{seed}-%"))}
    half = missing = in_flight_whole = 0
    for bid, evs in sent.items():
        n = sum(e["event_id"] in stored for e in evs)
        if 0 < n < len(evs):
            half += 1
        if bid in acked:
            missing += len(evs) - n
        elif n == len(evs):
            in_flight_whole += 1  # committed, but the answer never reached the client
    out.update(batches_sent=len(sent), batches_acked=len(acked), batches_in_flight=len(sent) - len(acked),
               in_flight_stored_whole=in_flight_whole,
               events_acked=sum(len(sent[b]) for b in acked), acked_missing=missing, half_stored=half)
    # restart on the same workspace: it serves what was acknowledged and takes new writes
    with serve(workspace, env, log, ready_path=ready_path) as srv:

        async def after() -> tuple[int, int]:
            by_user: dict[str, set[str]] = defaultdict(set)
            for b in acked:
                for e in sent[b]:
                    by_user[e["user_id"]].add(e["event_id"])
            async with httpx.AsyncClient(base_url=srv.url, headers={"Authorization": f"Bearer {KEY}"},
                                         timeout=60) as client:
                lost = 0
                for u, ids in by_user.items():
                    lost += len(ids - await read_back(client, dataset, u))
                r = await client.post("/v1/events", json={"dataset": dataset, "events": [
                    _event(f"ik{seed}-after-restart", users[0], items[0])]})
                return lost, r.status_code

        out["readback_missing"], out["post_after_restart"] = asyncio.run(after())
    out["ok"] = (out["integrity"] == "ok" and missing == 0 and half == 0 and out["readback_missing"] == 0
                 and out["post_after_restart"] == 200 and len(acked) > 0)
    return out


# ---- load -------------------------------------------------------------------------------------
def _kind(rng: random.Random) -> str:
    x, acc = rng.random(), 0.0
    for kind, w in MIX:
        acc += w
        if x < acc:
            return kind
    return MIX[-1][0]


async def _request(client: httpx.AsyncClient, kind: str, dataset: str, user: str, items: Sequence[str],
                   rng: random.Random, eid: str) -> tuple[int, str | None, bool, str | None]:
    """One request of `kind`; returns (HTTP status or 0 for a transport error, what a model
    request got: "model" / "degraded" / "503+retry-after" / "503" / None, whether the events
    posted were acknowledged, a degraded answer's reason with its numbers as N)."""
    try:
        if kind in ("next_fast", "next_model"):
            body: dict[str, Any] = {"dataset": dataset, "user_id": user, "k": 5}
            if kind == "next_fast":
                body["wait_s"] = 0
            r = await client.post("/v1/next-item", json=body)
        elif kind in ("churn_fast", "churn_model"):
            r = await client.post("/v1/churn", json={"dataset": dataset, "user_id": user,
                                                     "use_llm": kind == "churn_model"})
        elif kind == "events_read":
            r = await client.get(f"/v1/users/{user}/events", params={"dataset": dataset, "limit": 50})
        else:
            r = await client.post("/v1/events", json={"dataset": dataset, "events": [
                _event(eid, user, rng.choice(items))]})
            return r.status_code, None, r.status_code == 200 and r.json()["stored"] + r.json()["duplicates"] == 1, None
    except httpx.HTTPError:
        return 0, None, False, None
    got = why = None
    if kind in MODEL_KINDS:
        if r.status_code == 200:
            meta = r.json().get("meta") or {}
            got = "degraded" if meta.get("degraded") else "model"
            if meta.get("degraded_reason"):
                why = re.sub(r"\d+(\.\d+)?", "N", str(meta["degraded_reason"]))[:120]
        elif r.status_code == 503:
            got = "503+retry-after" if "retry-after" in r.headers else "503"
    return r.status_code, got, False, why


async def _clients(url: str, dataset: str, users: Sequence[str], items: Sequence[str], *, clients: int,
                   seconds: float, think_s: float, kinds: Sequence[str] | None, seed: int, serve_pid: int | None,
                   kill_model_at_s: float | None) -> dict[str, Any]:
    """`clients` closed-loop clients for `seconds` (each waits uniform(0.5, 1.5) x `think_s`
    between requests); with `kill_model_at_s`, SIGKILL the model server then and watch /readyz."""
    t_start = time.perf_counter()
    samples: list[dict[str, Any]] = []
    accepted: dict[str, set[str]] = defaultdict(set)
    kill: dict[str, Any] = {}

    async def killer(client: httpx.AsyncClient) -> None:
        assert serve_pid is not None and kill_model_at_s is not None
        await asyncio.sleep(kill_model_at_s)
        await kill_model_server(client, serve_pid, kill, t_start=t_start, give_up_at_s=seconds + 180)

    async def one(c: int, client: httpx.AsyncClient) -> None:
        rng = random.Random(seed * 1000 + c)
        i = 0
        while time.perf_counter() - t_start < seconds:
            kind = rng.choice(kinds) if kinds else _kind(rng)
            user, eid = rng.choice(users), f"rel{seed}-{c}-{i}"
            t0 = time.perf_counter()
            status, got, acked, why = await _request(client, kind, dataset, user, items, rng, eid)
            t1 = time.perf_counter()
            if acked:
                accepted[user].add(eid)
            samples.append({"kind": kind, "status": status, "got": got, "why": why, "start": t0 - t_start,
                            "end": t1 - t_start,
                            "s": t1 - t0, "after_kill": "at_s" in kill and t0 - t_start >= kill["at_s"]})
            i += 1
            await asyncio.sleep(think_s * rng.uniform(0.5, 1.5))

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=400,
                                 limits=limits) as client:
        watcher = asyncio.create_task(killer(client)) if kill_model_at_s is not None else None
        await asyncio.gather(*(one(c, client) for c in range(clients)))
        if watcher is not None:
            await watcher
        lost = 0
        for u, ids in accepted.items():
            lost += len(ids - await read_back(client, dataset, u))
    return {"samples": samples, "kill": kill, "events_acked": sum(map(len, accepted.values())), "events_lost": lost}


def _fast_summary(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in (*FAST_KINDS, "all_fast"):
        xs = [s["s"] for s in samples if s["status"] == 200 and (s["kind"] == kind or
                                                                 (kind == "all_fast" and s["kind"] in FAST_KINDS))]
        out[kind] = summarize(xs) if xs else None
    return out


def load_run(settings: Settings, dataset: str = "online-retail", *, clients: int = 50, seconds: float = 300.0,
             idle_s: float = 30.0, kill_model_at_s: float | None = 120.0, think_s: float = 1.0, users: int = 300,
             seed: int = 0, ready_timeout_s: float = 300.0) -> dict[str, Any]:
    """Serve a copy of `settings.workspace`'s `dataset` with the embedded model; one idle client
    (fast requests only) for `idle_s`, then `clients` clients with the `MIX` for `seconds`, the
    model server SIGKILLed at `kill_model_at_s` (None: no kill).

    Returns:
        ``idle`` and ``load`` fast-path latency summaries (seconds) per kind, ``p95_ratio``
        (load / idle, all fast kinds), HTTP statuses per kind, ``http_5xx``, ``transport_errors``,
        what model requests got before and after the kill, ``model_ready_after_kill_s`` (/readyz),
        ``model_answer_after_kill_s`` (the first model-written answer to a request sent after the
        kill), ``events_acked`` / ``events_lost``, and ``ok`` (the guarantees met).

    Raises:
        RuntimeError: the server did not become ready (its log tail is in the message).
    """
    user_ids, items = _users_and_items(settings, dataset, users, seed)
    res: dict[str, Any] = {"load_average": load_average(), "dataset": dataset, "clients": clients,
                           "seconds": seconds, "idle_s": idle_s, "think_s": think_s,
                           "mix": dict(MIX), "kill_model_at_s": kill_model_at_s}
    with tempfile.TemporaryDirectory(prefix="shoplens-reliability-") as tmp:
        ws = Path(tmp) / "ws"
        _copy_workspace(settings, ws, dataset)
        t0 = time.perf_counter()
        with serve(ws, server_env(settings), Path(tmp) / "serve.log", ready_timeout_s=ready_timeout_s) as srv:
            res["ready_s"] = round(time.perf_counter() - t0, 1)
            idle = asyncio.run(_clients(srv.url, dataset, user_ids, items, clients=1, seconds=idle_s, think_s=0.2,
                                        kinds=FAST_KINDS, seed=seed + 1, serve_pid=None, kill_model_at_s=None))
            load = asyncio.run(_clients(srv.url, dataset, user_ids, items, clients=clients, seconds=seconds,
                                        think_s=think_s, kinds=None, seed=seed, serve_pid=srv.proc.pid,
                                        kill_model_at_s=kill_model_at_s))
            res["metrics_tail"] = _restarts(srv.url)
    samples, kill = load["samples"], load["kill"]
    res["idle"], res["load"] = _fast_summary(idle["samples"]), _fast_summary(samples)
    ia, la = res["idle"]["all_fast"], res["load"]["all_fast"]
    res["p95_ratio"] = ratio(la["p95"], ia["p95"]) if ia and la else None
    res["requests"] = len(samples)
    res["statuses"] = {k: dict(Counter(str(s["status"]) for s in samples if s["kind"] == k)) for k, _ in MIX}
    res["http_5xx"] = sum(1 for s in samples + idle["samples"] if s["status"] >= 500 and s["got"] != "503+retry-after")
    res["transport_errors"] = sum(1 for s in samples + idle["samples"] if s["status"] == 0)
    res["model_requests"] = {phase: dict(Counter(str(s["got"]) for s in samples
                                                 if s["kind"] in MODEL_KINDS and s["after_kill"] == after))
                             for phase, after in (("before_kill", False), ("after_kill", True))}
    res["samples"] = samples
    res["degraded_reasons"] = dict(Counter(s["why"] for s in samples if s["why"]).most_common(8))
    res["model_answers_per_min"] = round(sum(s["got"] == "model" for s in samples) / (seconds / 60), 2)
    res["model_killed_pids"] = kill.get("pids", [])
    res["model_ready_after_kill_s"] = kill.get("ready_after_s")
    back = sorted(s["end"] for s in samples if s["after_kill"] and s["got"] == "model")
    res["model_answer_after_kill_s"] = back[0] - kill["at_s"] if back and "at_s" in kill else None
    res["events_acked"], res["events_lost"] = load["events_acked"] + idle["events_acked"], \
        load["events_lost"] + idle["events_lost"]
    res["ok"] = (res["http_5xx"] == 0 and res["transport_errors"] == 0 and res["events_lost"] == 0
                 and res["p95_ratio"] is not None and res["p95_ratio"] <= P95_RATIO_MAX
                 and (kill_model_at_s is None or (res["model_answer_after_kill_s"] is not None
                                                  and res["model_answer_after_kill_s"] <= MODEL_BACK_MAX_S)))
    return res


def _restarts(url: str) -> dict[str, float]:
    """The model-supervision and request counters from /metrics (operator key)."""
    r = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {OP_KEY}"}, timeout=30)
    out: dict[str, float] = {}
    for line in r.text.splitlines():
        if line.startswith(("shoplens_model_server_restarts", "shoplens_degraded_answers_total")) and " " in line:
            name, value = line.rsplit(" ", 1)
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


# ---- the command ------------------------------------------------------------------------------
def _fmt(x: float | None, unit: str = "", digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}{unit}"


def report(res: dict[str, Any]) -> Table:
    """The guarantees as a table: measured value, bound, met or not."""
    t = Table(title="ShopLens reliability run")
    for col in ("part", "guarantee", "measured", "bound", "met"):
        t.add_column(col)
    if "load" in res:
        lr = res["load"]
        ia, la = lr["idle"]["all_fast"], lr["load"]["all_fast"]
        rows = [
            ("HTTP 5xx (503 + Retry-After on model requests allowed)", str(lr["http_5xx"]), "0", lr["http_5xx"] == 0),
            ("transport errors", str(lr["transport_errors"]), "0", lr["transport_errors"] == 0),
            ("events lost", f"{lr['events_lost']} of {lr['events_acked']}", "0", lr["events_lost"] == 0),
            ("fast p95 load / idle", f"{_fmt(lr['p95_ratio'])} ({_fmt(la and la['p95'], ' s', 3)} / "
             f"{_fmt(ia and ia['p95'], ' s', 3)})", f"<= {P95_RATIO_MAX}",
             lr["p95_ratio"] is not None and lr["p95_ratio"] <= P95_RATIO_MAX),
            ("/readyz after model kill", _fmt(lr["model_ready_after_kill_s"], " s", 1), "-", None),
            ("first model answer after kill", _fmt(lr["model_answer_after_kill_s"], " s", 1),
             f"<= {MODEL_BACK_MAX_S:.0f} s", lr["model_answer_after_kill_s"] is not None
             and lr["model_answer_after_kill_s"] <= MODEL_BACK_MAX_S),
        ]
        for g, m, b, ok in rows:
            t.add_row(f"load ({lr['clients']} clients, {lr['seconds']:.0f} s)", g, m, b,
                      "-" if ok is None else ("yes" if ok else "NO"))
    if "ingest_kill" in res:
        ik = res["ingest_kill"]
        for g, m, b, ok in [
            ("PRAGMA integrity_check", ik["integrity"], "ok", ik["integrity"] == "ok"),
            ("acknowledged events missing", f"{ik['acked_missing']} of {ik['events_acked']}", "0", ik["acked_missing"] == 0),
            ("half-stored batches", f"{ik['half_stored']} of {ik['batches_sent']}", "0", ik["half_stored"] == 0),
            ("read back after restart: missing", str(ik["readback_missing"]), "0", ik["readback_missing"] == 0),
            ("new batch after restart", str(ik["post_after_restart"]), "200", ik["post_after_restart"] == 200),
        ]:
            t.add_row("kill -9 API during ingest", g, m, b, "yes" if ok else "NO")
    return t


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.reliability``: run the parts, print the table, write
    ``runs/reliability-<UTC time>/result.json``. Exit 0 when every guarantee is met, else 1."""
    p = argparse.ArgumentParser(prog="python -m bench.reliability", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="load,ingest-kill", help="comma-separated parts: load, ingest-kill")
    p.add_argument("--dataset", default="online-retail", help="an ingested dataset of the workspace")
    p.add_argument("--clients", type=int, default=50, help="concurrent clients in the load part")
    p.add_argument("--seconds", type=float, default=300.0, help="length of the load part")
    p.add_argument("--idle-seconds", type=float, default=30.0, help="the one-client idle phase before it")
    p.add_argument("--think", type=float, default=1.0,
                   help="each client's mean pause between requests (s); 50 clients at 1 s offer ~50 req/s")
    p.add_argument("--kill-model-at", type=float, default=120.0,
                   help="seconds into the load part when the model server is SIGKILLed (negative: never)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="output folder (default runs/reliability-<UTC time>)")
    a = p.parse_args(argv)
    parts = {x.strip() for x in a.only.split(",") if x.strip()}
    if bad := parts - {"load", "ingest-kill"}:
        p.error(f"--only: unknown part(s) {sorted(bad)}; use load, ingest-kill")
    settings = load_settings()
    if settings.database_url is not None:
        p.error("this run copies the workspace's SQLite store and checks it with PRAGMA integrity_check; "
                "unset SHOPLENS_DATABASE_URL (the PostgreSQL store is tested by tests/test_store.py and "
                "tests/test_api_postgres.py)")
    from agent.data.store import EventStore

    if not (settings.db_path.exists() and a.dataset in EventStore(settings.db_path).datasets()):
        p.error(f"dataset {a.dataset!r} is not in the workspace {settings.workspace}: load it first "
                f"(`.venv/bin/shoplens ingest {a.dataset}`, or --dataset with one that is)")
    started = timestamp(utc=True)
    out = run_folder("reliability", a.out, PROJECT_ROOT / "runs", stamp=started, stamp_last=True)
    res: dict[str, Any] = {"commit": git_commit(), "started_utc": started}
    if "load" in parts:
        err.print(f"load: {a.clients} clients x {a.seconds:.0f} s on {a.dataset} (idle phase {a.idle_seconds:.0f} s)")
        res["load"] = load_run(settings, a.dataset, clients=a.clients, seconds=a.seconds, idle_s=a.idle_seconds,
                               think_s=a.think, kill_model_at_s=None if a.kill_model_at < 0 else a.kill_model_at,
                               seed=a.seed)
    if "ingest-kill" in parts:
        err.print("ingest-kill: batches of events, then kill -9 of the API")
        user_ids, items = _users_and_items(settings, a.dataset, 20, a.seed)
        with tempfile.TemporaryDirectory(prefix="shoplens-ingest-kill-") as tmp:
            ws = Path(tmp) / "ws"
            _copy_workspace(settings, ws, a.dataset)
            res["ingest_kill"] = ingest_kill(ws, server_env(settings, SHOPLENS_LLM_BASE_URL="http://127.0.0.1:9/v1",
                                                            SHOPLENS_LLM_DIALECT="llamacpp"),
                                             a.dataset, [*user_ids, "reliability-new-user"], items, seed=a.seed)
    res["ok"] = all(res[k]["ok"] for k in ("load", "ingest_kill") if k in res)
    if "load" in res:  # every request, for rechecking the figures: one JSON line each
        samples = res["load"].pop("samples")
        (out / "samples.jsonl").write_text("".join(json.dumps(x) + "\n" for x in samples))
    (out / "result.json").write_text(json.dumps(res, indent=1, default=str))
    Console(width=140).print(report(res))
    err.print(f"result: {out / 'result.json'}; guarantees {'met' if res['ok'] else 'NOT met'}")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
