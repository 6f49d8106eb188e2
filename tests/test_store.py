"""EventStore: idempotent ingest, ordering, time filter, unknown users, deletes, item upserts,
counting, concurrent writers and migrations.

Every test that takes `store` or `open_store` runs twice: on a SQLite file and on a real
PostgreSQL server started for the session (tests/pg.py), so both backends pass one suite.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from agent.data.store import EventStore
from agent.data.store_schema import (
    SCHEMA_VERSION,
    StoreConfigError,
    events,
    schema_version,
    table_columns,
)
from agent.domain.errors import UnknownUserError
from agent.domain.schemas import BehaviorEvent, CatalogItem

DS = "retail"
OpenStore = Callable[[], EventStore]


def ev(user: str, item: str, ts: str, kind: str = "purchase", **kw: object) -> BehaviorEvent:
    return BehaviorEvent(user_id=user, item_id=item, event_type=kind, timestamp=ts, **kw)


@pytest.fixture(params=["sqlite", "postgresql"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenStore]:
    """Opens a new `EventStore` on one database per test (each call: another replica of it)."""
    if request.param == "sqlite":
        def make() -> EventStore:
            return EventStore(tmp_path / "ws" / "events.sqlite")
    else:
        url = request.getfixturevalue("pg_url")

        def make() -> EventStore:
            return EventStore(url=url)
    opened: list[EventStore] = []

    def open_() -> EventStore:
        opened.append(make())
        return opened[-1]

    yield open_
    for s in opened:
        s.close()


@pytest.fixture
def store(open_store: OpenStore) -> EventStore:
    return open_store()


def _seqs(store: EventStore, dataset: str = DS) -> list[int]:
    with store._engine.connect() as c:
        return [r[0] for r in c.execute(select(events.c.seq).where(events.c.dataset == dataset))]


def test_sqlite_is_in_wal_mode(tmp_path: Path) -> None:
    s = EventStore(tmp_path / "events.sqlite")
    with s._engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    s.close()


def test_add_events_is_idempotent(store: EventStore) -> None:
    events = [
        ev("u1", "a", "2011-12-01T10:00:00Z", quantity=2, unit_price=1.5, basket_id="b1"),
        ev("u1", "b", "2011-12-02T10:00:00Z"),
        ev("u2", "a", "2011-12-03T10:00:00Z", kind="view"),
    ]
    assert store.add_events(DS, events) == 3
    assert store.add_events(DS, events) == 0
    # an exact duplicate inside one batch collapses too; a new event still counts
    assert store.add_events(DS, [events[0], ev("u2", "c", "2011-12-04T10:00:00Z"),
                                 ev("u2", "c", "2011-12-04T10:00:00Z")]) == 1
    assert store.counts(DS) == {"events": 4, "users": 2, "items": 0}
    # the same events in another dataset are separate
    assert store.add_events("other", events) == 3
    assert store.datasets() == ["other", DS]


def test_round_trip_keeps_every_field(store: EventStore) -> None:
    e = ev("u1", "a", "2011-12-01T10:00:00Z", quantity=2, unit_price=1.5, rating=4.0,
           review_text="nice", session_id="s9", basket_id="b1")
    store.add_events(DS, [e])
    (back,) = store.user_events(DS, "u1")
    assert back.model_dump() == e.model_dump()
    assert back.timestamp.tzinfo is not None


def test_user_events_ordered_by_time_with_ingest_order_tie_break(store: EventStore) -> None:
    same = "2011-12-05T09:00:00Z"
    store.add_events(DS, [
        ev("u1", "late", "2011-12-09T10:00:00Z"),
        ev("u1", "tie_first", same),
        ev("u1", "early", "2011-12-01T10:00:00Z"),
        ev("u2", "other", "2011-12-02T10:00:00Z"),
    ])
    store.add_events(DS, [ev("u1", "tie_second", same), ev("u1", "tie_third", same, kind="view")])
    items = [e.item_id for e in store.user_events(DS, "u1")]
    assert items == ["early", "tie_first", "tie_second", "tie_third", "late"]
    # all events of a dataset: by user, then time, then ingest order
    assert [(e.user_id, e.item_id) for e in store.iter_events(DS)] == [
        ("u1", "early"), ("u1", "tie_first"), ("u1", "tie_second"), ("u1", "tie_third"),
        ("u1", "late"), ("u2", "other"),
    ]


def test_before_is_strict(store: EventStore) -> None:
    store.add_events(DS, [
        ev("u1", "a", "2011-12-01T10:00:00Z"),
        ev("u1", "b", "2011-12-05T10:00:00Z"),
        ev("u1", "c", "2011-12-09T10:00:00Z"),
    ])
    cut = datetime(2011, 12, 5, 10, tzinfo=UTC)
    assert [e.item_id for e in store.user_events(DS, "u1", before=cut)] == ["a"]
    assert [e.item_id for e in store.iter_events(DS, before=cut)] == ["a"]
    # a known user with nothing before the cut is an empty history, not an unknown user
    assert store.user_events(DS, "u1", before=datetime(2000, 1, 1, tzinfo=UTC)) == []


def test_unknown_user_suggests_similar_ids(store: EventStore) -> None:
    store.add_events(DS, [
        ev("17850", "a", "2011-12-01T10:00:00Z"),
        ev("17851", "a", "2011-12-01T10:00:00Z"),
        ev("12346", "a", "2011-12-01T10:00:00Z"),
    ])
    with pytest.raises(UnknownUserError) as exc:
        store.user_events(DS, "17859")
    err = exc.value
    assert err.suggestions == ["17850", "17851"]
    assert err.user_id == "17859" and err.dataset == DS
    assert str(err) == "no user '17859' in dataset 'retail'; did you mean 17850, 17851?"
    assert isinstance(err, LookupError)


def test_unknown_user_suggestions_treat_wildcards_literally(store: EventStore) -> None:
    store.add_events(DS, [
        ev("cust_17", "a", "2011-12-01T10:00:00Z"),
        ev("cust_18", "a", "2011-12-01T10:00:00Z"),
        ev("custard", "a", "2011-12-01T10:00:00Z"),
        ev("cust917", "a", "2011-12-01T10:00:00Z"),
    ])
    # "_" is a LIKE wildcard: it must not match "9" nor be dropped from the prefix
    assert store.similar_user_ids(DS, "cust_19") == ["cust_17", "cust_18"]


def test_unknown_user_without_any_match_has_no_hint(store: EventStore) -> None:
    store.add_events(DS, [ev("17850", "a", "2011-12-01T10:00:00Z")])
    with pytest.raises(UnknownUserError) as exc:
        store.user_events(DS, "zzz")
    assert exc.value.suggestions == []
    assert "did you mean" not in str(exc.value)
    with pytest.raises(UnknownUserError):
        store.user_events("other", "17850")


def test_delete_user(store: EventStore) -> None:
    store.add_events(DS, [
        ev("u1", "a", "2011-12-01T10:00:00Z"),
        ev("u1", "b", "2011-12-02T10:00:00Z"),
        ev("u2", "a", "2011-12-03T10:00:00Z"),
    ])
    assert store.delete_user(DS, "u1") == 2
    assert store.delete_user(DS, "u1") == 0
    assert not store.has_user(DS, "u1")
    with pytest.raises(UnknownUserError):
        store.user_events(DS, "u1")
    assert [e.item_id for e in store.user_events(DS, "u2")] == ["a"]


def test_items_upsert(store: EventStore) -> None:
    assert store.add_items(DS, [
        CatalogItem(item_id="a", title="MUG"),
        CatalogItem(item_id="b", title="Tea set", category="kitchen", price=9.5),
    ]) == 2
    assert store.add_items(DS, [CatalogItem(item_id="a", title="White mug", brand="acme")]) == 1
    items = store.items(DS)
    assert list(items) == ["a", "b"]
    assert items["a"] == CatalogItem(item_id="a", title="White mug", brand="acme")
    assert items["b"].price == 9.5 and items["b"].category == "kitchen"
    assert store.counts(DS)["items"] == 2
    assert store.items("other") == {}


def test_record_ingest_keeps_the_latest(store: EventStore) -> None:
    assert store.last_ingest(DS) is None
    store.record_ingest(DS, {"events": 1})
    store.record_ingest(DS, {"events": 2})
    assert store.last_ingest(DS) == {"events": 2}


def test_reopen_sees_committed_data(open_store: OpenStore) -> None:
    s1 = open_store()
    s1.add_events(DS, [ev("u1", "a", "2011-12-01T10:00:00Z")])
    s1.close()
    s2 = open_store()
    assert [e.item_id for e in s2.user_events(DS, "u1")] == ["a"]
    assert s2.add_events(DS, [ev("u1", "a", "2011-12-01T10:00:00Z")]) == 0


def test_has_dataset_by_items_or_events(store: EventStore) -> None:
    assert not store.has_dataset("shop")
    store.add_items("shop", [CatalogItem(item_id="1", title="Mug")])
    assert store.has_dataset("shop") and not store.has_dataset("shop2")
    assert store.has_items("shop") and not store.has_items("shop2")


def test_new_rows_are_counted_with_duplicates_in_and_across_batches(store: EventStore) -> None:
    batch = [ev(f"u{i % 7}", f"i{i}", f"2011-12-01T10:{i // 60:02d}:{i % 60:02d}Z") for i in range(500)]
    assert store.add_events(DS, batch[:300] + batch[:50]) == 300  # 50 repeated inside the batch
    assert store.add_events(DS, batch[250:] + batch[250:260]) == 200  # 50 stored + 10 repeated
    assert store.add_events(DS, batch) == 0
    assert store.counts(DS)["events"] == 500
    assert len(set(_seqs(store))) == 500


def test_a_batch_is_all_or_none(store: EventStore) -> None:
    store.add_events(DS, [ev("u1", "a", "2011-12-01T10:00:00Z")])
    broken = BehaviorEvent.model_construct(**(ev("u1", "c", "2011-12-03T10:00:00Z").model_dump() | {"item_id": None}))
    with pytest.raises(IntegrityError):  # item_id NOT NULL: the third row fails
        store.add_events(DS, [ev("u1", "b", "2011-12-02T10:00:00Z"), ev("u2", "b", "2011-12-02T10:00:00Z"), broken])
    assert [e.item_id for e in store.user_events(DS, "u1")] == ["a"]
    assert not store.has_user(DS, "u2")

    def failing() -> Iterator[BehaviorEvent]:
        yield ev("u3", "a", "2011-12-01T10:00:00Z")
        raise RuntimeError("the loader failed mid-batch")

    with pytest.raises(RuntimeError):
        store.add_events(DS, failing())
    assert not store.has_user(DS, "u3")


def test_user_events_sha256_is_the_same_hex_on_both_backends(store: EventStore) -> None:
    """Timestamps come back as the same double from REAL and double precision, so the hex
    computed here from the events as given is what either backend returns."""
    stamps = [datetime(1995, 7, 20, 20, 17, 40, 123457, tzinfo=UTC),
              datetime(2011, 12, 9, 12, 50, 0, 999999, tzinfo=UTC),
              datetime(2011, 12, 9, 12, 50, 0, 999999, tzinfo=UTC),  # a tie: ingest order
              datetime(2024, 2, 29, 23, 59, 59, 1, tzinfo=UTC)]
    evs = [BehaviorEvent(event_id=f"e{i}", user_id="u1", item_id="a", event_type="view", timestamp=t)
           for i, t in enumerate(stamps)]
    store.add_events(DS, evs)
    h = hashlib.sha256()
    for e in evs:
        h.update(f"{e.event_id}\x1f{e.timestamp.timestamp()!r}\x1e".encode())
    assert store.user_events_sha256(DS, "u1") == h.hexdigest()
    assert [e.timestamp for e in store.user_events(DS, "u1")] == stamps
    assert store.user_events_sha256(DS, "nobody") is None


def test_ids_sort_by_byte_on_every_backend(store: EventStore) -> None:
    """PostgreSQL's test database collates as ICU en-US, which would put 'Z' last and '_' first."""
    ids = ["ab", "a_b", "aB", "Z", "custard", "cust_17", "été", "10", "9"]
    store.add_events(DS, [ev(u, u, "2011-12-01T10:00:00Z") for u in ids])
    store.add_items(DS, [CatalogItem(item_id=u, title=u) for u in ids])
    assert store.user_ids(DS) == sorted(ids)
    assert store.user_ids(DS, limit=3) == sorted(ids)[:3]
    assert list(store.items(DS)) == sorted(ids)
    assert [e.user_id for e in store.iter_events(DS)] == sorted(ids)


def test_an_item_given_twice_in_a_batch_keeps_its_last_values(store: EventStore) -> None:
    assert store.add_items(DS, [CatalogItem(item_id="a", title="MUG"), CatalogItem(item_id="a", title="Mug")]) == 1
    assert store.items(DS)["a"].title == "Mug"


def test_two_concurrent_writers_never_share_a_seq(open_store: OpenStore) -> None:
    """Two replicas add batches to one dataset at once: every event gets its own ingest number,
    and each replica's batches keep their order."""
    replicas = [open_store(), open_store()]
    errors: list[BaseException] = []

    def write(k: int) -> None:
        try:
            for b in range(15):
                replicas[k].add_events(DS, [ev(f"r{k}", f"i{b}-{j}", "2011-12-01T10:00:00Z",
                                               event_id=f"r{k}-{b}-{j}") for j in range(20)])
        except BaseException as e:  # noqa: BLE001  # re-raised below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=write, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    seqs = _seqs(replicas[0])
    assert len(seqs) == 600 and len(set(seqs)) == 600
    for k in (0, 1):  # equal timestamps: ingest order
        assert [e.event_id for e in replicas[1 - k].user_events(DS, f"r{k}")] == [
            f"r{k}-{b}-{j}" for b in range(15) for j in range(20)]


def test_two_replicas_see_each_others_writes(open_store: OpenStore) -> None:
    a, b = open_store(), open_store()
    a.add_items(DS, [CatalogItem(item_id="x", title="Mug")])
    a.add_events(DS, [ev("u1", "x", "2011-12-01T10:00:00Z")])
    assert b.items(DS)["x"].title == "Mug" and [e.item_id for e in b.user_events(DS, "u1")] == ["x"]
    assert b.add_events(DS, [ev("u1", "x", "2011-12-01T10:00:00Z"), ev("u1", "y", "2011-12-02T10:00:00Z")]) == 1
    assert [e.item_id for e in a.user_events(DS, "u1")] == ["x", "y"]
    b.record_ingest(DS, {"by": "b"})
    a.record_ingest(DS, {"by": "a"})
    assert b.last_ingest(DS) == {"by": "a"}
    assert a.delete_user(DS, "u1") == 2 and not b.has_user(DS, "u1")


def test_the_schema_is_the_one_the_queries_use(store: EventStore) -> None:
    assert table_columns(store._engine) == {
        "events": ["dataset", "event_id", "user_id", "item_id", "event_type", "ts", "quantity", "unit_price",
                   "rating", "review_text", "session_id", "basket_id", "seq"],
        "items": ["dataset", "item_id", "title", "category", "brand", "price", "description"],
        "ingests": ["dataset", "finished_at", "report", "seq"],
    }
    with store._engine.connect() as c:
        assert c.execute(select(schema_version.c.version)).scalars().all() == [SCHEMA_VERSION]


def test_a_store_migrated_by_a_newer_build_is_refused(open_store: OpenStore) -> None:
    s = open_store()
    with s._engine.begin() as c:
        c.execute(schema_version.update().values(version=SCHEMA_VERSION + 1))
    with pytest.raises(StoreConfigError, match=rf"schema version {SCHEMA_VERSION + 1}, newer than this "
                                               rf"build's {SCHEMA_VERSION}: upgrade ShopLens"):
        open_store()


# The schema the store created before it was versioned (agent/data/store.py before PostgreSQL).
_UNVERSIONED_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    dataset TEXT NOT NULL, event_id TEXT NOT NULL, user_id TEXT NOT NULL, item_id TEXT NOT NULL,
    event_type TEXT NOT NULL, ts REAL NOT NULL, quantity INTEGER, unit_price REAL, rating REAL,
    review_text TEXT, session_id TEXT, basket_id TEXT, seq INTEGER NOT NULL,
    PRIMARY KEY (dataset, event_id)
);
CREATE INDEX IF NOT EXISTS events_user ON events (dataset, user_id, ts, seq);
CREATE INDEX IF NOT EXISTS events_item ON events (dataset, item_id);
CREATE TABLE IF NOT EXISTS items (
    dataset TEXT NOT NULL, item_id TEXT NOT NULL, title TEXT NOT NULL, category TEXT, brand TEXT,
    price REAL, description TEXT, PRIMARY KEY (dataset, item_id)
);
CREATE TABLE IF NOT EXISTS ingests (dataset TEXT NOT NULL, finished_at TEXT NOT NULL, report TEXT NOT NULL);
"""


def test_a_workspace_from_before_versioning_opens_with_its_data(tmp_path: Path) -> None:
    path = tmp_path / "shoplens.sqlite3"
    with sqlite3.connect(path) as c:
        c.executescript(_UNVERSIONED_SCHEMA)
        c.executemany("INSERT INTO events VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", [
            (DS, "e1", "u1", "a", "purchase", 1322733600.0, 2, 1.5, None, None, None, "b1", 1),
            (DS, "e2", "u1", "b", "view", 1322733600.0, None, None, None, None, "s1", None, 2),
        ])
        c.execute("INSERT INTO items VALUES (?,?,?,?,?,?,?)", (DS, "a", "Mug", None, None, 2.5, None))
        # rowid order is the ingest order, whatever the clock said
        c.executemany("INSERT INTO ingests VALUES (?,?,?)", [(DS, "2011-12-02T00:00:00", '{"n": 1}'),
                                                             (DS, "2011-12-01T00:00:00", '{"n": 2}')])
    c.close()
    s = EventStore(path)
    assert [(e.event_id, e.quantity, e.session_id) for e in s.user_events(DS, "u1")] == [
        ("e1", 2, None), ("e2", None, "s1")]
    assert s.items(DS)["a"].price == 2.5 and s.last_ingest(DS) == {"n": 2}
    assert s.add_events(DS, [ev("u1", "c", "2011-12-01T10:00:00Z", kind="view")]) == 1
    assert [e.item_id for e in s.user_events(DS, "u1")] == ["a", "b", "c"]  # seq continues at 3
    s.record_ingest(DS, {"n": 3})
    assert s.last_ingest(DS) == {"n": 3}
    assert table_columns(s._engine)["ingests"] == ["dataset", "finished_at", "report", "seq"]
    s.close()
    reopened = EventStore(path)  # the second open finds version 2 and changes nothing
    assert reopened.counts(DS) == {"events": 3, "users": 1, "items": 1}
    reopened.close()


# ---- URLs and settings (no database needed) ------------------------------------------------------


@pytest.mark.parametrize(("given", "shown"), [
    ("postgresql://shop:s3cret@db:5432/shoplens", "postgresql+psycopg://shop:***@db:5432/shoplens"),
    ("postgres://shop:s3cret@db/shoplens", "postgresql+psycopg://shop:***@db/shoplens"),
    ("postgresql+psycopg://shop@db/shoplens?password=s3cret&sslmode=require",
     "postgresql+psycopg://shop@db/shoplens?password=***&sslmode=require"),
    ("sqlite:////var/shoplens/shoplens.sqlite3", "sqlite:////var/shoplens/shoplens.sqlite3"),
])
def test_database_urls_mean_psycopg_and_print_without_the_password(given: str, shown: str) -> None:
    from agent.data.store_schema import masked_url, normalise_url

    assert masked_url(normalise_url(given)) == shown
    assert "s3cret" not in masked_url(given)


@pytest.mark.parametrize(("given", "says"), [
    ("mysql://u:p@db/shop", "is a 'mysql' URL; the event store runs on PostgreSQL"),
    ("postgresql+psycopg2://u@db/shop", "names the PostgreSQL driver 'psycopg2'; ShopLens uses psycopg 3"),
    ("db.example.com:5432", "is not a database URL: use postgresql://USER:PASSWORD@HOST:5432/DBNAME"),
    ("sqlite://", "needs a SQLite file"),
    ("sqlite:///:memory:", "needs a SQLite file"),
])
def test_an_unusable_database_url_is_refused_with_the_fix(given: str, says: str) -> None:
    with pytest.raises(StoreConfigError, match=re_escape(says)):
        EventStore(url=given)


def re_escape(s: str) -> str:
    import re

    return re.escape(s)


def test_a_store_needs_exactly_one_of_path_and_url(tmp_path: Path) -> None:
    with pytest.raises(StoreConfigError, match="exactly one"):
        EventStore()
    with pytest.raises(StoreConfigError, match="exactly one"):
        EventStore(tmp_path / "a.sqlite3", url=f"sqlite:///{tmp_path}/b.sqlite3")
    s = EventStore(url=f"sqlite:///{tmp_path}/ws/b.sqlite3")  # a SQLite URL works like a path
    assert s.location == str(tmp_path / "ws" / "b.sqlite3") and s.path == tmp_path / "ws" / "b.sqlite3"
    s.close()


def test_the_database_url_setting_is_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.settings import Settings

    monkeypatch.setenv("SHOPLENS_DATABASE_URL", "postgresql://shop:s3cret@db/shoplens")
    s = Settings()
    assert s.database_url is not None
    assert s.database_url.get_secret_value() == "postgresql://shop:s3cret@db/shoplens"
    assert "s3cret" not in repr(s) and "s3cret" not in str(s.model_dump())
    monkeypatch.delenv("SHOPLENS_DATABASE_URL")
    assert Settings().database_url is None  # the default: the workspace's SQLite file


def test_time_quantile_is_the_sorted_index_min_n_1_int_n_q(store: EventStore) -> None:
    assert store.time_quantile(DS, 0.995) is None  # no events
    # ten events, days 1..10 of December, stored out of time order and across two users
    store.add_events(DS, [ev("u1" if d % 2 else "u2", "a", f"2011-12-{d:02d}T00:00:00Z") for d in
                          (5, 1, 10, 3, 8, 2, 9, 4, 7, 6)])
    store.add_events("other", [ev("u1", "a", "2012-06-01T00:00:00Z")])  # another dataset's later event
    day = lambda d: datetime(2011, 12, d, tzinfo=UTC)  # noqa: E731
    assert store.time_quantile(DS, 0.995) == day(10)  # int(9.95) = 9: the last
    assert store.time_quantile(DS, 0.9) == day(10)    # int(9.0) = 9
    assert store.time_quantile(DS, 0.85) == day(9)    # int(8.5) = 8
    assert store.time_quantile(DS, 0.5) == day(6)     # int(5.0) = 5
    assert store.time_quantile(DS, 0.0) == day(1)
    with pytest.raises(ValueError, match=r"q must be in \[0, 1\], got 1.5"):
        store.time_quantile(DS, 1.5)


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://shoplens:s3cretPW@127.0.0.1:1/shoplens", "postgresql+psycopg://shoplens:***@127.0.0.1:1/shoplens"),
    # an unencoded "@" in the password: the parser takes its tail for the host; neither part is shown
    ("postgresql://shoplens:s3cret@PW@127.0.0.1:1/shoplens", "postgresql+psycopg://shoplens:***@***@127.0.0.1:1/shoplens"),
])
def test_a_store_that_cannot_be_opened_is_one_clear_error_without_the_password(url: str, shown: str) -> None:
    pytest.importorskip("psycopg", reason="the pg extra is not installed")
    with pytest.raises(StoreConfigError) as e:
        EventStore(url=url)
    msg = str(e.value)
    assert msg.startswith(f"cannot open the event store at {shown}: ") and "s3cret" not in msg and "PW" not in msg
    assert "percent-encode special characters in the password" in msg and "\n" not in msg
