"""The --time-format hint (agent/ingest/timeforms.py): an unreadable timestamp's error names a
strptime form that reads that very value, and the day-first one when the value cannot tell."""

from __future__ import annotations

from datetime import datetime

import pytest

from agent.ingest.timeforms import TimeReader, format_hint, guess_format


@pytest.mark.parametrize(("value", "guess"), [
    ("3/14/2021 8:26:11", ("%m/%d/%Y %H:%M:%S", None)),  # seconds kept (the old fixed example dropped them)
    ("14/3/2021 08:26", ("%d/%m/%Y %H:%M", None)),
    ("12/1/2010 8:26", ("%m/%d/%Y %H:%M", "%d/%m/%Y %H:%M")),  # Online Retail: month or day first?
    ("3/4/21 8:26PM", ("%m/%d/%y %I:%M%p", "%d/%m/%y %I:%M%p")),
    ("2021.03.14", ("%Y.%m.%d", None)),
    ("2021-03-14T08:26:11.5", ("%Y-%m-%dT%H:%M:%S.%f", None)),
    ("yesterday", None),
    ("13/13/2021", None),  # no month reads it
])
def test_the_guess_reads_the_value(value: str, guess: tuple[str, str | None] | None) -> None:
    assert guess_format(value) == guess
    for form in guess or ():
        if form:
            datetime.strptime(value, form)  # each suggested form really reads it


def test_the_error_names_the_form_for_the_failing_value() -> None:
    reader = TimeReader()
    with pytest.raises(ValueError, match=r"--time-format, e\.g\. '%d/%m/%Y %H:%M:%S'$"):
        reader.parse("31/12/2019 23:59:58")
    assert format_hint("no date here") == "e.g. '%d/%m/%Y %H:%M'"
