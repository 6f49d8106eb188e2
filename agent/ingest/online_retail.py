"""UCI Online Retail (Chen, Sain & Guo 2012): a UK gift-ware shop, 2010-12-01 .. 2011-12-09.

One invoice line -> one `purchase` event (quantity, unit_price in GBP, basket_id = InvoiceNo).
Cleaning follows ../shared/data/README.md; every dropped line is counted with its reason.
"""

from __future__ import annotations

import csv
import math
import re
import statistics
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from agent.ingest._common import LoadResult, RowSink, open_text, resolve_file
from agent.ingest.report import LoadReport

DATASET = "online-retail"
SUBDIR = "online-retail"
FILENAME = "online_retail.csv.gz"
COLUMNS = (
    "InvoiceNo", "StockCode", "Description", "Quantity", "InvoiceDate", "UnitPrice",
    "CustomerID", "Country",
)
LONDON = ZoneInfo("Europe/London")
# The original UCI file writes "12/1/2010 8:26"; the shared copy writes "2010-12-01 08:26".
_DATE_FORMATS = ("%Y-%m-%d %H:%M", "%Y-%m-%d %H:%M:%S", "%m/%d/%Y %H:%M", "%m/%d/%Y %H:%M:%S")

# Postage, fees, manual adjustments, samples, vouchers: not products a customer chose.
# Most have no digit at all (caught by the rule in `is_non_product_code`); the list also names
# the ones that do (C2 = carriage) and documents what each is.
NON_PRODUCT_CODES: frozenset[str] = frozenset({
    "POST",  # postage
    "DOT",  # dotcom postage
    "C2",  # carriage
    "M",  # manual
    "D",  # discount
    "S",  # samples
    "B",  # adjust bad debt
    "BANK CHARGES",
    "AMAZONFEE",
    "CRUK",  # CRUK commission
    "PADS",  # "pads to match all cushions", price 0.001
    "CARRIAGE",
})

# Drop reasons, in the order they are checked (a line counts under the first that applies).
R_MALFORMED = "malformed line (wrong number of fields)"
R_NO_CUSTOMER = "missing CustomerID"
R_CANCELLED = "cancellation (InvoiceNo starts with C)"
R_BAD_QTY = "unparseable Quantity"
R_NONPOS_QTY = "non-positive Quantity (return/adjustment)"
R_NO_DESC = "missing Description"
R_NON_PRODUCT = "non-product StockCode (postage, fees, manual, samples, vouchers)"
R_BAD_PRICE = "unparseable UnitPrice"
R_NONPOS_PRICE = "non-positive UnitPrice"
R_BAD_DATE = "unparseable InvoiceDate"

_FLOAT_ID = re.compile(r"^(\d+)\.0*$")


def is_non_product_code(code: str) -> bool:
    """True for StockCodes that are not products: the explicit list, any code without a digit,
    and gift vouchers (`gift_0001_20`)."""
    c = code.strip().upper()
    return c in NON_PRODUCT_CODES or not any(ch.isdigit() for ch in c) or c.startswith("GIFT_")


def normalise_customer_id(raw: str) -> str:
    """`"17850.0"` -> `"17850"` (pandas exports of this file write ids as floats); else stripped."""
    s = raw.strip()
    m = _FLOAT_ID.match(s)
    return m.group(1) if m else s


def london_to_utc(raw: str) -> datetime:
    """Parse a naive UK wall-clock InvoiceDate and convert it to aware UTC.

    The shop's clock is Europe/London: GMT in winter (UTC+0), BST in summer (UTC+1), so
    `2011-06-01 10:00` -> `2011-06-01 09:00 UTC`.

    Raises:
        ValueError: the string matches none of the known formats.
    """
    s = raw.strip()
    for fmt in _DATE_FORMATS:
        try:
            naive = datetime.strptime(s, fmt)
        except ValueError:
            continue
        return naive.replace(tzinfo=LONDON).astimezone(UTC)
    raise ValueError(f"InvoiceDate {raw!r} matches none of {_DATE_FORMATS}")


def _classify(rec: dict[str, str]) -> tuple[str | None, int, float]:
    """Return (drop reason or None, quantity, unit price) for one line."""
    if not rec["CustomerID"].strip():
        return R_NO_CUSTOMER, 0, 0.0
    if rec["InvoiceNo"].strip().upper().startswith("C"):
        return R_CANCELLED, 0, 0.0
    try:
        qty = int(float(rec["Quantity"]))
    except (ValueError, OverflowError):  # "", "abc", "nan", "inf"
        return R_BAD_QTY, 0, 0.0
    if qty <= 0:
        return R_NONPOS_QTY, qty, 0.0
    if not rec["Description"].strip():
        return R_NO_DESC, qty, 0.0
    if is_non_product_code(rec["StockCode"]):
        return R_NON_PRODUCT, qty, 0.0
    try:
        price = float(rec["UnitPrice"])
    except ValueError:
        return R_BAD_PRICE, qty, 0.0
    if not math.isfinite(price):
        return R_BAD_PRICE, qty, 0.0
    if not price > 0:
        return R_NONPOS_PRICE, qty, price
    return None, qty, price


def load_online_retail(data_dir: Path) -> LoadResult:
    """Load and clean UCI Online Retail into purchase events and a product catalogue.

    Args:
        data_dir: the shared data folder (holding `online-retail/online_retail.csv.gz`) or the
            dataset folder itself.

    Returns:
        LoadResult: one `purchase` event per kept invoice line (user = CustomerID, item =
        StockCode, quantity in units, unit_price in GBP, basket_id = InvoiceNo, timestamp
        converted from Europe/London to UTC); one CatalogItem per StockCode kept, titled with
        its most frequent Description and priced at its median unit price (GBP). Row numbers in
        the report are 1-based data lines (header excluded).

    Raises:
        FileNotFoundError: the CSV is not there.
        ValueError: the header is not the UCI column layout.
    """
    path = resolve_file(data_dir, SUBDIR, FILENAME)
    report = LoadReport(dataset=DATASET)
    sink = RowSink(report)
    titles: dict[str, Counter[str]] = defaultdict(Counter)
    prices: dict[str, list[float]] = defaultdict(list)
    date_cache: dict[str, datetime | None] = {}
    with open_text(path) as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != COLUMNS:
            raise ValueError(f"{path}: expected header {','.join(COLUMNS)}, got {header}")
        for row, fields in enumerate(reader, start=1):
            report.rows_read += 1
            if len(fields) != len(COLUMNS):
                report.drop(R_MALFORMED, row)
                continue
            rec = dict(zip(COLUMNS, fields, strict=True))
            reason, qty, price = _classify(rec)
            if reason is not None:
                report.drop(reason, row)
                continue
            raw_date = rec["InvoiceDate"]
            if raw_date not in date_cache:
                try:
                    date_cache[raw_date] = london_to_utc(raw_date)
                except ValueError:
                    date_cache[raw_date] = None
            ts = date_cache[raw_date]
            if ts is None:
                report.drop(R_BAD_DATE, row)
                continue
            code = rec["StockCode"].strip()
            ev = sink.event(
                row,
                user_id=normalise_customer_id(rec["CustomerID"]),
                item_id=code,
                event_type="purchase",
                timestamp=ts,
                quantity=qty,
                unit_price=price,
                basket_id=rec["InvoiceNo"].strip(),
            )
            if ev is not None:
                titles[code][" ".join(rec["Description"].split())] += 1
                prices[code].append(price)

    conflicts = 0
    for code, counts in titles.items():
        conflicts += len(counts) > 1
        # most_common is stable: ties go to the description seen first.
        sink.item(
            0,
            item_id=code,
            title=counts.most_common(1)[0][0],
            price=round(statistics.median(prices[code]), 2),
        )
    report.notes += [
        "InvoiceDate is UK wall-clock time: read as Europe/London and converted to UTC "
        "(summer/BST lines move back 1 h)",
        "unit_price and catalogue price are GBP; catalogue price is the median kept unit price",
        f"{conflicts} StockCodes had several descriptions; the catalogue title is the most "
        "frequent one",
        f"{report.duplicates_collapsed} exact duplicate lines (same invoice, code, quantity, "
        "price, time) collapsed into one event",
    ]
    return sink.result()
