"""The event store: SQLite (one file per workspace, the embedded default) or PostgreSQL (one
database shared by several API replicas), chosen by URL.

Events are keyed by (dataset, event_id) so re-ingesting is idempotent; each batch commits in
one transaction so an interrupted ingest leaves either the whole batch or none of it; `seq`
numbers a dataset's events in ingest order and breaks ties between equal timestamps.

Why SQLAlchemy Core (and not raw psycopg beside raw sqlite3): one `Table` definition is the
schema of both backends (`agent.data.store_schema`), so each query is written once; it brings a
thread-safe connection pool, which the threaded API needs on PostgreSQL; and the dialect modules
give the two upserts (``INSERT ... ON CONFLICT``) without string templates per backend. No ORM:
rows become `BehaviorEvent`s directly. The PostgreSQL driver is psycopg 3 (binary wheel, libpq
inside), the maintained one; SQLAlchemy 2 speaks it natively.

The bulk insert is the one place that bypasses SQLAlchemy's statement execution: 50k-row batches
go to the driver's ``executemany`` as tuples (`_insert_events`), the same hot path the store had
on sqlite3 (docs/deploy.md gives the measurement).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import BindParameter, Connection, Row, bindparam, func, literal, select, union
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql.base import PGDialect
from sqlalchemy.engine import URL, Dialect
from sqlalchemy.exc import OperationalError

from agent.data.store_schema import (
    StoreConfigError,
    create_store_engine,
    events,
    ingests,
    items,
    masked_url,
    migrate,
    normalise_url,
    redact,
    sqlite_url,
    write_transaction,
)
from agent.domain.errors import UnknownUserError
from agent.domain.schemas import BehaviorEvent, CatalogItem

_EVENT_FIELDS = ("event_id", "user_id", "item_id", "event_type", "ts", "quantity", "unit_price",
                 "rating", "review_text", "session_id", "basket_id")
_EVENT_COLS = [events.c[name] for name in _EVENT_FIELDS]
_ITEM_FIELDS = ("item_id", "title", "category", "brand", "price", "description")

# Statements built once: SQLAlchemy caches their compiled form, so a call pays only execution.
_DATASET: BindParameter[str] = bindparam("dataset")
_USER: BindParameter[str] = bindparam("user_id")
_USER_EVENTS = (select(*_EVENT_COLS).where(events.c.dataset == _DATASET, events.c.user_id == _USER)
                .order_by(events.c.ts, events.c.seq))
_USER_EVENTS_BEFORE = _USER_EVENTS.where(events.c.ts < bindparam("before"))
_USER_STAMPS = (select(events.c.event_id, events.c.ts)
                .where(events.c.dataset == _DATASET, events.c.user_id == _USER)
                .order_by(events.c.ts, events.c.seq))
_HAS_USER = select(literal(1)).where(events.c.dataset == _DATASET, events.c.user_id == _USER).limit(1)
_MAX_SEQ = select(func.coalesce(func.max(events.c.seq), 0)).where(events.c.dataset == _DATASET)

# Compilers with positional placeholders (qmark, format) for SQL handed to the driver itself.
# The base PostgreSQL dialect, not psycopg's, which adds a cast to every placeholder.
_POSITIONAL: dict[str, Dialect] = {"sqlite": sqlite.dialect(), "postgresql": PGDialect(paramstyle="format")}


class _DriverSQL:
    """A prebuilt statement compiled once per backend for the driver's own cursor: the per-user
    reads every request makes skip SQLAlchemy's execution layer (on SQLite that layer cost
    0.23 ms a call, 30x the query; measured in docs/deploy.md section 7)."""

    def __init__(self, stmt: Any):
        self.forms: dict[str, tuple[str, tuple[str, ...], dict[str, Any]]] = {}
        for backend, dialect in _POSITIONAL.items():
            c = stmt.compile(dialect=dialect)
            self.forms[backend] = (str(c), tuple(c.positiontup or ()), {k: b.value for k, b in c.binds.items()})

    def args(self, backend: str, params: dict[str, Any]) -> tuple[str, list[Any]]:
        sql, names, defaults = self.forms[backend]
        return sql, [params[k] if k in params else defaults[k] for k in names]


_USER_EVENTS_SQL = _DriverSQL(_USER_EVENTS)
_USER_EVENTS_BEFORE_SQL = _DriverSQL(_USER_EVENTS_BEFORE)
_USER_STAMPS_SQL = _DriverSQL(_USER_STAMPS)
_HAS_USER_SQL = _DriverSQL(_HAS_USER)


class EventStore:
    """Events and catalogue items, partitioned by dataset name, in SQLite or PostgreSQL.

    Thread-safe for the API: each call takes a pooled connection (SQLite in WAL mode, so readers
    never block the writer). Opening applies any pending schema migration.

    Args:
        path: a SQLite file (created with its folder), the embedded default.
        url: instead of `path`, a database URL: ``postgresql://USER:PASSWORD@HOST/DB`` (psycopg 3)
            or ``sqlite:////abs/path.sqlite3``.

    Raises:
        StoreConfigError: neither or both of `path` and `url`, an unsupported URL, psycopg missing
            for PostgreSQL, or a database migrated by a newer ShopLens.
    """

    def __init__(self, path: Path | None = None, *, url: str | URL | None = None):
        if path is not None and url is None:
            self.url = sqlite_url(Path(path))
        elif url is not None and path is None:
            self.url = normalise_url(url)
        else:
            raise StoreConfigError("EventStore needs exactly one of a SQLite file path or a database URL")
        self.backend: str = self.url.get_backend_name()  # "sqlite" | "postgresql"
        self._engine = create_store_engine(self.url)
        # The SQLite file (tests and tools use its folder as the workspace); None on PostgreSQL.
        self.path: Path | None = Path(self.url.database) if self.url.database and self.backend == "sqlite" else None
        try:
            migrate(self._engine)
        except OperationalError as e:  # unreachable server, wrong password, no such database, ...
            self._engine.dispose()
            reason = redact((str(e.orig or e).strip() or type(e).__name__).splitlines()[0], self.url)
            raise StoreConfigError(
                f"cannot open the event store at {masked_url(self.url)}: {reason} (check SHOPLENS_DATABASE_URL: "
                "host, port, database, user; percent-encode special characters in the password, e.g. @ as %40)"
            ) from None
        except BaseException:
            self._engine.dispose()
            raise

    @property
    def location(self) -> str:
        """Where the events live, safe to print: the SQLite file, or the URL with its password
        masked."""
        return str(self.path) if self.path is not None else masked_url(self.url)

    def close(self) -> None:
        """Close every pooled connection (a later call opens new ones)."""
        self._engine.dispose()

    # ---- writes ---------------------------------------------------------------------------
    def add_events(self, dataset: str, events_: Iterable[BehaviorEvent]) -> int:
        """Insert events in one transaction; returns how many were new (duplicates ignored, in
        the store and within the batch). Writers to one dataset are serialised, so two replicas
        never hand out the same `seq`."""
        with write_transaction(self._engine, dataset) as conn:
            start = conn.execute(_MAX_SEQ, {"dataset": dataset}).scalar_one()
            rows = [
                (dataset, e.event_id, e.user_id, e.item_id, e.event_type, e.timestamp.timestamp(),
                 e.quantity, e.unit_price, e.rating, e.review_text, e.session_id, e.basket_id,
                 start + i + 1)
                for i, e in enumerate(events_)
            ]
            return _insert_events(conn, rows) if rows else 0

    def add_items(self, dataset: str, items_: Iterable[CatalogItem]) -> int:
        """Upsert catalogue items (a re-ingest may improve titles); returns rows written. An item
        given twice in one batch is written once, with its last values."""
        latest = {i.item_id: i for i in items_}
        if not latest:
            return 0
        rows = [{"dataset": dataset, **{f: getattr(i, f) for f in _ITEM_FIELDS}} for i in latest.values()]
        with write_transaction(self._engine, dataset) as conn:
            ins = _dialect(conn).insert(items)
            stmt = ins.on_conflict_do_update(
                index_elements=[items.c.dataset, items.c.item_id],
                set_={f: ins.excluded[f] for f in _ITEM_FIELDS[1:]},
            )
            conn.execute(stmt, rows)
        return len(rows)

    def record_ingest(self, dataset: str, report: dict[str, object]) -> None:
        """Append an ingest report; `last_ingest` returns the latest."""
        with write_transaction(self._engine, dataset) as conn:
            n = conn.scalar(select(func.coalesce(func.max(ingests.c.seq), 0))
                            .where(ingests.c.dataset == dataset))
            conn.execute(ingests.insert().values(
                dataset=dataset, finished_at=datetime.now(UTC).isoformat(), report=json.dumps(report),
                seq=int(n or 0) + 1))

    def delete_user(self, dataset: str, user_id: str) -> int:
        """Delete all of a user's events; returns how many were deleted."""
        with self._engine.begin() as conn:
            res = conn.execute(events.delete().where(events.c.dataset == dataset,
                                                     events.c.user_id == user_id))
            return int(res.rowcount)

    # ---- reads ----------------------------------------------------------------------------
    def _rows(self, stmt: Any, params: dict[str, Any] | None = None) -> Sequence[Row[Any]]:
        with self._engine.connect() as conn:
            return conn.execute(stmt, params or {}).all()

    def _fetch(self, sql: _DriverSQL, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        """All rows of a prebuilt statement, through a pooled connection's own cursor."""
        text, args = sql.args(self.backend, params)
        conn = self._engine.raw_connection()  # closing returns it to the pool, rolled back
        try:
            cur = conn.cursor()
            try:
                cur.execute(text, args)
                return list(cur.fetchall())
            finally:
                cur.close()
        finally:
            conn.close()

    def datasets(self) -> list[str]:
        rows = self._rows(union(select(items.c.dataset).distinct(), select(events.c.dataset).distinct()))
        return sorted(r[0] for r in rows)

    def has_dataset(self, dataset: str) -> bool:
        """True when the dataset has any item or event (two indexed lookups, not a scan)."""
        with self._engine.connect() as conn:
            return any(
                conn.execute(select(literal(1)).where(t.c.dataset == dataset).limit(1)).first()
                for t in (items, events)
            )

    def has_items(self, dataset: str) -> bool:
        """True when the dataset has a catalogue (one indexed lookup)."""
        return bool(self._rows(select(literal(1)).where(items.c.dataset == dataset).limit(1)))

    def counts(self, dataset: str) -> dict[str, int]:
        with self._engine.connect() as conn:
            n_events, n_users = conn.execute(
                select(func.count(), func.count(events.c.user_id.distinct()))
                .where(events.c.dataset == dataset)).one()
            n_items = conn.scalar(select(func.count()).select_from(items).where(items.c.dataset == dataset))
        return {"events": int(n_events), "users": int(n_users), "items": int(n_items or 0)}

    def time_quantile(self, dataset: str, q: float) -> datetime | None:
        """The event time at quantile `q` (0..1) of the dataset's events sorted by time: the one
        at index ``min(n - 1, int(n * q))``, as sorting them all would give; None without events.
        Two indexed reads (a count, then a walk from the newest event along ``events_time``), so
        a high `q` costs milliseconds on any size.

        Raises:
            ValueError: `q` outside [0, 1].
        """
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q must be in [0, 1], got {q}")
        with self._engine.connect() as conn:
            n = int(conn.scalar(select(func.count()).select_from(events).where(events.c.dataset == dataset)) or 0)
            if n == 0:
                return None
            from_newest = n - 1 - min(n - 1, int(n * q))
            ts = conn.scalar(select(events.c.ts).where(events.c.dataset == dataset)
                             .order_by(events.c.ts.desc()).limit(1).offset(from_newest))
        return None if ts is None else datetime.fromtimestamp(float(ts), tz=UTC)  # None: deleted meanwhile

    def user_events(
        self, dataset: str, user_id: str, *, before: datetime | None = None
    ) -> list[BehaviorEvent]:
        """A user's events, oldest first (ties in ingest order), optionally strictly before a time.

        Raises:
            UnknownUserError: the user has no events in this dataset.
        """
        params: dict[str, Any] = {"dataset": dataset, "user_id": user_id}
        if before is None:
            rows = self._fetch(_USER_EVENTS_SQL, params)
        else:
            rows = self._fetch(_USER_EVENTS_BEFORE_SQL, params | {"before": before.timestamp()})
        if not rows and not self.has_user(dataset, user_id):
            raise UnknownUserError(dataset, user_id, self.similar_user_ids(dataset, user_id))
        return [_row_to_event(r) for r in rows]

    def user_events_sha256(self, dataset: str, user_id: str) -> str | None:
        """sha256 hex of a user's stored event ids and timestamps, in stored order (time, then
        ingest order): it changes when an event is added or deleted. None when the user has no
        events. One indexed range read; no event is parsed. The same hex on both backends.
        """
        h, n = hashlib.sha256(), 0
        for event_id, ts in self._fetch(_USER_STAMPS_SQL, {"dataset": dataset, "user_id": user_id}):
            h.update(f"{event_id}\x1f{ts!r}\x1e".encode())
            n += 1
        return h.hexdigest() if n else None

    def user_ids(self, dataset: str, *, since: datetime | None = None, limit: int | None = None) -> list[str]:
        """The dataset's user ids, sorted (by byte, on both backends); with `since`, only users
        with an event at or after it; with `limit`, the first `limit` of them."""
        stmt = select(events.c.user_id).distinct().where(events.c.dataset == dataset)
        if since is not None:
            stmt = stmt.where(events.c.ts >= since.timestamp())
        stmt = stmt.order_by(events.c.user_id)
        if limit is not None:
            stmt = stmt.limit(limit)
        return [r[0] for r in self._rows(stmt)]

    def has_user(self, dataset: str, user_id: str) -> bool:
        return bool(self._fetch(_HAS_USER_SQL, {"dataset": dataset, "user_id": user_id}))

    def similar_user_ids(self, dataset: str, user_id: str, n: int = 3) -> list[str]:
        """Up to n existing user ids sharing the longest prefix with `user_id` (for 'did you mean')."""
        with self._engine.connect() as conn:
            for k in range(len(user_id), 0, -1):
                rows = conn.execute(
                    select(events.c.user_id).distinct()
                    .where(events.c.dataset == dataset,
                           events.c.user_id.like(_like_escape(user_id[:k]) + "%", escape="\\"))
                    .order_by(events.c.user_id).limit(n)
                ).all()
                if rows:
                    return [r[0] for r in rows]
        return []

    def iter_events(
        self, dataset: str, *, before: datetime | None = None, event_types: tuple[str, ...] | None = None
    ) -> Iterator[BehaviorEvent]:
        """All events of a dataset (optionally only some types) ordered by (user, time, ingest order).

        Streams: PostgreSQL reads through a server-side cursor, 10k rows at a time.
        """
        stmt = select(*_EVENT_COLS).where(events.c.dataset == dataset)
        if event_types:
            stmt = stmt.where(events.c.event_type.in_(event_types))
        if before is not None:
            stmt = stmt.where(events.c.ts < before.timestamp())
        stmt = stmt.order_by(events.c.user_id, events.c.ts, events.c.seq)
        with self._engine.connect() as conn:
            if self.backend == "postgresql":
                conn.execution_options(yield_per=10_000)
            for r in conn.execute(stmt):
                yield _row_to_event(r)

    def items(self, dataset: str) -> dict[str, CatalogItem]:
        rows = self._rows(select(*(items.c[f] for f in _ITEM_FIELDS))
                          .where(items.c.dataset == dataset).order_by(items.c.item_id))
        return {
            r[0]: CatalogItem(item_id=r[0], title=r[1], category=r[2], brand=r[3], price=r[4],
                              description=r[5])
            for r in rows
        }

    def last_ingest(self, dataset: str) -> dict[str, object] | None:
        rows = self._rows(select(ingests.c.report).where(ingests.c.dataset == dataset)
                          .order_by(ingests.c.seq.desc()).limit(1))
        return json.loads(rows[0][0]) if rows else None


def _dialect(conn: Connection) -> Any:
    """The dialect module whose `insert` has ``on_conflict_do_*`` for this connection."""
    return postgresql if conn.dialect.name == "postgresql" else sqlite


def _insert_events(conn: Connection, rows: list[tuple[Any, ...]]) -> int:
    """Insert event rows (tuples in `events` column order), skipping any whose (dataset, event_id)
    is stored or earlier in `rows`; returns how many were inserted.

    The driver's own executemany of the dialect's ``ON CONFLICT DO NOTHING`` insert, with tuples:
    on 200k rows it took 0.6x the time of SQLAlchemy's executemany of dicts on SQLite and 0.35x
    its RETURNING form on PostgreSQL. Both drivers' rowcount after executemany is the sum over
    the rows, 0 for a skipped duplicate (tests/test_store.py checks it on both backends).
    """
    return int(conn.exec_driver_sql(_INSERT_EVENTS[conn.dialect.name], rows).rowcount)


_INSERT_EVENTS = {  # placeholders in `events` column order
    name: str(dialect.insert(events)
              .on_conflict_do_nothing(index_elements=[events.c.dataset, events.c.event_id])
              .compile(dialect=compile_for))
    for name, dialect, compile_for in (
        ("sqlite", sqlite, _POSITIONAL["sqlite"]),
        ("postgresql", postgresql, _POSITIONAL["postgresql"]),
    )
}


def _like_escape(s: str) -> str:
    """Escape LIKE wildcards so a prefix matches literally (ids like ``user_12`` are common)."""
    return s.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _row_to_event(r: Row[Any] | tuple[Any, ...]) -> BehaviorEvent:
    (event_id, user_id, item_id, event_type, ts, quantity, unit_price, rating, review_text,
     session_id, basket_id) = r
    return BehaviorEvent.model_construct(
        event_id=event_id, user_id=user_id, item_id=item_id, event_type=event_type,
        timestamp=datetime.fromtimestamp(ts, tz=UTC), quantity=quantity, unit_price=unit_price,
        rating=rating, review_text=review_text, session_id=session_id, basket_id=basket_id,
    )
