"""Evaluation protocols: turn a dataset into ranking cases.

The one protocol here is LLMRank's (Hou et al., "Large Language Models are Zero-Shot Rankers
for Recommender Systems", ECIR 2024; RUCAIBox/LLMRank, MIT) on its preprocessed Amazon
"Video_Games" data (Ni, Li & McAuley, EMNLP 2019): for each listed user take the candidate
line, remove the ground-truth item if present, keep the first ``n_candidates - 1``, append the
ground truth, shuffle, rank the ``n_candidates`` and report NDCG@K / HR@K x100.

Position-bias variants put the ground truth first or last instead of shuffling, to measure how
much a ranker depends on where the answer sits in the prompt (LLMRank Sec. 4.2).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Position = Literal["shuffle", "first", "last"]

DEFAULT_SEED = 2023  # LLMRank's configs fix seed 2023; our per-case shuffles derive from it


@dataclass(frozen=True)
class UserSequence:
    """One LLMRank test line: a user's chronological history (<= 50 ids) and held-out target."""

    user_id: str
    history: tuple[str, ...]
    target: str


@dataclass(frozen=True)
class RankingCase:
    """One ranking case: rank ``candidates`` for ``user_id`` given ``history``.

    Attributes:
        user_id: dataset user id.
        history: item ids, chronological (oldest first).
        candidates: item ids in the order shown to the ranker; contains ``target`` exactly once.
        target: the ground-truth next item.
        seed: the seed this case's order was derived from (see :func:`case_rng`).
        position: which variant placed the target (``shuffle``, ``first``, ``last``).
        source: where the negatives came from (``random``, ``bm25``, ...), for reports.
    """

    user_id: str
    history: tuple[str, ...]
    candidates: tuple[str, ...]
    target: str
    seed: int = DEFAULT_SEED
    position: Position = "shuffle"
    source: str = ""
    meta: Mapping[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        n_target = self.candidates.count(self.target)
        if n_target != 1:
            raise ValueError(
                f"case for user {self.user_id}: target {self.target} appears {n_target} times "
                f"in {len(self.candidates)} candidates (must be exactly once)"
            )
        if len(set(self.candidates)) != len(self.candidates):
            raise ValueError(f"case for user {self.user_id}: duplicate candidate ids")

    @property
    def target_index(self) -> int:
        """0-based position of the target in ``candidates``."""
        return self.candidates.index(self.target)


def case_rng(seed: int, user_id: str) -> random.Random:
    """The RNG for one case: depends only on (seed, user_id), not on the order of users.

    ``random.Random`` seeds a ``str`` through SHA-512, so this is stable across runs,
    processes and Python versions >= 3.2.
    """
    return random.Random(f"{seed}:{user_id}")


def llmrank_cases(
    interactions: Mapping[str, UserSequence],
    candidates_by_user: Mapping[str, Sequence[str]],
    users: Iterable[str] | None = None,
    n_candidates: int = 20,
    seed: int = DEFAULT_SEED,
    position: Position = "shuffle",
    source: str = "",
) -> list[RankingCase]:
    """Build LLMRank ranking cases.

    For each user: take the candidate line, remove the ground truth if present, keep the first
    ``n_candidates - 1``, append the ground truth, then shuffle with :func:`case_rng`
    (``position="shuffle"``, the published protocol) or put the ground truth first / last
    (position-bias variants; the negatives keep their file order).

    Args:
        interactions: user id -> sequence (from :func:`load_llmrank_interactions`).
        candidates_by_user: user id -> candidate ids in file order.
        users: which users, in output order; default: every user of ``candidates_by_user``.
        n_candidates: candidates per case, ground truth included (LLMRank: 20).
        seed: base seed; each case's shuffle depends only on (seed, user id).
        position: ``shuffle``, ``first`` or ``last``.
        source: a label for the candidate source, copied into each case.

    Returns:
        One case per user, in the order of ``users``.

    Raises:
        KeyError: a listed user has no interactions or no candidate line.
        ValueError: a candidate line has fewer than ``n_candidates - 1`` negatives.
    """
    if n_candidates < 1:
        raise ValueError(f"n_candidates must be >= 1, got {n_candidates}")
    user_list = list(candidates_by_user) if users is None else list(users)
    cases: list[RankingCase] = []
    for uid in user_list:
        if uid not in interactions:
            raise KeyError(f"user {uid} has a candidate line but no interactions")
        if uid not in candidates_by_user:
            raise KeyError(f"user {uid} has no candidate line")
        seq = interactions[uid]
        negatives = [c for c in candidates_by_user[uid] if c != seq.target][: n_candidates - 1]
        if len(negatives) < n_candidates - 1:
            raise ValueError(
                f"user {uid}: {len(negatives)} negatives after removing the target, "
                f"need {n_candidates - 1}"
            )
        if position == "shuffle":
            ordered = [*negatives, seq.target]
            case_rng(seed, uid).shuffle(ordered)
        elif position == "first":
            ordered = [seq.target, *negatives]
        elif position == "last":
            ordered = [*negatives, seq.target]
        else:
            raise ValueError(f"unknown position {position!r}")
        cases.append(
            RankingCase(
                user_id=uid,
                history=seq.history,
                candidates=tuple(ordered),
                target=seq.target,
                seed=seed,
                position=position,
                source=source,
            )
        )
    return cases


# --- loaders ---------------------------------------------------------------------------------
# Parsing lives in agent/ingest/amazon_games.py; these adapt its output to the harness's types.


def load_llmrank_interactions(data_dir: Path) -> dict[str, UserSequence]:
    """User id -> :class:`UserSequence` from ``Games-6k.test.inter.gz`` (50,546 users).

    Args:
        data_dir: the shared data folder (holding ``amazon-games/``) or that folder itself.

    Raises:
        FileNotFoundError, ValueError: as ``agent.ingest.amazon_games.read_llmrank_interactions``.
    """
    from agent.ingest.amazon_games import read_llmrank_interactions

    return {u: UserSequence(u, tuple(h), t) for u, h, t in read_llmrank_interactions(data_dir)}


def load_llmrank_candidates(path: Path) -> dict[str, list[str]]:
    """User id -> candidate ids in file order (``Games-200/Games.<source>``, ``Games-6k.*.gz``).

    Raises:
        FileNotFoundError, ValueError: as ``agent.ingest.amazon_games.read_llmrank_candidates``.
    """
    from agent.ingest.amazon_games import read_llmrank_candidates

    return read_llmrank_candidates(path)


def load_llmrank_titles(data_dir: Path) -> dict[str, str]:
    """Item id -> title from ``Games.item``, HTML entities unescaped."""
    from agent.ingest.amazon_games import read_llmrank_items

    return read_llmrank_items(data_dir)
