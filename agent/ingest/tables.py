"""Reading a user's files: CSV/TSV (a header row, or names given with `--header`) and JSON
Lines, each optionally gzipped, as (row number, record) with the file's columns known up front.
"""

from __future__ import annotations

import csv
import itertools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent.domain.errors import RequestError
from agent.ingest._common import jsonl_rows, open_text
from agent.ingest.report import LoadReport

R_BAD_CSV = "CSV row has more fields than the header"
PEEK_ROWS = 1_000  # JSON lines read ahead to learn the keys (columns) before mapping
NUMBER = re.compile(r"^[+-]?\d+(\.\d+)?([eE][+-]?\d+)?$")


def file_format(path: Path) -> str:
    name = path.name.lower().removesuffix(".gz")
    for ext, fmt in ((".csv", "csv"), (".tsv", "tsv"), (".jsonl", "jsonl"), (".ndjson", "jsonl"),
                     (".json", "jsonl")):
        if name.endswith(ext):
            return fmt
    raise ValueError(
        f"{path}: unknown format; use .csv, .tsv, .jsonl or .ndjson (optionally .gz)"
    )


class Table:
    """One input file, opened: its columns (CSV header, `header`, or the keys of the first JSON lines)
    and its records. CSV cells are stripped and empty ones treated as absent, so model defaults
    apply; JSON nulls and empty strings likewise."""

    def __init__(self, path: Path, report: LoadReport, header: list[str] | None = None):
        """Open `path` and learn its columns.

        Raises:
            ValueError: an unknown format.
            RequestError: a first row that looks like data (`check_header`), or `header` given
                for a JSON-lines file (its keys name the columns).
        """
        self.path, self.report, self.fmt = path, report, file_format(path)
        if header is not None and self.fmt == "jsonl":
            raise RequestError(f"{path.name}: --header names the columns of a headerless CSV/TSV; JSON lines "
                               "name theirs (map them with --map)", param="mapping.header")
        self._fh = open_text(path)
        self.seen: dict[str, None] = {}  # every column met, in order (JSON keys can appear late)
        try:
            self._open(header)
        except BaseException:
            self._fh.close()
            raise

    def _open(self, header: list[str] | None) -> None:
        path, report = self.path, self.report
        if self.fmt == "jsonl":
            self._json = jsonl_rows(self._fh, report)
            self._head = list(itertools.islice(self._json, PEEK_ROWS))
            for _, rec in self._head:
                self.seen.update(dict.fromkeys(rec))
        else:
            delim = "\t" if self.fmt == "tsv" else ","
            self._csv = csv.DictReader(self._fh, delimiter=delim, fieldnames=header)
            names = [c.strip() for c in self._csv.fieldnames or []]
            if header is None:
                check_header(path, names)
            self.seen.update(dict.fromkeys(names))

    def __enter__(self) -> Table:
        return self

    def __exit__(self, *exc: object) -> None:
        self._fh.close()

    @property
    def columns(self) -> list[str]:
        return list(self.seen)

    def rows(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """(1-based row number, record): CSV rows exclude the header; JSON rows are file lines."""
        try:
            if self.fmt == "jsonl":
                for row, rec in itertools.chain(self._head, self._json):
                    self.seen.update(dict.fromkeys(rec))
                    yield row, {k: v for k, v in rec.items() if v is not None and v != ""}
                return
            for row, raw in enumerate(self._csv, start=1):
                self.report.rows_read += 1
                if None in raw:
                    self.report.drop(R_BAD_CSV, row)
                    continue
                yield row, {k.strip(): v.strip() for k, v in raw.items()
                            if k is not None and v is not None and v.strip()}
        finally:
            self._fh.close()


def check_header(path: Path, names: list[str]) -> None:
    """A first row with an empty, repeated or numeric name is data, not a header.

    Raises:
        RequestError: the message shows the row and the `--header` flag to name the columns.
    """
    odd = [n for n in names if not n or NUMBER.match(n) or names.count(n) > 1]
    if names and odd:
        example = ",".join(f"col{i + 1}" for i in range(len(names)))
        raise RequestError(
            f"{path.name}: the first row looks like data, not column names ({', '.join(names[:8])}"
            f"{', ...' if len(names) > 8 else ''}); if the file has no header row, name its "
            f"{len(names)} columns in order with --header, e.g. --header {example}",
            param="mapping.header")
