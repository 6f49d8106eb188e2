"""Turn the benchmark's figures into rich tables, markdown tables and one PNG plot.

``python -m bench.report runs/bench-<time>`` re-renders a run folder's tables and plot from its
figures.json (no measurement).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

Row = list[str]


def _ms(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def _x(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _rate(rates: dict[str, Any], key: str) -> str:
    """A calibrated rate in tokens/s; n/a where the calibration could not measure it (an
    answer that stopped early, or, for JSON, a fallback to the plain rate)."""
    v = rates.get(key)
    if v is None or (key == "gen_json_tok_s" and rates.get("gen_json_fallback")):
        return "n/a"
    return f"{v:.1f} tok/s"


def _load(sec: dict[str, Any]) -> str:
    ld = sec.get("load") or {}
    return f"load {ld.get('1m', '?')}/{ld.get('5m', '?')} on {ld.get('cpus', '?')} CPUs"


def tables(fig: dict[str, Any]) -> list[tuple[str, Row, list[Row]]]:
    """(title, header, rows) per section that ran, in a fixed order."""
    out: list[tuple[str, Row, list[Row]]] = []
    rates = fig.get("rates")
    if rates:
        pp = [x["prompt_tokens"] / x["s"] for x in rates["samples"]["pp"]]
        spread = max(pp) / min(pp)
        busy = f"; WARNING: prompt rates spread {spread:.2f}x, the machine was busy" if spread > 1.2 else ""
        out.append((f"Model speed ({fig['model']['id']}; {_load(rates)}{busy})",
                    ["prompt processing", "generation", "generation, JSON schema"],
                    [[_rate(rates, "pp_tok_s"), _rate(rates, "gen_tok_s"),
                      _rate(rates, "gen_json_tok_s")]]))
    e = fig.get("e2e")
    if e:
        rows = [[r["user"], _ms(r["total_s"]), _ms(r["model_calls_s"]), _ms(r["model_estimate_s"]),
                 str(r["calls"]), f"{r['prompt_tokens']}+{r['completion_tokens']}",
                 "yes" if r["degraded"] else "no"] for r in e["records"]]
        rows.append(["p50 / p95", f"{_ms(e['total']['p50'])} / {_ms(e['total']['p95'])}",
                     _ms(e["model_calls"]["p50"]), _ms(e["model_estimate"]["p50"]), "", "", ""])
        rows.append(["overhead", "", _pct(e["overhead_vs_calls"]), _pct(e["overhead_vs_estimate"]),
                     "", "", ""])
        out.append((f"End-to-end next-item, {e['dataset']} ({_load(e)})",
                    ["customer", "total", "model calls (client)", "model (rates)", "calls",
                     "tokens", "degraded"], rows))
        st = e["stages_mean_s"]
        tot = sum(st.values()) or 1.0
        srows = [[k, _ms(v), _pct(v / tot)] for k, v in st.items()]
        srows.append(["retrieval alone (candidate generation)", _ms(e["retrieval_only"]["p50"]), "p50"])
        out.append(("Where the time goes (mean per request)", ["stage", "time", "share"], srows))
    pg = fig.get("progressive")
    if pg:
        def _opt(x: float | None) -> str:
            return _ms(x) if x is not None else "-"

        rows = [[r["user"], _ms(r["fast_s"]), _opt(r["refined_s"]), _ms(r["rank_estimate_s"]),
                 _opt(r["explained_s"]), _ms(r["rank_estimate_s"] + r["explain_estimate_s"]), r["state"]]
                for r in pg["records"]]
        rows.append(["time / limit", "", _x(pg["refined_vs_limit"]), "", _x(pg["explained_vs_limit"]), "", ""])
        out.append((f"Progressive next-item, {pg['dataset']} ({_load(pg)})",
                    ["customer", "fast answer", "LLM-refined ranking", "limit (rates)", "explained",
                     "limit (rates)", "refinement"], rows))
        fi, fb = pg["fast_idle"], pg.get("fast_busy")
        frows = [["model idle", str(fi["n"]), _ms(fi["p50"]), _ms(fi["p95"])]]
        if fb:
            frows.append(["model busy refining", str(fb["n"]), _ms(fb["p50"]), _ms(fb["p95"])])
            frows.append(["busy / idle (p95)", "", "", _x(pg["busy_vs_idle_p95"])])
        out.append((f"Fast path (no model), {pg['catalogue_items']} items", ["condition", "requests", "p50", "p95"],
                    frows))
    r = fig.get("ranking")
    if r:
        rows = [[name, _ms(r[name]["time"]["mean"]), _ms(r[name]["time"]["p50"]),
                 f"{r[name]['ndcg@10']:.2f}", _pct(r[name]["valid_rate"])]
                for name in ("verbalizer", "generation")]
        rows.append(["ratio", _x(r["time_ratio_gen_over_verb"]) + " (gen/verb)", "",
                     _x(r["ndcg_ratio_verb_over_gen"]) + " (verb/gen)", ""])
        out.append((f"Verbalizer vs generated ranking, {len(r['users'])} Games-200 users, "
                    f"20 random candidates ({_load(r)})",
                    ["ranker", "mean time/user", "p50", "NDCG@10", "valid"], rows))
    p = fig.get("prefix")
    if p:
        rows = [[k, _ms(v["p50"]), _ms(v["p95"]), _x(p["speedup_vs_cold"][k])]
                for k, v in p["conditions"].items()]
        out.append((f"Prefix caching, verbalizer call, ~{p['prompt_tokens_mean']:.0f} prompt tokens "
                    f"({_load(p)})", ["condition", "p50", "p95", "speed-up vs cold"], rows))
    ret = fig.get("retrieval")
    if ret:
        rows = []
        for row in ret["rows"]:
            for kind, v in row["kinds"].items():
                rows.append([f"{row['n']:,}", kind, _ms(v["search"]["p50"]), _ms(v["search"]["p95"]),
                             f"{v['recall@k']:.3f}", _x(v.get("speedup_vs_flat_p50")),
                             f"{v['build_s']:.1f} s", f"{v['bytes_per_million'] / 2**30:.2f} GiB"])
        out.append((f"Retrieval, dim 384, k={ret['k']}, {ret['n_queries']} single-vector queries, "
                    f"{ret['omp_threads']} threads ({_load(ret['rows'][0])})",
                    ["items", "index", "p50", "p95", f"recall@{ret['k']}", "speed-up vs flat",
                     "build", "memory / 1M items"], rows))
    fp = fig.get("fastpath")
    if fp:
        sizes = list(fp["sizes"].values())
        base = sizes[0]["fast"]["p50"]
        rows = [[f"{s['items']:,}", f"{s['customers']:,}", f"{s['events']:,}",
                 f"{s['index_kinds']['items']}/{s['index_kinds']['users']}", f"{s['index_s']:.1f} s",
                 str(s["fast"]["n"]), _ms(s["fast"]["p50"]), _ms(s["fast"]["p95"]),
                 _x(s["fast"]["p50"] / base if base else None)] for s in sizes]
        out.append((f"Fast path end to end (served pipeline, no model), synthetic shops ({_load(sizes[-1])})",
                    ["items", "customers", "events", "index (items/users)", "index build", "requests",
                     "p50", "p95", f"p50 vs {sizes[0]['items']:,} items"], rows))
    fl = fig.get("fault")
    if fl:
        rows = []
        for phase, label in (("model_up", "model up"), ("after_kill", "model server killed")):
            ph = fl["phases"][phase]
            f = ph["fast"] or {}
            rows.append([label, str(ph["requests"]), str(ph["http_5xx"]), _ms(f["p50"]) if f else "-",
                         _ms(f["p95"]) if f else "-",
                         ", ".join(f"{k} {v}" for k, v in sorted(ph["refinement_states"].items()))])
        rows.append(["p95 killed / up", "", "", "", _x(fl["p95_after_vs_before"]), ""])
        back = fl.get("model_back_after_s")
        rows.append(["model ready again after the kill", "", "", "", "-" if back is None else f"{back:.1f} s", ""])
        out.append((f"Fast path while the model server is killed at {fl['killed_at_s']:.0f} s of "
                    f"{fl['seconds']:.0f} s, {fl['workers']} clients; events posted {fl['events_posted']}, "
                    f"accepted {fl['events_accepted']}, missing after {fl['events_missing']} ({_load(fl)})",
                    ["phase", "requests", "5xx", "p50", "p95", "refinement states"], rows))
    rv = fig.get("reviews")
    if rv:
        names = {"polarity": "polarity only (1 token)", "joint": "polarity + aspects, one call (--one-call)",
                 "two_calls": "polarity + aspects, two calls (default)"}
        rows = [[names.get(m, m), str(v["n"]), f"{v['reviews_per_min']:.1f}",
                 "-" if v["limit_reviews_per_min"] is None else f"{v['limit_reviews_per_min']:.1f}",
                 _pct(v["measured_vs_limit"]) if v["measured_vs_limit"] is not None else "-",
                 f"{v['calls'] / v['n']:.1f}", f"{(v['prompt_tokens'] - v['cached_tokens']) / v['calls']:.0f}",
                 f"{v['completion_tokens'] / v['calls']:.1f}", str(v["with_aspects"])]
                for m, v in rv["modes"].items()]
        out.append((f"Review scoring, zh + en mix, concurrency {rv['concurrency']} ({_load(rv)}); limit = the "
                    "calls' uncached prompt and generated tokens at this run's calibrated rates",
                    ["mode", "reviews", "reviews/min", "limit reviews/min", "measured / limit", "calls/review",
                     "uncached prompt tok/call", "gen tok/call", "with aspects"], rows))
    server = (fig.get("model") or {}).get("base_url", "embedded")
    for key, label in (("concurrency", "embedded server" if server == "embedded" else server),
                       ("concurrency_vllm", "vLLM")):
        c = fig.get(key)
        if c:
            rows = [[lvl, str(v["requests"]), f"{v['req_s']:.3f}", f"{v['gen_tok_s']:.1f}",
                     _ms(v["latency"]["p50"]), _x(v["throughput_vs_first"])]
                    for lvl, v in c["levels"].items()]
            out.append((f"Throughput under concurrency, {label} ({_load(c)})",
                        ["concurrency", "requests", "req/s", "gen tok/s", "p50 latency",
                         "throughput vs c=1"], rows))
    ing = fig.get("ingest")
    if ing:
        rows = [["load (parse + validate)", f"{ing['load_s']:.1f} s", f"{ing['load_events_s']:,.0f}"],
                ["store write (SQLite, WAL)", f"{ing['write_s']:.1f} s", f"{ing['write_events_s']:,.0f}"],
                ["load + write", f"{ing['load_s'] + ing['write_s']:.1f} s", f"{ing['total_events_s']:,.0f}"],
                ["bare SQLite insert (floor)", f"{ing['bare_insert_s']:.1f} s", f"{ing['bare_events_s']:,.0f}"],
                ["store write / bare insert", _x(ing["store_vs_bare"]), ""]]
        out.append((f"Ingest, {ing['dataset']}: {ing['rows_read']:,} rows -> {ing['events']:,} events "
                    f"({_load(ing)})", ["step", "time", "events/s"], rows))
    ib = fig.get("index_build")
    if ib:
        out.append((f"Item index build, {ib['items']:,} real titles, {ib['embedder']} ({_load(ib)})",
                    ["embed", "FAISS add", "per 10k items", "embedding share"],
                    [[f"{ib['embed_s']:.1f} s", _ms(ib["faiss_s"]), f"{ib['per_10k_s']:.1f} s",
                      _pct(ib["embed_share"])]]))
    return out


def print_tables(fig: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console(width=160)
    for title, header, rows in tables(fig):
        t = Table(title=title, title_justify="left")
        for h in header:
            t.add_column(h)
        for r in rows:
            t.add_row(*r)
        console.print(t)


def markdown(fig: dict[str, Any]) -> str:
    """All tables as markdown, for docs/bench.md."""
    parts = []
    for title, header, rows in tables(fig):
        parts.append(f"**{title}**\n")
        parts.append("| " + " | ".join(header) + " |")
        parts.append("|" + "---|" * len(header))
        parts.extend("| " + " | ".join(r) + " |" for r in rows)
        parts.append("")
    return "\n".join(parts)


def plot(fig: dict[str, Any], path: Path) -> None:
    """One PNG, a panel per section that ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in ("e2e", "ranking", "prefix", "retrieval", "concurrency", "ingest")
              if fig.get(k)]
    if not panels:
        return
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    f, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, panels, strict=False):
        _PANELS[key](ax, fig)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    f.suptitle(f"ShopLens bench {fig['started']} · {fig['model'].get('id', '')}", fontsize=10)
    f.tight_layout()
    f.savefig(path, dpi=110)
    plt.close(f)


def _p_e2e(ax: Any, fig: dict[str, Any]) -> None:
    e = fig["e2e"]
    users = [r["user"] for r in e["records"]]
    left = [0.0] * len(users)
    for stage in e["stages_mean_s"]:
        vals = [r["stages_s"][stage] for r in e["records"]]
        ax.barh(users, vals, left=left, label=stage)
        left = [a + b for a, b in zip(left, vals, strict=True)]
    ax.set_xlabel("seconds")
    ax.set_title("next-item latency by stage", fontsize=9)
    ax.legend(fontsize=7)


def _p_ranking(ax: Any, fig: dict[str, Any]) -> None:
    r = fig["ranking"]
    names = ["verbalizer", "generation"]
    ax.bar(names, [r[n]["time"]["mean"] for n in names], color=["tab:green", "tab:red"])
    for i, n in enumerate(names):
        ax.text(i, r[n]["time"]["mean"], f"NDCG@10 {r[n]['ndcg@10']:.1f}", ha="center",
                va="bottom", fontsize=8)
    ax.set_ylabel("seconds per user")
    ax.set_title("ranking 20 candidates", fontsize=9)


def _p_prefix(ax: Any, fig: dict[str, Any]) -> None:
    c = fig["prefix"]["conditions"]
    ax.bar(list(c), [v["p50"] for v in c.values()])
    ax.set_ylabel("p50 seconds")
    ax.set_title("verbalizer call, prefix cache", fontsize=9)


def _p_retrieval(ax: Any, fig: dict[str, Any]) -> None:
    ret = fig["retrieval"]
    for kind in ("flat", "ivf", "hnsw"):
        pts = [(r["n"], r["kinds"][kind]["search"]["p50"] * 1e3) for r in ret["rows"] if kind in r["kinds"]]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=kind)
    ax.axhline(5, color="grey", ls="--", lw=0.8, label="5 ms target")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("catalogue items")
    ax.set_ylabel("p50 ms / query")
    ax.set_title("retrieval latency", fontsize=9)
    ax.legend(fontsize=7)


def _p_concurrency(ax: Any, fig: dict[str, Any]) -> None:
    for key, label in (("concurrency", "embedded"), ("concurrency_vllm", "vLLM")):
        c = fig.get(key)
        if c:
            lv = [int(x) for x in c["levels"]]
            ax.plot(lv, [v["req_s"] for v in c["levels"].values()], marker="o", label=label)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("requests/s")
    ax.set_title("throughput", fontsize=9)
    ax.legend(fontsize=7)


def _p_ingest(ax: Any, fig: dict[str, Any]) -> None:
    ing = fig["ingest"]
    names = ["load", "store write", "load+write", "bare insert"]
    vals = [ing["load_events_s"], ing["write_events_s"], ing["total_events_s"], ing["bare_events_s"]]
    ax.bar(names, vals)
    ax.set_ylabel("events/s")
    ax.set_title("ingest (Online Retail)", fontsize=9)
    ax.tick_params(axis="x", labelsize=7)


_PANELS = {"e2e": _p_e2e, "ranking": _p_ranking, "prefix": _p_prefix, "retrieval": _p_retrieval,
           "concurrency": _p_concurrency, "ingest": _p_ingest}


def rerender(run_dir: Path) -> None:
    """Rewrite ``tables.md`` and ``bench.png`` of a run folder from its ``figures.json``."""
    fig = json.loads((run_dir / "figures.json").read_text())
    print_tables(fig)
    (run_dir / "tables.md").write_text(markdown(fig))
    plot(fig, run_dir / "bench.png")


if __name__ == "__main__":
    rerender(Path(sys.argv[1]))
