"""A user's own events (and optionally catalogue) from CSV/TSV or JSON Lines, with a column map.

Used by `shoplens recommend --events my_events.jsonl --catalog my_items.csv`. A row that fails
validation is dropped and counted under `invalid event: <field> (<error type>)` with its row
number; the full pydantic message is kept in `LoadResult.errors` (and the first few in the
report notes). Nothing is dropped silently.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from agent.domain.schemas import BehaviorEvent, CatalogItem
from agent.ingest._common import LoadResult, RowSink, jsonl_rows, open_text
from agent.ingest.report import LoadReport

EVENT_FIELDS: tuple[str, ...] = tuple(BehaviorEvent.model_fields)
ITEM_FIELDS: tuple[str, ...] = tuple(CatalogItem.model_fields)
R_BAD_CSV = "CSV row has more fields than the header"


def _format(path: Path) -> str:
    name = path.name.lower().removesuffix(".gz")
    for ext, fmt in ((".csv", "csv"), (".tsv", "tsv"), (".jsonl", "jsonl"), (".ndjson", "jsonl"),
                     (".json", "jsonl")):
        if name.endswith(ext):
            return fmt
    raise ValueError(
        f"{path}: unknown format; use .csv, .tsv, .jsonl or .ndjson (optionally .gz)"
    )


def _records(path: Path, report: LoadReport) -> Iterator[tuple[int, dict[str, Any], list[str]]]:
    """Yield (1-based row number, record, known columns). CSV rows exclude the header; empty
    CSV cells are treated as absent so model defaults apply."""
    fmt = _format(path)
    with open_text(path) as fh:
        if fmt == "jsonl":
            for row, rec in jsonl_rows(fh, report):
                yield row, {k: v for k, v in rec.items() if v is not None and v != ""}, list(rec)
            return
        reader = csv.DictReader(fh, delimiter="\t" if fmt == "tsv" else ",")
        columns = [c.strip() for c in reader.fieldnames or []]
        for row, raw in enumerate(reader, start=1):
            report.rows_read += 1
            if None in raw:
                report.drop(R_BAD_CSV, row)
                continue
            rec = {
                k.strip(): v.strip()
                for k, v in raw.items()
                if k is not None and v is not None and v.strip()
            }
            yield row, rec, columns


def _resolve_mapping(
    mapping: Mapping[str, str], fields: tuple[str, ...], what: str
) -> dict[str, str]:
    """{model field: source column}; unmapped fields default to a column of the same name."""
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        raise ValueError(
            f"{what} mapping names unknown fields {unknown}; valid fields: {', '.join(fields)}"
        )
    return {f: mapping.get(f, f) for f in fields}


def _check_columns(path: Path, mapping: Mapping[str, str], columns: list[str]) -> None:
    missing = {f: c for f, c in mapping.items() if c not in columns}
    if missing:
        raise ValueError(
            f"{path}: mapped columns not found: "
            + ", ".join(f"{c!r} (for {f})" for f, c in missing.items())
            + f"; the file has columns {columns}"
        )


def load_generic(
    path: Path,
    mapping: dict[str, str],
    *,
    event_type_default: str | None = None,
    catalog_path: Path | None = None,
    catalog_mapping: dict[str, str] | None = None,
    dataset: str = "generic",
) -> LoadResult:
    """Load events (and optionally a catalogue) from CSV/TSV/JSONL with a column mapping.

    Args:
        path: events file (`.csv`, `.tsv`, `.jsonl`, `.ndjson`, optionally gzipped).
        mapping: {BehaviorEvent field: source column}, e.g. `{"user_id": "customer",
            "item_id": "sku", "timestamp": "ts"}`. Fields not mapped are read from a column
            of the same name when present. Timestamps: unix s or ms (detected) or ISO-8601.
        event_type_default: event type for rows without one (e.g. "purchase").
        catalog_path: optional catalogue file in the same formats.
        catalog_mapping: {CatalogItem field: source column} for the catalogue.
        dataset: the name written into the report.

    Returns:
        LoadResult: valid events sorted by (user_id, timestamp); the catalogue items, plus a
        placeholder item titled `Item {item_id}` for each event item the catalogue lacks (noted
        in the report). Row numbers are 1-based (CSV: header excluded; JSONL: file lines).

    Raises:
        FileNotFoundError: an input file does not exist.
        ValueError: unknown file format, a mapping naming unknown fields, or a mapped column
            missing from a CSV header.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"events file {path} not found")
    ev_map = _resolve_mapping(mapping, EVENT_FIELDS, "event")
    explicit_ev = {f: c for f, c in ev_map.items() if f in mapping}
    report = LoadReport(dataset=dataset)
    sink = RowSink(report)

    if catalog_path is not None:
        catalog_path = Path(catalog_path)
        if not catalog_path.is_file():
            raise FileNotFoundError(f"catalogue file {catalog_path} not found")
        it_map = _resolve_mapping(catalog_mapping or {}, ITEM_FIELDS, "catalogue")
        explicit_it = {f: c for f, c in it_map.items() if f in (catalog_mapping or {})}
        cat_report = LoadReport(dataset=dataset)
        checked = False
        for row, rec, columns in _records(catalog_path, cat_report):
            if not checked and _format(catalog_path) != "jsonl":
                _check_columns(catalog_path, explicit_it, columns)
            checked = True
            fields = {f: rec[c] for f, c in it_map.items() if c in rec}
            sink.item(row, **fields)
        for reason, n in cat_report.dropped.items():
            report.drop(f"catalogue: {reason}", n=n)
            report.examples[f"catalogue: {reason}"] = cat_report.examples.get(reason, [])
        report.notes.append(f"catalogue {catalog_path.name}: {cat_report.rows_read} rows read")

    checked = False
    for row, rec, columns in _records(path, report):
        if not checked and _format(path) != "jsonl":
            _check_columns(path, explicit_ev, columns)
        checked = True
        fields = {f: rec[c] for f, c in ev_map.items() if c in rec}
        if "event_type" not in fields and event_type_default is not None:
            fields["event_type"] = event_type_default
        sink.event(row, **fields)

    missing = sorted(i for i in sink.event_item_ids() if not sink.has_item(i))
    for item_id in missing:
        sink.item(0, item_id=item_id, title=f"Item {item_id}")
    if missing:
        report.notes.append(
            f"{len(missing)} event item ids have no catalogue row: placeholder titles "
            "'Item <id>' added" + ("" if catalog_path else " (no catalogue given)")
        )
    return sink.result()
