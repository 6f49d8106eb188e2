"""Alibaba Taobao UserBehavior (Tianchi 649; Zhu et al., KDD 2018), first 84,475 rows.

No header: `user_id,item_id,category_id,behavior_type,timestamp`, behaviour in pv|cart|fav|buy
(mapped onto view|cart|favourite|purchase by `EVENT_ALIASES`), timestamp in unix seconds.
"""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from datetime import datetime, timedelta, timezone
from pathlib import Path

from agent.ingest._common import LoadResult, RowSink, open_text, resolve_file
from agent.ingest.report import LoadReport

DATASET = "taobao"
SUBDIR = "taobao-userbehavior"
FILENAME = "UserBehavior_head84k.csv"
N_FIELDS = 5
CHINA = timezone(timedelta(hours=8), "China Standard Time")
# The official collection window, 2017-11-25 00:00 .. 2017-12-03 24:00 China time.
WINDOW_START = datetime(2017, 11, 25, tzinfo=CHINA)
WINDOW_END = datetime(2017, 12, 4, tzinfo=CHINA)

R_MALFORMED = "truncated or malformed line (expected 5 fields)"


def load_taobao(data_dir: Path) -> LoadResult:
    """Load the Taobao UserBehavior head slice into multi-behaviour events.

    Args:
        data_dir: the shared data folder (holding `taobao-userbehavior/`) or that folder itself.

    Returns:
        LoadResult: one event per line (view/cart/favourite/purchase; timestamps from unix
        seconds, milliseconds detected by magnitude); one CatalogItem per item with the title
        `Taobao item {item_id} (category {category_id})` and category = category id (the data has
        no titles). Rows outside the official window are kept and counted in a note. Row numbers
        are 1-based file lines (there is no header).

    Raises:
        FileNotFoundError: the CSV is not there.
    """
    path = resolve_file(data_dir, SUBDIR, FILENAME)
    report = LoadReport(dataset=DATASET)
    sink = RowSink(report)
    categories: dict[str, Counter[str]] = defaultdict(Counter)
    outside: list[int] = []
    with open_text(path) as fh:
        for row, fields in enumerate(csv.reader(fh), start=1):
            report.rows_read += 1
            if len(fields) != N_FIELDS or not all(f.strip() for f in fields):
                report.drop(R_MALFORMED, row)
                continue
            user_id, item_id, category_id, behaviour, ts = (f.strip() for f in fields)
            ev = sink.event(
                row, user_id=user_id, item_id=item_id, event_type=behaviour, timestamp=ts
            )
            if ev is None:
                continue
            categories[item_id][category_id] += 1
            if not WINDOW_START <= ev.timestamp < WINDOW_END:
                outside.append(row)

    multi = 0
    for item_id, counts in categories.items():
        multi += len(counts) > 1
        category_id = counts.most_common(1)[0][0]
        sink.item(
            0,
            item_id=item_id,
            title=f"Taobao item {item_id} (category {category_id})",
            category=category_id,
        )
    report.notes.append(
        f"{len(outside)} events fall outside the official window 2017-11-25..2017-12-03 "
        f"(China time, UTC+8); kept (e.g. rows {outside[:5]})"
    )
    report.notes.append(
        "no titles in the data: item title is 'Taobao item <id> (category <category_id>)'"
    )
    if multi:
        report.notes.append(
            f"{multi} items appear under several categories; the most frequent one is used"
        )
    return sink.result()
