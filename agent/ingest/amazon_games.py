"""Amazon 2018 "Video_Games" as preprocessed by LLMRank (Hou et al., ECIR 2024; RUCAIBox/LLMRank).

Files (tab-separated, RecBole atomic-file headers such as `user_id:token` on some of them):
`Games.item` (`item_id \\t title`), `Games-6k.test.inter.gz` (`user_id \\t history \\t target`),
candidate files `Games-6k.random.gz`, `Games-6k.pop.gz`, `Games-200/Games.<source>`
(`user_id \\t space-separated candidate ids`). No timestamps, ratings or text survive.
"""

from __future__ import annotations

import html
from collections.abc import Iterator
from pathlib import Path

from agent.ingest._common import (
    SYNTHETIC_NOTE,
    LoadResult,
    RowSink,
    open_text,
    resolve_file,
    sequence_events,
)
from agent.ingest.report import LoadReport

DATASET = "amazon-games"
SUBDIR = "amazon-games"
ITEM_FILE = "Games.item"
INTER_FILE = "Games-6k.test.inter.gz"


def _is_header(fields: list[str]) -> bool:
    """RecBole atomic-file headers look like `user_id:token`; data lines are numeric ids."""
    return any(":token" in f or ":float" in f for f in fields)


def _lines(path: Path) -> Iterator[tuple[int, list[str]]]:
    """Yield (1-based line number, tab-split fields), skipping a header line and blank lines."""
    with open_text(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if lineno == 1 and _is_header(fields):
                continue
            yield lineno, fields


def read_llmrank_items(data_dir: Path) -> dict[str, str]:
    """Read `Games.item` into {item_id: title}, HTML entities unescaped, whitespace collapsed.

    Raises:
        FileNotFoundError: the file is not there.
        ValueError: a line does not have 2 tab-separated fields (message names path:line).
    """
    path = resolve_file(data_dir, SUBDIR, ITEM_FILE)
    items: dict[str, str] = {}
    for lineno, fields in _lines(path):
        if len(fields) != 2:
            raise ValueError(f"{path}:{lineno}: expected 'item_id<TAB>title', got {fields!r}")
        items[fields[0].strip()] = " ".join(html.unescape(fields[1]).split())
    return items


def read_llmrank_interactions(data_dir: Path) -> list[tuple[str, list[str], str]]:
    """Read the leave-one-out test cases of `Games-6k.test.inter.gz`.

    Args:
        data_dir: the shared data folder (holding `amazon-games/`) or that folder itself.

    Returns:
        One `(user_id, history item ids oldest first (<= 50), target item id)` per user, in
        file order (50,546 users in the shared copy).

    Raises:
        FileNotFoundError: the file is not there.
        ValueError: a line does not have 3 tab-separated fields or has an empty target.
    """
    path = resolve_file(data_dir, SUBDIR, INTER_FILE)
    cases: list[tuple[str, list[str], str]] = []
    for lineno, fields in _lines(path):
        if len(fields) != 3 or not fields[0].strip() or not fields[2].strip():
            raise ValueError(
                f"{path}:{lineno}: expected 'user_id<TAB>history ids<TAB>target id', "
                f"got {fields!r}"
            )
        cases.append((fields[0].strip(), fields[1].split(), fields[2].strip()))
    return cases


def read_llmrank_candidates(path: Path) -> dict[str, list[str]]:
    """Read an LLMRank candidate file: `user_id \\t space-separated candidate item ids`.

    Works for `Games-6k.random.gz`, `Games-6k.pop.gz` and `Games-200/Games.<source>`. Candidate
    order and any repeated ids are kept as in the file (the protocol removes the ground truth,
    keeps the first 19 and appends it).

    Returns:
        {user_id: candidate item ids} in file order (100 per user, 21 for
        `rabmbepobpgrsa_3`).

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: a malformed line or a user listed twice (message names path:line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    out: dict[str, list[str]] = {}
    for lineno, fields in _lines(path):
        if len(fields) != 2 or not fields[0].strip():
            raise ValueError(f"{path}:{lineno}: expected 'user_id<TAB>ids', got {fields!r}")
        user = fields[0].strip()
        if user in out:
            raise ValueError(f"{path}:{lineno}: user {user!r} listed twice")
        out[user] = fields[1].split()
    return out


def load_amazon_games(data_dir: Path) -> LoadResult:
    """Load LLMRank's Games users as purchase sequences plus the Games catalogue.

    Each user's history items and then the target item become `purchase` events. The data has
    no timestamps, so the n-th interaction (0-based) gets the synthetic time
    2018-01-01 UTC + n days; only the order is real. The target is the user's last event: an
    evaluation must hold it out (see `read_llmrank_interactions`).

    Args:
        data_dir: the shared data folder (holding `amazon-games/`) or that folder itself.

    Returns:
        LoadResult with ~440k events (50,546 users) and 16,859 items. Row numbers in the report
        are 1-based lines of the interaction file (items: of `Games.item`).

    Raises:
        FileNotFoundError: a file is not there.
        ValueError: a malformed line (see the readers).
    """
    report = LoadReport(dataset=DATASET)
    sink = RowSink(report)
    titles = read_llmrank_items(data_dir)
    for n, (item_id, title) in enumerate(titles.items(), start=1):
        sink.item(n, item_id=item_id, title=title)
    cases = read_llmrank_interactions(data_dir)
    unknown: set[str] = set()
    for row, (user_id, history, target) in enumerate(cases, start=1):
        report.rows_read += 1
        unknown |= sequence_events(sink, row, user_id, [*history, target])
    report.notes += [
        f"no timestamps in the LLMRank files: {SYNTHETIC_NOTE}",
        "history items and the target are all 'purchase' events (no review text survives); "
        "the target is each user's last event",
        f"rows_read counts users (one line each); {len(unknown)} event item ids are missing "
        "from Games.item",
    ]
    return sink.result()
