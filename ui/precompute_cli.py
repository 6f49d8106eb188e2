"""`shoplens precompute` (thin: flags in, `agent.app.precompute.precompute` out).

`register(app)` adds the command to a Typer app. The progress bar and the throughput table go to
stderr; `--json` puts the report on stdout.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from agent.app.precompute import PrecomputeReport, precompute
from agent.app.runtime import Runtime
from agent.app.service import ShopLensService
from agent.domain.errors import CallerError
from agent.domain.schemas import parse_timestamp
from agent.settings import load_settings
from ui.options import NoLLM, Profile, Workspace

err = Console(stderr=True)


def register(app: typer.Typer) -> None:
    """Add the ``precompute`` command to `app`."""
    app.command("precompute")(precompute_cmd)


def _fail(msg: str, code: int = 2) -> typer.Exit:
    err.print(f"[bold red]error:[/] {msg}")
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
                                             "more for vLLM)")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="the report as JSON on stdout")] = False,
    workspace: Workspace = None,
    profile: Profile = None,
) -> None:
    """Precompute explained next-item answers for many users.

    Each answer is stored (SQLite, <workspace>/answers.sqlite3) as it is made, keyed by user, k,
    a hash of the user's events and the pipeline version; POST /v1/next-item with "stored": true
    and POST /v1/next-item/batch serve them in milliseconds. A rerun skips users whose stored
    answer is still fresh, so an interrupted run resumes. Model calls go in the batch lane.
    """
    try:
        chosen = read_users(users, users_file)
        since = parse_timestamp(active_since) if active_since is not None else None
    except OSError as e:
        raise _fail(str(e)) from e
    except ValueError as e:
        raise _fail(f"--active-since: {e}") from e
    rt = Runtime(load_settings(workspace=workspace, llm_profile=profile))
    svc = ShopLensService(rt, use_model=not no_llm)

    async def go() -> PrecomputeReport:
        try:
            ids = chosen
            if ids is None:
                ids = await asyncio.to_thread(svc.active_users, dataset, since=since, limit=limit)
            elif limit is not None:
                ids = ids[:limit]
            err.print(f"{len(ids):,} users of {dataset}; answers in {rt.answers.path}")
            return await precompute(svc, dataset, ids, k, use_model=not no_llm, resume=not no_resume,
                                    concurrency=concurrency)
        finally:
            await rt.aclose()

    try:
        report = asyncio.run(go())
    except CallerError as e:
        raise _fail(str(e)) from e
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]: the answers made so far are stored; run the same command again "
                  "to resume")
        raise typer.Exit(130) from None
    err.print(report_table(report))
    for e in report.errors[:5]:
        err.print(f"[red]failed[/] {e.user_id}: {e.error}")
    if as_json:
        print(report.model_dump_json(indent=2))
    if report.failed and not report.done and not report.skipped_fresh:
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
    ]
    for name, value in rows:
        t.add_row(name, value)
    return t
