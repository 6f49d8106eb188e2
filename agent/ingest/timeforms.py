"""Timestamps as real exports write them, read into aware UTC datetimes, each form counted.

Built-in forms (no flag needed): unix seconds and milliseconds (numbers; milliseconds detected by
magnitude), ISO-8601 (``2019-10-01T00:00:00Z``, ``+00:00`` or ``+0000`` offsets, a space instead
of the ``T``), a trailing zone name ``UTC``/``GMT`` (``2019-10-01 00:00:00 UTC``, the REES46
clickstream's form), and dates only (``2019-10-01``, midnight UTC). Anything else needs a strptime
format (`--time-format`, e.g. ``%m/%d/%Y %H:%M`` for UCI Online Retail's ``12/1/2010 8:26``).
A time without an offset is taken as UTC and counted, so the report can say so.
"""

from __future__ import annotations

import re
from collections import Counter
from datetime import datetime

from agent.domain.schemas import parse_timestamp

_ZONE_NAME = re.compile(r"\s*(?:UTC|GMT|Z)$", re.IGNORECASE)
_SPACED_OFFSET = re.compile(r"\s+([+-]\d{2}:?\d{2})$")
_DATE_ONLY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_NUMBER = re.compile(r"^[+-]?\d+(\.\d+)?$")
_MS_THRESHOLD = 1e11  # as agent.domain.schemas: milliseconds pass it, seconds never do


class TimeReader:
    """Parses one column's timestamps and counts the forms it saw.

    Args:
        time_format: a strptime format tried first (then the built-in forms), or None.

    Attributes:
        forms: {form: count} of parsed values (``unix seconds``, ``ISO-8601``, ``date only``, ...).
        naive: how many parsed values carried no offset (taken as UTC).
        failed: how many values no form read.
        first_failure: the first unreadable value, for the report.
    """

    def __init__(self, time_format: str | None = None):
        self.time_format = time_format
        self.forms: Counter[str] = Counter()
        self.naive = 0
        self.failed = 0
        self.first_failure: str | None = None

    def parse(self, value: object) -> datetime:
        """`value` as an aware UTC datetime.

        Raises:
            ValueError: no form reads it, or it is implausible (before 1995, in the future); the
                message says which and suggests `--time-format`.
        """
        try:
            ts, form, naive = self._parse(value)
        except ValueError as e:
            self.failed += 1
            if self.first_failure is None:
                self.first_failure = str(value)
            hint = "" if self.time_format else "; give its strptime form with --time-format, e.g. '%d/%m/%Y %H:%M'"
            raise ValueError(f"{e}{hint}") from e
        self.forms[form] += 1
        self.naive += naive
        return ts

    def _parse(self, value: object) -> tuple[datetime, str, bool]:
        if isinstance(value, datetime):
            return parse_timestamp(value), "datetime", value.tzinfo is None
        if isinstance(value, int | float) and not isinstance(value, bool):
            return parse_timestamp(value), _unit(float(value)), False
        s = str(value).strip()
        if self.time_format is not None:
            try:
                dt = datetime.strptime(s, self.time_format)
            except ValueError as e:
                raise ValueError(f"timestamp {s!r} does not match --time-format {self.time_format!r}") from e
            return parse_timestamp(dt), f"with --time-format {self.time_format!r}", dt.tzinfo is None
        if _NUMBER.match(s):
            return parse_timestamp(s), _unit(float(s)), False
        if _DATE_ONLY.match(s):
            return parse_timestamp(s), "date only", True
        iso, form = s, "ISO-8601"
        if _ZONE_NAME.search(s) and not s.endswith("Z"):
            iso, form = _ZONE_NAME.sub("+00:00", s), "date-time with a UTC suffix"
        iso = _SPACED_OFFSET.sub(r"\1", iso)
        ts = parse_timestamp(iso.replace("Z", "+00:00") if iso.endswith("Z") else iso)
        naive = datetime.fromisoformat(iso.replace("Z", "+00:00")).tzinfo is None
        return ts, form, naive

    def describe(self) -> str:
        """One line for the report: the forms seen with counts, and the naive ones."""
        forms = ", ".join(f"{n:,} {form}" for form, n in self.forms.most_common()) or "none parsed"
        naive = f"; {self.naive:,} without an offset, taken as UTC" if self.naive else ""
        failed = (f"; {self.failed:,} unreadable (e.g. {self.first_failure!r}: give --time-format)"
                  if self.failed else "")
        return f"timestamps: {forms}{naive}{failed}"


def _unit(num: float) -> str:
    return "unix milliseconds" if abs(num) > _MS_THRESHOLD else "unix seconds"

