"""Metrics from recorded cases, the run report (markdown + matplotlib PNG), and run comparison.

Everything here reads ``cases.jsonl`` records only, so a run can be re-scored without a model.
Conventions: NDCG@K / HR@K / MRR x100 as in LLMRank's trainer; every case counts (an invalid or
unretrieved answer is a miss, never dropped); timing in seconds.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.domain.stats import bootstrap_ci
from eval.metrics import evaluate_rankings, mrr, ndcg_at_k

KS = (1, 5, 10, 20)

# Published NDCG@10 x100 on Games, 20 random candidates (Hou et al., ECIR 2024, Table 2).
PUBLISHED_NDCG10 = {
    "Pop": 52.96, "BPRMF": 66.27, "SASRec": 75.92, "BM25 (zs)": 34.61, "UniSRec (zs)": 40.71,
    "ChatGPT": 53.50, "GPT-4": 62.88, "Llama-2-70B": 37.83, "Vicuna-13B": 24.30,
}


def _pct(values: Sequence[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 4) if values else 0.0


def compute_metrics(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """All metrics of a run from its case records (see ``eval/runner.py`` for the fields).

    Returns:
        ``ndcg@K``, ``hr@K`` (K in 1, 5, 10, 20), ``mrr`` (x100, over all cases);
        ``valid_rate`` (x100, over cases the ranker answered); ``hit@K_valid_all_users``
        (x100: hits from valid answers only, divided by ALL cases); ``retrieval_recall@20``;
        mean prompt/completion tokens and model calls per ranked case; model latency p50/p95
        per case; summed case wall time (seconds).

    Raises:
        ValueError: no records.
    """
    if not records:
        raise ValueError("no case records to score")
    rankings = [r["ranking"] for r in records]
    relevant = [set(r["relevant"]) for r in records]
    m: dict[str, Any] = {k: round(v, 4) for k, v in evaluate_rankings(rankings, relevant, KS).items()}
    m["mrr"] = round(100.0 * sum(mrr(r, rel) for r, rel in zip(rankings, relevant, strict=True))
                     / len(records), 4)
    ranked = [r for r in records if r["valid"] is not None]
    n = len(records)
    m["n_cases"] = n
    m["n_ranked"] = len(ranked)
    m["valid_rate"] = round(100.0 * sum(bool(r["valid"]) for r in ranked) / max(len(ranked), 1), 4)
    for k in (1, 10):
        hits = sum(1 for r in records if r["valid"] and set(r["ranking"][:k]) & set(r["relevant"]))
        m[f"hit@{k}_valid_all_users"] = round(100.0 * hits / n, 4)
    m["retrieval_recall@20"] = round(100.0 * sum(bool(r["retrieved"]) for r in records) / n, 4)
    lat = [r["latency_s"] for r in ranked]
    m["mean_prompt_tokens"] = round(sum(r["prompt_tokens"] for r in ranked) / max(len(ranked), 1), 2)
    m["mean_completion_tokens"] = round(
        sum(r["completion_tokens"] for r in ranked) / max(len(ranked), 1), 2)
    m["mean_model_calls"] = round(sum(len(r["responses"]) for r in ranked) / max(len(ranked), 1), 3)
    m["cached_calls"] = sum(bool(x.get("cached")) for r in records for x in r["responses"])
    m["latency_p50_s"] = _pct(lat, 50)
    m["latency_p95_s"] = _pct(lat, 95)
    m["wall_s"] = round(sum(r["wall_s"] for r in records), 3)
    m["wall_s_per_case"] = round(m["wall_s"] / n, 4)
    if all("candidate_hit" in r for r in records):  # generic protocols (eval/store_suite.py)
        m.update(_store_metrics(records))
    return m


def _store_metrics(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The generic protocols' extra figures, all percent of ALL cases unless named ``n_``:

    * ``candidate_recall@K``: cases whose held-out item is in the served candidate generator's top
      K (K = ``candidate_k``, the candidate count): the ceiling of any reranker of its candidates;
    * ``ndcg@10_ci95``: 95% bootstrap interval of NDCG@10 over cases;
    * ``target_in_history_rate`` and NDCG@10 on the cases whose target is new to the user
      (``ndcg@10_new_items``, over ``n_new_items`` cases): a repeat target is easy against
      never-touched negatives, so both are shown.
    """
    k = records[0].get("candidate_k", 20)
    n = len(records)
    per = [100.0 * ndcg_at_k(r["ranking"], set(r["relevant"]), 10) for r in records]
    lo, hi = bootstrap_ci(per)
    out: dict[str, Any] = {
        f"candidate_recall@{k}": round(100.0 * sum(bool(r["candidate_hit"]) for r in records) / n, 4),
        "ndcg@10_ci95": [round(lo, 4), round(hi, 4)],
    }
    if all("target_in_history" in r for r in records):
        new = [p for p, r in zip(per, records, strict=True) if not r["target_in_history"]]
        out["target_in_history_rate"] = round(100.0 * (n - len(new)) / n, 4)
        out["n_new_items"] = len(new)
        out["ndcg@10_new_items"] = round(sum(new) / len(new), 4) if new else None
    return out


def _plot(path: Path, series: dict[str, dict[str, Any]], published: bool = True) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, m in series.items():
        ax1.plot(KS, [m[f"ndcg@{k}"] for k in KS], marker="o", label=name)
    ax1.set_xlabel("K")
    ax1.set_ylabel("NDCG@K x100")
    ax1.set_xticks(KS)
    ax1.legend(fontsize=7)
    ax1.grid(alpha=0.3)
    bars = {name: m["ndcg@10"] for name, m in series.items()}
    if published:
        bars.update({f"{k} (pub.)": v for k, v in PUBLISHED_NDCG10.items()})
    names = list(bars)
    colours = ["tab:blue" if "(pub.)" not in x else "tab:gray" for x in names]
    ax2.barh(names, [bars[x] for x in names], color=colours)
    ax2.set_xlabel("NDCG@10 x100")
    ax2.invert_yaxis()
    ax2.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


UNITS = ("Units: NDCG@K, HR@K, MRR, hit@K_valid_all_users, retrieval_recall@20 (cases whose held-out item "
         "is among the ranked candidates) and candidate_recall@K (cases whose held-out item the served "
         "candidate generator retrieves in its top K) are percentages (x100, 0-100) of ALL cases (an invalid "
         "or unretrieved answer is a miss, never dropped); valid_rate is a percentage of the cases a ranker "
         "answered; tokens are per case; latency and wall times are seconds.")


def metrics_table(rows: dict[str, dict[str, Any]]) -> str:
    """A markdown table: one row per run, the headline metrics as columns (percent, see `UNITS`)."""
    recall = sorted({k for m in rows.values() for k in m if k.startswith("candidate_recall@")})
    cols = [f"ndcg@{k}" for k in KS] + [f"hr@{k}" for k in KS] + [
        "mrr", "valid_rate", "hit@1_valid_all_users", "retrieval_recall@20", *recall, "mean_prompt_tokens",
        "mean_completion_tokens", "latency_p50_s", "latency_p95_s", "wall_s_per_case", "n_cases"]
    lines = ["| run | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, m in rows.items():
        cells = [f"{m[c]:.2f}" if isinstance(m.get(c), float) else str(m.get(c, "")) for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(run_dir: Path, meta: dict[str, Any], metrics: dict[str, Any]) -> Path:
    """``report.md`` + ``ndcg_at_k.png`` for one run."""
    run_dir = Path(run_dir)
    games_random = meta.get("dataset") == "amazon-games" and meta.get("protocol") == "llmrank" \
        and meta.get("candidates_source") == "Games.random"
    _plot(run_dir / "ndcg_at_k.png", {meta.get("ranker", "run"): metrics}, published=games_random)
    cfg = {k: meta.get(k) for k in ("protocol", "dataset", "candidates_source", "n_cases", "seed",
                                    "position", "ranker", "prompt", "prompt_sha256", "model_id",
                                    "model_sha256", "hybrid_w", "permutations", "git_commit")}
    text = [
        f"# {run_dir.name}", "",
        "```json", json.dumps(cfg, indent=2), "```", "",
        *_headline(meta, metrics),
        metrics_table({meta.get("ranker", "run"): metrics}), "",
        "Metrics x100 over ALL cases (invalid or unretrieved answers are misses); latency is the "
        "model time per case in seconds (cached calls report the original latency).", "",
        UNITS, "",
        "![NDCG@K](ndcg_at_k.png)", "",
        "What was fitted on what:", "", "```json",
        json.dumps(meta.get("fitted_on", {}), indent=2, default=str)[:4000], "```",
    ]
    if games_random:
        text += ["", "Published NDCG@10 (Hou et al., ECIR 2024, Games, 20 random candidates): "
                 + ", ".join(f"{k} {v}" for k, v in PUBLISHED_NDCG10.items())]
    path = run_dir / "report.md"
    path.write_text("\n".join(text) + "\n")
    return path


def _headline(meta: dict[str, Any], m: dict[str, Any]) -> list[str]:
    """Generic protocols: the figures in words, with their units, n and the ceiling beside them."""
    recall = next((k for k in m if k.startswith("candidate_recall@")), None)
    if recall is None:
        return []
    lo, hi = m["ndcg@10_ci95"]
    lines = [f"- NDCG@10 = {m['ndcg@10']:.2f} % (95% bootstrap CI {lo:.2f} - {hi:.2f}), HR@10 = "
             f"{m['hr@10']:.2f} %, MRR = {m['mrr']:.2f} %, over n = {m['n_cases']} cases",
             f"- candidate recall@{recall.split('@')[1]} = {m[recall]:.2f} %: the share of cases whose held-out "
             "item the served candidate generator retrieves (the ceiling of any reranker of its candidates)"]
    if m.get("target_in_history_rate") is not None:
        new = m.get("ndcg@10_new_items")
        lines.append(f"- {m['target_in_history_rate']:.2f} % of targets are items the user touched before; "
                     f"NDCG@10 on the {m['n_new_items']} new-item targets = "
                     f"{'-' if new is None else f'{new:.2f} %'}")
    return [*lines, ""]


def compare(run_dirs: Sequence[Path], out: Path | None = None) -> str:
    """Side-by-side markdown table of runs, plus ``compare.png`` (in ``out`` or the first run).

    Raises:
        FileNotFoundError: a run folder has no metrics.json.
    """
    rows: dict[str, dict[str, Any]] = {}
    kinds: dict[str, tuple[Any, ...]] = {}
    for d in map(Path, run_dirs):
        if d.is_file() and d.suffix == ".json":  # an exported result file (`shoplens eval export`)
            data = json.loads(d.read_text())
            rows[d.name] = data["metrics"]
            run = data["config"]
            kinds[d.name] = (run.get("dataset"), run.get("protocol"), run.get("candidates"), run.get("split"))
            continue
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: no such run folder")
        mp = d / "metrics.json"
        if not mp.exists():
            raise FileNotFoundError(f"{mp} not found: not a finished run folder (`shoplens eval rescore {d}` "
                                    "recomputes it from cases.jsonl)")
        rows[d.name] = json.loads(mp.read_text())
        if "ndcg@10" not in rows[d.name]:
            raise ValueError(f"{d} is not a next-item run (no ndcg@10 in metrics.json); compare next-item runs only")
        cfg = json.loads((d / "config.json").read_text()) if (d / "config.json").exists() else {}
        run = cfg.get("run", {})
        kinds[d.name] = (run.get("dataset"), run.get("protocol"), run.get("candidates"), run.get("split"))
    # the plot goes beside the first run, or (for exported files, which sit in the docs) to runs/compare
    target = Path(out) if out else Path(run_dirs[0]) if Path(run_dirs[0]).is_dir() else Path("runs") / "compare"
    target.mkdir(parents=True, exist_ok=True)
    _plot(target / "compare.png", rows, published=True)
    first = Path(run_dirs[0])
    # pairing by user makes sense only on the same cases: same dataset, protocol, candidate file
    paired = [paired_difference(first, Path(d)) for d in run_dirs[1:] if kinds[Path(d).name] == kinds[first.name]]
    unpaired = [Path(d).name for d in run_dirs[1:] if kinds[Path(d).name] != kinds[first.name]]
    lines = ["", f"Paired NDCG@10 x100 against {Path(run_dirs[0]).name} (same users; other minus first):", "",
             "| run | users | first | other | difference +- SE | 95% bootstrap CI | better / worse |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {p['run']} | {p['n']} | {p['first']:.2f} | {p['other']:.2f} | {p['diff']:+.2f} +- {p['se']:.2f} | "
              f"[{p['ci95'][0]:+.2f}, {p['ci95'][1]:+.2f}] | {p['better']} / {p['worse']} |" for p in paired if p["n"]]
    if unpaired:
        lines += ["", f"Not paired (other dataset, protocol or candidate file than {first.name}): {', '.join(unpaired)}"]
    return metrics_table(rows) + ("\n".join(lines) if len(run_dirs) > 1 else "") + f"\n\nplot: {target / 'compare.png'}"


def _case_ndcg10(run_dir: Path) -> dict[str, float]:
    """Per-case NDCG@10 (x100) of a run folder or an exported result file, keyed by user (and
    case index for repeated users)."""
    if run_dir.is_file():
        return {k: float(v) for k, v in json.loads(run_dir.read_text())["ndcg@10_per_case"].items()}
    out: dict[str, float] = {}
    for ln in (run_dir / "cases.jsonl").read_text().splitlines():
        if ln.strip():
            r = json.loads(ln)
            out[f"{r['user']}#{r['i']}"] = 100.0 * ndcg_at_k(r["ranking"], set(r["relevant"]), 10)
    return out


def paired_difference(first: Path, other: Path, n_boot: int = 5000, seed: int = 0) -> dict[str, Any]:
    """Per-user NDCG@10 difference (other minus first) on the cases both runs share.

    Returns:
        ``n`` shared cases, both means, ``diff`` (mean difference), ``se`` (its standard
        error), ``ci95`` (percentile bootstrap over users, ``n_boot`` resamples, seeded),
        ``better`` / ``worse`` (users where other is higher / lower). All x100.
    """
    a, b = _case_ndcg10(first), _case_ndcg10(other)
    keys = sorted(k for k in a if k in b)  # the same bootstrap from a run folder or its export
    d = np.array([b[k] - a[k] for k in keys])
    if not len(d):
        return {"run": other.name, "n": 0}
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)
    return {"run": other.name, "n": len(d), "first": float(np.mean([a[k] for k in keys])),
            "other": float(np.mean([b[k] for k in keys])), "diff": float(d.mean()),
            "se": float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0,
            "ci95": (float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))),
            "better": int((d > 0).sum()), "worse": int((d < 0).sum())}


EXPORT_CONFIG_KEYS = ("dataset", "protocol", "candidates", "split", "users", "ranker", "prompt", "seed",
                      "position", "permutations", "hybrid_val_users", "hybrid_w", "sasrec", "no_llm",
                      "untrained", "llm_scorer", "n_candidates", "min_history", "cutoff", "source")


def export_run(run_dir: Path, out_dir: Path) -> Path:
    """A small, committable summary of a next-item run: its configuration (run fields, model id
    and sha256, prompt and its sha256, git commit), metrics, and per-case NDCG@10 x100, so paired
    differences can be recomputed without the model or the run folder (`shoplens eval compare
    a.json b.json`). Written to ``out_dir/<run name>.json``.

    Raises:
        FileNotFoundError: not a finished run folder.
    """
    run_dir = Path(run_dir)
    mp, cp = run_dir / "metrics.json", run_dir / "config.json"
    if not (mp.exists() and cp.exists()):
        raise FileNotFoundError(f"{run_dir}: not a finished run folder (no metrics.json / config.json)")
    cfg = json.loads(cp.read_text())
    run = cfg.get("run", {})
    keep = {k: run[k] for k in EXPORT_CONFIG_KEYS if k in run}
    for k in ("model_id", "model_sha256", "prompt", "prompt_sha256", "hybrid_w", "git_commit", "fusion"):
        if k in cfg:
            keep[k] = cfg[k]
    body = {"run": run_dir.name, "config": keep, "metrics": json.loads(mp.read_text()),
            "ndcg@10_per_case": {k: round(v, 4) for k, v in _case_ndcg10(run_dir).items()}}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{run_dir.name}.json"
    path.write_text(json.dumps(body, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path
