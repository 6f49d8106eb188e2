"""How a user's own export maps onto ShopLens fields: `ColumnMap`, read from `--map` flags and a
saved mapping file (YAML or JSON), and the error that names a missing field and its fix.

A mapping goes from the file's column to a ShopLens field (``event_time: timestamp``), the way a
user reads their export. The fields are the `BehaviorEvent` fields plus the catalogue attributes
(`ATTRIBUTE_FIELDS`: title, category, brand, price, description), which may come from the events
file itself. A column named like a field needs no mapping.

A mapping file has the same shape as the `source.mapping` block saved with every ingested dataset,
so a dataset's mapping can be copied into a file and reused::

    events:               # events-file column -> field
      event_time: timestamp
      product_id: item_id
      user_session: session_id
      category_code: category
    catalog:              # catalogue-file column -> field (default: the events section)
      product_id: item_id
    time_format: null     # strptime format, for timestamps no built-in form reads
    order_column: null    # no timestamps: a sequence column orders each user's rows
    file_order: false     # no timestamps: the file's row order is each user's order
    event_type: null      # every row is this event type (for files without a type column)
    header: null          # a headerless CSV: its column names, in order
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from agent.domain.errors import RequestError
from agent.domain.schemas import EVENT_ALIASES, EVENT_TYPES, BehaviorEvent, CatalogItem

EVENT_FIELDS: tuple[str, ...] = tuple(BehaviorEvent.model_fields)
ITEM_FIELDS: tuple[str, ...] = tuple(CatalogItem.model_fields)
# Catalogue fields an events file may carry per row; they become the item's catalogue entry.
ATTRIBUTE_FIELDS: tuple[str, ...] = tuple(f for f in ITEM_FIELDS if f != "item_id")
FIELDS: tuple[str, ...] = EVENT_FIELDS + ATTRIBUTE_FIELDS
REQUIRED: tuple[str, ...] = ("user_id", "item_id", "event_type", "timestamp")

# Column names seen in real exports, per field (lower case, letters and digits only). Used only to
# suggest a `--map` in errors and hints; nothing is mapped by a guess.
ALIASES: dict[str, tuple[str, ...]] = {
    "user_id": ("user", "userid", "uid", "customer", "customerid", "customerno", "client", "clientid",
                "visitor", "visitorid", "member", "memberid", "buyer", "buyerid", "reviewerid",
                "account", "accountid", "shopper", "shopperid"),
    "item_id": ("item", "itemid", "product", "productid", "productcode", "sku", "asin", "article",
                "articleid", "stockcode", "goods", "goodsid", "pid", "iid", "offerid", "variantid"),
    "timestamp": ("time", "ts", "datetime", "date", "eventtime", "eventdate", "eventtimestamp",
                  "createdat", "created", "occurredat", "invoicedate", "orderdate", "ordertime",
                  "unixreviewtime", "unixtime", "epoch", "timestampms"),
    "event_type": ("type", "event", "eventtype", "eventname", "action", "behavior", "behaviour",
                   "behaviortype", "behaviourtype", "activity", "interaction", "kind"),
    "session_id": ("session", "sessionid", "usersession", "visit", "visitid", "sid"),
    "basket_id": ("basket", "basketid", "order", "orderid", "orderno", "invoice", "invoiceno",
                  "cartid", "transaction", "transactionid"),
    "quantity": ("qty", "units", "count", "amount"),
    "unit_price": ("unitprice",),
    "rating": ("stars", "score", "overall", "ratingvalue"),
    "review_text": ("review", "reviewtext", "text", "comment", "body", "reviewbody"),
    "title": ("name", "productname", "itemname", "producttitle"),
    "category": ("categorycode", "categoryid", "categoryname", "cat", "categories", "categorypath"),
    "brand": ("manufacturer", "maker", "brandname", "vendor"),
    "price": ("listprice", "saleprice"),
    "description": ("desc", "details", "productdescription"),
}


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def suggest_column(field: str, columns: Iterable[str], *, stem: bool = True, cutoff: float = 0.6) -> str | None:
    """The file column most likely meant for `field`, or None when none is close.

    A known alias wins (``CustomerID`` for user_id), then the closest name by difflib (ratio >=
    `cutoff` on lower-case letters and digits), then (with `stem`) a column containing the field's
    stem (``user`` for user_id).
    """
    cols = [c for c in columns if c]
    by_norm = {_norm(c): c for c in reversed(cols)}  # the first column wins on equal names
    for alias in ALIASES.get(field, ()):
        if alias in by_norm:
            return by_norm[alias]
    close = difflib.get_close_matches(_norm(field), list(by_norm), n=1, cutoff=cutoff)
    if close:
        return by_norm[close[0]]
    if not stem:
        return None
    root = field.split("_")[0]
    return next((c for c in cols if root in _norm(c)), None)


def closest_field(name: str, fields: Sequence[str] = FIELDS) -> str | None:
    """The ShopLens field a mistyped target most likely means: ``time`` -> timestamp (a known
    alias), ``user`` -> user_id, ``titel`` -> title (difflib); None when nothing is close."""
    key = _norm(name)
    for field in fields:
        if key in ALIASES.get(field, ()) or key == _norm(field):
            return field
    close = difflib.get_close_matches(name, list(fields), n=1)
    return close[0] if close else None


class MissingFieldsError(RequestError):
    """Required fields that no column of the file maps to.

    Attributes:
        path: the events file.
        missing: the required fields without a column, in `REQUIRED` order.
        columns: the file's columns, in file order.
        suggestions: {field: the column suggested for it, or None}.
    """

    default_code = "missing_field"

    def __init__(self, path: Path, missing: Sequence[str], columns: Sequence[str],
                 suggestions: Mapping[str, str | None]):
        self.path, self.missing, self.columns = path, list(missing), list(columns)
        self.suggestions = dict(suggestions)
        super().__init__(missing_fields_message(path, missing, columns, suggestions),
                         param=f"mapping.{self.missing[0]}")


def missing_fields_message(path: Path, missing: Sequence[str], columns: Sequence[str],
                           suggestions: Mapping[str, str | None]) -> str:
    """The error text for required fields without a column: the fields, the file's columns and the
    `--map` flags that fix it (a suggested column, or ``COLUMN`` where none is close)."""
    fixes = " ".join(f"--map {suggestions.get(f) or 'COLUMN'}={f}" for f in missing)
    noun = "field" if len(missing) == 1 else "fields"
    lines = [f"{path.name} has no column for the required {noun} {', '.join(missing)}",
             f"  columns in the file: {', '.join(columns) if columns else '(none)'}",
             f"  fix: {fixes}"]
    if "event_type" in missing:
        lines.append("  or, when every row is one kind of event: --event-type purchase (or view, ...)")
    if "timestamp" in missing:
        lines.append("  or, when the data has no times: --order-column COLUMN (a sequence number per "
                     "row) or --file-order (rows are in time order); times are then synthetic, and "
                     "labelled so")
    return "\n".join(lines)


class ColumnMap(BaseModel):
    """A user's export -> ShopLens fields, with how to read its times. Unknown keys are refused.

    Attributes:
        events: {events-file column: field}; fields in `FIELDS`, each from at most one column.
        catalog: {catalogue-file column: field} (item_id and `ATTRIBUTE_FIELDS`); empty: the
            `events` section's item fields apply to the catalogue too.
        header: the column names of a headerless CSV, in order (None: the first row names them).
        time_format: a strptime format for timestamps none of the built-in forms read.
        order_column: no timestamps: this column orders each user's rows (numbers numerically).
        file_order: no timestamps: each user's rows are in file order.
        event_type: the event type of every row (for files without a type column).
    """

    model_config = ConfigDict(extra="forbid")

    events: dict[str, str] = {}
    catalog: dict[str, str] = {}
    header: list[str] | None = None
    time_format: str | None = None
    order_column: str | None = None
    file_order: bool = False
    event_type: str | None = None

    @field_validator("events", "catalog")
    @classmethod
    def _known_fields(cls, v: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        allowed = FIELDS if info.field_name == "events" else ITEM_FIELDS
        out: dict[str, str] = {}
        for source, target in v.items():
            field = str(target).strip().lower()
            if field not in allowed:
                close = closest_field(field, allowed)
                hint = f" (did you mean {close}?)" if close else ""
                raise ValueError(f"column {source!r} maps to unknown field {target!r}{hint}; "
                                 f"fields: {', '.join(allowed)}")
            out[str(source)] = field
        twice = sorted({f for f in out.values() if list(out.values()).count(f) > 1})
        if twice:
            raise ValueError("each field takes one column; " + "; ".join(
                f"{f} is mapped from {', '.join(repr(s) for s, t in out.items() if t == f)}" for f in twice))
        return out

    @field_validator("event_type")
    @classmethod
    def _event_type(cls, v: str | None) -> str | None:
        if v is None:
            return None
        key = EVENT_ALIASES.get(v.strip().lower(), v.strip().lower())
        if key not in EVENT_TYPES:
            raise ValueError(f"event type {v!r} is not one of {', '.join(EVENT_TYPES)}")
        return key

    @field_validator("header")
    @classmethod
    def _header(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return None
        names = [c.strip() for c in v]
        if not all(names) or len(set(names)) != len(names):
            raise ValueError(f"header names must be non-empty and distinct, got {names}")
        return names

    @model_validator(mode="after")
    def _one_clock(self) -> ColumnMap:
        if self.order_column is not None and self.file_order:
            raise ValueError("give --order-column or --file-order, not both")
        if (self.order_column is not None or self.file_order) and "timestamp" in self.events.values():
            raise ValueError("a timestamp column is mapped: --order-column and --file-order are for "
                             "data without times")
        return self

    @property
    def synthetic_times(self) -> bool:
        """True when times are made up from an order (`order_column` or `file_order`)."""
        return self.order_column is not None or self.file_order

    def merged(self, other: ColumnMap) -> ColumnMap:
        """`self` overridden by `other` (flags over a mapping file): `other`'s column mappings
        replace any of `self`'s for the same column or the same field; its set options win."""
        def merge(a: dict[str, str], b: dict[str, str]) -> dict[str, str]:
            kept = {s: f for s, f in a.items() if s not in b and f not in b.values()}
            return {**kept, **b}

        data = self.model_dump()
        data["events"] = merge(self.events, other.events)
        data["catalog"] = merge(self.catalog, other.catalog)
        for key in ("header", "time_format", "order_column", "event_type"):
            if getattr(other, key) is not None:
                data[key] = getattr(other, key)
        data["file_order"] = self.file_order or other.file_order
        if other.order_column is not None:  # the other's clock replaces this one's
            data["file_order"] = False
        if other.file_order:
            data["order_column"] = None
        if "timestamp" in other.events.values():
            data["file_order"], data["order_column"] = False, None
        return ColumnMap.model_validate(data)

    @classmethod
    def from_fields(cls, mapping: Mapping[str, str], **options: Any) -> ColumnMap:
        """From {field: column} (the older `load_generic` argument) rather than {column: field}.

        Raises:
            RequestError: an unknown field or option (see `column_map`).
        """
        return column_map({"events": {col: field for field, col in mapping.items()}, **options})


def parse_map_flags(flags: Iterable[str]) -> dict[str, str]:
    """``["event_time=timestamp", ...]`` -> {column: field} (split at the last ``=``).

    Raises:
        RequestError: a flag without ``=`` or with an empty side (param ``map``).
    """
    out: dict[str, str] = {}
    for flag in flags:
        source, sep, field = flag.rpartition("=")
        if not sep or not source.strip() or not field.strip():
            raise RequestError(f"--map {flag!r} must be COLUMN=FIELD, e.g. --map event_time=timestamp",
                               param="map")
        out[source.strip()] = field.strip()
    return out


def load_map_file(path: Path) -> ColumnMap:
    """Read a mapping file (``.yaml``/``.yml`` or ``.json``) in the `ColumnMap` shape.

    Raises:
        FileNotFoundError: no such file.
        RequestError: not YAML/JSON, not a mapping, or keys/fields `ColumnMap` refuses (the
            message names the file and the key).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mapping file {path} not found")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise RequestError(f"mapping file {path}: not valid {path.suffix.lstrip('.') or 'YAML'}: {e}",
                           param="map_file") from e
    if not isinstance(data, dict):
        raise RequestError(f"mapping file {path}: expected a mapping with an 'events:' section, e.g. "
                           "{\"events\": {\"event_time\": \"timestamp\"}}", param="map_file")
    return column_map(data, where=f"mapping file {path}")


def column_map(data: Mapping[str, Any], *, where: str = "mapping") -> ColumnMap:
    """Validate a `ColumnMap` from plain data, with errors that name `where` and the key.

    Raises:
        RequestError: an unknown key, an unknown field or an invalid option.
    """
    try:
        return ColumnMap.model_validate(dict(data))
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in err["loc"]) or "mapping"
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = f"unknown key; keys: {', '.join(ColumnMap.model_fields)}"
        param = f"mapping.{err['loc'][0]}" if err["loc"] else "mapping"
        if where == "flags":  # name the flag the user typed
            flag = {"events": "--map", "mapping": ""}.get(loc, f"--{loc.replace('_', '-')}")
            raise RequestError(f"{flag}: {msg}" if flag else msg, param=param) from e
        raise RequestError(f"{where}: {loc}: {msg}", param=param) from e


def build_column_map(flags: Iterable[str] = (), map_file: Path | None = None, *, base: ColumnMap | None = None,
                     **options: Any) -> ColumnMap:
    """The mapping a CLI call or API request describes: flags over a mapping file over `base`.

    Args:
        flags: ``COLUMN=FIELD`` strings (`--map`).
        map_file: an optional mapping file (`load_map_file`); when given, `base` is not used.
        base: the mapping to start from without a file (e.g. `saved_mapping` of the dataset).
        **options: `ColumnMap` options given as flags (header, time_format, order_column,
            file_order, event_type); None and False mean "not given".

    Raises:
        RequestError, FileNotFoundError: see `parse_map_flags`, `load_map_file`, `column_map`.
    """
    start = load_map_file(map_file) if map_file is not None else (base or ColumnMap())
    given = {k: v for k, v in options.items() if v is not None and v is not False}
    return start.merged(column_map({"events": parse_map_flags(flags), **given}, where="flags"))
