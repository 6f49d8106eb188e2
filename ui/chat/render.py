"""Pure rendering: typed tool results -> escaped text and data frames for the Gradio panels.

Everything shown comes from data (titles, reviews, ids), so every string that reaches markdown
is escaped here: HTML special characters become entities and markdown syntax is backslashed,
so a title like ``<img src=x onerror=...>`` or ``[x](javascript:...)`` shows as text.
"""

from __future__ import annotations

import html
import math
import re
from pathlib import Path
from typing import Any

import pandas as pd

from agent.chat.results import (
    ChurnSegment,
    ItemDetails,
    ItemSentiment,
    NextItems,
    SearchHits,
    TaskResult,
    Timeline,
    ToolResult,
)

SOURCES = ("embedding", "covisit", "similar_users", "popularity", "llm")
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|~>-])")


def safe_md(text: str) -> str:
    """Escape data for a markdown surface (the chatbot): no HTML, no links, no formatting."""
    return _MD_SPECIAL.sub(r"\\\1", html.escape(text, quote=False))


def timeline_frame(t: Timeline) -> pd.DataFrame:
    """One row per event: time, units (quantity, or 1), event type, item title and id."""
    rows = [{"time": pd.Timestamp(e.timestamp).tz_convert(None), "units": abs(e.quantity or 1),
             "event": e.event_type, "item": e.title, "item_id": e.item_id} for e in t.events]
    return pd.DataFrame(rows, columns=["time", "units", "event", "item", "item_id"])


def timeline_figure(t: Timeline, max_rows: int = 12) -> Any:
    """Events over time (x) per item (y: the most frequent items), coloured by event type.

    Text is drawn as pixels, so titles cannot inject markup; '$' is escaped so matplotlib
    does not read a title as mathtext.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = timeline_frame(t)
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=100)
    if df.empty:
        ax.text(0.5, 0.5, "no events", ha="center", va="center", transform=ax.transAxes)
        return fig
    top = df["item_id"].value_counts().index[:max_rows].tolist()
    label = {i: _short(df.loc[df["item_id"] == i, "item"].iloc[0]) + f" ({i})" for i in top}
    df["row"] = df["item_id"].map(lambda i: label.get(i, "other items"))
    order = [label[i] for i in reversed(top)] + (["other items"] if (df["row"] == "other items").any() else [])
    ypos = {r: n for n, r in enumerate(order)}
    for event, g in df.groupby("event"):
        ax.scatter(g["time"], g["row"].map(ypos), s=12 + 6 * g["units"].clip(upper=24), alpha=0.7,
                   label=str(event))
    ax.set_yticks(range(len(order)), order, fontsize=7)
    shown = f"latest {len(df)} of {t.n_events}" if len(df) < t.n_events else str(t.n_events)
    ax.set_title(f"Customer {_short(t.customer_id)}: {shown} events", fontsize=9)
    ax.legend(fontsize=7, loc="best", title="event (size = units)", title_fontsize=7)
    ax.tick_params(axis="x", labelsize=7)
    fig.autofmt_xdate()
    fig.tight_layout()
    plt.close(fig)
    return fig


def _short(text: str, n: int = 34) -> str:
    text = text.replace("$", r"\$")
    return text if len(text) <= n else text[: n - 1] + "…"


def items_frame(result: ToolResult) -> pd.DataFrame | None:
    """The result's table with internal column names (`readable_table` gives the shown one): a
    customer's events (newest first), the ranked candidates (with per-source scores), search
    hits, one item's details, an item's complaints, a month's at-risk customers, or a task
    answer's table (`task_frame`)."""
    if isinstance(result, NextItems):
        rows = []
        for it in result.prediction.items:
            row: dict[str, Any] = {"rank": it.rank, "item": it.title, "item_id": it.item_id,
                                   "score": round(it.score, 3)}
            row.update({s: round(it.source_scores.get(s, 0.0), 3) for s in SOURCES})
            row["why"] = it.reason
            row["evidence"] = _cites(it.evidence)
            rows.append(row)
        return pd.DataFrame(rows)
    if isinstance(result, Timeline):  # newest first
        return pd.DataFrame([{"date": e.timestamp[:10], "event": e.event_type, "item": e.title,
                              "item_id": e.item_id, "units": e.quantity, "price": e.unit_price}
                             for e in reversed(result.events)],
                            columns=["date", "event", "item", "item_id", "units", "price"])
    if isinstance(result, SearchHits):
        return pd.DataFrame([{"rank": i, "item": h.title, "item_id": h.item_id, "similarity": h.score,
                              "price": h.price} for i, h in enumerate(result.hits, 1)])
    if isinstance(result, ItemSentiment):  # the complaints; counts and trend are in the answer
        return pd.DataFrame([{"date": x.timestamp[:10], "stars": x.rating, "complaint": x.excerpt,
                              "review_event": x.event_id} for x in result.complaints],
                            columns=["date", "stars", "complaint", "review_event"])
    if isinstance(result, ChurnSegment):
        return pd.DataFrame([{"rank": i, "customer_id": x.customer_id, "churn_probability": x.probability,
                              "risk": x.risk_band, "recency_days": x.recency_days, "orders": x.n_orders,
                              "spend": round(x.monetary, 2), "drivers": "; ".join(x.drivers),
                              "last_purchase_event": x.last_purchase_event,
                              "last_purchase_at": x.last_purchase_at[:10]}
                             for i, x in enumerate(result.customers, 1)])
    if isinstance(result, ItemDetails):
        info = result.item
        return pd.DataFrame([{"item": info.title, "item_id": info.item_id, "price": info.price,
                              "category": info.category, "customers": result.n_customers}])
    if isinstance(result, TaskResult):
        return task_frame(result)
    return None


def _cites(evidence: list[Any]) -> str:
    """Cited events as "E3 2011-12-01 purchase of X" (the ref and date, never the event's hash)."""
    def get(e: Any, k: str) -> str:
        return str(e.get(k, "") if isinstance(e, dict) else getattr(e, k))
    return "; ".join(f"{get(e, 'ref')} {get(e, 'timestamp')[:10]} {get(e, 'summary')}" for e in evidence)


def task_frame(result: TaskResult) -> pd.DataFrame | None:
    """A task answer as a table: the audience's customers, a profile's attributes, a churn
    answer's drivers, or an intent answer's numbers (one row per field)."""
    d = result.data
    if result.tool == "audience":
        return pd.DataFrame([{"rank": u["rank"], "customer_id": u["user_id"], "score": round(u["score"], 3),
                              "model_probability": u.get("model_probability"), "why": u["reason"],
                              "evidence": _cites(u.get("evidence", []))} for u in d.get("users", [])],
                            columns=["rank", "customer_id", "score", "model_probability", "why", "evidence"])
    if result.tool == "profile":
        return pd.DataFrame([{"attribute": a["name"], "value": a["value"], "kind": a["kind"],
                              "weight": a.get("weight"), "evidence": _cites(a.get("evidence", []))}
                             for a in d.get("attributes", [])],
                            columns=["attribute", "value", "kind", "weight", "evidence"])
    if result.tool == "churn":
        return pd.DataFrame([{"driver": x["name"], "effect": x["effect"], "detail": x["detail"]}
                             for x in d.get("drivers", [])], columns=["driver", "effect", "detail"])
    if result.tool == "intent":
        keys = ["probability", "baseline_probability", "model_probability", "probability_source", "stage",
                "horizon_hours", "reason"]
        return pd.DataFrame([{"field": k, "value": d[k]} for k in keys if d.get(k) is not None],
                            columns=["field", "value"])
    return None


# Column names as a merchandiser reads them, in the question's language.
COLUMN_NAMES: dict[str, tuple[str, str]] = {
    "rank": ("Rank", "排名"), "item": ("Product", "商品"), "item_id": ("Product code", "商品编号"),
    "score": ("Score", "得分"), "embedding": ("Similar products", "相似商品"),
    "covisit": ("Bought together", "共同购买"), "similar_users": ("Similar customers", "相似客户"),
    "popularity": ("Popularity", "热度"), "llm": ("Model", "模型"), "why": ("Why", "理由"),
    "evidence": ("Cited events", "依据事件"), "similarity": ("Similarity", "相似度"), "price": ("Price", "价格"),
    "date": ("Date", "日期"), "stars": ("Stars", "星级"), "complaint": ("Complaint", "抱怨内容"),
    "review_event": ("Review", "评价"), "customer_id": ("Customer", "客户"),
    "churn_probability": ("P(churn)", "流失概率"), "risk": ("Risk", "风险"),
    "recency_days": ("Days since last order", "距上次购买天数"), "orders": ("Orders", "订单数"),
    "spend": ("Spend", "消费额"), "drivers": ("Drivers", "主要因素"), "last_purchase_event": ("Last order", "最近订单"),
    "last_purchase_at": ("Last order date", "最近购买日期"), "category": ("Category", "类别"),
    "customers": ("Customers", "客户数"), "model_probability": ("Model P", "模型概率"),
    "attribute": ("Attribute", "属性"), "value": ("Value", "取值"), "kind": ("Observed or inferred", "观察或推断"),
    "weight": ("Weight", "权重"), "driver": ("Driver", "因素"), "effect": ("Effect", "影响"),
    "detail": ("Detail", "说明"), "field": ("Field", "字段"), "event": ("Event", "行为"),
    "units": ("Units", "数量"),
}
# an event id: a hex digest (sha1: 40), with letters in it (a long numeric customer id is no hash)
_HASH = re.compile(r"(?=[0-9]*[a-f])[0-9a-f]{32,}|(?=[0-9]*[A-F])[0-9A-F]{32,}")
# Columns kept even when constant: what identifies a row.
_KEY_COLUMNS = {"rank", "item", "customer_id", "attribute", "driver", "field", "date"}


def readable_table(frame: pd.DataFrame | None, lang: str) -> tuple[pd.DataFrame | None, str]:
    """The table a merchandiser sees: human column names in the question's language (`lang`
    'zh' or else English), without hash-valued columns (event ids; the events stay cited by
    ref and date) and without columns whose value is the same on every row (said once in the
    returned note instead, e.g. "Same on every row: Model = 0.0", so nothing is lost).

    Returns:
        (the renamed frame, or None when there is no table; the note, "" when none).
    """
    if frame is None:
        return None, ""
    zh = lang == "zh"
    drop, same = [], []
    for col in frame.columns:
        values = frame[col].dropna()
        empty = len(frame) > 0 and not any(str(v).strip() for v in values)  # nothing in it to show
        hashes = col not in _KEY_COLUMNS and len(values) > 0 and all(
            isinstance(v, str) and _HASH.fullmatch(v) for v in values)
        if empty or hashes:
            drop.append(col)
        elif len(frame) >= 2 and col not in _KEY_COLUMNS and frame[col].astype(str).nunique(dropna=False) == 1:
            drop.append(col)
            same.append(f"{_column(col, zh)} = {frame[col].iloc[0]}")
    note = (("每行相同：" if zh else "Same on every row: ") + ("；" if zh else "; ").join(same)) if same else ""
    out = frame.drop(columns=drop).rename(columns=lambda c: _column(c, zh))
    return out, note


def _column(name: str, zh: bool) -> str:
    en_zh = COLUMN_NAMES.get(name)
    return en_zh[1 if zh else 0] if en_zh else name.replace("_", " ")


# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection, OWASP).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "＝", "＋", "－", "＠")


def write_csv(frame: pd.DataFrame, folder: Path, stem: str) -> Path:
    """The shown table as UTF-8 CSV with a byte-order mark (Excel reads the Chinese headers),
    at ``folder/shoplens-<stem>.csv``; returns the path. A text cell that a spreadsheet would
    run as a formula (a title like ``=HYPERLINK(...)``) is written with a leading ``'``, so it
    opens as text; numbers are written as numbers."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"shoplens-{re.sub(r'[^A-Za-z0-9_.-]+', '-', stem).strip('-') or 'table'}.csv"
    safe = frame.map(lambda v: "'" + v if isinstance(v, str) and v.lstrip(" ").startswith(_FORMULA_START) else v)
    safe.columns = ["'" + c if str(c).startswith(_FORMULA_START) else c for c in frame.columns]
    safe.to_csv(path, index=False, encoding="utf-8-sig")
    return path


def chart_frame(result: ToolResult, lang: str) -> tuple[pd.DataFrame | None, str]:
    """The result's numbers as (name, value) bars and the chart's title: the candidates' scores,
    a month's at-risk customers' P(churn), an audience's scores, a profile's attribute weights,
    a churn or intent answer's probabilities (baseline, model, served), an item's reviews by
    polarity. Names are shortened titles or customer ids; (None, "") when nothing to plot."""
    zh = lang == "zh"

    def frame(rows: list[tuple[str, float | None]], en: str, cn: str) -> tuple[pd.DataFrame | None, str]:
        kept = [(n, float(v)) for n, v in rows if v is not None and math.isfinite(float(v))]
        return (pd.DataFrame(kept, columns=["name", "value"]) if kept else None), (cn if zh else en)

    if isinstance(result, NextItems):
        return frame([(f"{it.rank}. {_short(it.title, 24)}", it.score) for it in result.prediction.items],
                     "Score of each predicted item", "各推荐商品得分")
    if isinstance(result, ChurnSegment):
        return frame([(x.customer_id, x.probability) for x in result.customers],
                     "P(churn) of each customer", "各客户流失概率")
    if isinstance(result, SearchHits):
        return frame([(_short(h.title, 24), h.score or 0.0) for h in result.hits], "Search similarity", "搜索相似度")
    if isinstance(result, ItemSentiment) and not result.n_reviews:
        return None, ""
    if isinstance(result, ItemSentiment):
        names = {"negative": "差评", "neutral": "中评", "positive": "好评"} if zh else {}
        return frame([(names.get(k, k), v) for k, v in result.counts.items()], "Reviews by polarity", "评价分布")
    if not isinstance(result, TaskResult):
        return None, ""
    d = result.data
    if result.tool == "audience":
        return frame([(str(u["user_id"]), u["score"]) for u in d.get("users", [])[:15]],
                     "Score of each targeted customer", "各目标客户得分")
    if result.tool == "profile":
        return frame([(_short(f"{a['name']}: {a['value']}", 28), a["weight"]) for a in d.get("attributes", [])
                      if a.get("weight") is not None], "Profile attributes by weight", "画像属性权重")
    if result.tool in ("churn", "intent"):
        labels = (("基线", "模型", "最终") if zh else ("baseline", "model", "served"))
        what = ("流失概率" if result.tool == "churn" else "购买概率") if zh else (
            "P(churn)" if result.tool == "churn" else "P(purchase)")
        return frame(list(zip(labels, (d.get("baseline_probability"), d.get("model_probability"),
                                       d.get("probability")), strict=True)), what, what)
    return None, ""


def status_line(kind: str, text: str, lang: str) -> str:
    """A one-line, escaped status for the status bar."""
    icon = {"warn": "⚠️", "info": "⏳", "ok": "✅"}.get(kind, "")
    return f"{icon} {safe_md(text)}".strip()
