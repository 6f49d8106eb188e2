"""Chat routing accuracy: does the router pick the right tool with the right arguments?

``python -m eval.routing_eval [--profile 1.5b] [--limit N] [--dataset online-retail]`` runs every
question of ``eval/routing_questions.jsonl`` through the real router (deterministic pre-parser +
the schema-constrained ``chat_route.v1`` call on the real model) and, as the baseline beside it,
through the keyword router (`rule_route`, no model). It writes ``runs/<timestamp>-routing/``:
``config.json`` (prompt ref + sha, model id + sha256, dataset), ``cases.jsonl`` (per question:
the raw model output, the call, correctness, latency) and ``metrics.json``, and prints the score.
``--rescore RUN_DIR`` recomputes the metrics from ``cases.jsonl`` without a model;
``--resume RUN_DIR`` continues an interrupted run (questions already in ``cases.jsonl`` are
kept, the rest are asked).

A call is correct when the tool matches and every expected argument matches: ids and the month
exactly; text arguments (``query``, ``item_query``) when every expected word appears in the
predicted text (case-insensitive, plural -s ignored; for Chinese, every expected character). A predicted
customer or item id that the expected call does not have is wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from agent.chat.router import ROUTE_PROMPT, ToolCall, model_route, preparse, rule_route
from eval.runs import git_commit, read_jsonl, run_folder

PROJECT_ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = Path(__file__).with_name("routing_questions.jsonl")
TEXT_ARGS = {"query", "item_query"}
ID_ARGS = {"customer_id", "item_id"}


def load_questions(path: Path = QUESTIONS) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _words(text: str) -> set[str]:
    low = text.lower()
    words = {w[:-1] if len(w) > 3 and w.endswith("s") else w for w in re.findall(r"[a-z0-9]+", low)}
    return words | set(re.findall(r"[\u4e00-\u9fff]", low))


def args_match(expected: dict[str, Any], got: dict[str, Any]) -> bool:
    """Expected args vs the call's args (rules in the module docstring)."""
    for key, want in expected.items():
        have = got.get(key)
        if key in TEXT_ARGS:
            # a title may come as item_query or be resolved into query: accept either field
            have = have or got.get("query" if key == "item_query" else "item_query")
            if not have or not _words(str(want)) <= _words(str(have)):
                return False
        elif str(have) != str(want):
            return False
    return all(key in expected for key in ID_ARGS if got.get(key))


def score(cases: list[dict[str, Any]], field: str) -> dict[str, Any]:
    """Accuracy overall and by language for the calls under `field` ('model' or 'rules')."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for c in cases:
        groups["all"].append(c)
        groups[c["lang"]].append(c)
    out: dict[str, Any] = {}
    for name, cs in groups.items():
        n = len(cs)
        out[name] = {
            "n": n,
            "tool_accuracy": round(sum(c[field]["tool_ok"] for c in cs) / n, 4),
            "accuracy": round(sum(c[field]["correct"] for c in cs) / n, 4),
        }
    return out


def judge(q: dict[str, Any], call: ToolCall | None) -> dict[str, Any]:
    if call is None:
        return {"call": None, "tool_ok": False, "correct": False}
    tool_ok = call.tool == q["tool"]
    return {"call": call.model_dump(), "tool_ok": tool_ok,
            "correct": tool_ok and args_match(q["args"], call.args)}


async def run(profile: str | None, dataset: str, limit: int | None, out_root: Path,
              timeout_s: float | None = None, resume: Path | None = None) -> Path:
    from agent.app.runtime import Runtime
    from agent.llm.base import ModelUnavailableError, OutputValidationError
    from agent.llm.prompting import load_prompt
    from agent.settings import load_settings

    rt = Runtime(load_settings(llm_profile=profile, llm_timeout_s=timeout_s))
    questions = load_questions()[:limit]
    known = dataset in rt.store.datasets()
    catalog = rt.store.items(dataset) if known else {}

    def has_user(u: str) -> bool:
        return known and rt.store.has_user(dataset, u)

    run_dir = run_folder("routing", resume, out_root)
    done: list[dict[str, Any]] = []
    if resume and (resume / "cases.jsonl").exists():  # an interrupted run continues where it stopped
        done = [json.loads(x) for x in (resume / "cases.jsonl").read_text(encoding="utf-8").splitlines() if x]
    done_ids = {c["id"] for c in done}
    tpl = load_prompt(ROUTE_PROMPT)
    try:
        model = await rt.model()
        cases = list(done)
        with open(run_dir / "cases.jsonl", "a", encoding="utf-8") as f:
            for i, q in enumerate(questions, 1):
                if q["id"] in done_ids:
                    continue
                parsed = preparse(q["question"], has_user=has_user if known else None,
                                  has_item=(lambda x: x in catalog) if known else None)
                t0 = time.perf_counter()
                raw: list[str] = []
                error = None
                try:
                    route = await model_route(model, parsed)
                    call: ToolCall | None = route.call
                    raw = route.trace.raw_outputs
                except (OutputValidationError, ModelUnavailableError) as e:
                    call, error = None, str(e)
                case = {**q, "latency_s": round(time.perf_counter() - t0, 2), "raw": raw, "error": error,
                        "language_detected": parsed.language,
                        "model": judge(q, call), "rules": judge(q, rule_route(parsed))}
                cases.append(case)
                f.write(json.dumps(case, ensure_ascii=False) + "\n")
                f.flush()
                mark = "ok " if case["model"]["correct"] else "BAD"
                print(f"[{i}/{len(questions)}] {mark} {q['id']} {case['latency_s']:.1f}s "
                      f"{call.tool if call else error} {call.args if call else ''}", flush=True)
        config = {
            "questions": str(QUESTIONS.relative_to(PROJECT_ROOT)), "n": len(questions),
            "dataset_for_id_lookup": dataset if known else None,
            "prompt": tpl.ref, "prompt_sha": tpl.sha256, "model_id": model.model_id,
            "model_sha256": rt.model_sha256, "profile": profile, "git_commit": git_commit(),
        }
        (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    finally:
        await rt.aclose()
    print_summary(run_dir, rescore(run_dir))
    return run_dir


def rescore(run_dir: Path) -> dict[str, Any]:
    """Recompute metrics.json from cases.jsonl (no model); returns the metrics."""
    cases = read_jsonl(run_dir / "cases.jsonl")
    for c in cases:
        call = ToolCall.model_validate(c["model"]["call"]) if c["model"]["call"] else None
        c["model"] = judge(c, call)
    lat = sorted(c["latency_s"] for c in cases)
    metrics = {"model_router": score(cases, "model"), "rules_baseline": score(cases, "rules"),
               "latency_s_median": lat[len(lat) // 2] if lat else None,
               "language_detection_accuracy": round(
                   sum(c["language_detected"] == c["lang"] for c in cases) / max(len(cases), 1), 4)}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def print_summary(run_dir: Path, metrics: dict[str, Any]) -> None:
    """The routing accuracy table of a scored run, on stdout."""
    print(f"\nrouting accuracy ({run_dir.name}): right tool + right args")
    print(f"{'router':<16}{'all':>14}{'en':>14}{'zh':>14}")
    for name, key in (("model (1 call)", "model_router"), ("keyword rules", "rules_baseline")):
        m = metrics[key]
        cells = [f"{m[g]['accuracy']:.3f} (n={m[g]['n']})" if g in m else "-" for g in ("all", "en", "zh")]
        print(f"{name:<16}" + "".join(f"{c:>14}" for c in cells))
    print(f"tool only (model): {metrics['model_router']['all']['tool_accuracy']:.3f}; "
          f"median latency {metrics['latency_s_median']} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default=None, help="embedded model profile (default: settings)")
    ap.add_argument("--dataset", default="online-retail", help="dataset whose store resolves ids")
    ap.add_argument("--limit", type=int, default=None, help="first N questions only")
    ap.add_argument("--out", type=Path, default=PROJECT_ROOT / "runs")
    ap.add_argument("--timeout", type=float, default=None,
                    help="per model call, seconds (default: settings; raise it on a busy machine)")
    ap.add_argument("--resume", type=Path, default=None, help="continue an interrupted run folder")
    ap.add_argument("--rescore", type=Path, default=None, help="recompute metrics of a run folder")
    a = ap.parse_args()
    if a.rescore:
        print_summary(a.rescore, rescore(a.rescore))
        return
    asyncio.run(run(a.profile, a.dataset, a.limit, a.out, a.timeout, a.resume))


if __name__ == "__main__":
    main()
