"""Ingest throughput: real Online Retail rows through the real loader and the SQLite store,
and item-index build time (real MiniLM embedder) per 10k items."""

from __future__ import annotations

import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.data.store import EventStore
from agent.ingest import ingest, load_dataset
from bench.stats import load_average, ratio
from retrieval.embedder import make_embedder
from retrieval.index import VectorIndex


def _bare_insert(path: Path, rows: list[tuple[Any, ...]]) -> float:
    """Seconds to write `rows` with one executemany into a bare table of the same columns (no
    secondary indexes, no duplicate check, same WAL/synchronous pragmas): the floor for SQLite
    on this disk."""
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE ev (dataset, event_id, user_id, item_id, event_type, ts, quantity,"
                 " unit_price, rating, review_text, session_id, basket_id, seq)")
    t0 = time.perf_counter()
    with conn:
        conn.executemany("INSERT INTO ev VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
    s = time.perf_counter() - t0
    conn.close()
    return s


def ingest_throughput(data_dir: Path, dataset: str = "online-retail") -> dict[str, Any]:
    """Load (parse + validate) and store (SQLite, WAL) a real dataset into a temporary store.

    Returns:
        Seconds and events/s for loading, storing and both, and the store's write time relative
        to a bare SQLite insert of the same rows.
    """
    res: dict[str, Any] = {"load": load_average(), "dataset": dataset}
    t0 = time.perf_counter()
    result = load_dataset(dataset, data_dir)
    load_s = time.perf_counter() - t0
    n = len(result.events)
    with tempfile.TemporaryDirectory(prefix="shoplens-bench-") as tmp:
        store = EventStore(Path(tmp) / "store.sqlite3")
        t0 = time.perf_counter()
        report = ingest(store, dataset, result, progress=False)
        write_s = time.perf_counter() - t0
        store.close()
        rows = [(dataset, e.event_id, e.user_id, e.item_id, e.event_type, e.timestamp.timestamp(),
                 e.quantity, e.unit_price, e.rating, e.review_text, e.session_id, e.basket_id, i)
                for i, e in enumerate(result.events)]
        bare_s = _bare_insert(Path(tmp) / "bare.sqlite3", rows)
    res.update({
        "rows_read": report.rows_read, "events": n, "events_new": report.events_new,
        "items": len(result.items),
        "load_s": load_s, "write_s": write_s, "bare_insert_s": bare_s,
        "load_events_s": n / load_s, "write_events_s": n / write_s,
        "total_events_s": n / (load_s + write_s), "bare_events_s": n / bare_s,
        "store_vs_bare": ratio(write_s, bare_s),
    })
    return res


def index_build(data_dir: Path, n_items: int = 10_000, embedder: str = "all-MiniLM-L6-v2",
                ) -> dict[str, Any]:
    """Embed ``n_items`` real product titles (Amazon Games, the largest title catalogue here)
    and build the exact item index, as `shoplens ingest` does.

    Returns:
        Embedding and FAISS seconds, and seconds per 10k items.
    """
    from eval.protocols import load_llmrank_titles

    res: dict[str, Any] = {"load": load_average(), "embedder": embedder}
    titles = list(load_llmrank_titles(Path(data_dir) / "amazon-games").items())[:n_items]
    emb = make_embedder(embedder)
    emb.embed([t for _, t in titles[:64]])  # model load and warm-up, not timed
    t0 = time.perf_counter()
    vecs = emb.embed([t for _, t in titles])
    embed_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    VectorIndex.build([i for i, _ in titles], vecs, name="items", embedder=emb.name,
                      content_hash="bench")
    faiss_s = time.perf_counter() - t0
    n = len(titles)
    res.update({"items": n, "dim": int(vecs.shape[1]), "embed_s": embed_s, "faiss_s": faiss_s,
                "per_10k_s": (embed_s + faiss_s) * 10_000 / n, "embed_share": embed_s / (embed_s + faiss_s)})
    return res
