"""Dataset loaders and ingest.

Fixture tests read tests/fixtures/ (slices of the real files plus hostile lines, written by
scripts/make_fixtures.py; the comments there number every appended line). Expected counts below
were computed by hand from those files. `real_data` tests read ../shared/data and skip when it
is absent.
"""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.data.store import EventStore
from agent.domain.schemas import parse_timestamp
from agent.ingest import LOADERS, ingest, load_dataset
from agent.ingest.amazon_beauty import load_amazon_beauty
from agent.ingest.amazon_games import (
    load_amazon_games,
    read_llmrank_candidates,
    read_llmrank_interactions,
)
from agent.ingest.amazon_industrial import (
    load_amazon_industrial,
    merge_windows,
    read_industrial_cases,
)
from agent.ingest.generic import load_generic
from agent.ingest.online_retail import (
    R_BAD_DATE,
    R_CANCELLED,
    R_MALFORMED,
    R_NO_CUSTOMER,
    R_NO_DESC,
    R_NON_PRODUCT,
    R_NONPOS_PRICE,
    R_NONPOS_QTY,
    is_non_product_code,
    load_online_retail,
    london_to_utc,
    normalise_customer_id,
)
from agent.ingest.taobao import load_taobao
from agent.settings import Settings

FIXTURES = Path(__file__).parent / "fixtures"


# ---- Online Retail ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def retail():
    return load_online_retail(FIXTURES)


def test_online_retail_drop_counts(retail):
    r = retail.report
    assert r.rows_read == 312
    assert dict(r.dropped) == {
        R_CANCELLED: 9,  # rows 142, 155, 236, 237, 238, ... (one is the C invoice of code D)
        R_NON_PRODUCT: 2,  # row 46 POST, row 304 C2 carriage
        R_NO_CUSTOMER: 1,  # 301
        R_NO_DESC: 1,  # 302
        R_NONPOS_PRICE: 1,  # 303
        R_NONPOS_QTY: 1,  # 305
        "invalid event: timestamp (value_error)": 1,  # 308, year 1899
        R_BAD_DATE: 1,  # 309
        R_MALFORMED: 1,  # 312
    }
    assert r.examples[R_NON_PRODUCT] == [46, 304]
    assert r.examples["invalid event: timestamp (value_error)"] == [308]
    assert r.duplicates_collapsed == 2  # 306 = row 2; 307 = row 3 once 17850.0 -> 17850
    assert r.events_kept == len(retail.events) == 312 - 18 - 2
    assert r.items_kept == len(retail.items) == 205
    assert len({e.user_id for e in retail.events}) == 23
    assert len({e.basket_id for e in retail.events}) == 32
    assert "17850.0" not in {e.user_id for e in retail.events}
    keys = [(e.user_id, e.timestamp) for e in retail.events]
    assert keys == sorted(keys)  # events sorted by (user, time)
    assert any("row 308: timestamp" in n and "before 1995" in n for n in r.notes)
    assert [str(e) for e in retail.errors] == [
        "event row 308: timestamp: Value error, timestamp 1899-12-31T10:00:00+00:00 is before "
        "1995: check the unit or format"
    ]


def test_online_retail_event_fields_and_winter_utc(retail):
    first = [e for e in retail.events if e.user_id == "17850" and e.item_id == "85123A"]
    ev = next(e for e in first if e.quantity == 6)
    assert ev.event_type == "purchase"
    assert ev.unit_price == 2.55 and ev.basket_id == "536365"
    assert ev.timestamp == datetime(2010, 12, 1, 8, 26, tzinfo=UTC)  # GMT = UTC in winter


def test_online_retail_summer_row_moves_back_one_hour(retail):
    ev = next(e for e in retail.events if e.user_id == "12473" and e.item_id == "21498")
    assert ev.timestamp == datetime(2011, 6, 1, 9, 15, tzinfo=UTC)  # 10:15 BST
    assert london_to_utc("2011-06-01 10:00") == datetime(2011, 6, 1, 9, 0, tzinfo=UTC)
    assert london_to_utc("2010-12-01 08:26") == datetime(2010, 12, 1, 8, 26, tzinfo=UTC)
    assert london_to_utc("6/1/2011 10:00") == datetime(2011, 6, 1, 9, 0, tzinfo=UTC)  # UCI form
    with pytest.raises(ValueError, match="InvoiceDate"):
        london_to_utc("31/31/2011 99:99")


def test_online_retail_catalogue_uses_most_frequent_description(retail):
    items = {i.item_id: i for i in retail.items}
    assert items["85123A"].title == "WHITE HANGING HEART T-LIGHT HOLDER"  # 6 vs 1 (row 311)
    assert items["22632"].title == "HAND WARMER RED POLKA DOT"  # real conflict, 3 vs 1
    assert items["85123A"].price == 2.55
    assert "2 StockCodes had several descriptions" in " ".join(retail.report.notes)


def test_online_retail_helpers():
    for code in ["POST", "DOT", "M", "m", "C2", "BANK CHARGES", "AMAZONFEE", "PADS", "D", "CRUK",
                 "S", "B", "gift_0001_20"]:
        assert is_non_product_code(code), code
    for code in ["85123A", "22632", "84029G", "DCGS0003"]:
        assert not is_non_product_code(code), code
    assert normalise_customer_id("17850.0") == "17850"
    assert normalise_customer_id(" 17850 ") == "17850"


# ---- Taobao -----------------------------------------------------------------------------------
def test_taobao_counts_truncated_line_and_window():
    res = load_taobao(FIXTURES)
    r = res.report
    assert r.rows_read == 127
    assert dict(r.dropped) == {
        "truncated or malformed line (expected 5 fields)": 1,
        "invalid event: timestamp (value_error)": 1,  # row 125: unix 12345 = 1970
        "invalid event: event_type (value_error)": 1,  # row 126: "like"
    }
    assert r.examples["truncated or malformed line (expected 5 fields)"] == [127]
    assert r.events_kept == 124
    assert any(n.startswith("3 events fall outside the official window") for n in r.notes)
    assert {e.event_type for e in res.events} == {"view", "favourite", "purchase"}  # pv fav buy
    assert any("event row 126: event_type" in str(e) for e in res.errors)
    item = next(i for i in res.items if i.item_id == "1")
    assert item.title == "Taobao item 1 (category 2)" and item.category == "2"


def test_taobao_milliseconds_detected():
    res = load_taobao(FIXTURES)
    ev = next(e for e in res.events if e.user_id == "999999999")  # row 124, ms
    assert ev.timestamp == datetime.fromtimestamp(1511544070, tz=UTC)
    assert ev.event_type == "purchase"


def test_parse_timestamp_seconds_vs_milliseconds():
    s = datetime(2017, 11, 24, 17, 21, 10, tzinfo=UTC)
    assert parse_timestamp(1511544070) == s
    assert parse_timestamp(1511544070000) == s
    assert parse_timestamp("1511544070000") == s
    with pytest.raises(ValueError, match="before 1995"):
        parse_timestamp(12345)


# ---- Amazon Beauty ----------------------------------------------------------------------------
def test_amazon_beauty():
    res = load_amazon_beauty(FIXTURES)
    r = res.report
    assert r.rows_read == 154
    assert dict(r.dropped) == {
        "invalid event: rating (less_than_equal)": 1,  # row 153, 7 stars
        "line is not a JSON object": 1,  # row 154
    }
    assert r.duplicates_collapsed == 1  # rows 151-152
    assert r.events_kept == 151
    assert {i.item_id: i.title for i in res.items}["B0000530HU"] == "Beauty product B0000530HU"
    ev = next(e for e in res.events if e.user_id == "A3CIUOJXQ5VDQ2")
    assert ev.event_type == "review" and ev.rating == 5.0
    assert ev.review_text == "Five Stars\nAs advertised. Reasonably priced"
    assert ev.timestamp == datetime.fromtimestamp(1472688000, tz=UTC)


# ---- Amazon Games -----------------------------------------------------------------------------
def test_llmrank_interactions_and_items():
    cases = read_llmrank_interactions(FIXTURES)
    assert len(cases) == 30  # the header line is skipped
    assert cases[0] == ("0", [str(i) for i in range(14)], "14")
    res = load_amazon_games(FIXTURES)
    titles = {i.item_id: i.title for i in res.items}
    assert titles["11"] == "Phantasy Star Online, Episode I & II"
    assert titles["37"] == "Marvel\u2019s Spider-Man - PlayStation 4"
    assert len(res.events) == sum(len(h) + 1 for _, h, _ in cases) == 451
    user0 = [e for e in res.events if e.user_id == "0"]
    start = datetime(2018, 1, 1, tzinfo=UTC)
    assert [e.timestamp for e in user0] == [start + timedelta(days=d) for d in range(15)]
    assert user0[-1].item_id == "14" and {e.event_type for e in user0} == {"purchase"}
    assert any("synthetic ordinal times" in n for n in res.report.notes)


def test_llmrank_candidates(tmp_path):
    six_k = read_llmrank_candidates(FIXTURES / "amazon-games" / "Games-6k.random.gz")
    assert len(six_k) == 3 and all(len(v) == 100 for v in six_k.values())
    top3 = read_llmrank_candidates(FIXTURES / "amazon-games" / "Games-200" /
                                   "Games.rabmbepobpgrsa_3")
    assert all(len(v) == 21 for v in top3.values())
    with_header = tmp_path / "cands"
    with_header.write_text("user_id:token\tcandidate_items:token_seq\n7\t1 2 3\n")
    assert read_llmrank_candidates(with_header) == {"7": ["1", "2", "3"]}
    dup = tmp_path / "dup"
    dup.write_text("7\t1 2\n7\t3 4\n")
    with pytest.raises(ValueError, match="listed twice"):
        read_llmrank_candidates(dup)


# ---- Amazon Industrial ------------------------------------------------------------------------
def test_industrial_cases_and_sequences():
    valid = read_industrial_cases(FIXTURES, "valid")
    test = read_industrial_cases(FIXTURES, "test")
    assert (len(valid), len(test)) == (11, 16)
    assert ("A4042", ["3112"], "114") in valid
    res = load_amazon_industrial(FIXTURES)
    seqs: dict[str, list[str]] = defaultdict(list)
    for e in res.events:
        seqs[e.user_id].append(e.item_id)
    # A1749: 2 valid windows then 10 test windows -> 13 distinct positions.
    assert seqs["A1749"] == ["563", "2264", "2933", "2402", "281", "2879", "1820", "1551",
                             "2157", "2803", "2059", "3048", "3049"]
    assert res.report.rows_read == 27 and res.report.events_kept == 44
    assert "0 rows did not continue" in " ".join(res.report.notes)
    item = next(i for i in res.items if i.description)
    assert not item.description.startswith("['")
    assert all(i.category is None for i in res.items)
    with pytest.raises(ValueError, match="unknown split"):
        read_industrial_cases(FIXTURES, "train")  # type: ignore[arg-type]


def test_merge_windows():
    assert merge_windows([], ["1"], "2") == (["1", "2"], True)
    assert merge_windows(["1", "2"], ["1", "2"], "3") == (["1", "2", "3"], True)
    assert merge_windows(["1", "2", "3"], ["2", "3", "9"], "4") == (["1", "2", "3", "9", "4"],
                                                                     False)


# ---- generic loader ---------------------------------------------------------------------------
def test_generic_csv_mapping_and_row_errors(tmp_path):
    events = tmp_path / "my_events.csv"
    events.write_text(
        "customer,sku,when,kind,qty\n"
        "u1,A,2024-01-02T10:00:00Z,buy,2\n"  # row 1 ok (alias buy -> purchase)
        "u1,B,yesterday,view,\n"  # row 2 bad timestamp
        ",C,1704189600,view,\n"  # row 3 missing user
        "u2,D,1704189600000,cart,abc\n"  # row 4 bad quantity
        "u2,E,1704189600000,,\n"  # row 5 ok: ms timestamp, default event type
    )
    catalog = tmp_path / "my_items.csv"
    catalog.write_text("sku,name\nA,Alpha\nB,\n")
    res = load_generic(
        events, {"user_id": "customer", "item_id": "sku", "timestamp": "when",
                 "event_type": "kind", "quantity": "qty"},
        event_type_default="view", catalog_path=catalog,
        catalog_mapping={"item_id": "sku", "title": "name"},
    )
    assert [(e.user_id, e.item_id, e.event_type) for e in res.events] == [
        ("u1", "A", "purchase"), ("u2", "E", "view")]
    assert res.events[1].timestamp == datetime(2024, 1, 2, 10, 0, tzinfo=UTC)
    r = res.report
    assert r.rows_read == 5
    assert dict(r.dropped) == {
        "invalid event: timestamp (value_error)": 1,
        "invalid event: user_id (missing)": 1,
        "invalid event: quantity (int_parsing)": 1,
    }
    assert r.examples["invalid event: timestamp (value_error)"] == [2]
    msgs = [str(e) for e in res.errors]
    assert "catalogue rows without a title: 0 titled from brand/category, 1 'Item <id>'" in r.notes
    assert any(m.startswith("event row 2: timestamp: ") and "yesterday" in m for m in msgs)
    assert "event row 3: user_id: Field required" in msgs
    assert any(m.startswith("event row 4: quantity: ") for m in msgs)
    assert {i.item_id: i.title for i in res.items} == {"A": "Alpha", "B": "Item B", "E": "Item E"}


def test_generic_jsonl_identity_mapping(tmp_path):
    path = tmp_path / "my_events.jsonl"
    rows = [
        {"user_id": 17850, "item_id": "A", "event_type": "pv", "timestamp": 1704189600},
        {"user_id": "u", "item_id": "B", "event_type": "teleport", "timestamp": 1704189600},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n{broken\n")
    res = load_generic(path, {})
    assert [(e.user_id, e.event_type) for e in res.events] == [("17850", "view")]
    assert dict(res.report.dropped) == {
        "invalid event: event_type (value_error)": 1,
        "line is not a JSON object": 1,
    }
    assert res.report.examples["line is not a JSON object"] == [4]
    assert "teleport" in str(res.errors[0]) and "event row 2: event_type" in str(res.errors[0])


def test_generic_mapping_errors(tmp_path):
    path = tmp_path / "e.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="unknown field 'usr' \\(did you mean user_id\\?\\)"):
        load_generic(path, {"usr": "a"})
    with pytest.raises(ValueError, match="no column 'customer' \\(mapped to user_id\\)"):
        load_generic(path, {"user_id": "customer"})
    parquet = tmp_path / "e.parquet"
    parquet.write_text("")
    with pytest.raises(ValueError, match="unknown format"):
        load_generic(parquet, {})
    with pytest.raises(FileNotFoundError):
        load_generic(tmp_path / "nope.csv", {})
    excel = tmp_path / "excel.csv"  # Excel's CSV export starts with a byte-order mark
    excel.write_bytes("\ufeffuser_id,item_id,timestamp\nu1,A,1704189600\n".encode())
    res = load_generic(excel, {}, event_type_default="purchase")
    assert [(e.user_id, e.item_id, e.event_type) for e in res.events] == [("u1", "A", "purchase")]


# ---- registry and ingest ----------------------------------------------------------------------
def test_load_dataset_errors(tmp_path):
    assert set(LOADERS) == {"online-retail", "amazon-games", "amazon-industrial",
                            "amazon-beauty", "taobao"}
    with pytest.raises(ValueError, match="valid names: online-retail, amazon-games"):
        load_dataset("movielens", FIXTURES)
    with pytest.raises(FileNotFoundError, match="shared/data"):
        load_dataset("taobao", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=r"online_retail\.csv\.gz.*shared/data"):
        load_dataset("online-retail", tmp_path)


def test_ingest_is_idempotent(tmp_path, retail):
    store = EventStore(tmp_path / "shoplens.sqlite3")
    first = ingest(store, "online-retail", retail, batch_size=100, progress=False)
    assert (first.events_new, first.events_already_present) == (292, 0)
    assert first.items_written == 205
    second = ingest(store, "online-retail", retail, batch_size=100, progress=False)
    assert (second.events_new, second.events_already_present) == (0, 292)
    assert store.counts("online-retail") == {"events": 292, "users": 23, "items": 205}
    logged = store.last_ingest("online-retail")
    assert logged is not None and logged["events_new"] == 0
    assert logged["dropped"][R_CANCELLED] == 9
    assert retail.report.notes == first.notes  # the loader's report is not mutated
    history = store.user_events("online-retail", "17850")
    assert [e.timestamp for e in history] == sorted(e.timestamp for e in history)
    with pytest.raises(ValueError, match="batch_size"):
        ingest(store, "online-retail", retail, batch_size=0)


# ---- real data --------------------------------------------------------------------------------
def _data_dir() -> Path:
    data = Settings().data_dir
    if not data.is_dir():
        pytest.skip(f"real data folder {data} is absent (the datasets live in ../shared/data)")
    return data


@pytest.mark.real_data
def test_real_online_retail_cleaned_counts():
    res = load_dataset("online-retail", _data_dir())  # its speed is measured by `make bench` (ingest)
    r = res.report
    assert r.rows_read == 541_909
    assert dict(r.dropped) == {
        R_NO_CUSTOMER: 135_080,
        R_CANCELLED: 8_905,
        R_NON_PRODUCT: 1_554,
        R_NONPOS_PRICE: 33,
    }
    assert r.duplicates_collapsed == 5_189
    assert r.events_kept == 391_148
    # README: ~4,372 customers / 3,665 products / 25,900 invoices are counted before dropping
    # cancellations and non-product codes (4,372 = all CustomerIDs; 25,900 = all InvoiceNos).
    assert len({e.user_id for e in res.events}) == 4_334
    assert len(res.items) == 3_659
    assert len({e.basket_id for e in res.events}) == 18_402
    invoices: dict[str, set[str]] = defaultdict(set)
    for e in res.events:
        invoices[e.user_id].add(e.basket_id or "")
    assert sum(len(v) >= 2 for v in invoices.values()) == 2_829  # README: 2,845
    assert sum(len(v) >= 5 for v in invoices.values()) == 1_101  # README: 1,115


@pytest.mark.real_data
@pytest.mark.parametrize(
    ("name", "rows", "events", "items", "users", "dups"),
    [
        ("taobao", 84_476, 84_475, 55_368, 815, 0),
        ("amazon-beauty", 5_269, 4_219, 85, 991, 1_050),
        ("amazon-games", 50_546, 440_264, 16_859, 50_546, 0),
        ("amazon-industrial", 9_065, 22_743, 3_686, 3_285, 0),
    ],
)
def test_real_other_datasets(name, rows, events, items, users, dups):
    res = load_dataset(name, _data_dir())
    r = res.report
    assert (r.rows_read, r.events_kept, r.items_kept, r.duplicates_collapsed) == (
        rows, events, items, dups)
    assert len({e.user_id for e in res.events}) == users
    expected_drops = {"taobao": {"truncated or malformed line (expected 5 fields)": 1}}
    assert dict(r.dropped) == expected_drops.get(name, {})


# ---- the pieces the loaders share (agent/ingest/_common.py) ----------------------------------


def test_jsonl_rows_counts_lines_and_drops_non_objects_with_their_line() -> None:
    from agent.ingest._common import R_BAD_JSON, jsonl_rows
    from agent.ingest.report import LoadReport

    report = LoadReport(dataset="t")
    lines = ['{"a": 1}\n', "\n", "not json\n", "[1, 2]\n", '{"b": 2}\n']
    assert list(jsonl_rows(lines, report)) == [(1, {"a": 1}), (5, {"b": 2})]
    assert report.rows_read == 4  # the blank line is not a row
    assert report.dropped == {R_BAD_JSON: 2}


def test_sequence_events_use_the_synthetic_clock_and_report_unknown_items() -> None:
    from agent.ingest._common import SYNTHETIC_START, RowSink, sequence_events
    from agent.ingest.report import LoadReport

    sink = RowSink(LoadReport(dataset="t"))
    sink.item(1, item_id="i1", title="one")
    assert sequence_events(sink, 7, "u", ["i1", "i2", "i3"]) == {"i2", "i3"}
    events = sink.result().events
    assert [(e.item_id, e.timestamp - SYNTHETIC_START) for e in events] == [
        ("i1", timedelta(0)), ("i2", timedelta(days=1)), ("i3", timedelta(days=2))]
    assert {e.event_type for e in events} == {"purchase"}
