"""`shoplens precompute` (thin: flags in, `agent.app.precompute.precompute` out).

`register(app)` adds the command to a Typer app. The progress bar and the throughput table go to
stderr; `--json` puts the report on stdout.

Exit status: 0 when every user has an answer (computed now or fresh already); 1 when any user
failed (one summary line names how many and the file that lists them); 2 for a flag or caller
mistake; 130 / 143 when SIGINT / SIGTERM stopped the run (the user in flight is abandoned, every
answer stored so far is kept, so a rerun resumes).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from agent.app.precompute import PrecomputeReport, failures_path, precompute
from agent.app.runtime import Runtime
from agent.app.service import ShopLensService
from agent.domain.errors import CallerError
from agent.domain.schemas import parse_timestamp
from agent.settings import load_settings
from ui.options import NoLLM, Profile, Workspace

err = Console(stderr=True)
T = TypeVar("T")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(BaseException):
    """The run was stopped by SIGINT or SIGTERM; `code` is the exit status (128 + the signal).

    A BaseException, as KeyboardInterrupt is: code that reports one user's failure and goes on
    (``except Exception``) must not take a stop for a failure."""

    def __init__(self, signum: int):
        self.name = signal.Signals(signum).name
        self.code = 128 + signum
        super().__init__(self.name)


def register(app: typer.Typer) -> None:
    """Add the ``precompute`` command to `app`."""
    app.command("precompute")(precompute_cmd)


def _fail(msg: str, code: int = 2) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(msg)}")  # a message's [brackets] are text, not markup
    return typer.Exit(code)


def read_users(users: str | None, users_file: Path | None) -> list[str] | None:
    """--users a,b,c and/or --users-file (one id a line; blank lines and # comments skipped), in
    order, each once; None when neither is given."""
    if users is None and users_file is None:
        return None
    ids = [u.strip() for u in (users or "").split(",")]
    if users_file is not None:
        ids += [line.split("#", 1)[0].strip() for line in users_file.read_text(encoding="utf-8").splitlines()]
    return list(dict.fromkeys(u for u in ids if u))


def precompute_cmd(
    dataset: Annotated[str, typer.Option(help="an ingested dataset")],
    users: Annotated[str | None, typer.Option(help="comma-separated user ids (default: every user of the "
                                              "dataset, or those active since --active-since)")] = None,
    users_file: Annotated[Path | None, typer.Option(help="a file of user ids, one a line", exists=True,
                                                    dir_okay=False)] = None,
    active_since: Annotated[str | None, typer.Option(help="only users with an event on or after this date "
                                                     "(YYYY-MM-DD, ISO-8601 or unix s)")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="at most this many users")] = None,
    k: Annotated[int, typer.Option("-k", "--k", min=1, max=20, help="how many items per answer")] = 5,
    no_llm: NoLLM = False,
    no_resume: Annotated[bool, typer.Option("--no-resume", help="recompute users whose stored answer is "
                                            "still fresh")] = False,
    concurrency: Annotated[int, typer.Option(min=1, max=64, help="users in flight at once (1 for a CPU model; "
                                             "more for vLLM); with --ray-address, per actor")] = 1,
    ray_address: Annotated[str | None, typer.Option(
        help="run on Ray: 'local' (a Ray on this machine), 'auto' (this node's cluster) or "
             "ray://HEAD:10001; needs the 'batch' extra")] = None,
    base_url: Annotated[list[str] | None, typer.Option(
        help="a model server (vLLM replica) base URL, e.g. http://127.0.0.1:8001/v1; repeat it with "
             "--ray-address to deal the users round-robin over several (default: SHOPLENS_LLM_BASE_URL)")] = None,
    actors_per_replica: Annotated[int | None, typer.Option(
        min=1, max=16, help="with --ray-address: Ray actors per replica, each holding its own copy of the "
                            "indexes [default: 1]")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="the report as JSON on stdout")] = False,
    workspace: Workspace = None,
    profile: Profile = None,
) -> None:
    """Precompute explained next-item answers for many users.

    Each answer is stored (SQLite, <workspace>/answers.sqlite3) as it is made, keyed by user, k,
    a hash of the user's events and the pipeline version; POST /v1/next-item with "stored": true
    and POST /v1/next-item/batch serve them in milliseconds. A rerun skips users whose stored
    answer is still fresh, so an interrupted run resumes. Model calls go in the batch lane.
    With --ray-address the users are computed by Ray actors, one pool per --base-url replica
    (docs/deploy.md, "Production layout"); this process still checks freshness and stores.

    Exits 1 when any user failed: the failures are written to
    <workspace>/precompute/<dataset>.k<k>.failed.jsonl. SIGINT or SIGTERM stops the run cleanly
    (exit 130 / 143); the answers stored so far are kept, and a rerun resumes.
    """
    try:
        chosen = read_users(users, users_file)
        since = parse_timestamp(active_since) if active_since is not None else None
    except OSError as e:
        raise _fail(str(e)) from e
    except ValueError as e:
        raise _fail(f"--active-since: {e}") from e
    urls = base_url or []
    if ray_address is None and len(urls) > 1:
        raise _fail(f"--base-url was given {len(urls)} times: several replicas need --ray-address (e.g. "
                    "--ray-address local; one Ray actor pool per replica); without Ray give one --base-url")
    if ray_address is None and actors_per_replica is not None:
        raise _fail("--actors-per-replica needs --ray-address")
    settings = load_settings(workspace=workspace, llm_profile=profile, llm_base_url=urls[0] if urls else None)
    rt = Runtime(settings)
    svc = ShopLensService(rt, use_model=not no_llm)
    failures = failures_path(rt.workspace, dataset, k)
    if ray_address is not None:
        report = _on_ray(svc, dataset, chosen, since, limit, k, use_model=not no_llm, resume=not no_resume,
                         concurrency=concurrency, ray_address=ray_address, base_urls=urls,
                         actors_per_replica=actors_per_replica or 1, failures=failures)
        _show(report, as_json)
        return

    async def go() -> PrecomputeReport:
        try:
            ids = chosen
            if ids is None:
                ids = await asyncio.to_thread(svc.active_users, dataset, since=since, limit=limit)
            elif limit is not None:
                ids = ids[:limit]
            err.print(f"{len(ids):,} users of {dataset}; answers in {rt.answers.path}")
            return await precompute(svc, dataset, ids, k, use_model=not no_llm, resume=not no_resume,
                                    concurrency=concurrency, failures=failures)
        finally:
            await rt.aclose()

    try:
        report = run_until_signal(go)
    except CallerError as e:
        raise _fail(str(e)) from e
    except KeyboardInterrupt:  # a SIGINT before the loop's handlers were in place
        raise _stopped(Stopped(signal.SIGINT)) from None
    except Stopped as e:
        raise _stopped(e) from None
    _show(report, as_json)


def run_until_signal(main: Callable[[], Awaitable[T]]) -> T:
    """`asyncio.run(main())`, where SIGINT or SIGTERM cancels `main` instead of raising wherever
    the interpreter happens to be: the work in flight is abandoned, `finally` blocks and
    cleanups run, and `Stopped` is raised. A second signal while stopping exits at once.

    Raises:
        Stopped: a signal stopped `main` (its exit status in `code`).
    """
    got: list[int] = []

    async def guarded() -> T:
        loop, task = asyncio.get_running_loop(), asyncio.current_task()
        assert task is not None

        def stop(signum: int) -> None:
            if got:  # asked twice: no more waiting for the cleanup
                os._exit(128 + signum)
            got.append(signum)
            task.cancel()

        previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
        try:
            for s in STOP_SIGNALS:
                loop.add_signal_handler(s, stop, s)
        except (ValueError, RuntimeError, NotImplementedError):  # not the main thread, or no such support
            previous = {}
        try:
            return await main()
        finally:
            for s, handler in previous.items():
                loop.remove_signal_handler(s)
                if handler is not None:  # None: a handler not set from Python; the default stays
                    signal.signal(s, handler)

    try:
        return asyncio.run(guarded())
    except (asyncio.CancelledError, KeyboardInterrupt):
        if got:
            raise Stopped(got[0]) from None
        raise


@contextmanager
def _signals_stop() -> Iterator[None]:
    """For blocking code outside an event loop (the Ray driver): SIGINT and SIGTERM raise
    `Stopped` in the main thread."""
    def stop(signum: int, _frame: object) -> None:
        raise Stopped(signum)

    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def _stopped(e: Stopped) -> typer.Exit:
    err.print(f"[yellow]stopped by {e.name}[/]: the answers made so far are stored; run the same command "
              "again to resume", soft_wrap=True, highlight=False)
    return typer.Exit(e.code)


def _on_ray(svc: ShopLensService, dataset: str, chosen: list[str] | None, since: datetime | None,
            limit: int | None, k: int, *, use_model: bool, resume: bool, concurrency: int, ray_address: str,
            base_urls: list[str], actors_per_replica: int, failures: Path) -> PrecomputeReport:
    """The run on Ray (`agent.app.precompute_ray`); flags are checked before Ray starts."""
    from agent.app import precompute_ray  # Ray only on this path

    rt = svc.runtime
    try:
        precompute_ray.import_ray()
        precompute_ray.check_ray_address(ray_address)
        replicas = precompute_ray.replica_urls(base_urls, rt.settings, use_model=use_model)
        ids = chosen
        if ids is None:
            ids = svc.active_users(dataset, since=since, limit=limit)
        elif limit is not None:
            ids = ids[:limit]
        err.print(f"{len(ids):,} users of {dataset} over {len(replicas)} replica(s) on Ray ({ray_address}); "
                  f"answers in {rt.answers.path}")
        with _signals_stop(), precompute_ray.ray_session(ray_address):
            return precompute_ray.precompute_on_ray(svc, dataset, ids, k, base_urls=base_urls, use_model=use_model,
                                                    resume=resume, concurrency=concurrency,
                                                    actors_per_replica=actors_per_replica, failures=failures)
    except CallerError as e:
        raise _fail(str(e)) from e
    except ConnectionError as e:
        raise _fail(f"--ray-address {ray_address}: {e}", code=1) from e
    except KeyboardInterrupt:
        raise _stopped(Stopped(signal.SIGINT)) from None
    except Stopped as e:
        raise _stopped(e) from None
    finally:
        asyncio.run(rt.aclose())


def _show(report: PrecomputeReport, as_json: bool) -> None:
    """The throughput table and the first failures on stderr; the report as JSON on stdout with
    --json. Exits 1 when any user failed, after one line naming how many and where they are
    listed."""
    err.print(report_table(report))
    for e in report.errors[:5]:
        err.print(f"[red]failed[/] {escape(e.user_id)}: {escape(e.error)}")
    if as_json:
        print(report.model_dump_json(indent=2))
    if report.failed:
        where = f"every failure is listed in {report.failures_file}" if report.failures_file else \
            "see the errors above"
        err.print(f"[bold red]error:[/] {report.failed:,} of {report.users:,} users failed (no answer stored "
                  f"for them); {escape(where)}", soft_wrap=True, highlight=False)
        raise typer.Exit(1)


def report_table(r: PrecomputeReport) -> Table:
    """The throughput table: users by outcome, users per hour, seconds per user, model cost."""
    t = Table(title=f"precompute {r.dataset} (k={r.k}, {'with' if r.use_model else 'without'} the model)",
              title_justify="left")
    t.add_column("measure")
    t.add_column("value", justify="right")
    uph, spu = r.users_per_hour, r.seconds_per_user
    rows = [
        ("users asked", f"{r.users:,}"),
        ("computed and stored", f"{r.done:,}"),
        ("skipped (stored answer fresh)", f"{r.skipped_fresh:,}"),
        ("failed", f"{r.failed:,}"),
        ("made without the model (stored stale)", f"{r.degraded:,}"),
        ("wall time", f"{r.seconds:,.1f} s"),
        ("users per hour", f"{uph:,.0f}" if uph is not None else "-"),
        ("seconds per user", f"{spu:,.3f}" if spu is not None else "-"),
        ("model calls", f"{r.model_calls:,}"),
        ("tokens (prompt + completion)", f"{r.prompt_tokens:,} + {r.completion_tokens:,}"),
        ("tokens per user", f"{(r.prompt_tokens + r.completion_tokens) / r.done:,.0f}" if r.done else "-"),
        *((f"computed via {url}", f"{n:,}") for url, n in sorted(r.replicas.items())),
    ]
    for name, value in rows:
        t.add_row(name, value)
    return t
