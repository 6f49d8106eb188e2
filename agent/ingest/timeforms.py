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
_DATE_TIME = re.compile(r"(\d{1,4})([/.\-])(\d{1,2})\2(\d{2,4})(?:([ T])(\d{1,2}):(\d{2})(:\d{2})?(\.\d+)?"
                        r"(\s*[AaPp][Mm])?)?")


def guess_format(value: str) -> tuple[str, str | None] | None:
    """The strptime form that reads `value` (a day/month/year date, optionally with a time), and
    the day-first alternative when the value cannot tell month from day (both parts <= 12);
    None when no such form reads it. '3/14/2021 8:26:11' -> ('%m/%d/%Y %H:%M:%S', None)."""
    m = _DATE_TIME.fullmatch(value.strip())
    if not m:
        return None
    a, sep, b, c = m.group(1), m.group(2), m.group(3), m.group(4)
    t = ""
    if m.group(5):
        t = (f"{m.group(5)}{'%I' if m.group(10) else '%H'}:%M" + (":%S" if m.group(8) else "")
             + (".%f" if m.group(9) else "") + (f"{m.group(10)[:-2]}%p" if m.group(10) else ""))
    year = "%Y" if len(c) == 4 else "%y"
    if len(a) == 4:
        forms = [f"%Y{sep}%m{sep}%d"]
    elif int(a) > 12:
        forms = [f"%d{sep}%m{sep}{year}"]
    elif int(b) > 12:
        forms = [f"%m{sep}%d{sep}{year}"]
    else:
        forms = [f"%m{sep}%d{sep}{year}", f"%d{sep}%m{sep}{year}"]
    ok = []
    for f in forms:
        try:
            datetime.strptime(value.strip(), f + t)
        except ValueError:
            continue
        ok.append(f + t)
    if not ok:
        return None
    return ok[0], (ok[1] if len(ok) > 1 else None)


def format_hint(value: str) -> str:
    """'e.g. '%m/%d/%Y %H:%M:%S'' for a value `guess_format` reads (naming the day-first form
    when both fit), else a generic example."""
    g = guess_format(value)
    if g is None:
        return "e.g. '%d/%m/%Y %H:%M'"
    first, other = g
    return f"e.g. '{first}'" + (f" (or '{other}' if the day comes first)" if other else "")


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
            hint = "" if self.time_format else f"; give its strptime form with --time-format, {format_hint(str(value))}"
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

