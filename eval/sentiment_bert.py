"""The fine-tuned BERT ranker of the sentiment eval: the classic supervised method beside the LLM.

`agent.tasks.encoder` fine-tunes the packaged all-MiniLM-L6-v2 (22.7M parameters) with a new
classification head. Here it learns from a set's training part (the cases the TF-IDF baseline
learns from, so the test cases are the same and runs pair case by case), with a seeded,
stratified 15% of that part held out for early stopping and calibration; or, with ``train_on``,
from OTHER English sets only (the cross-domain "fair zero-shot baseline" for a new shop that has
no labelled reviews of its own).

* Binary sets (amazon_cells): a 2-way head, P(positive) Platt-calibrated on validation.
* Three-way sets (laptops, beauty): a 3-way head (``FineTuneConfig.num_labels = 3``),
  temperature-calibrated. On laptops the input is ``"<aspect term> [SEP] <sentence>"`` (the
  BERT-SPC sentence-pair input of Song et al., "Attentional Encoder Network for Targeted
  Sentiment Classification", 2019), so the head judges the given aspect.
* Class balance: training cases of rarer classes are repeated until every class has as many as
  the largest (what ``class_weight="balanced"`` does for the TF-IDF baseline), and validation
  cases are weighted 1 / (K x class share), so calibration refers to a balanced prior, as the
  TF-IDF baseline's does.
* Cross-domain training maps each source set onto the target's labels: laptops contributes
  sentences whose aspects all share one polarity (one case per sentence, no aspect); on a binary
  target, neutral cases are dropped.

The model folder is saved in the run folder (``encoder/``, with its manifest); an interrupted
run reloads it (manifest and data hash checked) instead of training again.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from sklearn.model_selection import train_test_split

from agent.domain.errors import ArtifactMismatchError
from agent.tasks.encoder import EncoderClassifier, FineTuneConfig, FitProgress, fine_tune
from agent.tasks.sentiment import clean_text

ENCODER_TASK = "sentiment"
ENCODER_TEMPLATE = "sentiment-text.v1"  # the cleaned review; with an aspect: "<term> [SEP] <sentence>"
VAL_SHARE = 0.15  # of the training part, stratified by label, seeded
MAX_VAL = 400  # validation cases at most (each check scores all of them; long beauty reviews are slow)
# Run defaults: ~5-10 min on 2 CPU cores (beauty's long reviews are the slow end)
DEFAULT_CONFIG = FineTuneConfig(max_len=128, batch_size=32, max_steps=300, eval_every=50, patience=3)
INFO_KEYS = ("fit_seconds", "n_fit", "n_fit_unique", "n_val", "fine_tune", "encoder_config")


def encoder_text(case: Any, max_chars: int) -> str:
    """What the encoder reads for one case: the cleaned review (``clean_text``: HTML stripped,
    personal data masked, cut to `max_chars`), with ``"<term> [SEP] "`` in front for an aspect case."""
    text = clean_text(case.text, max_chars)
    return f"{case.aspect} [SEP] {text}" if case.aspect else text


def sentence_cases(cases: Sequence[Any]) -> list[Any]:
    """Aspect cases -> one sentence-level case per sentence whose aspects all share one polarity
    (the sentence's label); sentences with mixed polarities are dropped. Non-aspect cases pass."""
    from eval.sentiment_eval import Case

    by: dict[str, list[Any]] = defaultdict(list)
    out = []
    for c in cases:
        (by[c.text].append(c) if c.aspect else out.append(c))
    for text, group in by.items():
        golds = {c.gold for c in group}
        if len(golds) == 1:
            out.append(Case(group[0].id, text, group[0].gold))
    return out


def check_train_on(target: str, train_on: Sequence[str]) -> None:
    """Refuse a cross-domain source list that is empty, names the target or a non-English set.

    Raises:
        ValueError: with the allowed sets in the message.
    """
    from eval.sentiment_eval import ENGLISH_SETS

    if not train_on:
        raise ValueError("train_on needs at least one set")
    for s in train_on:
        if s == target:
            raise ValueError(f"--train-on {s}: cross-domain training uses OTHER sets; leave --train-on out "
                             f"to train on {target}'s own training part")
        if s not in ENGLISH_SETS:
            raise ValueError(f"--train-on {s}: the packaged encoder is English-only; choose from "
                             f"{', '.join(ENGLISH_SETS)}")


def cross_domain_cases(target: str, train_on: Sequence[str], labels: Sequence[str], data_dir: Path,
                       n: int, seed: int) -> list[Any]:
    """Every labelled case of the sets in `train_on` (their train and test parts: none of them is
    the target), as sentence-level cases with a label among `labels`.

    Raises:
        ValueError: `train_on` names the target itself, a non-English set, or is empty.
    """
    from eval.sentiment_eval import load_set

    check_train_on(target, train_on)
    out: list[Any] = []
    for s in train_on:
        tr, te, _ = load_set(s, data_dir, n, seed)
        out += [c for c in sentence_cases([*tr, *te]) if c.gold in labels]
    return out


def balance(cases: Sequence[Any], seed: int) -> list[Any]:
    """Rarer classes' cases repeated (cycling through a seeded shuffle) until every class has as
    many cases as the largest; the result is shuffled."""
    rng = random.Random(seed)
    by: dict[str, list[Any]] = defaultdict(list)
    for c in cases:
        by[c.gold].append(c)
    top = max((len(v) for v in by.values()), default=0)
    out: list[Any] = []
    for lab in sorted(by):
        group = list(by[lab])
        rng.shuffle(group)
        out += [group[i % len(group)] for i in range(top)]
    rng.shuffle(out)
    return out


def balanced_weights(golds: Sequence[str], labels: Sequence[str]) -> list[float]:
    """Per case 1 / (K x its class's share), K = len(labels): a balanced prior's weights (mean 1)."""
    counts = Counter(golds)
    return [len(golds) / (len(labels) * counts[g]) for g in golds]


def split_validation(cases: Sequence[Any], seed: int) -> tuple[list[Any], list[Any]]:
    """(fit, validation): a stratified, seeded VAL_SHARE of `cases` (at most MAX_VAL) held out."""
    golds = [c.gold for c in cases]
    counts = Counter(golds)
    strat = [g if counts[g] >= 2 else "_rare" for g in golds]
    size = min(max(int(round(VAL_SHARE * len(cases))), len(counts)), MAX_VAL)
    fit, val = train_test_split(list(cases), test_size=size, random_state=seed, stratify=strat)
    return list(fit), list(val)


def _data_sha(cases: Sequence[Any]) -> str:
    return hashlib.sha256(json.dumps([[c.id, c.text, c.gold, c.aspect] for c in cases]).encode()).hexdigest()


def fit_or_load(train: Sequence[Any], labels: Sequence[str], *, dataset: str, seed: int, max_chars: int,
                cfg: FineTuneConfig | None, model_dir: Path) -> tuple[EncoderClassifier, dict[str, Any]]:
    """The encoder for one run: loaded from `model_dir` when a finished one is there (same dataset,
    template and training data), else fine-tuned on `train` and saved there.

    Args:
        train: the training cases (labels among `labels`); 15% of them (seeded) become validation.
        labels: the set's labels; their order gives the head's class indices.
        dataset: what the manifest records as trained-on (the set, or ``"+"``-joined sources).
        cfg: fine-tuning settings (default `DEFAULT_CONFIG`); ``num_labels`` and ``seed`` are set here.

    Returns:
        The classifier and what to record in the run's config.json (sizes, seconds, history).

    Raises:
        ValueError: no training case, or fewer than two classes among them.
        ArtifactMismatchError: `model_dir` holds an encoder trained on other data.
    """
    cases = [c for c in train if c.gold in labels]
    if len({c.gold for c in cases}) < 2:
        raise ValueError(f"the bert ranker needs training cases of at least two labels; got {len(cases)} cases "
                         f"labelled {sorted({c.gold for c in cases})}")
    cfg = replace(cfg or DEFAULT_CONFIG, num_labels=len(labels), seed=seed)
    data_sha = _data_sha(cases)
    fix = f"remove {model_dir} to train again"
    if (model_dir / "manifest.json").exists():
        clf = EncoderClassifier.load(model_dir, dataset=dataset, task=ENCODER_TASK, template=ENCODER_TEMPLATE, fix=fix)
        if clf.manifest.get("data_sha256") != data_sha:
            raise ArtifactMismatchError(f"{model_dir} was trained on other cases (data sha256 "
                                        f"{str(clf.manifest.get('data_sha256'))[:12]}); {fix}")
        return clf, {k: clf.manifest[k] for k in INFO_KEYS}
    fit, val = split_validation(cases, seed)
    fit = balance(fit, seed)
    index = {lab: i for i, lab in enumerate(labels)}
    xt, yt = [encoder_text(c, max_chars) for c in fit], [index[c.gold] for c in fit]
    xv, yv = [encoder_text(c, max_chars) for c in val], [index[c.gold] for c in val]
    bar = FitProgress(f"fine-tune {dataset}")

    t0 = time.perf_counter()
    work = model_dir.with_name(model_dir.name + ".work")  # checkpoints: an interrupted fine-tune resumes
    clf, hist = fine_tune((xt, yt), (xv, yv), cfg, val_weights=balanced_weights([c.gold for c in val], labels),
                          work_dir=work, progress=bar)
    bar.close()
    shutil.rmtree(work, ignore_errors=True)
    info = {"fit_seconds": round(time.perf_counter() - t0, 2), "n_fit": len(xt), "n_fit_unique": len(set(map(id, fit))),
            "n_val": len(xv), "fine_tune": asdict(hist), "encoder_config": asdict(cfg)}
    clf.save(model_dir, {"task": ENCODER_TASK, "dataset": dataset, "template": ENCODER_TEMPLATE,
                         "data_sha256": data_sha, "labels": list(labels), **info})
    return clf, info


def bert_probabilities(clf: EncoderClassifier, case: Any, labels: Sequence[str], max_chars: int) -> dict[str, float]:
    """Calibrated probability of each of `labels` for one case (the head's class order)."""
    p = clf.class_probabilities([encoder_text(case, max_chars)])[0]
    return {lab: float(v) for lab, v in zip(labels, p, strict=True)}
