"""The event store: SQLite in WAL mode, one file per workspace.

Events are keyed by (dataset, event_id) so re-ingesting is idempotent; each batch commits in
one transaction so an interrupted ingest leaves either the whole batch or none of it.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from agent.domain.errors import UnknownUserError
from agent.domain.schemas import BehaviorEvent, CatalogItem

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    dataset TEXT NOT NULL,
    event_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    item_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    ts REAL NOT NULL,               -- unix seconds, UTC
    quantity INTEGER,
    unit_price REAL,
    rating REAL,
    review_text TEXT,
    session_id TEXT,
    basket_id TEXT,
    seq INTEGER NOT NULL,           -- ingest order, the stable tie-break for equal timestamps
    PRIMARY KEY (dataset, event_id)
);
CREATE INDEX IF NOT EXISTS events_user ON events (dataset, user_id, ts, seq);
CREATE INDEX IF NOT EXISTS events_item ON events (dataset, item_id);
CREATE TABLE IF NOT EXISTS items (
    dataset TEXT NOT NULL,
    item_id TEXT NOT NULL,
    title TEXT NOT NULL,
    category TEXT,
    brand TEXT,
    price REAL,
    description TEXT,
    PRIMARY KEY (dataset, item_id)
);
CREATE TABLE IF NOT EXISTS ingests (
    dataset TEXT NOT NULL,
    finished_at TEXT NOT NULL,
    report TEXT NOT NULL
);
"""

_EVENT_COLS = (
    "event_id, user_id, item_id, event_type, ts, quantity, unit_price, rating, review_text, "
    "session_id, basket_id"
)


class EventStore:
    """SQLite-backed store of events and catalogue items, partitioned by dataset name.

    Thread-safe for the API: one connection per thread, WAL so readers never block the writer.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._conn() as c:
            c.executescript(_SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # ---- writes ---------------------------------------------------------------------------
    def add_events(self, dataset: str, events: Iterable[BehaviorEvent]) -> int:
        """Insert events in one transaction; returns how many were new (duplicates ignored)."""
        conn = self._conn()
        with conn:
            (start,) = conn.execute(
                "SELECT COALESCE(MAX(seq), 0) FROM events WHERE dataset = ?", (dataset,)
            ).fetchone()
            before = conn.total_changes
            conn.executemany(
                f"INSERT OR IGNORE INTO events (dataset, {_EVENT_COLS}, seq) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    (
                        dataset, e.event_id, e.user_id, e.item_id, e.event_type,
                        e.timestamp.timestamp(), e.quantity, e.unit_price, e.rating,
                        e.review_text, e.session_id, e.basket_id, start + i + 1,
                    )
                    for i, e in enumerate(events)
                ),
            )
            return conn.total_changes - before

    def add_items(self, dataset: str, items: Iterable[CatalogItem]) -> int:
        """Upsert catalogue items (a re-ingest may improve titles); returns rows written."""
        conn = self._conn()
        with conn:
            before = conn.total_changes
            conn.executemany(
                "INSERT INTO items (dataset, item_id, title, category, brand, price, description)"
                " VALUES (?,?,?,?,?,?,?) ON CONFLICT(dataset, item_id) DO UPDATE SET "
                "title=excluded.title, category=excluded.category, brand=excluded.brand, "
                "price=excluded.price, description=excluded.description",
                (
                    (dataset, i.item_id, i.title, i.category, i.brand, i.price, i.description)
                    for i in items
                ),
            )
            return conn.total_changes - before

    def record_ingest(self, dataset: str, report: dict[str, object]) -> None:
        conn = self._conn()
        with conn:
            conn.execute(
                "INSERT INTO ingests VALUES (?,?,?)",
                (dataset, datetime.now(UTC).isoformat(), json.dumps(report)),
            )

    def delete_user(self, dataset: str, user_id: str) -> int:
        """Delete all of a user's events; returns how many were deleted."""
        conn = self._conn()
        with conn:
            cur = conn.execute(
                "DELETE FROM events WHERE dataset = ? AND user_id = ?", (dataset, user_id)
            )
            return cur.rowcount

    # ---- reads ----------------------------------------------------------------------------
    def datasets(self) -> list[str]:
        rows = self._conn().execute("SELECT DISTINCT dataset FROM items UNION "
                                    "SELECT DISTINCT dataset FROM events").fetchall()
        return sorted(r[0] for r in rows)

    def has_dataset(self, dataset: str) -> bool:
        """True when the dataset has any item or event (two indexed lookups, not a scan)."""
        c = self._conn()
        return any(
            c.execute(f"SELECT 1 FROM {table} WHERE dataset = ? LIMIT 1", (dataset,)).fetchone()
            for table in ("items", "events")
        )

    def has_items(self, dataset: str) -> bool:
        """True when the dataset has a catalogue (one indexed lookup)."""
        row = self._conn().execute("SELECT 1 FROM items WHERE dataset = ? LIMIT 1", (dataset,)).fetchone()
        return row is not None

    def counts(self, dataset: str) -> dict[str, int]:
        c = self._conn()
        n_events, n_users = c.execute(
            "SELECT COUNT(*), COUNT(DISTINCT user_id) FROM events WHERE dataset = ?", (dataset,)
        ).fetchone()
        (n_items,) = c.execute("SELECT COUNT(*) FROM items WHERE dataset = ?", (dataset,)).fetchone()
        return {"events": n_events, "users": n_users, "items": n_items}

    def user_events(
        self, dataset: str, user_id: str, *, before: datetime | None = None
    ) -> list[BehaviorEvent]:
        """A user's events, oldest first (ties in ingest order), optionally strictly before a time.

        Raises:
            UnknownUserError: the user has no events in this dataset.
        """
        sql = f"SELECT {_EVENT_COLS} FROM events WHERE dataset = ? AND user_id = ?"
        args: list[object] = [dataset, user_id]
        if before is not None:
            sql += " AND ts < ?"
            args.append(before.timestamp())
        rows = self._conn().execute(sql + " ORDER BY ts, seq", args).fetchall()
        if not rows and not self.has_user(dataset, user_id):
            raise UnknownUserError(dataset, user_id, self.similar_user_ids(dataset, user_id))
        return [_row_to_event(r) for r in rows]

    def user_events_sha256(self, dataset: str, user_id: str) -> str | None:
        """sha256 hex of a user's stored event ids and timestamps, in stored order (time, then
        ingest order): it changes when an event is added or deleted. None when the user has no
        events. One indexed range read; no event is parsed.
        """
        rows = self._conn().execute(
            "SELECT event_id, ts FROM events WHERE dataset = ? AND user_id = ? ORDER BY ts, seq",
            (dataset, user_id),
        )
        h, n = hashlib.sha256(), 0
        for event_id, ts in rows:
            h.update(f"{event_id}\x1f{ts!r}\x1e".encode())
            n += 1
        return h.hexdigest() if n else None

    def user_ids(self, dataset: str, *, since: datetime | None = None, limit: int | None = None) -> list[str]:
        """The dataset's user ids, sorted; with `since`, only users with an event at or after it;
        with `limit`, the first `limit` of them."""
        sql = "SELECT DISTINCT user_id FROM events WHERE dataset = ?"
        args: list[object] = [dataset]
        if since is not None:
            sql += " AND ts >= ?"
            args.append(since.timestamp())
        sql += " ORDER BY user_id"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return [r[0] for r in self._conn().execute(sql, args)]

    def has_user(self, dataset: str, user_id: str) -> bool:
        row = self._conn().execute(
            "SELECT 1 FROM events WHERE dataset = ? AND user_id = ? LIMIT 1", (dataset, user_id)
        ).fetchone()
        return row is not None

    def similar_user_ids(self, dataset: str, user_id: str, n: int = 3) -> list[str]:
        """Up to n existing user ids sharing the longest prefix with `user_id` (for 'did you mean')."""
        for k in range(len(user_id), 0, -1):
            rows = self._conn().execute(
                "SELECT DISTINCT user_id FROM events WHERE dataset = ? AND user_id LIKE ? "
                "ESCAPE '\\' ORDER BY user_id LIMIT ?",
                (dataset, _like_escape(user_id[:k]) + "%", n),
            ).fetchall()
            if rows:
                return [r[0] for r in rows]
        return []

    def iter_events(
        self, dataset: str, *, before: datetime | None = None, event_types: tuple[str, ...] | None = None
    ) -> Iterator[BehaviorEvent]:
        """All events of a dataset (optionally only some types) ordered by (user, time, ingest order)."""
        sql = f"SELECT {_EVENT_COLS} FROM events WHERE dataset = ?"
        args: list[object] = [dataset]
        if event_types:
            sql += f" AND event_type IN ({','.join('?' * len(event_types))})"
            args.extend(event_types)
        if before is not None:
            sql += " AND ts < ?"
            args.append(before.timestamp())
        for r in self._conn().execute(sql + " ORDER BY user_id, ts, seq", args):
            yield _row_to_event(r)

    def items(self, dataset: str) -> dict[str, CatalogItem]:
        rows = self._conn().execute(
            "SELECT item_id, title, category, brand, price, description FROM items "
            "WHERE dataset = ? ORDER BY item_id", (dataset,)
        ).fetchall()
        return {
            r["item_id"]: CatalogItem(
                item_id=r["item_id"], title=r["title"], category=r["category"],
                brand=r["brand"], price=r["price"], description=r["description"],
            )
            for r in rows
        }

    def last_ingest(self, dataset: str) -> dict[str, object] | None:
        row = self._conn().execute(
            "SELECT report FROM ingests WHERE dataset = ? ORDER BY rowid DESC LIMIT 1", (dataset,)
        ).fetchone()
        return json.loads(row[0]) if row else None


def _like_escape(s: str) -> str:
    """Escape LIKE wildcards so a prefix matches literally (ids like ``user_12`` are common)."""
    return s.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _row_to_event(r: sqlite3.Row) -> BehaviorEvent:
    return BehaviorEvent.model_construct(
        event_id=r["event_id"], user_id=r["user_id"], item_id=r["item_id"],
        event_type=r["event_type"], timestamp=datetime.fromtimestamp(r["ts"], tz=UTC),
        quantity=r["quantity"], unit_price=r["unit_price"], rating=r["rating"],
        review_text=r["review_text"], session_id=r["session_id"], basket_id=r["basket_id"],
    )
