"""Pure rendering: typed tool results -> escaped text and data frames for the Gradio panels.

Everything shown comes from data (titles, reviews, ids), so every string that reaches markdown
is escaped here: HTML special characters become entities and markdown syntax is backslashed,
so a title like ``<img src=x onerror=...>`` or ``[x](javascript:...)`` shows as text.
"""

from __future__ import annotations

import html
import re
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
    """The ranked candidates (with per-source scores), search hits, one item's details, an item's
    complaints, or a month's at-risk customers."""
    if isinstance(result, NextItems):
        rows = []
        for it in result.prediction.items:
            row: dict[str, Any] = {"rank": it.rank, "item": it.title, "item_id": it.item_id,
                                   "score": round(it.score, 3)}
            row.update({s: round(it.source_scores.get(s, 0.0), 3) for s in SOURCES})
            row["why"] = it.reason
            row["evidence"] = "; ".join(f"{e.ref} {e.timestamp[:10]} {e.summary}" for e in it.evidence)
            rows.append(row)
        return pd.DataFrame(rows)
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
                              "drivers": "; ".join(x.drivers), "last_purchase_event": x.last_purchase_event,
                              "last_purchase_at": x.last_purchase_at[:10]}
                             for i, x in enumerate(result.customers, 1)])
    if isinstance(result, ItemDetails):
        it = result.item
        return pd.DataFrame([{"item": it.title, "item_id": it.item_id, "price": it.price,
                              "category": it.category, "customers": result.n_customers}])
    return None


def breakdown_frame(result: ToolResult) -> pd.DataFrame | None:
    """Numbers of a task result (sentiment shares, risk drivers) as (name, value) bars."""
    if not isinstance(result, TaskResult):
        return None
    rows: list[dict[str, Any]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, bool):
            return
        if isinstance(value, int | float):
            rows.append({"name": prefix, "value": float(value)})
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)

    walk("", result.data)
    return pd.DataFrame(rows[:30], columns=["name", "value"]) if rows else None


def status_line(kind: str, text: str, lang: str) -> str:
    """A one-line, escaped status for the status bar."""
    icon = {"warn": "⚠️", "info": "⏳", "ok": "✅"}.get(kind, "")
    return f"{icon} {safe_md(text)}".strip()
