"""Few-shot sentiment for a shop the model has never seen: retrieved demonstrations and a fitted offset.

Issue 16: zero-shot polarity on reviews from unseen shops was 0.82. Two levers, both fitted from
labelled reviews that are never the review being judged:

* **Retrieved demonstrations** (`DemoPool`): labelled reviews embedded with the multilingual E5
  (`retrieval.embedder.E5Embedder`, Chinese and English); for each review the k most similar
  ones are put in the prompt with their labels, **balanced by label** (k / |labels| nearest of each
  label), so the demonstrations show both sides of a similar text instead of teaching the
  majority label. Demonstrations are ordered least similar first: the nearest sits next to the
  review. The "KATE" retrieval of Liu et al., "What Makes Good In-Context Examples for GPT-3?"
  (DeeLIO 2022), with label balance as in Min et al. (EMNLP 2022, labels matter less than format
  and label space).
* **A per-domain decision offset** (`fit_offset`): on a handful of a shop's labelled reviews, the
  shift b of the log-odds log p(positive) - log p(negative) that minimises their log loss (slope
  fixed at 1, a weak Gaussian prior toward 0 so 8-16 examples cannot push it to infinity). It
  moves the decision threshold to the shop's label prior (e.g. Chinese reviews that complain
  about one thing but recommend the product), the intercept of Platt scaling.

Labels in a shop's file: ``positive``/``negative``/``neutral``, ``1``/``0`` (1 = positive), or
正面/负面/中性; anything else is refused with the row and the column named.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.domain.predictions import POLARITIES
from agent.tasks.sentiment.text import prepare_text
from retrieval.embedder import Embedder

LABEL_WORDS = {"positive": "positive", "negative": "negative", "neutral": "neutral", "1": "positive",
               "0": "negative", "pos": "positive", "neg": "negative", "正面": "positive", "负面": "negative",
               "中性": "neutral", "好评": "positive", "差评": "negative", "中评": "neutral"}
DEMO_CHARS = 200  # a demonstration is cut to this many characters (prompt cost: ~150 tokens of Chinese)
OFFSET_BOUND = 6.0  # |b| at most: e^6 ~ 400x odds, beyond any real label prior
OFFSET_PRIOR_SD = 2.0  # the Gaussian prior on b (log-odds units): weak, keeps 8 separable examples finite


@dataclass(frozen=True)
class Demo:
    """One labelled review: `text` (cleaned), `label` (a polarity), `domain` (shop or category)."""

    text: str
    label: str
    domain: str = ""


def parse_label(value: object, *, where: str) -> str:
    """A label cell -> a polarity.

    Raises:
        ValueError: not one of `LABEL_WORDS` (the message names `where` and the accepted values).
    """
    key = str(value).strip().lower() if value is not None else ""
    if key.endswith(".0"):  # pandas writes 1 as 1.0
        key = key[:-2]
    if key not in LABEL_WORDS:
        raise ValueError(f"{where}: label {str(value)[:30]!r} is not a sentiment label; use positive/negative/"
                         "neutral, 1/0 (1 = positive) or 正面/负面/中性")
    return LABEL_WORDS[key]


def read_labelled(path: Path, *, text_column: str = "review", label_column: str = "label",
                  domain: str = "") -> list[Demo]:
    """A shop's labelled reviews from a CSV or JSONL file (one review per row), cleaned as a
    review is before the model sees it (`prepare_text`: markup out, personal data masked,
    instruction-like sentences removed).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a missing column, an unknown label or an empty text (naming the row or line
            and the column), a file that is not UTF-8 or not CSV/JSONL, or no rows at all.
    """
    if not path.exists():
        raise FileNotFoundError(f"--demos: no file {path}")
    jsonl = path.suffix.lower() in {".jsonl", ".json"}
    rows: list[tuple[int, dict[str, object]]] = []
    try:
        if jsonl:
            for n, ln in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
                if ln.strip():
                    try:
                        row = json.loads(ln)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"--demos {path} line {n}: not a JSON object ({e.msg}); one object per line, "
                                         'e.g. {"review": "...", "label": "positive"}') from e
                    if not isinstance(row, dict):
                        raise ValueError(f"--demos {path} line {n}: a JSON {type(row).__name__}, not an object; one "
                                         'object per line, e.g. {"review": "...", "label": "positive"}')
                    rows.append((n, row))
        else:
            with path.open(encoding="utf-8-sig", newline="") as f:
                reader = csv.DictReader(f)
                rows = [(reader.line_num, r) for r in reader]
    except UnicodeDecodeError as e:
        raise ValueError(f"--demos {path}: not UTF-8 ({e.reason} at byte {e.start}); save the file as UTF-8") from e
    except csv.Error as e:
        raise ValueError(f"--demos {path}: unreadable CSV ({e}); one review per row, quoted when it holds commas") from e
    if not rows:
        raise ValueError(f"--demos {path}: no rows")
    for col in (text_column, label_column):
        if col not in rows[0][1]:
            raise ValueError(f"--demos {path}: no column {col!r} (columns: {', '.join(map(str, rows[0][1]))}); "
                             f"name it with --demo-text-column / --demo-label-column")
    out = []
    for n, r in rows:
        where = f"--demos {path} {'line' if jsonl else 'row'} {n}"
        text, _ = prepare_text(str(r.get(text_column) or ""))
        if not text:
            raise ValueError(f"{where}: column {text_column!r} is empty")
        out.append(Demo(text, parse_label(r.get(label_column), where=f"{where} column {label_column!r}"), domain))
    return out


def text_key(text: str) -> str:
    """A review as the model is shown it (`prepare_text`), whitespace collapsed: a labelled review
    and the review being judged are the same review when their keys are equal, however each was
    cleaned before."""
    return " ".join(prepare_text(text)[0].split())


class DemoPool:
    """Labelled reviews and their unit vectors, searched by cosine similarity.

    Args:
        demos: the labelled reviews.
        vectors: (len(demos), dim) float32 rows of unit norm, from `embedder_name`.
        embedder_name: recorded so a pool is never searched with another embedder's vectors.

    Raises:
        ValueError: vectors and demos disagree in length, or no demos.
    """

    def __init__(self, demos: Sequence[Demo], vectors: np.ndarray, embedder_name: str):
        if not demos:
            raise ValueError("a demonstration pool needs at least one labelled review")
        if len(vectors) != len(demos):
            raise ValueError(f"{len(vectors)} vectors for {len(demos)} demonstrations")
        if bad := sorted({d.label for d in demos} - set(POLARITIES)):
            raise ValueError(f"demonstration labels {bad} are not polarities ({', '.join(POLARITIES)})")
        self.demos = list(demos)
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.embedder_name = embedder_name
        self._labels = np.array([d.label for d in self.demos])
        self._domains = np.array([d.domain for d in self.demos])
        self._keys = [text_key(d.text) for d in self.demos]  # what the model would be shown, for self-exclusion

    @classmethod
    def build(cls, demos: Sequence[Demo], embedder: Embedder) -> DemoPool:
        """Embed `demos` (one batch; E5 does ~10-30 reviews/s on 2 cores)."""
        return cls(demos, embedder.embed([d.text for d in demos]), embedder.name)

    @property
    def sha256(self) -> str:
        """Content hash of the labelled texts (not the vectors): part of a stored score's key."""
        h = hashlib.sha256(self.embedder_name.encode())
        for d in self.demos:
            h.update(f"\x1e{d.domain}\x1f{d.label}\x1f{d.text}".encode())
        return h.hexdigest()[:16]

    def select(self, query: np.ndarray, k: int, *, labels: Sequence[str] = ("negative", "positive"),
               exclude_domain: str | None = None, exclude_text: str | None = None) -> list[Demo]:
        """The demonstrations for one review: up to ceil(k / len(labels)) nearest of each label.

        Args:
            query: the review's unit vector, shape (dim,), from the same embedder.
            k: demonstrations wanted (0: none).
            labels: the labels to show (a binary shop: negative and positive).
            exclude_domain: never pick demos of this domain (leave-one-domain-out transfer).
            exclude_text: never pick a demo that is this review (equal `text_key`).

        Returns:
            At most k demos, least similar first (the nearest last, next to the review).
        """
        if k <= 0:
            return []
        if not labels:
            raise ValueError("select needs at least one label to pick demonstrations of")
        sims = self.vectors @ np.asarray(query, dtype=np.float32)
        ok = np.ones(len(self.demos), dtype=bool)
        if exclude_domain is not None:
            ok &= self._domains != exclude_domain
        if exclude_text is not None:
            key = text_key(exclude_text)
            ok &= np.array([k != key for k in self._keys])
        per = math.ceil(k / len(labels))
        picked: list[int] = []
        for lab in labels:
            idx = np.flatnonzero(ok & (self._labels == lab))
            picked += idx[np.argsort(-sims[idx], kind="stable")[:per]].tolist()
        picked = sorted(picked, key=lambda i: -sims[i])[:k]
        return [self.demos[i] for i in reversed(picked)]

    def save(self, folder: Path) -> None:
        """``demos.jsonl`` + ``vectors.npy`` + ``manifest.json`` (sha256 of both) in `folder`."""
        folder.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps({"text": d.text, "label": d.label, "domain": d.domain}, ensure_ascii=False) + "\n"
                        for d in self.demos)
        (folder / "demos.jsonl").write_text(lines, encoding="utf-8")
        np.save(folder / "vectors.npy", self.vectors)
        manifest = {"embedder": self.embedder_name, "n": len(self.demos), "pool_sha256": self.sha256,
                    "files": {f: _file_sha(folder / f) for f in ("demos.jsonl", "vectors.npy")}}
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))

    @classmethod
    def load(cls, folder: Path) -> DemoPool:
        """Load a saved pool, checking each file's sha256 against the manifest.

        Raises:
            FileNotFoundError: no pool in `folder`.
            ValueError: a file changed since it was saved (rebuild the pool).
        """
        manifest = json.loads((folder / "manifest.json").read_text())
        for f in ("demos.jsonl", "vectors.npy"):
            if _file_sha(folder / f) != manifest.get("files", {}).get(f):
                raise ValueError(f"demonstration pool {folder}: {f} changed since it was saved; rebuild it")
        rows = [json.loads(ln) for ln in (folder / "demos.jsonl").read_text(encoding="utf-8").splitlines() if ln.strip()]
        pool = cls([Demo(str(r["text"]), str(r["label"]), str(r.get("domain", ""))) for r in rows],
                   np.load(folder / "vectors.npy"), manifest["embedder"])
        if pool.sha256 != manifest.get("pool_sha256"):
            raise ValueError(f"demonstration pool {folder}: its content does not match its manifest; rebuild it")
        return pool


def _file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def log_odds(probs: dict[str, float]) -> float:
    """log p(positive) - log p(negative), probabilities floored at 1e-12."""
    return math.log(max(probs.get("positive", 0.0), 1e-12)) - math.log(max(probs.get("negative", 0.0), 1e-12))


def fit_offset(x: Sequence[float], y: Sequence[int]) -> float:
    """The decision offset b for a shop: argmin over b of the log loss of sigmoid(x + b) on its
    labelled reviews plus b^2 / (2 * OFFSET_PRIOR_SD^2), bounded to +-OFFSET_BOUND.

    Args:
        x: each labelled review's log-odds (`log_odds` of the model's probabilities).
        y: 1 for a positive review, 0 for a negative one (neutral reviews are left out by the caller).

    Returns:
        b in log-odds units (0.0 with no examples). Add it to a review's log-odds before the
        argmax: b > 0 moves borderline reviews to positive.
    """
    from scipy.optimize import minimize_scalar

    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(xs) != len(ys):
        raise ValueError(f"fit_offset: {len(xs)} log-odds for {len(ys)} labels")
    if not np.all(np.isfinite(xs)) or not set(ys.tolist()) <= {0.0, 1.0}:
        raise ValueError("fit_offset: log-odds must be finite and labels 0 or 1")
    if len(xs) == 0:
        return 0.0

    def loss(b: float) -> float:
        z = xs + b
        return float(np.sum(np.logaddexp(0.0, z) - ys * z) + b * b / (2 * OFFSET_PRIOR_SD ** 2))

    res = minimize_scalar(loss, bounds=(-OFFSET_BOUND, OFFSET_BOUND), method="bounded")
    return float(res.x)


def shifted(probs: dict[str, float], offset: float) -> dict[str, float]:
    """`probs` with log p(positive) - log p(negative) moved by `offset` (p(neutral) kept, the
    positive and negative mass redistributed), renormalised to sum to 1.

    Raises:
        ValueError: a non-finite `offset`.
    """
    if not math.isfinite(offset):
        raise ValueError(f"label offset must be a finite number, got {offset}")
    if offset == 0.0:
        return dict(probs)
    pos, neg = max(probs.get("positive", 0.0), 1e-12), max(probs.get("negative", 0.0), 1e-12)
    mass = pos + neg
    z = min(max(math.log(pos) - math.log(neg) + offset, -700.0), 700.0)  # exp() stays finite
    p_pos = mass / (1.0 + math.exp(-z))
    out = dict(probs)
    out["positive"], out["negative"] = p_pos, mass - p_pos
    total = sum(out.get(k, 0.0) for k in POLARITIES)
    return {k: out.get(k, 0.0) / total for k in POLARITIES}
