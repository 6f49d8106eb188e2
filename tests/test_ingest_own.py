"""A user's own export, end to end: every timestamp form, mappings by flags and by file, the
missing-field error (exact text), headerless files, order-only data, derived catalogue titles,
every column accounted for, and the CLI from `shoplens ingest --events` to `recommend --no-llm`
with the stderr line a degraded answer gets. Small files generated here; fakes only."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agent.data.store import EventStore
from agent.domain.errors import RequestError
from agent.ingest import check_dataset_name, ingest, saved_mapping
from agent.ingest._common import SYNTHETIC_START
from agent.ingest.derived import category_leaf, derived_title
from agent.ingest.generic import load_generic
from agent.ingest.mapping import (
    ColumnMap,
    MissingFieldsError,
    build_column_map,
    load_map_file,
    suggest_column,
)

MIDNIGHT = datetime(2019, 10, 1, tzinfo=UTC)
REES_HEADER = "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session"
REES_MAP = ["product_id=item_id", "event_time=timestamp", "user_session=session_id", "category_code=category"]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---- timestamps ------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "fmt", "expected", "form"), [
    ("2019-10-01 00:00:00 UTC", None, MIDNIGHT, "date-time with a UTC suffix"),
    ("2019-10-01T02:00:00+0200", None, MIDNIGHT, "ISO-8601"),
    ("2019-10-01 02:00:00 +0200", None, MIDNIGHT, "ISO-8601"),
    ("2019-09-30T19:00:00-05:00", None, MIDNIGHT, "ISO-8601"),
    ("2019-10-01T00:00:00Z", None, MIDNIGHT, "ISO-8601"),
    ("2019-10-01", None, MIDNIGHT, "date only"),
    ("1569888000", None, MIDNIGHT, "unix seconds"),
    ("1569888000000", None, MIDNIGHT, "unix milliseconds"),
    ("1569888000.5", None, MIDNIGHT + timedelta(seconds=0.5), "unix seconds"),
    ("01/10/2019 00:00", "%d/%m/%Y %H:%M", MIDNIGHT, "with --time-format '%d/%m/%Y %H:%M'"),
    ("10/1/2019 8:26", "%m/%d/%Y %H:%M", MIDNIGHT + timedelta(hours=8, minutes=26),
     "with --time-format '%m/%d/%Y %H:%M'"),
])
def test_each_timestamp_form_round_trips(tmp_path: Path, value: str, fmt: str | None, expected: datetime,
                                         form: str) -> None:
    path = write(tmp_path / "e.csv", f"user_id,item_id,event_type,timestamp\nu1,A,view,{value}\n")
    res = load_generic(path, ColumnMap(time_format=fmt))
    assert [e.timestamp for e in res.events] == [expected]
    assert res.report.source["times"].startswith(f"column 'timestamp'; timestamps: 1 {form}")


def test_unreadable_timestamps_are_counted_with_the_fix(tmp_path: Path) -> None:
    path = write(tmp_path / "e.csv", "user_id,item_id,event_type,timestamp\nu1,A,view,12/1/2010 8:26\n"
                                     "u1,B,view,2010-12-01 08:26:00 UTC\n")
    res = load_generic(path, ColumnMap())
    assert [e.item_id for e in res.events] == ["B"]
    assert dict(res.report.dropped) == {"invalid event: timestamp (value_error)": 1}
    assert "--time-format" in str(res.errors[0]) and "event row 1: timestamp" in str(res.errors[0])
    assert res.report.source["times"].endswith("1 unreadable (e.g. '12/1/2010 8:26': give --time-format)")
    # a format that does not match is said so, with the format
    res = load_generic(path, ColumnMap(time_format="%m/%d/%Y %H:%M"))
    assert [e.item_id for e in res.events] == ["A"]
    assert "does not match --time-format '%m/%d/%Y %H:%M'" in str(res.errors[0])


def test_dates_only_keep_file_order_within_a_day_and_say_so(tmp_path: Path) -> None:
    path = write(tmp_path / "e.csv", "user_id,item_id,event_type,timestamp\nu1,B,view,2019-10-01\n"
                                     "u1,A,purchase,2019-10-01\nu1,C,view,2019-09-30\n")
    res = load_generic(path, ColumnMap())
    assert [e.item_id for e in res.events] == ["C", "B", "A"]
    assert ("3 timestamps are dates only (midnight UTC): events of the same day keep the file's order"
            in res.report.notes)


# ---- mappings: flags, files, errors ----------------------------------------------------------


REES_ROWS = [
    "2019-10-01 00:00:00 UTC,view,44600062,2103807459595387724,,shiseido,35.79,541312140,s-a",
    "2019-10-01 00:00:01 UTC,view,1307067,2053013558920217191,computers.notebook,lenovo,251.74,550050854,s-b",
    "2019-10-01 00:00:04 UTC,view,1004237,2053013555631882655,electronics.smartphone,apple,1081.98,535871217,s-c",
    "2019-10-01 00:05:04 UTC,cart,1004237,2053013555631882655,electronics.smartphone,apple,1061.98,535871217,s-c",
    "2019-10-01 00:06:04 UTC,purchase,1004237,2053013555631882655,electronics.smartphone,apple,1071.98,535871217,s-c",
    "2019-10-01 00:07:00 UTC,view,17200506,2053013559792632471,furniture.living_room.sofa,,543.10,535871217,s-d",
]


@pytest.fixture
def rees(tmp_path: Path) -> Path:
    return write(tmp_path / "rees.csv", "\n".join([REES_HEADER, *REES_ROWS]) + "\n")


def test_flags_map_columns_and_every_column_is_accounted_for(rees: Path) -> None:
    res = load_generic(rees, build_column_map(REES_MAP), dataset="my-shop")
    assert len(res.events) == 6 and res.report.rows_dropped == 0
    ev = next(e for e in res.events if e.event_type == "purchase")
    assert (ev.user_id, ev.item_id, ev.session_id, ev.unit_price) == ("535871217", "1004237", "s-c", 1071.98)
    assert ev.timestamp == MIDNIGHT + timedelta(minutes=6, seconds=4)
    assert res.report.source["columns"] == {
        "event_time": "timestamp",
        "event_type": "event_type",
        "product_id": "item_id",
        "category_id": "ignored",
        "category_code": "category (catalogue attribute)",
        "brand": "brand (catalogue attribute)",
        "price": "price (catalogue attribute and each event's unit_price)",
        "user_id": "user_id",
        "user_session": "session_id",
    }
    assert res.report.source["mapping"] == {"events": dict(m.split("=") for m in REES_MAP)}
    summary = res.report.summary()
    assert "    user_session: session_id" in summary and "    category_id: ignored" in summary


def test_an_ignored_column_that_looks_like_a_field_gets_a_hint(tmp_path: Path, rees: Path) -> None:
    res = load_generic(rees, build_column_map(["product_id=item_id", "event_time=timestamp"]))
    cols = res.report.source["columns"]
    assert cols["user_session"] == "ignored (maybe --map user_session=session_id)"
    assert cols["category_code"] == "ignored (maybe --map category_code=category)"
    assert all(e.session_id is None for e in res.events)
    # only aliases and near-identical names get a hint (Amazon's 'style' is not a 'title')
    path = write(tmp_path / "r.csv", "user_id,item_id,event_type,timestamp,style,summary,Brands\n"
                                     "u,i,review,1569888000,x,y,z\n")
    cols = load_generic(path, ColumnMap()).report.source["columns"]
    assert (cols["style"], cols["summary"], cols["Brands"]) == (
        "ignored", "ignored", "ignored (maybe --map Brands=brand)")


def test_derived_catalogue_titles_from_brand_and_category(rees: Path) -> None:
    res = load_generic(rees, build_column_map(REES_MAP))
    items = {i.item_id: i for i in res.items}
    assert {i: it.title for i, it in items.items()} == {
        "1004237": "apple smartphone (item 1004237)",
        "1307067": "lenovo notebook (item 1307067)",
        "17200506": "sofa (item 17200506)",
        "44600062": "shiseido (item 44600062)",
    }
    phone = items["1004237"]
    assert (phone.brand, phone.category, phone.price) == ("apple", "electronics.smartphone", 1071.98)  # median
    assert items["44600062"].category is None
    notes = res.report.notes
    assert ("4 event items without a catalogue row (no catalogue given): derived from the events, 0 with a "
            "title column, 4 titled from brand/category, 0 'Item <id>'") in notes
    assert "1 item has several price values in the events; the median is the catalogue's" in notes


def test_derived_title_rules() -> None:
    assert category_leaf("Home > Kitchen > Mugs") == "Mugs"
    assert category_leaf("appliances.kitchen.washer") == "washer"
    assert category_leaf("2520377") == "category 2520377"
    assert category_leaf("living_room") == "living room"
    assert derived_title("7", "Bosch", "appliances.kitchen.washer") == "Bosch washer (item 7)"
    assert derived_title("7", None, None) is None


def test_a_catalogue_wins_over_event_attributes_and_fills_missing_titles(tmp_path: Path, rees: Path) -> None:
    cat = write(tmp_path / "items.csv", "product_id,name,brand,category_code\n1004237,iPhone 11 64GB,apple,phones\n"
                                        "1307067,,lenovo,computers.notebook\n")
    res = load_generic(rees, build_column_map([*REES_MAP, "name=title"]), catalog_path=cat)
    titles = {i.item_id: i.title for i in res.items}
    assert titles["1004237"] == "iPhone 11 64GB"  # the catalogue's, not the events' brand + category
    assert titles["1307067"] == "lenovo notebook (item 1307067)"  # catalogue row without a title
    assert titles["17200506"] == "sofa (item 17200506)"  # not in the catalogue: from the events
    assert res.report.source["catalog_columns"] == {"product_id": "item_id", "name": "title", "brand": "brand",
                                                    "category_code": "category"}
    assert "2 catalogue items have attributes in the events too; the catalogue's are kept" in res.report.notes


def test_a_mapping_file_yaml_or_json_equals_the_flags_and_flags_override_it(tmp_path: Path, rees: Path) -> None:
    by_flags = load_generic(rees, build_column_map(REES_MAP))
    yml = write(tmp_path / "map.yaml", "events:\n  product_id: item_id\n  event_time: timestamp\n"
                                       "  user_session: session_id\n  category_code: category\n")
    jsn = write(tmp_path / "map.json", json.dumps({"events": dict(m.split("=") for m in REES_MAP)}))
    for f in (yml, jsn):
        res = load_generic(rees, build_column_map([], f))
        assert res.events == by_flags.events and res.items == by_flags.items
    # a flag maps another column to a field the file maps: the flag's column wins
    res = load_generic(rees, build_column_map(["category_id=category"], yml))
    assert {i.category for i in res.items} >= {"2053013555631882655"}
    assert res.report.source["columns"]["category_code"] == "ignored"  # no hint: category is taken


def test_mapping_file_errors_name_the_file_and_the_key(tmp_path: Path) -> None:
    bad_key = write(tmp_path / "m.yaml", "events: {a: user_id}\ncolumns: [a]\n")
    with pytest.raises(RequestError, match=r"m\.yaml: columns: unknown key; keys: events, catalog, header"):
        load_map_file(bad_key)
    bad_field = write(tmp_path / "n.json", '{"events": {"ts": "time"}}')
    with pytest.raises(RequestError, match=r"n\.json: events: column 'ts' maps to unknown field 'time' "
                                           r"\(did you mean timestamp\?\)"):
        load_map_file(bad_field)
    with pytest.raises(RequestError, match=r"--map 'user_id' must be COLUMN=FIELD"):
        build_column_map(["user_id"])
    with pytest.raises(RequestError, match=r"each field takes one column; user_id is mapped from 'a', 'b'"):
        build_column_map(["a=user_id", "b=user_id"])
    with pytest.raises(RequestError, match=r"--map: column 'u' maps to unknown field 'user' \(did you mean user_id\?\)"):
        build_column_map(["u=user"])
    with pytest.raises(RequestError, match=r"--event-type: event type 'teleport' is not one of view"):
        build_column_map([], event_type="teleport")


def test_missing_required_fields_error_shows_columns_and_the_fix(tmp_path: Path) -> None:
    path = write(tmp_path / "export.csv", "event_time,action,product_id,CustomerID\n"
                                          "2019-10-01 00:00:00 UTC,view,1,2\n")
    with pytest.raises(MissingFieldsError) as exc:
        load_generic(path, ColumnMap())
    assert str(exc.value) == (
        "export.csv has no column for the required fields user_id, item_id, event_type, timestamp\n"
        "  columns in the file: event_time, action, product_id, CustomerID\n"
        "  fix: --map CustomerID=user_id --map product_id=item_id --map action=event_type "
        "--map event_time=timestamp\n"
        "  or, when every row is one kind of event: --event-type purchase (or view, ...)\n"
        "  or, when the data has no times: --order-column COLUMN (a sequence number per row) or --file-order "
        "(rows are in time order); times are then synthetic, and labelled so")
    assert exc.value.param == "mapping.user_id" and exc.value.suggestions["item_id"] == "product_id"
    # with the fix applied it loads
    res = load_generic(path, build_column_map(["CustomerID=user_id", "product_id=item_id", "action=event_type",
                                               "event_time=timestamp"]))
    assert [(e.user_id, e.item_id, e.event_type) for e in res.events] == [("2", "1", "view")]
    # nothing close: the fix says COLUMN
    odd = write(tmp_path / "odd.csv", "user_id,item_id,event_type,zzz\nu,i,view,1\n")
    with pytest.raises(MissingFieldsError, match="fix: --map COLUMN=timestamp"):
        load_generic(odd, ColumnMap())


def test_a_mapped_column_that_is_not_there_is_named_with_the_closest(rees: Path) -> None:
    with pytest.raises(RequestError, match=r"rees\.csv has no column 'user_sesion' \(mapped to session_id\); "
                                           r"columns in the file: event_time, .*; did you mean --map "
                                           r"user_session=session_id\?"):
        load_generic(rees, build_column_map([*REES_MAP[:2], "user_sesion=session_id"]))


def test_suggestions_prefer_known_aliases() -> None:
    assert suggest_column("user_id", ["visitorid", "itemid"]) == "visitorid"
    assert suggest_column("item_id", ["asin", "reviewerID"]) == "asin"
    assert suggest_column("timestamp", ["unixReviewTime", "reviewTime"]) == "unixReviewTime"
    assert suggest_column("session_id", ["foo"]) is None


def test_a_headerless_csv_is_refused_then_named_with_header(tmp_path: Path) -> None:
    path = write(tmp_path / "UserBehavior.csv", "1,2268318,2520377,pv,1511544070\n1,2333346,2520771,buy,1511561733\n")
    with pytest.raises(RequestError) as exc:
        load_generic(path, ColumnMap())
    assert str(exc.value) == (
        "UserBehavior.csv: the first row looks like data, not column names (1, 2268318, 2520377, pv, "
        "1511544070); if the file has no header row, name its 5 columns in order with --header, e.g. "
        "--header col1,col2,col3,col4,col5")
    cm = build_column_map(["behavior=event_type", "ts=timestamp", "category=category"],
                          header=["user_id", "item_id", "category", "behavior", "ts"])
    res = load_generic(path, cm)
    assert [(e.item_id, e.event_type) for e in res.events] == [("2268318", "view"), ("2333346", "purchase")]
    assert res.report.rows_read == 2
    assert {i.item_id: i.title for i in res.items}["2268318"] == "category 2520377 (item 2268318)"


# ---- order-only data -------------------------------------------------------------------------


def test_an_order_column_gives_labelled_synthetic_times(tmp_path: Path) -> None:
    path = write(tmp_path / "orders.csv", "user,sku,seq\nu1,C,10\nu1,A,9\nu2,B,1\nu1,D,\nu1,B,2\n")
    cm = build_column_map(["user=user_id", "sku=item_id"], order_column="seq", event_type="purchase")
    res = load_generic(path, cm)
    u1 = [e for e in res.events if e.user_id == "u1"]
    assert [e.item_id for e in u1] == ["B", "A", "C"]  # 2 < 9 < 10: numeric, not text, order
    assert [e.timestamp for e in u1] == [SYNTHETIC_START + timedelta(days=n) for n in range(3)]
    assert dict(res.report.dropped) == {"no value in the order column": 1}
    assert res.report.source["times"].startswith("synthetic: no timestamps; each user's rows ordered by the "
                                                 "order column 'seq'")
    assert any(n.startswith("times are SYNTHETIC") for n in res.report.notes)
    assert res.report.source["columns"]["seq"] == "order column (synthetic times)"


def test_file_order_gives_labelled_synthetic_times(tmp_path: Path) -> None:
    path = write(tmp_path / "o.jsonl", "\n".join(json.dumps(r) for r in [
        {"reviewerID": "r1", "asin": "X"}, {"reviewerID": "r2", "asin": "X"}, {"reviewerID": "r1", "asin": "Y"}]))
    cm = build_column_map(["reviewerID=user_id", "asin=item_id"], file_order=True, event_type="purchase")
    res = load_generic(path, cm)
    assert [(e.user_id, e.item_id, (e.timestamp - SYNTHETIC_START).days) for e in res.events] == [
        ("r1", "X", 0), ("r1", "Y", 1), ("r2", "X", 0)]
    assert "the file's row order" in res.report.source["times"]
    with pytest.raises(RequestError, match="--order-column and --file-order are for data without times"):
        build_column_map(["ts=timestamp"], file_order=True)


# ---- store: the dataset record ---------------------------------------------------------------


def test_the_mapping_is_saved_with_the_dataset_and_read_back(tmp_path: Path, rees: Path) -> None:
    store = EventStore(tmp_path / "s.sqlite3")
    cm = build_column_map(REES_MAP, time_format=None)
    ingest(store, "my-shop", load_generic(rees, cm, dataset="my-shop"), progress=False)
    assert saved_mapping(store, "my-shop") == cm
    assert store.last_ingest("my-shop")["source"]["times"].startswith("column 'event_time'")  # type: ignore[index]
    assert saved_mapping(store, "never") is None
    assert "my-shop" in store.datasets()
    with pytest.raises(RequestError, match="'taobao' is a built-in dataset"):
        check_dataset_name("taobao")
    with pytest.raises(RequestError, match="dataset name '../x'"):
        check_dataset_name("../x")


# ---- the CLI ---------------------------------------------------------------------------------

ENV = {"SHOPLENS_EMBEDDER": "hashing-16", "COLUMNS": "200"}


def _export(tmp_path: Path) -> Path:
    """A small clickstream export: 8 users x 2 sessions over 6 items, REES46's column names."""
    brands = {"1": ("apple", "electronics.smartphone"), "2": ("samsung", "electronics.smartphone"),
              "3": ("lenovo", "computers.notebook"), "4": ("bosch", "appliances.kitchen.washer"),
              "5": ("ikea", "furniture.living_room.sofa"), "6": ("sony", "electronics.audio.headphone")}
    rows = [REES_HEADER]
    for u in range(8):
        for s in range(2):
            t0 = MIDNIGHT + timedelta(days=u + 3 * s)
            for k, kind in enumerate(("view", "view", "cart", "purchase")):
                item = str((u + s + (k // 2)) % 6 + 1)
                brand, cat = brands[item]
                ts = (t0 + timedelta(minutes=5 * k)).strftime("%Y-%m-%d %H:%M:%S UTC")
                rows.append(f"{ts},{kind},{item},99,{cat},{brand},{10 * int(item)}.0,user{u},u{u}s{s}")
    return write(tmp_path / "export.csv", "\n".join(rows) + "\n")


def test_cli_ingest_own_export_then_every_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ui.cli import app

    ws, export = tmp_path / "ws", _export(tmp_path)
    runner = CliRunner()
    r = runner.invoke(app, ["ingest", "--events", str(export), "--name", "my-shop", "--workspace", str(ws)],
                      env=ENV)
    assert r.exit_code == 2
    assert "fix: --map product_id=item_id --map event_time=timestamp" in r.stderr
    flags = [x for m in REES_MAP for x in ("--map", m)]
    r = runner.invoke(app, ["ingest", "--events", str(export), "--name", "my-shop", *flags, "--workspace", str(ws)],
                      env=ENV)
    assert r.exit_code == 0, r.stderr
    assert "my-shop: read 64 rows -> 64 events, 6 items" in r.stderr
    assert "    category_id: ignored" in r.stderr
    assert 'mapping saved with \'my-shop\': {"events": {"product_id": "item_id"' in r.stderr
    listed = json.loads(runner.invoke(app, ["datasets", "--workspace", str(ws), "--json"], env=ENV).stdout)
    assert {"name": "my-shop", "users": 8, "items": 6, "events": 64}.items() <= listed["datasets"][0].items()

    # a second ingest under the same name reuses the saved mapping (and says so): nothing new
    r = runner.invoke(app, ["ingest", "--events", str(export), "--name", "my-shop", "--workspace", str(ws),
                            "--no-index"], env=ENV)
    assert r.exit_code == 0, r.stderr
    assert "starting from the mapping saved with 'my-shop'" in r.stderr
    assert "ingest: 0 new events, 64 already present" in r.stderr

    r = runner.invoke(app, ["recommend", "--dataset", "my-shop", "--user", "user3", "-k", "3", "--no-llm",
                            "--workspace", str(ws)], env=ENV)
    assert r.exit_code == 0, r.stderr
    body = json.loads(r.stdout)
    titles = {"apple smartphone (item 1)", "samsung smartphone (item 2)", "lenovo notebook (item 3)",
              "bosch washer (item 4)", "ikea sofa (item 5)", "sony headphone (item 6)"}
    assert body["dataset"] == "my-shop" and len(body["items"]) == 3
    assert {it["title"] for it in body["items"]} <= titles
    assert r.stderr.count("note: template reasons") == 1  # --no-llm: said once, not silent

    # session intent follows user_session: user3's last session u3s1 is 4 events (a 3-day gap anyway)
    r = runner.invoke(app, ["intent", "--dataset", "my-shop", "--user", "user3", "--no-llm",
                            "--workspace", str(ws)], env=ENV)
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["session"]["n_events"] == 4
    assert "note: degraded answer: no model configured" in r.stderr
    for args in (["intent", "--user", "user3", "--item", "4"], ["churn", "--user", "user3", "--as-of", "2019-10-08"],
                 ["profile", "--user", "user3"], ["audience", "--item", "4", "-n", "3"]):
        r = runner.invoke(app, [*args, "--dataset", "my-shop", "--no-llm", "--workspace", str(ws)], env=ENV)
        assert r.exit_code == 0, (args, r.stderr)
        assert json.loads(r.stdout)["dataset"] == "my-shop"
    r = runner.invoke(app, ["sentiment", "--dataset", "my-shop", "--by", "item", "--workspace", str(ws)], env=ENV)
    assert r.exit_code == 0 and "has no review events" in r.stderr


def test_cli_recommend_events_takes_the_ingest_mapping_flags(tmp_path: Path) -> None:
    from ui.cli import app

    ws, export = tmp_path / "ws", _export(tmp_path)
    runner = CliRunner()
    base = ["recommend", "--events", str(export), "--user", "user3", "-k", "2", "--no-llm", "--workspace", str(ws)]
    r = runner.invoke(app, base, env=ENV)  # the raw export: its columns need mapping, as for ingest
    assert r.exit_code == 2
    assert "fix: --map product_id=item_id --map event_time=timestamp" in r.stderr
    flags = [x for m in REES_MAP for x in ("--map", m)]
    r = runner.invoke(app, [*base, *flags], env=ENV)
    assert r.exit_code == 0, r.stderr
    assert "read 64 rows -> 64 events, 6 items" in r.stderr
    body = json.loads(r.stdout)
    assert body["dataset"].startswith("file-") and len(body["items"]) == 2
    assert all(it["title"].endswith(f"(item {it['item_id']})") for it in body["items"])  # derived titles
    # the same file under the same mapping is the same dataset: nothing new on a second call
    again = runner.invoke(app, [*base, *flags], env=ENV)
    assert again.exit_code == 0 and json.loads(again.stdout)["dataset"] == body["dataset"]
    assert "0 new events, 64 already present" in again.stderr
    # the mapping flags belong to --events
    r = runner.invoke(app, ["recommend", "--dataset", "x", "--user", "u", "--map", "a=item_id",
                            "--workspace", str(ws)], env=ENV)
    assert r.exit_code == 2 and "go with --events" in r.stderr


def test_cli_recommend_prints_one_stderr_line_when_the_model_is_unreachable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.app.runtime import Runtime
    from agent.domain.errors import ModelUnavailableError
    from ui.cli import app

    ws, export = tmp_path / "ws", _export(tmp_path)
    flags = [x for m in REES_MAP for x in ("--map", m)]
    assert CliRunner().invoke(app, ["ingest", "--events", str(export), "--name", "shop", *flags, "--workspace",
                                    str(ws)], env=ENV).exit_code == 0

    async def unreachable(self: Runtime) -> None:
        raise ModelUnavailableError("forced: no server at 127.0.0.1:9")

    monkeypatch.setattr(Runtime, "connect_model", unreachable)
    r = CliRunner().invoke(app, ["recommend", "--dataset", "shop", "--user", "user3", "-k", "2", "--workspace",
                                 str(ws)], env=ENV)
    assert r.exit_code == 0, r.stderr
    body = json.loads(r.stdout)
    assert body["meta"]["degraded"] is True
    lines = [x for x in r.stderr.splitlines() if x.startswith("note: degraded answer: ")]
    assert len(lines) == 1 and "forced: no server at 127.0.0.1:9" in lines[0]


def test_event_type_choices_match_the_schema() -> None:
    from typing import get_args

    from agent.domain.schemas import EVENT_TYPES
    from ui.options import EventTypeChoice

    assert get_args(EventTypeChoice) == EVENT_TYPES


def test_new_events_drop_only_that_datasets_cached_baselines(tmp_path: Path) -> None:
    from agent.app.baselines import drop_fitted_baselines

    names = ["intent-48h-shop.json", "session_intent-session-shop.json", "churn-90d-shop.json",
             "churn-90d-my-shop.json", "intent-0.5h-shop.json", "churn-90d-shop.json.bak"]
    for n in names:
        (tmp_path / n).write_text("{}")
    gone = sorted(p.name for p in drop_fitted_baselines(tmp_path, "shop"))
    assert gone == ["churn-90d-shop.json", "intent-0.5h-shop.json", "intent-48h-shop.json",
                    "session_intent-session-shop.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["churn-90d-my-shop.json", "churn-90d-shop.json.bak"]
