"""A user's own export (events, optionally a catalogue) from CSV/TSV or JSON Lines, mapped onto
ShopLens fields by a `ColumnMap` (`agent.ingest.mapping`): `shoplens ingest --events ... --name`,
`shoplens recommend --events`, and the API's dataset creation all call `load_generic`.

What it guarantees:

* Every column is accounted for in `report.source["columns"]`: mapped to an event field, used as
  a catalogue attribute (title, brand, category, price, description), the order column, or
  ignored (with a `--map` hint when a column looks like a field).
* A required field without a column (user_id, item_id, event_type, timestamp) is a
  `MissingFieldsError` naming it, listing the file's columns and the `--map` that fixes it.
* Timestamps in the common forms are read (`agent.ingest.timeforms`); data without times gets
  synthetic times from an order column or the file order, said in the notes and in
  ``report.source["times"]``.
* A row that fails validation is dropped and counted under ``invalid event: <field> (<error
  type>)`` with its row number; the full message is kept in `LoadResult.errors`. Nothing is
  dropped silently.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent.domain.errors import RequestError
from agent.domain.schemas import CatalogItem
from agent.ingest._common import SYNTHETIC_START, LoadResult, RowSink
from agent.ingest.derived import ItemAttributes, derived_title
from agent.ingest.mapping import (
    ATTRIBUTE_FIELDS,
    EVENT_FIELDS,
    FIELDS,
    ITEM_FIELDS,
    ColumnMap,
    MissingFieldsError,
    suggest_column,
)
from agent.ingest.report import LoadReport
from agent.ingest.tables import NUMBER, R_BAD_CSV, Table
from agent.ingest.timeforms import TimeReader

__all__ = ["EVENT_FIELDS", "ITEM_FIELDS", "R_BAD_CSV", "R_NO_ORDER", "NoValidEventsError", "load_generic"]

R_NO_ORDER = "no value in the order column"
# An order-only row waiting for its synthetic time: (row number, event fields, record, order key).
Pending = tuple[int, dict[str, Any], Mapping[str, Any], Any]


class NoValidEventsError(RequestError):
    """Every row of a user's events file was dropped; `report` says why, reason by reason."""

    def __init__(self, path: Path, report: LoadReport):
        self.report = report
        reasons = "; ".join(f"{n:,} {r}" for r, n in report.dropped.most_common(3)) or "the file has no rows"
        super().__init__(f"{Path(path).name}: no valid events ({reasons})", param="events",
                         code="no_valid_events")


def _field_map(explicit: Mapping[str, str], columns: list[str], allowed: tuple[str, ...],
               skip: set[str]) -> dict[str, str]:
    """{field: column}: the explicit {column: field} entries, then every column named like an
    allowed field that is neither mapped nor in `skip`."""
    fmap = {f: c for c, f in explicit.items() if f in allowed}
    for c in columns:
        if c in allowed and c not in fmap and c not in explicit and c not in skip:
            fmap[c] = c
    return fmap


def _check_sources(path: Path, explicit: Mapping[str, str], columns: list[str],
                   elsewhere: Sequence[str] = ()) -> None:
    """A mapped column must exist (in this file, or for item fields in the other file).

    Raises:
        RequestError: names the column, its field and the file's columns (and the closest one).
    """
    for col, field in explicit.items():
        if col in columns or col in elsewhere:
            continue
        close = suggest_column(col, columns)
        hint = f"; did you mean --map {close}={field}?" if close else ""
        raise RequestError(f"{path.name} has no column {col!r} (mapped to {field}); columns in the file: "
                           f"{', '.join(columns)}{hint}", param=f"mapping.{field}")


def _roles(columns: list[str], fmap: Mapping[str, str], cm: ColumnMap, *, events: bool) -> dict[str, str]:
    """What became of each column, for the report (`source["columns"]`); an ignored column that
    looks like an unmapped field (alias or close name) carries the `--map` that would use it."""
    by_col = {c: f for f, c in fmap.items()}
    fields = FIELDS if events else ITEM_FIELDS
    unmapped = [f for f in fields if f not in fmap and f != "event_id"
                and not (f == "timestamp" and cm.synthetic_times)]
    roles: dict[str, str] = {}
    for col in columns:
        field = by_col.get(col)
        if events and col == cm.order_column:
            roles[col] = "order column (synthetic times)"
        elif field is None:
            guess = next((f for f in unmapped if suggest_column(f, [col], stem=False, cutoff=0.85) == col), None)
            roles[col] = f"ignored (maybe --map {col}={guess})" if guess else "ignored"
        elif not events:
            roles[col] = field
        elif field in ATTRIBUTE_FIELDS:
            extra = " and each event's unit_price" if field == "price" and "unit_price" not in fmap else ""
            roles[col] = f"{field} (catalogue attribute{extra})"
        else:
            roles[col] = field
    return roles


def load_generic(
    path: Path,
    mapping: ColumnMap | Mapping[str, str],
    *,
    event_type_default: str | None = None,
    catalog_path: Path | None = None,
    catalog_mapping: Mapping[str, str] | None = None,
    dataset: str = "generic",
) -> LoadResult:
    """Load a user's events (and optionally a catalogue) from CSV/TSV/JSONL with a column map.

    Args:
        path: events file (`.csv`, `.tsv`, `.jsonl`, `.ndjson`, optionally gzipped).
        mapping: a `ColumnMap` ({column: field} plus time options), or the older {field: column}
            dict. Columns named like a field need no mapping.
        event_type_default: event type for rows without one (`ColumnMap.event_type` wins).
        catalog_path: optional catalogue file in the same formats.
        catalog_mapping: {CatalogItem field: column} for the catalogue (older form of
            `ColumnMap.catalog`).
        dataset: the name written into the report.

    Returns:
        LoadResult: valid events sorted by (user_id, timestamp); the catalogue items, then items
        derived from the events' attributes for event items the catalogue lacks (titled from
        brand + category, else ``Item <id>``; counted in the notes). ``report.source`` holds the
        files, the mapping used, every column's role and where the times came from. Row numbers
        are 1-based (CSV: header excluded; JSONL: file lines).

    Raises:
        FileNotFoundError: an input file does not exist.
        ValueError: unknown file format.
        MissingFieldsError: a required field has no column (message: field, columns, fix).
        RequestError: a mapped column is not in the file, a header row that looks like data, or
            an invalid mapping.
    """
    cm = mapping if isinstance(mapping, ColumnMap) else ColumnMap.from_fields(mapping)
    if event_type_default is not None and cm.event_type is None:
        cm = cm.merged(ColumnMap(event_type=event_type_default))
    if catalog_mapping:
        cm = cm.merged(ColumnMap(catalog={c: f for f, c in catalog_mapping.items()}))
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"events file {path} not found")
    if catalog_path is not None and not Path(catalog_path).is_file():
        raise FileNotFoundError(f"catalogue file {catalog_path} not found")
    report = LoadReport(dataset=dataset)
    with Table(path, report, cm.header) as table, (
            Table(Path(catalog_path), LoadReport(dataset=dataset)) if catalog_path is not None else nullcontext()
    ) as cat_table:
        return _load(path, table, cat_table, cm, report, catalog_path)


def _load(path: Path, table: Table, cat_table: Table | None, cm: ColumnMap, report: LoadReport,
          catalog_path: Path | None) -> LoadResult:
    """`load_generic` once the files are open."""
    sink = RowSink(report)
    columns = table.columns
    _check_sources(path, cm.events, columns, cat_table.columns if cat_table else [])
    if cm.order_column is not None and cm.order_column not in columns:
        raise RequestError(f"{path.name} has no column {cm.order_column!r} (--order-column); columns in "
                           f"the file: {', '.join(columns)}", param="mapping.order_column")
    skip = {"timestamp"} if cm.synthetic_times else set()
    skip |= {cm.order_column} if cm.order_column else set()
    fmap = {f: c for f, c in _field_map(cm.events, columns, FIELDS, skip).items() if c in columns}
    missing = [f for f in ("user_id", "item_id", "event_type", "timestamp") if f not in fmap
               and not (f == "event_type" and cm.event_type) and not (f == "timestamp" and cm.synthetic_times)]
    if missing:
        free = [c for c in columns if c not in fmap.values() and c != cm.order_column]
        raise MissingFieldsError(path, missing, columns, {f: suggest_column(f, free) for f in missing})

    items = _load_catalog(cat_table, cm, sink, report) if cat_table is not None else set()
    attrs, times = ItemAttributes(), TimeReader(cm.time_format)
    ev_fields = {f: c for f, c in fmap.items() if f in EVENT_FIELDS}
    at_fields = {f: c for f, c in fmap.items() if f in ATTRIBUTE_FIELDS}
    price_to_event = "price" in at_fields and "unit_price" not in ev_fields
    pending: list[Pending] = []  # order-only data, timed once every row is read

    def keep(row: int, fields: dict[str, Any], rec: Mapping[str, Any]) -> None:
        ev = sink.event(row, **fields)
        if ev is not None:
            for f, c in at_fields.items():
                if c in rec:
                    attrs.add(ev.item_id, f, rec[c])

    for row, rec in table.rows():
        fields = {f: rec[c] for f, c in ev_fields.items() if c in rec}
        if price_to_event and _price(rec.get(at_fields["price"])) is not None:
            fields["unit_price"] = _price(rec[at_fields["price"]])
        if cm.event_type is not None and "event_type" not in fields:
            fields["event_type"] = cm.event_type
        if cm.synthetic_times:
            order = rec.get(cm.order_column) if cm.order_column else row
            if order is None:
                report.drop(R_NO_ORDER, row)
                continue
            pending.append((row, fields, rec, order))
            continue
        if "timestamp" in fields:
            try:
                fields["timestamp"] = times.parse(fields["timestamp"])
            except ValueError as e:
                sink.fail(row, "timestamp", str(e))
                continue
        keep(row, fields, rec)
    if cm.synthetic_times:
        _synthetic(pending, keep)
    report.source = {"events": str(path), "catalog": str(catalog_path) if catalog_path else None,
                     "mapping": cm.model_dump(exclude_defaults=True),
                     "columns": _roles(table.columns, fmap, cm, events=True)}
    if cm.synthetic_times:
        by = f"the order column {cm.order_column!r}" if cm.order_column else "the file's row order"
        report.source["times"] = (f"synthetic: no timestamps; each user's rows ordered by {by}, the n-th "
                                  f"(0-based) at {SYNTHETIC_START:%Y-%m-%d} UTC + n days (order is real, "
                                  "gaps and dates are not)")
        report.notes.append(f"times are SYNTHETIC ({report.source['times']})")
    else:
        report.source["times"] = f"column {fmap['timestamp']!r}; {times.describe()}"
        if times.forms.get("date only"):
            report.notes.append(f"{times.forms['date only']:,} timestamps are dates only (midnight UTC): "
                                "events of the same day keep the file's order")
    if cat_table is not None:
        report.source["catalog_columns"] = _roles(cat_table.columns, _catalog_map(cm, cat_table.columns), cm,
                                                  events=False)
    _add_event_items(sink, attrs, items, report, catalog_given=catalog_path is not None)
    return sink.result()


def _synthetic(pending: list[Pending], keep: Callable[[int, dict[str, Any], Mapping[str, Any]], None]) -> None:
    """Times for order-only rows: per user, sorted by the order key (numerically when every key is
    a number; ties in file order), the n-th at SYNTHETIC_START + n days."""
    numeric = all(isinstance(k, int | float) or NUMBER.match(str(k)) for *_, k in pending)
    per_user: dict[str, list[tuple[float | str, Pending]]] = defaultdict(list)
    for p in pending:
        per_user[str(p[1].get("user_id", "")).strip()].append((float(p[3]) if numeric else str(p[3]), p))
    for rows in per_user.values():
        rows.sort(key=lambda x: (x[0], x[1][0]))
        for n, (_, (row, fields, rec, _key)) in enumerate(rows):
            keep(row, {**fields, "timestamp": SYNTHETIC_START + timedelta(days=n)}, rec)


def _catalog_map(cm: ColumnMap, columns: list[str]) -> dict[str, str]:
    explicit = cm.catalog or {c: f for c, f in cm.events.items() if f in ITEM_FIELDS}
    return {f: c for f, c in _field_map(explicit, columns, ITEM_FIELDS, set()).items() if c in columns}


def _load_catalog(table: Table, cm: ColumnMap, sink: RowSink, report: LoadReport) -> set[str]:
    """Catalogue rows into the sink; items without a title get one from brand + category.

    Returns:
        The ids of the items kept.

    Raises:
        MissingFieldsError: no item_id column.
        RequestError: a column of the `catalog` section is not in the file.
    """
    _check_sources(table.path, cm.catalog, table.columns)
    fmap = _catalog_map(cm, table.columns)
    if "item_id" not in fmap:
        raise MissingFieldsError(table.path, ["item_id"], table.columns,
                                 {"item_id": suggest_column("item_id", table.columns)})
    kept: set[str] = set()
    derived = placeholder = 0
    for row, rec in table.rows():
        fields = {f: rec[c] for f, c in fmap.items() if c in rec}
        if "title" not in fields and "item_id" in fields:
            item_id = str(fields["item_id"]).strip()
            title = derived_title(item_id, fields.get("brand"), fields.get("category"))
            derived += title is not None
            placeholder += title is None
            fields["title"] = title or f"Item {item_id}"
        it = sink.item(row, **fields)
        if it is not None:
            kept.add(it.item_id)
    cat_report = table.report
    for reason, n in cat_report.dropped.items():
        report.drop(f"catalogue: {reason}", n=n)
        report.examples[f"catalogue: {reason}"] = cat_report.examples.get(reason, [])
    report.notes.append(f"catalogue {table.path.name}: {cat_report.rows_read} rows read")
    if derived or placeholder:
        report.notes.append(f"catalogue rows without a title: {derived:,} titled from brand/category, "
                            f"{placeholder:,} 'Item <id>'")
    return kept


def _add_event_items(sink: RowSink, attrs: ItemAttributes, catalogued: set[str], report: LoadReport, *,
                     catalog_given: bool) -> None:
    """One item per event item the catalogue lacks, from the events' attributes."""
    missing = sorted(i for i in sink.event_item_ids() if not sink.has_item(i))
    kinds = {"title": 0, "brand + category": 0, "placeholder": 0}
    bad = 0
    for item_id in missing:
        fields = attrs.fold(item_id)
        if "title" in fields:
            kinds["title"] += 1
        else:
            title = derived_title(item_id, _str(fields.get("brand")), _str(fields.get("category")))
            kinds["brand + category" if title else "placeholder"] += 1
            fields["title"] = title or f"Item {item_id}"
        try:
            CatalogItem.model_validate({"item_id": item_id, **fields})
        except ValidationError:  # an attribute out of bounds (a 2,000-char brand): keep the item
            bad += 1
            fields = {"title": str(fields["title"])[:1_000]}
        sink.item(0, item_id=item_id, **fields)
    if bad:
        report.notes.append(f"{bad:,} derived items had an attribute out of bounds; kept with the title only")
    if missing:
        where = "the catalogue lacks" if catalog_given else "no catalogue given"
        report.notes.append(
            f"{len(missing):,} event items without a catalogue row ({where}): derived from the events, "
            f"{kinds['title']:,} with a title column, {kinds['brand + category']:,} titled from brand/category, "
            f"{kinds['placeholder']:,} 'Item <id>'")
    if attrs.bad_prices:
        report.notes.append(f"{attrs.bad_prices:,} price values were not numbers (not used)")
    for field, n in attrs.ambiguous().items():
        rule = "the median" if field == "price" else "the most frequent"
        report.notes.append(f"{_items(n)} several {field} values in the events; {rule} is the "
                            "catalogue's")
    overlap = sum(1 for i in catalogued if i in attrs)
    if overlap:
        report.notes.append(f"{_items(overlap, 'catalogue item')} attributes in the events too; the "
                            "catalogue's are kept")


def _items(n: int, noun: str = "item") -> str:
    """'1 item has' / '3 items have'."""
    return f"{n:,} {noun} has" if n == 1 else f"{n:,} {noun}s have"


def _str(v: object) -> str | None:
    return None if v is None else str(v)


def _price(v: object) -> float | None:
    """A per-row price as a number >= 0, or None (then the event simply has no unit_price)."""
    try:
        p = float(str(v))
    except ValueError:
        return None
    return p if 0 <= p <= 1_000_000 else None
