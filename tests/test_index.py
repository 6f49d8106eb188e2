"""VectorIndex: save/load round trip, manifest checks, known neighbours, flat vs HNSW."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from retrieval.embedder import HashingEmbedder
from retrieval.index import IndexMismatchError, VectorIndex, catalogue_hash

TEXTS = {
    "mug": "white ceramic coffee mug",
    "cup": "ceramic tea cup and saucer",
    "candle": "vanilla scented candle",
    "lantern": "metal garden lantern for candle",
    "spade": "garden spade with wooden handle",
    "teapot": "ceramic teapot for tea",
}


def unit(rows: list[list[float]]) -> np.ndarray:
    a = np.asarray(rows, dtype=np.float32)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


@pytest.fixture
def built() -> tuple[VectorIndex, HashingEmbedder, str]:
    emb = HashingEmbedder(32)
    ids = sorted(TEXTS)
    chash = catalogue_hash(TEXTS.items())
    idx = VectorIndex.build(ids, emb.embed([TEXTS[i] for i in ids]), name="items",
                            embedder=emb.name, content_hash=chash)
    return idx, emb, chash


def test_round_trip_gives_identical_results(built, tmp_path: Path) -> None:
    idx, emb, chash = built
    idx.save(tmp_path / "items")
    back = VectorIndex.load(tmp_path / "items", embedder=emb.name, dim=emb.dim, content_hash=chash)
    queries = emb.embed(["ceramic tea", "garden candle", "nothing in common xyz"])
    assert back.search(queries, 4) == idx.search(queries, 4)
    assert back.ids == idx.ids
    assert back.manifest == idx.manifest
    for i in idx.ids:
        np.testing.assert_array_equal(back.vector(i), idx.vector(i))
    manifest = json.loads((tmp_path / "items" / "manifest.json").read_text())
    assert manifest == {
        "name": "items", "embedder": "hashing-32", "dim": 32, "metric": "inner_product",
        "normalised": True, "catalogue_hash": chash, "kind": "flat", "count": 6,
        "files": {name: hashlib.sha256((tmp_path / "items" / name).read_bytes()).hexdigest()
                  for name in ("index.faiss", "ids.json")},
    }
    assert sorted(p.name for p in (tmp_path / "items").iterdir()) == ["ids.json", "index.faiss", "manifest.json"]


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"embedder": "all-MiniLM-L6-v2"}, "embedder 'hashing-32' != 'all-MiniLM-L6-v2'"),
        ({"dim": 384}, "dimension 32 != 384"),
        ({"content_hash": "0" * 64}, "catalogue changed since the index was built"),
    ],
)
def test_manifest_mismatch_says_how_to_rebuild(built, tmp_path: Path, kwargs, problem) -> None:
    idx, emb, chash = built
    idx.save(tmp_path / "items")
    args = {"embedder": emb.name, "dim": emb.dim, "content_hash": chash, **kwargs}
    with pytest.raises(IndexMismatchError) as exc:
        VectorIndex.load(tmp_path / "items", **args)
    msg = str(exc.value)
    assert problem in msg
    assert "Rebuild it with `shoplens ingest <dataset> --rebuild-index`" in msg


def test_catalogue_change_changes_the_hash() -> None:
    base = catalogue_hash(TEXTS.items())
    assert catalogue_hash(reversed(list(TEXTS.items()))) == base  # order-free
    assert catalogue_hash({**TEXTS, "mug": "white ceramic coffee mug!"}.items()) != base
    assert catalogue_hash({**TEXTS, "new": "x"}.items()) != base


def test_missing_index_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="shoplens ingest"):
        VectorIndex.load(tmp_path / "nope", embedder="hashing-32", dim=32)


def test_corrupt_ids_detected(built, tmp_path: Path) -> None:
    idx, emb, _ = built
    idx.save(tmp_path / "items")
    (tmp_path / "items" / "ids.json").write_text(json.dumps(idx.ids[:-1]))
    with pytest.raises(IndexMismatchError, match="corrupt"):
        VectorIndex.load(tmp_path / "items", embedder=emb.name, dim=emb.dim)


def test_known_nearest_neighbour_on_hand_made_vectors() -> None:
    vecs = unit([[1, 0, 0], [0.8, 0.6, 0], [0, 1, 0], [0, 0, 1]])
    idx = VectorIndex.build(["x", "xy", "y", "z"], vecs, name="t", embedder="hand", content_hash="h")
    (row,) = idx.search(np.array([1.0, 0.0, 0.0], dtype=np.float32), 3)
    assert [i for i, _ in row] == ["x", "xy", "y"]
    assert [s for _, s in row] == pytest.approx([1.0, 0.8, 0.0])
    rows = idx.search(unit([[0, 0.6, 0.8], [0, 1, 0]]), 2)
    assert [i for i, _ in rows[0]] == ["z", "y"]
    assert [s for _, s in rows[0]] == pytest.approx([0.8, 0.6])
    assert rows[1][0] == ("y", pytest.approx(1.0))
    # k larger than the index returns everything; an empty index returns nothing
    assert len(idx.search(vecs[:1], 10)[0]) == 4
    empty = VectorIndex.build([], np.zeros((0, 3), np.float32), name="t", embedder="hand",
                              content_hash="h")
    assert empty.search(vecs, 3) == [[], [], [], []]
    assert idx.vector("nope") is None
    np.testing.assert_allclose(idx.vector("xy"), vecs[1])


def test_empty_index_round_trip(tmp_path: Path) -> None:
    empty = VectorIndex.build([], np.zeros((0, 8), np.float32), name="users", embedder="hashing-8",
                              content_hash="h")
    empty.save(tmp_path / "users")
    back = VectorIndex.load(tmp_path / "users", embedder="hashing-8", dim=8, content_hash="h")
    assert len(back) == 0


def test_build_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="does not match"):
        VectorIndex.build(["a", "b"], unit([[1, 0]]), name="t", embedder="e", content_hash="h")
    with pytest.raises(ValueError, match="duplicate"):
        VectorIndex.build(["a", "a"], unit([[1, 0], [0, 1]]), name="t", embedder="e",
                          content_hash="h")


def test_hnsw_and_flat_agree_on_a_small_set(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((300, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = [f"i{n}" for n in range(300)]
    flat = VectorIndex.build(ids, vecs, name="t", embedder="e", content_hash="h")
    hnsw = VectorIndex.build(ids, vecs, name="t", embedder="e", content_hash="h", kind="hnsw")
    hnsw.save(tmp_path / "hnsw")
    hnsw = VectorIndex.load(tmp_path / "hnsw", embedder="e", dim=16, content_hash="h")
    assert hnsw.manifest.kind == "hnsw"
    queries = vecs[:20] + 0.05 * rng.standard_normal((20, 16)).astype(np.float32)
    a, b = flat.search(queries, 5), hnsw.search(queries, 5)
    for ra, rb in zip(a, b, strict=True):
        assert [i for i, _ in rb] == [i for i, _ in ra]
        assert [s for _, s in rb] == pytest.approx([s for _, s in ra], abs=1e-5)
    np.testing.assert_allclose(hnsw.vector("i7"), vecs[7])


def test_auto_kind_switches_to_hnsw_above_the_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    import retrieval.index as ri

    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(40, 8)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = [f"i{k}" for k in range(40)]
    assert VectorIndex.build(ids, vecs, name="t", embedder="e", content_hash="h").manifest.kind == "flat"
    monkeypatch.setattr(ri, "AUTO_HNSW_ABOVE", 39)
    idx = VectorIndex.build(ids, vecs, name="t", embedder="e", content_hash="h")
    assert idx.manifest.kind == "hnsw"
    assert idx.search(vecs[3:4], 1)[0][0][0] == "i3"


# ---- incremental changes and crash-safe saves (issue 17) ----------------------------------------


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_upserted_replaces_and_appends_rows_and_leaves_the_original(kind: str, tmp_path: Path) -> None:
    vecs = unit([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    idx = VectorIndex.build(["a", "b", "c"], vecs, name="users", embedder="e", content_hash="h", kind=kind)
    up = idx.upserted(["b", "d"], unit([[1, 1, 0], [0, 1, 1]]))
    assert up.ids == ["a", "b", "c", "d"] and up.manifest.count == 4 and up.manifest.kind == kind
    np.testing.assert_allclose(up.vector("b"), unit([[1, 1, 0]])[0])
    assert [i for i, _ in up.search(unit([[0, 1, 1]]), 1)[0]] == ["d"]
    assert up.search(unit([[1, 1, 0]]), 1)[0][0] == ("b", pytest.approx(1.0))
    # the original still answers as before (a search in another thread keeps a consistent index)
    assert idx.ids == ["a", "b", "c"] and len(idx) == 3
    np.testing.assert_allclose(idx.vector("b"), [0, 1, 0])
    up.save(tmp_path / "users")
    back = VectorIndex.load(tmp_path / "users", embedder="e", dim=3, content_hash="h")
    assert back.ids == up.ids and back.search(unit([[0, 1, 1]]), 4) == up.search(unit([[0, 1, 1]]), 4)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_removed_drops_rows_and_keeps_the_rest_in_order(kind: str) -> None:
    vecs = unit([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]])
    idx = VectorIndex.build(["a", "b", "c", "d"], vecs, name="users", embedder="e", content_hash="h", kind=kind)
    out = idx.removed(["b", "zz"])
    assert out.ids == ["a", "c", "d"] and out.manifest.count == 3 and out.manifest.kind == kind
    assert out.vector("b") is None and idx.vector("b") is not None
    np.testing.assert_allclose(out.vector("d"), vecs[3])
    assert [i for i, _ in out.search(unit([[0.1, 1, 0.5]]), 3)[0]] == ["d", "c", "a"]
    assert idx.removed(["zz"]) is idx
    assert out.removed(["a", "c", "d"]).ids == []


def test_upserted_rejects_bad_input(built) -> None:
    idx, emb, _ = built
    with pytest.raises(ValueError, match="does not match 1 ids of dimension 32"):
        idx.upserted(["x"], np.zeros((1, 8), np.float32))
    with pytest.raises(ValueError, match="duplicate"):
        idx.upserted(["x", "x"], emb.embed(["a", "b"]))


def test_a_save_killed_midway_is_detected_on_load_and_leaves_no_temporary_file(
        built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    idx, emb, _ = built
    folder = tmp_path / "users"
    idx.save(folder)
    grown = idx.upserted(["new"], emb.embed(["a new row"]))
    replaced: list[str] = []
    real_replace = os.replace

    def killed_after_the_index_file(src: str, dst: str) -> None:
        if replaced:  # index.faiss is in place; the process dies before ids.json and the manifest
            raise KeyboardInterrupt("killed")
        replaced.append(str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_after_the_index_file)
    with pytest.raises(KeyboardInterrupt):
        grown.save(folder)
    monkeypatch.undo()
    assert replaced == [str(folder / "index.faiss")]
    assert sorted(p.name for p in folder.iterdir()) == ["ids.json", "index.faiss", "manifest.json"]
    with pytest.raises(IndexMismatchError, match="corrupt: index.faiss differ from the checksums in its manifest"):
        VectorIndex.load(folder, embedder=emb.name, dim=emb.dim)


def test_a_save_that_fails_before_any_rename_leaves_the_old_index_loadable(
        built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    idx, emb, _ = built
    folder = tmp_path / "users"
    idx.save(folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def disk_full(*_: object) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr("retrieval.index.faiss.write_index", disk_full)
    with pytest.raises(OSError, match="No space left"):
        idx.upserted(["new"], emb.embed(["a new row"])).save(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no temporary file either
    assert VectorIndex.load(folder, embedder=emb.name, dim=emb.dim).ids == idx.ids
