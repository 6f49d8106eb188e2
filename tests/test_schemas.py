"""Input schemas: event type aliases, timestamp parsing, content hashes, id normalisation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from agent.domain.history import describe_event
from agent.domain.schemas import (
    EVENT_TYPES,
    MAX_TITLE_CHARS,
    BehaviorEvent,
    CatalogItem,
    parse_timestamp,
)
from agent.ingest._common import RowSink
from agent.ingest.report import LoadReport

BASE = {
    "user_id": "u1",
    "item_id": "i1",
    "event_type": "purchase",
    "timestamp": "2011-12-09T12:50:00Z",
}


def event(**changes: object) -> BehaviorEvent:
    return BehaviorEvent(**{**BASE, **changes})


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("pv", "view"),
        ("fav", "favourite"),
        ("buy", "purchase"),
        ("favorite", "favourite"),
        ("  PV ", "view"),
        ("Purchase", "purchase"),
        ("cart", "cart"),
    ],
)
def test_event_type_aliases(raw: str, expected: str) -> None:
    assert event(event_type=raw).event_type == expected


def test_unknown_event_type_names_the_valid_types() -> None:
    with pytest.raises(ValidationError) as exc:
        event(event_type="teleport")
    msg = str(exc.value)
    assert "unknown event_type 'teleport'" in msg
    for t in EVENT_TYPES:
        assert t in msg


def test_seconds_and_milliseconds_are_the_same_instant() -> None:
    s = parse_timestamp(1323435000)
    ms = parse_timestamp(1323435000000)
    assert s == ms == datetime(2011, 12, 9, 12, 50, tzinfo=UTC)
    assert parse_timestamp("1323435000") == s
    assert parse_timestamp(1323435000.5) == s + timedelta(milliseconds=500)
    assert parse_timestamp(1323435000500) == s + timedelta(milliseconds=500)


def test_iso_naive_is_utc_and_offsets_are_converted() -> None:
    naive = parse_timestamp("2011-12-09T12:50:00")
    assert naive == datetime(2011, 12, 9, 12, 50, tzinfo=UTC)
    assert naive.utcoffset() == timedelta(0)
    assert parse_timestamp("2011-12-09T12:50:00Z") == naive
    # 14:50 at +02:00 is 12:50 UTC
    shifted = parse_timestamp("2011-12-09T14:50:00+02:00")
    assert shifted == naive and shifted.utcoffset() == timedelta(0)
    assert parse_timestamp(datetime(2011, 12, 9, 12, 50)) == naive


@pytest.mark.parametrize("value", ["1994-12-31T23:59:59Z", 0, 788_918_399, -5])
def test_before_1995_rejected(value: object) -> None:
    with pytest.raises(ValueError, match="before 1995"):
        parse_timestamp(value)


def test_1995_itself_accepted() -> None:
    assert parse_timestamp("1995-01-01T00:00:00Z") == datetime(1995, 1, 1, tzinfo=UTC)


def test_future_rejected_but_an_hour_ahead_is_tolerated() -> None:
    future = datetime.now(UTC) + timedelta(days=3)
    with pytest.raises(ValueError, match="in the future"):
        parse_timestamp(future.isoformat())
    with pytest.raises(ValueError, match="in the future"):
        parse_timestamp(future.timestamp() * 1000)
    soon = datetime.now(UTC) + timedelta(hours=1)
    assert parse_timestamp(soon) == soon


@pytest.mark.parametrize("value", ["yesterday", None, True, float("nan"), ""])
def test_unparseable_timestamps_rejected(value: object) -> None:
    with pytest.raises(ValueError):
        parse_timestamp(value)


# The ends of the calendar with an offset: converting to UTC leaves datetime's range (issue 17,
# "Calendar edges crash the server"). Each must be a ValueError (a 422 at the field), not an
# OverflowError (a 500, and the whole batch lost).
CALENDAR_EDGES = ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"]


@pytest.mark.parametrize("value", CALENDAR_EDGES)
def test_calendar_edges_with_an_offset_are_out_of_range(value: str) -> None:
    with pytest.raises(ValueError, match=r"out of range.*ISO-8601") as e:
        parse_timestamp(value)
    assert value in str(e.value)
    aware = datetime.fromisoformat(value)  # a datetime object takes the same path
    with pytest.raises(ValueError, match="out of range"):
        parse_timestamp(aware)


@pytest.mark.parametrize("value", CALENDAR_EDGES)
def test_calendar_edges_fail_event_validation_at_the_timestamp(value: str) -> None:
    with pytest.raises(ValidationError) as e:
        event(timestamp=value)
    assert [err["loc"] for err in e.value.errors()] == [("timestamp",)]


_OFFSETS = st.timedeltas(min_value=-timedelta(hours=23, minutes=59), max_value=timedelta(hours=23, minutes=59))
_TZ = st.builds(timezone, _OFFSETS)
# Weighted towards the calendar's ends, where an offset pushes the UTC instant out of range.
_AWARE = st.one_of(st.datetimes(max_value=datetime(1, 1, 2), timezones=_TZ),
                   st.datetimes(min_value=datetime(9999, 12, 30), timezones=_TZ),
                   st.datetimes(timezones=_TZ))


@settings(max_examples=300, deadline=None)
@given(ts=st.one_of(_AWARE, st.datetimes(), _AWARE.map(datetime.isoformat),
                    _AWARE.map(lambda d: d.isoformat().replace("+00:00", "Z")),
                    st.integers(), st.floats(), st.integers().map(str)))
def test_parse_timestamp_raises_only_value_error(ts: object) -> None:
    """Any datetime, with any offset, as an object or an ISO string, and any number: an aware UTC
    datetime in [1995, now + 1 day] or a ValueError, never another exception."""
    try:
        out = parse_timestamp(ts)
    except ValueError:
        return
    assert out.utcoffset() == timedelta(0)
    assert datetime(1995, 1, 1, tzinfo=UTC) <= out <= datetime.now(UTC) + timedelta(days=1)


def test_event_timestamp_goes_through_the_parser() -> None:
    with pytest.raises(ValidationError, match="before 1995"):
        event(timestamp=12)
    assert event(timestamp=1323435000000).timestamp == event().timestamp


def test_content_hash_equal_for_equal_events() -> None:
    a = event(quantity=2, unit_price=1.25, basket_id="536365")
    # same content written differently: alias, ms timestamp, numeric ids
    b = BehaviorEvent(
        user_id="u1", item_id="i1", event_type="buy", timestamp=1323435000000,
        quantity=2, unit_price=1.25, basket_id="536365",
    )
    assert a.content_hash() == b.content_hash()
    assert a.event_id == b.event_id == a.content_hash()
    assert len(a.event_id) == 40


@pytest.mark.parametrize(
    "change",
    [
        {"user_id": "u2"},
        {"item_id": "i2"},
        {"event_type": "view"},
        {"timestamp": "2011-12-09T12:50:01Z"},
        {"quantity": 3},
        {"unit_price": 1.5},
        {"rating": 4.0},
        {"review_text": "great"},
        {"session_id": "s1"},
        {"basket_id": "536366"},
    ],
)
def test_content_hash_differs_when_any_field_differs(change: dict[str, object]) -> None:
    base = event(quantity=2, unit_price=1.25, basket_id="536365")
    changed = event(**{"quantity": 2, "unit_price": 1.25, "basket_id": "536365", **change})
    assert base.content_hash() != changed.content_hash()
    assert base.event_id != changed.event_id


def test_client_event_id_is_kept_and_not_hashed() -> None:
    e = event(event_id="client-42")
    assert e.event_id == "client-42"
    assert e.content_hash() == event().content_hash()


def test_float_ids_become_integer_strings() -> None:
    e = event(user_id=17850.0, item_id=85123)
    assert e.user_id == "17850"
    assert e.item_id == "85123"
    assert event(user_id=12.5).user_id == "12.5"
    assert event(user_id="  17850 ").user_id == "17850"


def test_catalog_item_ids_and_text() -> None:
    item = CatalogItem(item_id=85123, title="WHITE HANGING HEART T-LIGHT HOLDER",
                       category="home", brand="acme", description="long text")
    assert item.item_id == "85123"
    assert item.text() == "WHITE HANGING HEART T-LIGHT HOLDER | category: home | brand: acme"
    assert CatalogItem(item_id="x", title="Mug").text() == "Mug"


def test_unknown_fields_rejected() -> None:
    with pytest.raises(ValidationError, match="extra"):
        event(colour="red")


# ---- catalogue and review text is normalised on the way in (issue 17) --------------------------


def test_catalogue_markup_is_stripped_and_plain_titles_are_untouched() -> None:
    it = CatalogItem(item_id="1", title="<b>Red</b> mug &amp; saucer &lt;set of 2&gt;", category="<i>Kitchen</i>",
                     brand="Ben &amp; Jerry", description="<p>Fine &quot;bone&quot; china</p><script>x()</script>")
    assert (it.title, it.category, it.brand, it.description) == (
        "Red mug & saucer <set of 2>", "Kitchen", "Ben & Jerry", 'Fine "bone" china')
    for plain in ("WHITE HANGING HEART T-LIGHT HOLDER", "BOX OF 6  <3 MINI CAKES", "A & B; C"):
        assert CatalogItem(item_id="1", title=plain).title == plain  # unchanged: catalogue hashes stay


@pytest.mark.parametrize("title", ["   ", "<br/>", "&nbsp;", "<p> </p>"])
def test_a_blank_title_is_refused_naming_the_field(title: str) -> None:
    with pytest.raises(ValidationError) as e:
        CatalogItem(item_id="1", title=title)
    err = e.value.errors()[0]
    assert err["loc"] == ("title",) and "title is empty or only whitespace/markup: give the item a title" in err["msg"]


def test_a_long_title_is_cut_at_a_word() -> None:
    t = CatalogItem(item_id="1", title="handmade ceramic " * 30).title
    assert len(t) <= MAX_TITLE_CHARS and t.endswith("…") and t[:-1].split()[-1] in {"handmade", "ceramic"}
    zh = CatalogItem(item_id="1", title="手工陶瓷杯" * 100).title
    assert len(zh) == MAX_TITLE_CHARS and zh.endswith("…")  # no spaces: a hard cut at the limit


def test_review_markup_is_stripped_and_a_markup_only_review_is_none() -> None:
    ev = {"user_id": "u", "item_id": "i", "event_type": "review", "timestamp": "2011-12-01T00:00:00Z"}
    assert BehaviorEvent(**ev, review_text="<p>Great &amp; cheap</p>\n<br>Recommended").review_text == \
        "Great & cheap Recommended"
    assert BehaviorEvent(**ev, review_text="<br/>").review_text is None
    assert BehaviorEvent(**ev, review_text="Loved it.\nWould buy again").review_text == "Loved it.\nWould buy again"


def test_the_loader_summary_counts_what_it_normalised_and_names_a_blank_title() -> None:
    report = LoadReport(dataset="shop")
    sink = RowSink(report)
    assert sink.item(1, item_id="a", title="<b>Mug</b>") is not None
    assert sink.item(2, item_id="b", title="word " * 100) is not None
    assert sink.item(3, item_id="c", title="   ") is None
    assert sink.event(4, user_id="u", item_id="a", event_type="review", timestamp="2011-12-01T00:00:00Z",
                      review_text="<i>ok</i>") is not None
    res = sink.result()
    assert report.dropped == {"invalid catalogue item: title (value_error)": 1}
    assert "1 rows: HTML tags or entities removed from catalogue text" in report.notes
    assert f"1 rows: titles cut at a word to {MAX_TITLE_CHARS} characters" in report.notes
    assert "1 rows: HTML tags or entities removed from review text" in report.notes
    assert (res.errors[0].row, res.errors[0].field) == (3, "title")


def test_a_review_excerpt_in_a_prompt_ends_at_a_word() -> None:
    ev = BehaviorEvent(user_id="u", item_id="a", event_type="review", timestamp="2011-12-01T00:00:00Z",
                       review_text="lovely " * 40)
    text = describe_event(ev, "Mug")
    assert text.endswith('lovely…"') and "lov…" not in text
