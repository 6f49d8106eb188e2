"""Command-line options several `shoplens` commands share, the closed value sets they take, and
the one stderr line a degraded answer gets (`note_degraded`).

Options with a fixed set of values are `Literal` types, so `--help` shows the choices
(``<1.5b|0.5b>``) and a wrong value is refused before anything runs. Each set mirrors a
registry elsewhere (`agent.ingest.LOADERS`, `agent.llm.servers.embedded.PROFILES`, ...);
tests/test_cli_help.py checks that they stay equal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Protocol

import typer

# agent.ingest.LOADERS: the real datasets `shoplens ingest` knows.
IngestDataset = Literal["online-retail", "amazon-games", "amazon-industrial", "amazon-beauty", "taobao"]
# agent.domain.schemas.EVENT_TYPES: what `shoplens ingest --event-type` may set for every row.
EventTypeChoice = Literal["view", "click", "cart", "remove_from_cart", "favourite", "purchase", "review"]
# agent.llm.servers.embedded.PROFILES: the packaged GGUF models.
ModelProfile = Literal["1.5b", "0.5b"]

Workspace = Annotated[Path | None, typer.Option(help="workspace folder (default ./var; env SHOPLENS_WORKSPACE)")]
DataDir = Annotated[Path | None, typer.Option(help="shared data folder (default ../shared/data)")]
Profile = Annotated[ModelProfile | None, typer.Option(help="embedded model profile (default: 1.5b)")]
NoLLM = Annotated[bool, typer.Option("--no-llm", help="answer without the model (baseline + template reasons)")]

# How a user's own export maps onto events: the same flags for `shoplens ingest --events` and
# `shoplens recommend --events` (agent.ingest.mapping.build_column_map; docs/your-data.md).
MapFlags = Annotated[list[str] | None, typer.Option(
    "--map", help="COLUMN=FIELD, repeatable (e.g. --map event_time=timestamp); a column named like a "
    "field needs none")]
MapFile = Annotated[Path | None, typer.Option(help="a YAML/JSON mapping file (see docs/your-data.md); "
                                              "--map flags override it")]
Header = Annotated[str | None, typer.Option(help="a headerless CSV: its column names, comma-separated")]
TimeFormat = Annotated[str | None, typer.Option(
    help="strptime format for timestamps the built-in forms do not read, e.g. '%m/%d/%Y %H:%M'")]
OrderColumn = Annotated[str | None, typer.Option(
    help="no timestamps: a column that orders each user's rows (times become synthetic, labelled)")]
FileOrder = Annotated[bool, typer.Option(
    "--file-order", help="no timestamps: each user's rows are in file order (times become synthetic)")]
RowEventType = Annotated[EventTypeChoice | None, typer.Option(
    help="the event type of rows without one: every row of a file without a type column, or the "
    "blank cells of its type column (a filled cell keeps its value)")]


class _Degradable(Protocol):
    degraded: bool
    degraded_reason: str | None


def note_degraded(meta: _Degradable, what: str = "answer") -> None:
    """Nothing silent: one line on stderr when an answer is degraded (a baseline or template
    fallback, `meta.degraded`), naming why; stdout's JSON keeps `meta.degraded` and its reason."""
    if meta.degraded:
        typer.echo(f"note: degraded {what}: {meta.degraded_reason or 'no reason recorded'}", err=True)
