"""EventStore: idempotent ingest, ordering, time filter, unknown users, deletes, item upserts."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.data.store import EventStore
from agent.domain.errors import UnknownUserError
from agent.domain.schemas import BehaviorEvent, CatalogItem

DS = "retail"


def ev(user: str, item: str, ts: str, kind: str = "purchase", **kw: object) -> BehaviorEvent:
    return BehaviorEvent(user_id=user, item_id=item, event_type=kind, timestamp=ts, **kw)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[EventStore]:
    s = EventStore(tmp_path / "ws" / "events.sqlite")
    yield s
    s.close()


def test_wal_mode(store: EventStore) -> None:
    (mode,) = store._conn().execute("PRAGMA journal_mode").fetchone()
    assert mode == "wal"


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


def test_reopen_sees_committed_data(tmp_path: Path) -> None:
    path = tmp_path / "events.sqlite"
    s1 = EventStore(path)
    s1.add_events(DS, [ev("u1", "a", "2011-12-01T10:00:00Z")])
    s1.close()
    s2 = EventStore(path)
    assert [e.item_id for e in s2.user_events(DS, "u1")] == ["a"]
    assert s2.add_events(DS, [ev("u1", "a", "2011-12-01T10:00:00Z")]) == 0
    s2.close()


def test_has_dataset_by_items_or_events(tmp_path) -> None:
    from agent.data.store import EventStore
    from agent.domain.schemas import CatalogItem

    s = EventStore(tmp_path / "db.sqlite3")
    assert not s.has_dataset("shop")
    s.add_items("shop", [CatalogItem(item_id="1", title="Mug")])
    assert s.has_dataset("shop") and not s.has_dataset("shop2")
