"""The event store's schema, its migrations, and the engine for a database URL.

One set of SQLAlchemy Core `Table` definitions is the schema of both backends, so a query is
written once and compiled for SQLite or PostgreSQL. The few things that differ are here and
nowhere else:

- Text keys sort by byte on both: SQLite compares with BINARY; PostgreSQL columns get the "C"
  collation, because a database created with a language locale (en_US, ICU) would otherwise order
  ``user_ids()``, ``iter_events()`` and ``items()`` differently from SQLite.
- A writer to a dataset is serialised: SQLite with ``BEGIN IMMEDIATE`` (the file's write lock,
  taken before the transaction reads ``MAX(seq)``), PostgreSQL with a transaction-scoped advisory
  lock per dataset (several API replicas may write the same dataset at once).
- Migrations run at open in one transaction under the same kind of lock, so replicas starting
  together migrate once.

Timestamps are float unix seconds (REAL on SQLite, double precision on PostgreSQL): the same
IEEE double comes back from both, so hashes of stored timestamps agree across backends.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Double,
    Engine,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    create_engine,
    event,
    func,
    inspect,
    select,
    text,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import QueuePool

# Byte order on PostgreSQL too (see the module docstring); plain TEXT on SQLite.
KEY = Text().with_variant(postgresql.TEXT(collation="C"), "postgresql")

# Connections kept per store. SQLite: a connection per concurrently busy thread, as the store had
# before SQLAlchemy; never make an API thread wait for a file handle (overflow is unbounded,
# overflow connections close when returned). PostgreSQL: the server has a connection limit
# (max_connections, 100 by default) shared by every replica, so each replica keeps 5 and opens
# at most 10 more under load; a caller past that waits up to 30 s for one.
SQLITE_POOL = {"pool_size": 8, "max_overflow": -1}
POSTGRES_POOL = {"pool_size": 5, "max_overflow": 10, "pool_timeout": 30.0}
SQLITE_BUSY_TIMEOUT_S = 30  # a writer waits this long for another writer's transaction


class StoreConfigError(ValueError):
    """The store's URL or schema cannot be used as given; the message names the fix."""


def _baseline_tables(md: MetaData) -> None:
    """Migration 1's tables: the schema the store had before it was versioned (and PostgreSQL)."""
    Table(
        "events", md,
        Column("dataset", KEY, nullable=False),
        Column("event_id", KEY, nullable=False),
        Column("user_id", KEY, nullable=False),
        Column("item_id", KEY, nullable=False),
        Column("event_type", Text, nullable=False),
        Column("ts", Double, nullable=False),  # unix seconds, UTC
        Column("quantity", Integer),
        Column("unit_price", Double),
        Column("rating", Double),
        Column("review_text", Text),
        Column("session_id", Text),
        Column("basket_id", Text),
        Column("seq", BigInteger, nullable=False),  # ingest order, the tie-break for equal times
        PrimaryKeyConstraint("dataset", "event_id"),
        Index("events_user", "dataset", "user_id", "ts", "seq"),
        Index("events_item", "dataset", "item_id"),
    )
    Table(
        "items", md,
        Column("dataset", KEY, nullable=False),
        Column("item_id", KEY, nullable=False),
        Column("title", Text, nullable=False),
        Column("category", Text),
        Column("brand", Text),
        Column("price", Double),
        Column("description", Text),
        PrimaryKeyConstraint("dataset", "item_id"),
    )
    Table(
        "ingests", md,
        Column("dataset", KEY, nullable=False),
        Column("finished_at", Text, nullable=False),  # ISO 8601, UTC
        Column("report", Text, nullable=False),  # JSON
    )


# The schema the queries use: the baseline plus every later migration's columns.
metadata = MetaData()
_baseline_tables(metadata)
events = metadata.tables["events"]
items = metadata.tables["items"]
ingests = metadata.tables["ingests"]
ingests.append_column(Column("seq", BigInteger))  # migration 2: the order of a dataset's ingests
schema_version = Table("schema_version", metadata, Column("version", Integer, nullable=False))


def _m1_baseline(conn: Connection) -> None:
    # checkfirst: a workspace file from before versioning already has these tables (and their
    # indexes) and keeps them as they are, rows included.
    md = MetaData()
    _baseline_tables(md)
    md.create_all(conn, checkfirst=True)


def _m2_ingest_order(conn: Connection) -> None:
    # `last_ingest` ordered by SQLite's rowid, which PostgreSQL has no equivalent of. Existing
    # SQLite rows keep their rowid order; on PostgreSQL this migration always meets an empty table
    # (both arrived together), ordered by time all the same for safety.
    conn.execute(text("ALTER TABLE ingests ADD COLUMN seq BIGINT"))
    if conn.dialect.name == "sqlite":
        conn.execute(text("UPDATE ingests SET seq = rowid"))
    else:
        conn.execute(text("UPDATE ingests SET seq = (SELECT COUNT(*) FROM ingests AS i2 "
                          "WHERE i2.finished_at <= ingests.finished_at)"))
    conn.execute(text("CREATE UNIQUE INDEX ingests_order ON ingests (dataset, seq)"))


def _m3_events_by_time(conn: Connection) -> None:
    # `EventStore.time_quantile` (a dataset's robust end, read after every event write) walks
    # this index from the newest event instead of sorting the dataset.
    conn.execute(text("CREATE INDEX IF NOT EXISTS events_time ON events (dataset, ts)"))


# Ordered; a store at version n has had the first n applied. Append, never edit or reorder:
# every deployed database has run the ones before.
MIGRATIONS: tuple[tuple[str, Callable[[Connection], None]], ...] = (
    ("events, items and ingests tables (the unversioned schema)", _m1_baseline),
    ("ingests.seq: the order of a dataset's ingests without SQLite's rowid", _m2_ingest_order),
    ("events_time: the index of a dataset's events by time", _m3_events_by_time),
)
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(engine: Engine) -> int:
    """Bring the database to `SCHEMA_VERSION` in one transaction; returns the version found.

    Writers are serialised (SQLite's write lock, a PostgreSQL advisory lock), so replicas that
    start together apply each migration once; a failure rolls every step back.

    Raises:
        StoreConfigError: the database is at a newer version than this build knows.
    """
    with write_transaction(engine, "schema") as conn:
        schema_version.create(conn, checkfirst=True)
        found = conn.scalar(select(func.max(schema_version.c.version)))
        current = int(found) if found is not None else 0
        if current > SCHEMA_VERSION:
            raise StoreConfigError(
                f"the event store at {masked_url(engine.url)} is at schema version {current}, newer "
                f"than this build's {SCHEMA_VERSION}: upgrade ShopLens on this replica")
        for migration in MIGRATIONS[current:]:
            migration[1](conn)
        if found is None:
            conn.execute(schema_version.insert().values(version=SCHEMA_VERSION))
        elif current < SCHEMA_VERSION:
            conn.execute(schema_version.update().values(version=SCHEMA_VERSION))
        return current


@contextlib.contextmanager
def write_transaction(engine: Engine, lock_key: str) -> Iterator[Connection]:
    """One transaction that holds the writer lock for `lock_key` (a dataset name, or "schema")
    until it commits or rolls back.

    SQLite has one write lock per file, so `lock_key` only matters on PostgreSQL, where writers
    to different datasets proceed in parallel.
    """
    with engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            conn.execution_options(shoplens_begin="BEGIN IMMEDIATE")
        with conn.begin():
            if conn.dialect.name == "postgresql":
                conn.execute(select(func.pg_advisory_xact_lock(
                    func.hashtextextended(f"shoplens:{lock_key}", 0))))
            yield conn


def sqlite_url(path: Path) -> URL:
    """The URL of a SQLite file store."""
    return URL.create("sqlite", database=str(path))


def normalise_url(url: str | URL) -> URL:
    """Parse a store URL; ``postgresql://`` and ``postgres://`` mean psycopg 3.

    Raises:
        StoreConfigError: not a URL, or a database other than SQLite and PostgreSQL.
    """
    try:
        u = make_url(url)
    except ArgumentError as e:
        raise StoreConfigError(
            "SHOPLENS_DATABASE_URL is not a database URL: use "
            "postgresql://USER:PASSWORD@HOST:5432/DBNAME or sqlite:////absolute/path.sqlite3") from e
    if u.drivername == "postgres" or u.drivername.startswith("postgres+"):  # Heroku-style URLs
        u = u.set(drivername="postgresql" + u.drivername[len("postgres"):])
    backend, driver = u.get_backend_name(), u.drivername.partition("+")[2]  # "" for no driver
    if backend == "postgresql":
        if driver not in ("", "psycopg"):
            raise StoreConfigError(
                f"SHOPLENS_DATABASE_URL names the PostgreSQL driver {driver!r}; ShopLens uses "
                "psycopg 3: write postgresql://... or postgresql+psycopg://...")
        return u.set(drivername="postgresql+psycopg")
    if backend == "sqlite" and driver in ("", "pysqlite"):
        return u
    raise StoreConfigError(
        f"SHOPLENS_DATABASE_URL is a {u.drivername!r} URL; the event store runs on PostgreSQL "
        "(postgresql://USER:PASSWORD@HOST/DBNAME) or SQLite (unset: <workspace>/shoplens.sqlite3)")


def masked_url(url: str | URL) -> str:
    """The URL with its password (in the user part or a ``password=`` query) replaced by ***,
    for logs and messages."""
    u = make_url(url)
    if u.host and "@" in u.host:  # an unencoded "@" in the password: the parser took its tail as the host
        u = u.set(host="***@" + u.host.rsplit("@", 1)[1])
    if "password" not in u.query:
        return u.render_as_string(hide_password=True)
    mark = "SHOPLENSMASKEDPASSWORD"  # a plain token: the query's "***" would be %-encoded
    return u.update_query_dict({"password": mark}).render_as_string(hide_password=True).replace(mark, "***")


def redact(text: str, url: URL) -> str:
    """`text` (a driver's error message) without `url`'s password or, when the password held an
    unencoded "@", the part of it the parser took for the host."""
    for secret in (url.password, url.host.rsplit("@", 1)[0] if url.host and "@" in url.host else None):
        if secret:
            text = text.replace(str(secret), "***")
    return text


def create_store_engine(url: URL) -> Engine:
    """An engine for a normalised store URL, with the pool and per-connection settings above.

    Raises:
        StoreConfigError: a PostgreSQL URL without psycopg installed, or an in-memory SQLite
            URL (each pooled connection would see its own empty database).
    """
    if url.get_backend_name() == "postgresql":
        if importlib.util.find_spec("psycopg") is None:
            raise StoreConfigError(
                f"the event store URL {masked_url(url)} needs psycopg 3, which is not installed: "
                "pip install 'shoplens[pg]'")
        # pre_ping: a replica's pooled connections survive a database restart or failover.
        # hide_parameters: a failed statement's error (logged by the API) must not carry the
        # events' ids and review text.
        return create_engine(url, pool_pre_ping=True, hide_parameters=True, **POSTGRES_POOL)
    if not url.database or url.database == ":memory:":
        raise StoreConfigError("the event store needs a SQLite file (sqlite:////path/shoplens.sqlite3), "
                               "not an in-memory database")
    Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, poolclass=QueuePool, hide_parameters=True, connect_args={
        "timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False}, **SQLITE_POOL)
    event.listen(engine, "connect", _sqlite_connect)
    event.listen(engine, "begin", _sqlite_begin)
    return engine


def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
    # The driver's own implicit BEGIN (before the first INSERT, not before a SELECT) would let two
    # writers read the same MAX(seq): transactions are begun explicitly instead (_sqlite_begin).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
    cur.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; safe with WAL
    cur.close()


def _sqlite_begin(conn: Connection) -> None:
    conn.exec_driver_sql(conn.get_execution_options().get("shoplens_begin", "BEGIN"))


def table_columns(engine: Engine) -> dict[str, list[str]]:
    """Each store table's column names as the database has them (for schema checks in tests)."""
    insp = inspect(engine)
    return {t: [c["name"] for c in insp.get_columns(t)] for t in ("events", "items", "ingests")}
