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


class _Degradable(Protocol):
    degraded: bool
    degraded_reason: str | None


def note_degraded(meta: _Degradable, what: str = "answer") -> None:
    """Nothing silent: one line on stderr when an answer is degraded (a baseline or template
    fallback, `meta.degraded`), naming why; stdout's JSON keeps `meta.degraded` and its reason."""
    if meta.degraded:
        typer.echo(f"note: degraded {what}: {meta.degraded_reason or 'no reason recorded'}", err=True)
