"""Command-line options several `shoplens` commands share, and the closed value sets they take.

Options with a fixed set of values are `Literal` types, so `--help` shows the choices
(``<1.5b|0.5b>``) and a wrong value is refused before anything runs. Each set mirrors a
registry elsewhere (`agent.ingest.LOADERS`, `agent.llm.servers.embedded.PROFILES`, ...);
tests/test_cli_help.py checks that they stay equal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

# agent.ingest.LOADERS: the real datasets `shoplens ingest` knows.
IngestDataset = Literal["online-retail", "amazon-games", "amazon-industrial", "amazon-beauty", "taobao"]
# agent.llm.servers.embedded.PROFILES: the packaged GGUF models.
ModelProfile = Literal["1.5b", "0.5b"]

Workspace = Annotated[Path | None, typer.Option(help="workspace folder (default ./var; env SHOPLENS_WORKSPACE)")]
DataDir = Annotated[Path | None, typer.Option(help="shared data folder (default ../shared/data)")]
Profile = Annotated[ModelProfile | None, typer.Option(help="embedded model profile (default: 1.5b)")]
NoLLM = Annotated[bool, typer.Option("--no-llm", help="answer without the model (baseline + template reasons)")]
