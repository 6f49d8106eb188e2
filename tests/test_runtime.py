"""Runtime composition: per-dataset embedder choice (CJK catalogues get the multilingual model)."""

from __future__ import annotations

from pathlib import Path

import pytest

import agent.app.runtime as runtime_mod
from agent.app.runtime import MULTILINGUAL_EMBEDDER, Runtime
from agent.domain.schemas import CatalogItem
from agent.settings import Settings
from retrieval.embedder import HashingEmbedder


@pytest.fixture
def rt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Runtime:
    built: list[str] = []

    def fake_make(name: str) -> HashingEmbedder:
        built.append(name)
        e = HashingEmbedder(8)
        e.name = name
        return e

    monkeypatch.setattr(runtime_mod, "make_embedder", fake_make)
    r = Runtime(Settings(workspace=tmp_path))
    r.built = built  # type: ignore[attr-defined]
    return r


def test_auto_embedder_picks_multilingual_for_chinese_titles(rt: Runtime) -> None:
    rt.store.add_items("zh-shop", [CatalogItem(item_id=str(i), title=f"纯棉T恤 款式{i}") for i in range(8)]
                       + [CatalogItem(item_id="x", title="USB cable")])
    rt.store.add_items("uk-shop", [CatalogItem(item_id="1", title="WHITE METAL LANTERN"),
                                   CatalogItem(item_id="2", title="茶杯")])  # 1 of 2 -> 50%: CJK
    rt.store.add_items("en-shop", [CatalogItem(item_id=str(i), title=f"LANTERN {i}") for i in range(9)]
                       + [CatalogItem(item_id="z", title="茶杯")])  # 1 of 10 -> 10%: English
    assert rt.embedder_for("zh-shop").name == MULTILINGUAL_EMBEDDER
    assert rt.embedder_for("uk-shop").name == MULTILINGUAL_EMBEDDER
    assert rt.embedder_for("en-shop").name == "all-MiniLM-L6-v2"
    # each model is built once and shared
    assert rt.built == [MULTILINGUAL_EMBEDDER, "all-MiniLM-L6-v2"]  # type: ignore[attr-defined]


def test_explicit_embedder_setting_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime_mod, "make_embedder", lambda name: HashingEmbedder(16))
    r = Runtime(Settings(workspace=tmp_path, embedder="hashing-16"))
    r.store.add_items("zh-shop", [CatalogItem(item_id="1", title="纯棉T恤")])
    assert r.embedder_for("zh-shop").name == "hashing-16"
