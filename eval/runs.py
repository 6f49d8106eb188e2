"""Run folders: where an eval (or bench) run lives, which code made it, and how to re-score it.

Every harness writes ``runs/<timestamp>-<name>/`` (`run_folder`) with the git commit in its
config (`git_commit`) and per-case records in ``cases.jsonl`` (`read_jsonl`). `rescore` recomputes
a finished run's metrics from those records alone (no model), whichever harness wrote it: the
kind is read from ``config.json`` (`run_kind`) and dispatched through `RESCORERS`.
"""

from __future__ import annotations

import importlib
import json
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RUNS_DIR = PROJECT_ROOT / "runs"

# kind -> "module:function" of its rescore(run_dir) -> metrics (imported on use: the harnesses
# import this module, and a rescore should not load the other harnesses' dependencies)
RESCORERS: dict[str, str] = {
    "next_item": "eval.runner:rescore",
    "sentiment": "eval.sentiment_eval:rescore",
    "aspects": "eval.aspect_eval:rescore",
    "routing": "eval.routing_eval:rescore",
    "intent_scorers": "eval.encoder_eval:rescore",
    "churn": "eval.churn_eval:rescore",
}


def git_commit(*, short: bool = False) -> str:
    """The checked-out commit, with ``-dirty`` when tracked files differ from it.

    Returns:
        e.g. ``"4311614c...-dirty"`` (``short``: the abbreviated sha), or ``"unknown"`` outside a
        git checkout or without git.
    """
    try:
        sha = subprocess.run(["git", "rev-parse", *(["--short"] if short else []), "HEAD"], cwd=PROJECT_ROOT,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=PROJECT_ROOT, capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def timestamp(*, utc: bool = False) -> str:
    """``YYYYmmdd-HHMMSS``, local time (``utc``: UTC), the prefix of run folder names."""
    return (datetime.now(UTC) if utc else datetime.now()).strftime("%Y%m%d-%H%M%S")


def run_folder(name: str, out: Path | None = None, runs_dir: Path | None = None, *, stamp: str | None = None,
               stamp_last: bool = False, create: bool = True) -> Path:
    """The folder of a run: `out` when given (resuming one), else ``<runs_dir>/<stamp>-<name>``.

    Args:
        name: the run's name, e.g. ``"churn"`` or ``"sentiment-zh-llm"``.
        out: an explicit folder; wins over everything else.
        runs_dir: where new run folders go (default ``<project>/runs``).
        stamp: the timestamp to use (default: now, local time).
        stamp_last: ``<name>-<stamp>`` instead (the benchmark's ``bench-<time>``).
        create: make the folder (and its parents) if missing.
    """
    if out is not None:
        d = Path(out)
    else:
        s = stamp or timestamp()
        d = Path(runs_dir or RUNS_DIR) / (f"{name}-{s}" if stamp_last else f"{s}-{name}")
    if create:
        d.mkdir(parents=True, exist_ok=True)
    return d


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file in file order; blank lines and a torn line (a run
    interrupted mid-write) are skipped. A missing file has no records."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def run_kind(run_dir: Path) -> str:
    """Which harness wrote `run_dir`, from its ``config.json``.

    Raises:
        FileNotFoundError: no ``config.json`` in `run_dir`.
        ValueError: a config no harness with a rescore writes (the task evals' metrics need the
            dataset rows, so they are re-run, not re-scored).
    """
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: not a run folder")
    cfg = json.loads(path.read_text())
    task = cfg.get("task")
    if cfg.get("kind") in RESCORERS:
        return str(cfg["kind"])
    if task in RESCORERS:
        return str(task)
    if "run" in cfg and "protocol" in cfg:
        return "next_item"
    if "labels" in cfg and "set" in cfg:
        return "sentiment"
    if "questions" in cfg:
        return "routing"
    what = f"task {task!r}" if task else "this kind of run"
    raise ValueError(f"{run_dir}: no rescore for {what}; runs that can be re-scored: {', '.join(RESCORERS)}")


def rescorer(kind: str) -> Callable[[Path], dict[str, Any]]:
    """The rescore function registered for `kind`.

    Raises:
        ValueError: an unknown kind (the message lists the known ones).
    """
    if kind not in RESCORERS:
        raise ValueError(f"unknown run kind {kind!r}; known: {', '.join(RESCORERS)}")
    module, fn = RESCORERS[kind].split(":")
    return getattr(importlib.import_module(module), fn)  # type: ignore[no-any-return]


def rescore(run_dir: Path) -> dict[str, Any]:
    """Recompute a finished run's ``metrics.json`` (and report) from its records, no model.

    Raises:
        FileNotFoundError: not a run folder, or it has no ``cases.jsonl``.
        ValueError: a run kind without a rescore.
    """
    run_dir = Path(run_dir)
    kind = run_kind(run_dir)
    if not (run_dir / "cases.jsonl").exists() and not (run_dir / "scores.jsonl").exists():
        raise FileNotFoundError(f"{run_dir}/cases.jsonl not found")
    return rescorer(kind)(run_dir)
