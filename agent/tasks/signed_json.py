"""A fitted artifact as JSON with the sha256 of its content: ``fusion.json`` and ``llm_weight.json``.

Both are dataclasses with a ``dataset`` field, written beside a dataset's indexes by ``shoplens
train``. The sha256 covers every field except those a caller leaves out (the fit's timestamp,
runtime-only state), so an edited file is refused rather than served.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol, TypeVar

from agent.domain.errors import ArtifactMismatchError


class Signed(Protocol):
    """A dataclass fitted for one dataset, with its content hash."""

    dataset: str

    def sha256(self) -> str: ...


S = TypeVar("S", bound=Signed)


def content_sha256(obj: Any, exclude: Collection[str]) -> str:
    """sha256 (hex) of a dataclass's fields but `exclude`, as sorted-key JSON."""
    body = json.dumps({k: v for k, v in asdict(obj).items() if k not in exclude}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def write_signed(obj: Signed, path: Path, exclude: Collection[str] = ()) -> Path:
    """Write `obj`'s fields but `exclude`, plus ``"sha256": obj.sha256()``, to `path` (its folder
    is created); returns `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {k: v for k, v in asdict(obj).items() if k not in exclude}  # type: ignore[call-overload]
    path.write_text(json.dumps({**body, "sha256": obj.sha256()}, indent=2), encoding="utf-8")
    return path


def read_signed(path: Path, cls: type[S]) -> tuple[S, str | None]:
    """(the object as written, its stored sha256), without checks.

    Raises:
        FileNotFoundError: no file.
    """
    d = json.loads(path.read_text(encoding="utf-8"))
    stored = d.pop("sha256", None)
    return cls(**d), stored


def load_signed(path: Path, cls: type[S], dataset: str, fix: str) -> S:
    """`read_signed`, checked: the content matches its sha256 and was fitted for `dataset`.

    Args:
        fix: what the user should do, appended to each error (e.g. "re-run `shoplens train ...`").

    Raises:
        ArtifactMismatchError: edited file (sha256) or another dataset; the message names the fix.
    """
    obj, stored = read_signed(path, cls)
    if obj.sha256() != stored:
        raise ArtifactMismatchError(f"{path}: sha256 does not match its content; {fix}")
    if obj.dataset != dataset:
        raise ArtifactMismatchError(f"{path} was fitted for dataset {obj.dataset!r}, not {dataset!r}; {fix}")
    return obj
