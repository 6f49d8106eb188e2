"""``python -m bench``: run the selected sections, print tables, save figures and a plot.

    python -m bench                                   # everything, embedded 1.5B
    python -m bench --only retrieval,fastpath,ingest  # no model needed
    python -m bench --model 0.5b --only e2e,prefix
    python -m bench --base-url http://gpu:8000/v1 --only e2e,ranking,prefix,concurrency
    python -m bench --only reviews --reviews 60       # review scoring: reviews/min vs the token limit

Run it alone on the machine (it is a measurement): on shared boxes wrap it in the box's lock.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from agent.app.runtime import Runtime
from agent.llm.openai_compat import OpenAICompatModel, detect_dialect
from agent.settings import PROJECT_ROOT, load_settings
from eval.runs import git_commit, run_folder, timestamp

SECTIONS = ("e2e", "progressive", "ranking", "prefix", "reviews", "retrieval", "fastpath", "fault", "concurrency",
            "ingest")
MODEL_SECTIONS = {"e2e", "progressive", "ranking", "prefix", "reviews", "concurrency"}
DEMO_USERS = ("17850", "12347", "13047")  # `shoplens demo`'s customers, first three
err = Console(stderr=True)


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma-separated sections (default all): {','.join(SECTIONS)}")
    p.add_argument("--model", choices=("1.5b", "0.5b"), default="1.5b",
                   help="embedded model profile (ignored with --base-url)")
    p.add_argument("--base-url", help="an OpenAI-compatible server (e.g. vLLM) instead of the "
                                      "embedded model, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model-name", help="served model name (default: the server's first model)")
    p.add_argument("--vllm-base-url", help="also run the concurrency section against this server")
    p.add_argument("--users", default=",".join(DEMO_USERS),
                   help="Online Retail customers for the end-to-end and prefix sections")
    p.add_argument("--fast-users", type=int, default=200,
                   help="customers sampled for the fast-path latency (progressive section)")
    p.add_argument("--games-users", type=int, default=5, help="Games-200 users for ranking")
    p.add_argument("--permutations", type=int, default=1,
                   help="verbalizer passes in the ranking comparison (1 = LlamaRec's single pass)")
    p.add_argument("--sizes", default="10000,100000,1000000", help="synthetic catalogue sizes")
    p.add_argument("--hnsw-max", type=int, default=100_000,
                   help="largest size that also gets an HNSW index (its build is slow on 2 cores)")
    p.add_argument("--fastpath-sizes", default="10000,100000",
                   help="synthetic shop sizes (items) for the fast path end to end (fastpath section)")
    p.add_argument("--fault-seconds", type=float, default=60.0,
                   help="fault section: seconds of load; the model server is killed after a third")
    p.add_argument("--queries", type=int, default=200, help="retrieval queries per index")
    p.add_argument("--reviews", type=int, default=60,
                   help="reviews section: zh + en reviews scored per mode (the two-call mode gets a sixth)")
    p.add_argument("--review-concurrency", type=int, default=1,
                   help="reviews section: requests in flight (1 for the embedded model; 16+ for vLLM)")
    p.add_argument("--concurrency", default="1,2,4,8", help="concurrency levels")
    p.add_argument("--requests-per-level", type=int, default=2,
                   help="requests per level = max(4, this * concurrency)")
    p.add_argument("--index-items", type=int, default=10_000, help="titles embedded for index build")
    p.add_argument("--out", type=Path,
                   help="output folder (default runs/bench-<UTC timestamp>); an existing run "
                        "folder gets the new sections added, so sections can run at different times")
    a = p.parse_args(argv)
    a.sections = [s.strip() for s in a.only.split(",") if s.strip()]
    unknown = sorted(set(a.sections) - set(SECTIONS))
    if unknown:
        p.error(f"unknown sections {unknown}; known: {', '.join(SECTIONS)}")
    return a


async def _remote_model(base_url: str, name: str | None) -> OpenAICompatModel:
    """A client for any OpenAI-compatible server (dialect probed from /v1/models)."""
    if name is None:
        r = httpx.get(base_url.rstrip("/") + "/models", timeout=10)
        r.raise_for_status()
        name = r.json()["data"][0]["id"]
    return OpenAICompatModel(base_url, name, await detect_dialect(base_url, "not-needed"),
                             timeout_s=600)


async def run(a: argparse.Namespace) -> dict[str, Any]:
    """Run the selected sections; returns the figures (also written as it goes)."""
    from bench import ingest as ingest_mod
    from bench import llm, pipeline, retrieval

    started = timestamp(utc=True)
    out = run_folder("bench", a.out, PROJECT_ROOT / "runs", stamp=started, stamp_last=True)
    previous = out / "figures.json"
    fig: dict[str, Any] = json.loads(previous.read_text()) if previous.exists() else {
        "started": started, "invocations": [], "model": {}, "errors": {}}
    fig["invocations"].append({"started": started, "argv": sys.argv[1:],
                               "git_commit": git_commit(short=True), "sections": a.sections})
    fig.update({"out": str(out), "machine": {
        "python": platform.python_version(), "platform": platform.platform(),
        "cpus": os.cpu_count()}})

    def save() -> None:
        previous.write_text(json.dumps(fig, indent=2, default=str))

    async def section(name: str, coro: Any) -> None:
        """Run one section; a failure is recorded and reported, and the others still run."""
        err.print(f"[bold]{name}[/] ...")
        try:
            fig[name] = await coro
            fig["errors"].pop(name, None)
        except Exception as e:  # noqa: BLE001 - recorded in figures.json, re-raised at exit
            err.print(f"[red]{name} failed: {e!r}[/]")
            fig["errors"][name] = repr(e)
        save()

    settings = load_settings(llm_profile=a.model, llm_base_url=a.base_url)
    rt = Runtime(settings)
    users = [u for u in a.users.split(",") if u]
    try:
        if MODEL_SECTIONS & set(a.sections):
            t0 = time.perf_counter()
            if a.base_url:
                model = await _remote_model(a.base_url, a.model_name)
            else:
                model = await rt.model()  # type: ignore[assignment]
            fig["model"] = {"id": model.model_id, "base_url": a.base_url or "embedded",
                            "sha256": rt.model_sha256, "dialect": getattr(getattr(model, "inner", model), "dialect", None),
                            "startup_s": time.perf_counter() - t0,
                            "threads": settings.llm_threads, "ctx": settings.llm_ctx}
            err.print(f"model {model.model_id} ready ({fig['model']['startup_s']:.1f} s); "
                      "calibrating speed ...")
            await model.complete([{"role": "user", "content": "Hi"}], max_tokens=1)  # warm-up
            fig["rates"] = await llm.calibrate_rates(model)
            save()
            if "e2e" in a.sections:
                if report := rt.ensure_ingested("online-retail"):
                    err.print(report.summary())
                await section("e2e", pipeline.end_to_end(rt, model, "online-retail", users,
                                                         fig["rates"]))
            if "progressive" in a.sections:
                from bench import progressive

                if report := rt.ensure_ingested("online-retail"):
                    err.print(report.summary())
                await section("progressive", progressive.progressive(
                    rt, model, "online-retail", users, fig["rates"], fast_users=a.fast_users))
            if "ranking" in a.sections:
                await section("ranking", pipeline.ranking_vs_generation(
                    model, settings.data_dir, a.games_users, permutations=a.permutations))
            if "prefix" in a.sections:
                if report := rt.ensure_ingested("online-retail"):
                    err.print(report.summary())
                pairs = await pipeline.prompt_pairs(rt, "online-retail", users)
                await section("prefix", llm.prefix_caching(model, pairs))
            if "reviews" in a.sections:
                from bench import reviews

                texts = reviews.review_mix(settings.data_dir, a.reviews)
                await section("reviews", reviews.review_throughput(
                    model, texts, fig["rates"], concurrency=a.review_concurrency,
                    two_calls_n=max(1, a.reviews // 6)))
            if "concurrency" in a.sections:
                await section("concurrency", llm.concurrency(
                    model, _ints(a.concurrency), requests_per_level=a.requests_per_level))
            if "concurrency" in a.sections and a.vllm_base_url:
                vm = await _remote_model(a.vllm_base_url, None)
                await section("concurrency_vllm", llm.concurrency(
                    vm, _ints(a.concurrency), requests_per_level=a.requests_per_level))
                if "concurrency_vllm" in fig:
                    fig["concurrency_vllm"]["model"] = vm.model_id
                await vm.aclose()
                save()
    finally:
        await rt.aclose()  # stops the embedded server before the CPU-heavy sections
    if "retrieval" in a.sections:
        await section("retrieval", asyncio.to_thread(
            retrieval.retrieval_scaling, _ints(a.sizes), hnsw_max=a.hnsw_max,
            n_queries=a.queries, log=err.print))
    if "fault" in a.sections:  # its own `shoplens serve` and model server, after ours stopped
        from bench import fault

        await section("fault", asyncio.to_thread(fault.model_killed, settings, seconds=a.fault_seconds,
                                                 kill_at_s=a.fault_seconds / 3))
    if "fastpath" in a.sections:
        from bench import fastpath

        await section("fastpath", asyncio.to_thread(fastpath.fast_path_scale, _ints(a.fastpath_sizes),
                                                    requests=a.fast_users))
    if "ingest" in a.sections:
        await section("ingest", asyncio.to_thread(ingest_mod.ingest_throughput, settings.data_dir))
        await section("index_build", asyncio.to_thread(ingest_mod.index_build, settings.data_dir,
                                                       a.index_items))
    return fig


def main(argv: Sequence[str] | None = None) -> None:
    from bench.report import markdown, plot, print_tables

    a = parse_args(argv)
    fig = asyncio.run(run(a))
    out = Path(fig["out"])
    print_tables(fig)
    (out / "tables.md").write_text(markdown(fig))
    plot(fig, out / "bench.png")
    err.print(f"figures: {out / 'figures.json'} · tables: {out / 'tables.md'} · plot: {out / 'bench.png'}")
    if fig["errors"]:
        err.print(f"[red]sections that failed: {', '.join(fig['errors'])}[/]")
        raise SystemExit(1)
