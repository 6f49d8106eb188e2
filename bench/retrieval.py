"""Retrieval scaling on synthetic catalogues: exact inner product vs HNSW vs IVF.

Items are unit vectors from a Gaussian mixture (about 100 items per cluster, like products in
categories; uniform random vectors would be the worst case for approximate indexes). Every
index is wrapped in ShopLens's `retrieval.index.VectorIndex`, so a query costs what the
candidate generator pays (FAISS search + string-id mapping). Queries are fresh draws from the
same mixture, one vector per search call, k = 10.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import faiss
import numpy as np

from bench.stats import load_average, ratio, recall_at_k, summarize
from retrieval.index import Manifest, VectorIndex

HNSW_M = 32  # VectorIndex's default
HNSW_EF_CONSTRUCTION = 40  # FAISS's default
HNSW_EF_SEARCH = 64  # VectorIndex's setting


def mixture_centres(n: int, dim: int, seed: int, items_per_cluster: int = 100) -> np.ndarray:
    """(n // items_per_cluster, dim) float32 cluster centres of an n-item synthetic catalogue."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((max(1, n // items_per_cluster), dim), dtype=np.float32)


def sample_mixture(centres: np.ndarray, n: int, seed: int, chunk: int = 100_000) -> np.ndarray:
    """(n, dim) float32 unit vectors: a random centre plus unit Gaussian noise, normalised.
    Generated in chunks (memory: 4 * n * dim bytes plus one chunk)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, centres.shape[1]), dtype=np.float32)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        x = centres[rng.integers(0, len(centres), e - s)]
        x += rng.standard_normal(x.shape, dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[s:e] = x
    return out


def ivf_params(n: int) -> tuple[int, int]:
    """(nlist, nprobe) for n items: nlist ~ 4 sqrt(n) (the FAISS wiki's rule of thumb), capped
    at n / 39 so k-means has the 39 points per centroid FAISS asks for; nprobe =
    max(8, nlist / 50)."""
    nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
    return nlist, max(8, nlist // 50)


def _build(kind: str, x: np.ndarray, seed: int) -> tuple[faiss.Index, dict[str, Any]]:
    n, dim = x.shape
    info: dict[str, Any] = {}
    if kind == "flat":
        index: faiss.Index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = HNSW_EF_SEARCH
        info = {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION, "efSearch": HNSW_EF_SEARCH}
    elif kind == "ivf":
        nlist, nprobe = ivf_params(n)
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = 10
        index.cp.seed = seed
        sample = x[np.random.default_rng(seed).choice(n, min(n, 40 * nlist), replace=False)]
        index.train(sample)
        index.nprobe = nprobe
        info = {"nlist": nlist, "nprobe": nprobe, "train_sample": len(sample), "kmeans_iter": 10}
    else:
        raise ValueError(f"unknown index kind {kind!r}")
    index.add(x)
    return index, info


def bench_size(n: int, dim: int, kinds: Sequence[str], *, n_queries: int, k: int, seed: int,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build each index kind over n synthetic items and time single-vector searches.

    Returns:
        Per kind: build seconds, search latency summary (seconds), recall@k vs exact, serialized
        bytes per million items; plus speed-ups vs the exact index.
    """
    centres = mixture_centres(n, dim, seed)
    x = sample_mixture(centres, n, seed + 1)
    queries = sample_mixture(centres, n_queries, seed + 2)  # fresh draws, not in the index
    ids = [str(i) for i in range(n)]
    out: dict[str, Any] = {"n": n, "dim": dim, "load": load_average(), "kinds": {}}
    exact_ids: np.ndarray | None = None
    for kind in kinds:
        log(f"  retrieval n={n:,} {kind}: building ...")
        t0 = time.perf_counter()
        index, info = _build(kind, x, seed)
        build_s = time.perf_counter() - t0
        nbytes = int(faiss.serialize_index(index).nbytes)
        vi = VectorIndex(index, ids, Manifest("items", "synthetic", dim, "inner_product", True,
                                              f"synthetic-{seed}", kind, n))  # type: ignore[arg-type]
        for q in queries[:10]:  # warm-up
            vi.search(q[None, :], k)
        lat, found = [], []
        for q in queries:
            t = time.perf_counter()
            hits = vi.search(q[None, :], k)[0]
            lat.append(time.perf_counter() - t)
            found.append([int(i) for i, _ in hits] + [-1] * (k - len(hits)))
        got = np.asarray(found, dtype=np.int64)
        if kind == "flat":
            exact_ids = got
        out["kinds"][kind] = {
            "build_s": build_s, "search": summarize(lat), "params": info,
            "bytes_per_million": nbytes / n * 1e6,
            "recall@k": 1.0 if kind == "flat" else (
                recall_at_k(got, exact_ids, k) if exact_ids is not None else None),
        }
        del index, vi
        gc.collect()
    flat = out["kinds"].get("flat")
    if flat:
        for v in out["kinds"].values():
            v["speedup_vs_flat_p50"] = ratio(flat["search"]["p50"], v["search"]["p50"])
    del x
    gc.collect()
    return out


def retrieval_scaling(sizes: Sequence[int], *, dim: int = 384, hnsw_max: int = 100_000,
                      n_queries: int = 200, k: int = 10, seed: int = 0,
                      log: Callable[[str], None] = print) -> dict[str, Any]:
    """`bench_size` for each catalogue size; HNSW only up to ``hnsw_max`` items (its build is
    the slow one on 2 cores). Faiss uses all OpenMP threads it is given for builds."""
    rows = []
    for n in sizes:
        kinds = ["flat", "ivf"] + (["hnsw"] if n <= hnsw_max else [])
        rows.append(bench_size(n, dim, kinds, n_queries=n_queries, k=k, seed=seed, log=log))
    return {"sizes": list(sizes), "k": k, "n_queries": n_queries, "hnsw_max": hnsw_max,
            "omp_threads": faiss.omp_get_max_threads(), "rows": rows}
