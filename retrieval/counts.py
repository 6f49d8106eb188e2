"""Signed count deltas applied to stored counts: the one rule the incremental updates of
popularity and co-visitation share (`Popularity.updated`, `CoVisitation.updated`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

N = TypeVar("N", int, float)


def added(base: Mapping[str, N], delta: Mapping[str, N], *, floor: float = 0) -> dict[str, N]:
    """A new dict: `base` plus `delta` per key, where a key whose sum is at or below `floor` is
    left out (as a fit never stores a zero count). `base` is not changed.

    Args:
        base: counts per key, all above `floor`.
        delta: signed changes per key (keys absent from `base` start from 0).
        floor: the threshold; float counts pass a small epsilon for rounding.
    """
    out = dict(base)
    for key, d in delta.items():
        n = out.get(key, 0) + d
        if n > floor:
            out[key] = n
        else:
            out.pop(key, None)
    return out
