"""FAISS vector indexes on disk, each with a manifest checked on load.

An index folder holds ``index.faiss``, ``ids.json`` (row -> external id) and
``manifest.json`` (embedder, dimension, metric, normalisation, catalogue hash, kind, and the
sha256 of the other two files). Loading with a different embedder or a changed catalogue is an
error, never silently wrong neighbours.

Saving replaces each file atomically (`retrieval.files`), the manifest last: a save killed
midway leaves files whose checksums do not match the manifest, which loading reports as an
`IndexMismatchError` instead of serving a torn index (the caller rebuilds it). An index can
also change in place of a rebuild (`VectorIndex.upserted`, `VectorIndex.removed`): each returns
a new index and leaves the old one untouched, so searches running in other threads keep a
consistent one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal, cast

import faiss
import numpy as np

from retrieval.files import atomic_path, sha256_file, write_atomic

IndexKind = Literal["flat", "hnsw"]
# `auto` picks HNSW above this many rows: an exact inner-product search of dim 384 passes 5 ms per
# query at about 35k rows on the 2-core box, while HNSW (M=32, efSearch=64) stays under 0.4 ms with
# recall@10 0.999 at 100k (docs/bench.md, retrieval section).
AUTO_HNSW_ABOVE = 35_000


_FILES = ("index.faiss", "ids.json")  # the files manifest.json records a sha256 of


class IndexMismatchError(ValueError):
    """The index on disk was built for another embedder, dimension or catalogue."""


@dataclass(frozen=True)
class Manifest:
    name: str  # "items" or "users"
    embedder: str
    dim: int
    metric: str  # "inner_product" over unit vectors == cosine similarity
    normalised: bool
    catalogue_hash: str  # sha256 of the (id, text) pairs the vectors came from
    kind: IndexKind
    count: int


def catalogue_hash(pairs: Iterable[tuple[str, str]]) -> str:
    """sha256 over sorted (id, text) pairs: changes iff the embedded content changes."""
    h = hashlib.sha256()
    for k, v in sorted(pairs):
        h.update(k.encode())
        h.update(b"\x1f")
        h.update(v.encode())
        h.update(b"\x1e")
    return h.hexdigest()


class VectorIndex:
    """Cosine-similarity search over unit vectors with external string ids."""

    def __init__(self, index: faiss.Index, ids: list[str], manifest: Manifest):
        self._index = index
        self.ids = ids
        self.manifest = manifest
        self._pos = {x: i for i, x in enumerate(ids)}

    @classmethod
    def build(
        cls,
        ids: list[str],
        vectors: np.ndarray,
        *,
        name: str,
        embedder: str,
        content_hash: str,
        kind: IndexKind | Literal["auto"] = "auto",
        hnsw_m: int = 32,
    ) -> VectorIndex:
        """Build from (n, dim) float32 unit vectors.

        `flat` is exact inner product; `hnsw` is approximate; `auto` (default) is `flat` up to
        :data:`AUTO_HNSW_ABOVE` rows and `hnsw` above. The manifest records the kind built.

        Raises:
            ValueError: shape mismatch or duplicate ids.
        """
        if vectors.ndim != 2 or vectors.shape[0] != len(ids):
            raise ValueError(f"vectors shape {vectors.shape} does not match {len(ids)} ids")
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate ids in index build")
        dim = int(vectors.shape[1])
        if kind == "auto":
            kind = "hnsw" if len(ids) > AUTO_HNSW_ABOVE else "flat"
        index: faiss.Index
        if kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = 64
        else:
            index = faiss.IndexFlatIP(dim)
        if len(ids):
            index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        manifest = Manifest(
            name=name, embedder=embedder, dim=dim, metric="inner_product", normalised=True,
            catalogue_hash=content_hash, kind=kind, count=len(ids),
        )
        return cls(index, list(ids), manifest)

    def save(self, folder: Path) -> None:
        """Write ``index.faiss``, ``ids.json`` and then ``manifest.json`` (with the sha256 of
        the other two), each atomically: see the module docstring for what a crash leaves."""
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / "index.faiss") as tmp:
            faiss.write_index(self._index, str(tmp))
        write_atomic(folder / "ids.json", json.dumps(self.ids))
        files = {name: sha256_file(folder / name) for name in _FILES}
        write_atomic(folder / "manifest.json", json.dumps(asdict(self.manifest) | {"files": files}, indent=2))

    @classmethod
    def load(
        cls, folder: Path, *, embedder: str, dim: int, content_hash: str | None = None
    ) -> VectorIndex:
        """Load and check the manifest.

        Raises:
            FileNotFoundError: no index in `folder`.
            IndexMismatchError: embedder, dimension or catalogue hash differ (rebuild it with
                `shoplens ingest <dataset>`).
        """
        mpath = folder / "manifest.json"
        if not mpath.exists():
            raise FileNotFoundError(f"no index at {folder}: run `shoplens ingest` first")
        raw = json.loads(mpath.read_text())
        files = raw.pop("files", None)  # absent in indexes saved before checksums were recorded
        manifest = Manifest(**raw)
        problems = []
        if manifest.embedder != embedder:
            problems.append(f"embedder {manifest.embedder!r} != {embedder!r}")
        if manifest.dim != dim:
            problems.append(f"dimension {manifest.dim} != {dim}")
        if content_hash is not None and manifest.catalogue_hash != content_hash:
            problems.append("catalogue changed since the index was built")
        if problems:
            raise IndexMismatchError(
                f"index at {folder} does not match: {'; '.join(problems)}. "
                "Rebuild it with `shoplens ingest <dataset> --rebuild-index`."
            )
        if files is not None:
            torn = [name for name in _FILES if sha256_file(folder / name) != files.get(name)]
            if torn:
                raise IndexMismatchError(
                    f"index at {folder} is corrupt: {', '.join(torn)} differ from the checksums in its "
                    "manifest (a save was interrupted). Rebuild it with `shoplens ingest <dataset>`.")
        index = faiss.read_index(str(folder / "index.faiss"))
        ids = json.loads((folder / "ids.json").read_text())
        if index.ntotal != len(ids) or len(ids) != manifest.count:
            raise IndexMismatchError(f"index at {folder} is corrupt: {index.ntotal} vectors, "
                                     f"{len(ids)} ids, manifest says {manifest.count}")
        return cls(index, ids, manifest)

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """Top-k neighbours per query row: (id, cosine similarity), best first."""
        if len(self.ids) == 0 or k <= 0:
            return [[] for _ in range(len(queries))]
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        scores, rows = self._index.search(q, min(k, len(self.ids)))
        return [
            [(self.ids[r], float(s)) for r, s in zip(rr, ss, strict=True) if r >= 0]
            for rr, ss in zip(rows, scores, strict=True)
        ]

    def vector(self, id_: str) -> np.ndarray | None:
        """The stored vector of `id_` (flat and HNSW indexes both store raw vectors)."""
        pos = self._pos.get(id_)
        # faiss's stubs type a buffer-less reconstruct() as torch.Tensor (its first overload, for
        # when faiss.contrib.torch_utils is imported); here it returns an ndarray, which
        # np.asarray passes through unchanged.
        return None if pos is None else np.asarray(self._index.reconstruct(pos))

    def upserted(self, ids: Sequence[str], vectors: np.ndarray) -> VectorIndex:
        """A new index with these rows: an id already present gets its vector replaced (same
        row), a new id is appended. This index is left as it was.

        Flat indexes stay exact. An HNSW index keeps the graph links a replaced row had: the row
        is scored with its new vector, but a search reaches it through its old neighbours, so
        recall for rows that moved far can drop until the index is rebuilt.

        Args:
            ids: distinct external ids, one per row of `vectors`.
            vectors: (len(ids), dim) float32 unit vectors.

        Raises:
            ValueError: shape mismatch or duplicate ids.
        """
        dim = self.manifest.dim
        if vectors.ndim != 2 or vectors.shape != (len(ids), dim):
            raise ValueError(f"vectors shape {vectors.shape} does not match {len(ids)} ids of dimension {dim}")
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate ids in index upsert")
        vecs = np.ascontiguousarray(vectors, dtype=np.float32)
        index = faiss.clone_index(self._index)
        new_ids = list(self.ids)
        fresh = [r for r, i in enumerate(ids) if i not in self._pos]
        moved = [(self._pos[i], r) for r, i in enumerate(ids) if i in self._pos]
        if moved:
            rows = _stored_rows(index, dim)
            for pos, r in moved:
                rows[pos] = vecs[r]
        if fresh:
            index.add(vecs[fresh])
            new_ids += [ids[r] for r in fresh]
        return VectorIndex(index, new_ids, replace(self.manifest, count=len(new_ids)))

    def removed(self, ids: Iterable[str]) -> VectorIndex:
        """A new index without these ids (absent ids are ignored); the other rows keep their
        order and vectors. This index is left as it was. Flat: the rows are cut out; HNSW: the
        graph is rebuilt from the remaining stored vectors (no re-embedding).
        """
        gone = {self._pos[i] for i in ids if i in self._pos}
        if not gone:
            return self
        keep = [i for p, i in enumerate(self.ids) if p not in gone]
        m = self.manifest
        if m.kind == "hnsw":
            vecs = np.stack([np.asarray(self._index.reconstruct(self._pos[i])) for i in keep]) if keep else \
                np.zeros((0, m.dim), np.float32)
            return VectorIndex.build(keep, vecs, name=m.name, embedder=m.embedder, content_hash=m.catalogue_hash,
                                     kind="hnsw")
        index = faiss.clone_index(self._index)
        index.remove_ids(faiss.IDSelectorBatch(np.asarray(sorted(gone), dtype=np.int64)))
        return VectorIndex(index, keep, replace(m, count=len(keep)))


def _stored_rows(index: faiss.Index, dim: int) -> np.ndarray:
    """A writable (ntotal, dim) float32 view of the vectors a flat or HNSW-flat index stores."""
    flat = cast(faiss.IndexFlat, faiss.downcast_index(index.storage) if isinstance(index, faiss.IndexHNSW) else index)
    return faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * dim).reshape(flat.ntotal, dim)
