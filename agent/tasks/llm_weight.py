"""The model's share of the served next-item score, fitted per dataset: `shoplens train --llm`.

The served score is ``w * model + (1 - w) * retrieval fusion`` (`agent.tasks.next_item.blend`).
A weight set by hand made answers worse where it was measured (Online Retail, leave-one-out,
20 random candidates, n=100: NDCG@10 -10.85, 95% CI [-15.75, -6.00] at w=0.5; docs/results.md),
so no dataset is ranked by the model until its own validation users show a gain:

1. validation windows as `shoplens train` fits the fusion (`agent.tasks.fusion.held_out_windows`:
   each user's last item held out, every source refit without it, cold targets skipped);
2. each window's candidate sets (``random``: the target and 19 counted items the user never
   touched, LLMRank's protocol; ``retrieved``: the served generator's pool, when it holds the
   target) go through the served pipeline with the model ranking (`NextItemService.predict`),
   which gives each candidate's model score; the retrieval fusion score comes from the same
   generator;
3. every weight of `GRID` ranks each set exactly as the served `blend` would; a window's
   NDCG@10 is the mean over its sets;
4. the weight is chosen by mean NDCG@10 over all windows (ties: the smaller weight), and judged by
   K-fold cross-fitting: each fold's windows are scored at the weight chosen on the other folds,
   paired against w=0 on the same windows. Only when the 95% bootstrap CI of that paired gain
   is above 0 is the weight served; otherwise 0 is (the model still explains), and every
   answer's ``meta.notes`` says which and why.

The result, ``llm_weight.json`` beside the dataset's indexes, names the model (GGUF sha256 or
served model id), the scorer and its prompt (name and content sha256): a weight fitted for one
model is never applied to another (weight 0, said in ``meta.notes``).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from agent.data.candidates import Candidate
from agent.domain.stats import bootstrap_ci
from agent.tasks.next_item import blend, untrained_note
from agent.tasks.signed_json import content_sha256, load_signed, write_signed

LLM_WEIGHT_FILE = "llm_weight.json"
PARTIAL_FILE = "llm_weight.partial.jsonl"  # scored sets of an unfinished fit (resume)
SETS_FILE = "llm_weight.sets.jsonl"  # the finished fit's scored sets: `python -m agent.tasks.llm_weight` rechecks it
FORMAT = "shoplens.llm_weight.v1"
GRID: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)  # GRID[0] must be 0: the baseline
FOLDS = 5


@dataclass
class ScoredSet:
    """One candidate set of one validation window, as the served pipeline scored it.

    `fused`: item id -> the retrieval fusion score (`Candidate.fused`); `llm`: item id -> the
    model's score (missing: the model did not score it); `target`: the held-out item."""

    user_id: str
    target: str
    kind: str  # "random" | "retrieved"
    fused: dict[str, float]
    llm: dict[str, float]


def ndcg10_of_set(s: ScoredSet, w: float) -> float:
    """NDCG@10 (0..1) of `s.target` when `s` is ranked at model weight `w` by the served blend."""
    cands = [Candidate(item_id=i, fused=f) for i, f in s.fused.items()]
    ranked = [c.item_id for c, _ in blend(cands, s.llm, w)]
    rank = ranked.index(s.target)
    return 1.0 / math.log2(rank + 2) if rank < 10 else 0.0


def window_table(sets: Sequence[ScoredSet], grid: Sequence[float] = GRID) -> tuple[list[str], np.ndarray]:
    """(window ids, ``(windows, len(grid))`` NDCG@10 x100): each window's mean over its sets."""
    by_window: dict[str, list[ScoredSet]] = {}
    for s in sets:
        by_window.setdefault(f"{s.user_id}\x1f{s.target}", []).append(s)
    ids = sorted(by_window)
    table = np.asarray([[100.0 * float(np.mean([ndcg10_of_set(s, w) for s in by_window[k]])) for w in grid]
                        for k in ids], dtype=np.float64).reshape(len(ids), len(grid))
    return ids, table


@dataclass
class WeightChoice:
    """What `choose_weight` found: `best` by mean over all windows, the cross-fitted paired gain
    over w=0 (x100 NDCG@10, per window) and its 95% bootstrap CI, and the weight to serve."""

    best: float
    served: float
    mean_by_weight: dict[str, float]
    gain: float
    ci_low: float
    ci_high: float
    n: int


def choose_weight(table: np.ndarray, grid: Sequence[float] = GRID, *, seed: int = 0,
                  folds: int = FOLDS) -> WeightChoice:
    """Pick the model weight from a `window_table` (see the module docstring, step 4).

    Raises:
        ValueError: `grid` does not start at 0, or fewer windows than folds.
    """
    if not grid or grid[0] != 0.0:
        raise ValueError("the weight grid must start at 0 (the pipeline without the model)")
    n = len(table)
    if n < folds:
        raise ValueError(f"{n} scored window(s); the cross-fitted check needs at least {folds}")
    means = table.mean(axis=0)
    best = int(np.argmax(means))  # the first maximum: ties go to the smaller weight
    fold = np.empty(n, dtype=int)
    perm = np.random.default_rng(seed).permutation(n)
    for f in range(folds):
        fold[perm[f::folds]] = f
    gains = np.empty(n)
    for f in range(folds):
        inside = fold == f
        j = int(np.argmax(table[~inside].mean(axis=0)))
        gains[inside] = table[inside, j] - table[inside, 0]
    lo, hi = bootstrap_ci(gains.tolist(), seed=seed)
    return WeightChoice(best=float(grid[best]), served=float(grid[best]) if lo > 0 else 0.0,
                        mean_by_weight={f"{w:g}": round(float(m), 4) for w, m in zip(grid, means, strict=True)},
                        gain=round(float(gains.mean()), 4), ci_low=round(lo, 4), ci_high=round(hi, 4), n=n)


@dataclass
class FittedLlmWeight:
    """A dataset's fitted model weight, with what it was fitted for."""

    weight: float  # served: the best weight when its cross-fitted gain is significant, else 0
    best_weight: float
    dataset: str
    catalogue_hash: str
    events_hash: str
    model: str  # the GGUF's sha256, or the served model's id
    scorer: str  # NextItemConfig.llm_scorer
    prompt: str  # the scorer's prompt, "name@sha256"
    n_windows: int
    n_sets: int
    seed: int
    metrics: dict[str, object] = field(default_factory=dict)
    fitted_at: str = ""
    format: str = FORMAT

    def sha256(self) -> str:
        return content_sha256(self, exclude=("fitted_at",))

    def verdict(self) -> str:
        """The measured gain in words: 'paired NDCG@10 gain +1.20 [+0.10, +2.30] at w=0.3 on 30 windows'."""
        m = self.metrics
        return (f"cross-fitted paired NDCG@10 gain {m['gain']:+.2f} [{m['ci_low']:+.2f}, {m['ci_high']:+.2f}] "
                f"over the pipeline without the model, best weight {self.best_weight:g}, "
                f"{self.n_windows} validation windows, {self.fitted_at[:10]}")

    def served_for(self, model: str | None, scorer: str, prompt: str) -> tuple[float, str]:
        """(the weight to rank with, the `meta.notes` line) for the model, scorer and prompt this
        process serves: 0 unless they are the ones fitted and the gain was significant."""
        refit = f"`shoplens train --dataset {self.dataset} --llm`"
        if (model, scorer, prompt) != (self.model, self.scorer, self.prompt):
            return 0.0, (f"model ranking off (weight 0): {LLM_WEIGHT_FILE} was fitted for model {self.model[:16]}, "
                         f"scorer {self.scorer}, prompt {self.prompt}; this server runs {str(model)[:16]}, "
                         f"{scorer}, {prompt} (rerun {refit})")
        if self.weight == 0:
            return 0.0, f"model ranking off (weight 0): no significant gain on validation users ({self.verdict()})"
        return self.weight, f"model ranking weight {self.weight:g} ({self.verdict()})"


def save_llm_weight(fitted: FittedLlmWeight, folder: Path) -> Path:
    """Write ``llm_weight.json`` (with its sha256) into the dataset's index folder."""
    return write_signed(fitted, folder / LLM_WEIGHT_FILE)


def load_llm_weight(folder: Path, dataset: str) -> FittedLlmWeight | None:
    """The dataset's fitted model weight, or None when ``shoplens train --llm`` never ran for it.

    Raises:
        ArtifactMismatchError: the file was fitted for another dataset, or was edited (sha256).
    """
    path = folder / LLM_WEIGHT_FILE
    if not path.exists():
        return None
    return load_signed(path, FittedLlmWeight, dataset, f"re-run `shoplens train --dataset {dataset} --llm` (or delete {path})")


def served_llm_weight(fitted: FittedLlmWeight | None, dataset: str, *, model: str | None, scorer: str,
                      prompt: str) -> tuple[float, str]:
    """(weight, note) a dataset is served with: `FittedLlmWeight.served_for`, or 0 untrained."""
    if fitted is None:
        return 0.0, untrained_note(dataset)
    return fitted.served_for(model, scorer, prompt)


def read_partial(path: Path, key: str) -> list[ScoredSet]:
    """Scored sets an interrupted fit with the same `key` left in `path` (others are ignored)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            d = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the interruption
            continue
        if d.pop("key", None) == key:
            out.append(ScoredSet(**d))
    return out


def append_partial(path: Path, key: str, s: ScoredSet) -> None:
    """Append one scored set to `path` (flushed: an interruption loses at most this line)."""
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"key": key, **asdict(s)}) + "\n")


def run_key(parts: Mapping[str, object]) -> str:
    """16 hex digits naming what a scored set depends on (data, model, scorer, prompt, seed)."""
    return hashlib.sha256(json.dumps(dict(parts), sort_keys=True, default=str).encode()).hexdigest()[:16]


def recheck(sets_path: Path, seed: int = 0) -> WeightChoice:
    """The weight choice recomputed from a fit's scored sets (``llm_weight.sets.jsonl``), no model.

    Raises:
        ValueError: fewer scored windows than `FOLDS`.
    """
    sets = []
    for line in sets_path.read_text(encoding="utf-8").splitlines():
        d = json.loads(line)
        d.pop("key", None)
        sets.append(ScoredSet(**d))
    return choose_weight(window_table(sets)[1], seed=seed)


if __name__ == "__main__":  # python -m agent.tasks.llm_weight <llm_weight.sets.jsonl> [seed]
    import sys

    print(json.dumps(asdict(recheck(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 0)), indent=2))
