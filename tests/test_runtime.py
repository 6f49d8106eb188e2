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


# ---- the model every surface gets: guarded, bounds from Settings, observed ----------------------


async def test_model_is_guarded_once_with_settings_bounds_and_observed(tmp_path: Path) -> None:
    from agent.llm.fake import FakeModel
    from agent.llm.wrappers import GuardedModel

    fake = FakeModel(responder=lambda call: "ok")

    class _RT(Runtime):
        async def connect_model(self) -> FakeModel:
            return fake

    rt = _RT(Settings(workspace=tmp_path, model_call_timeout_s=7, model_retries=0, model_max_concurrency=3,
                      model_cooldown_s=1.5))
    seen: list[str] = []

    class _Obs:
        def call_started(self, lane: str) -> None:
            seen.append(f"start:{lane}")

        def call_finished(self, lane: str, outcome: str, seconds: float, usage: object) -> None:
            seen.append(outcome)

    rt.add_observer(_Obs())  # type: ignore[arg-type]
    m = await rt.model()
    assert isinstance(m, GuardedModel) and m.inner is fake and await rt.model() is m
    c = m.config
    assert (c.timeout_s, c.retries, c.max_concurrency, c.cooldown_s) == (7, 0, 3, 1.5)
    await m.complete([{"role": "user", "content": "hi"}], max_tokens=1)
    assert seen == ["start:interactive", "ok"] and rt.observers.counters.calls == {"ok": 1}


def test_api_settings_refuse_the_fields_that_moved_to_settings() -> None:
    from ui.api.config import ApiSettings

    with pytest.raises(ValueError, match="model_call_timeout_s: set on the agent's Settings"):
        ApiSettings(model_call_timeout_s=1)


# ---- datasets: one summary for the CLI and the API ------------------------------------------------


def test_datasets_summary_reports_counts_index_state_and_embedder(tmp_path: Path) -> None:
    import json
    from datetime import UTC, datetime

    from typer.testing import CliRunner

    from agent.app.service import ShopLensService
    from agent.domain.schemas import BehaviorEvent
    from ui.cli import app

    settings = Settings(workspace=tmp_path, embedder="hashing-16")
    rt = Runtime(settings)
    rt.store.add_items("shop", [CatalogItem(item_id=str(i), title=f"MUG {i}") for i in range(3)])
    rt.store.add_events("shop", [BehaviorEvent(user_id=u, item_id="1", event_type="purchase",
                                               timestamp=datetime(2011, 1, 1 + i, tzinfo=UTC))
                                 for i, u in enumerate(["a", "b", "a"])])
    rt.store.add_events("events-only", [BehaviorEvent(user_id="a", item_id="9", event_type="view",
                                                      timestamp=datetime(2011, 1, 1, tzinfo=UTC))])
    svc = ShopLensService(rt)
    first = {d.name: d for d in svc.datasets()}
    assert (first["shop"].users, first["shop"].items, first["shop"].events) == (2, 3, 3)
    assert (first["shop"].indexes, first["shop"].indexes_ready, first["shop"].embedder) == ("not built", False,
                                                                                             "hashing-16")
    assert first["events-only"].embedder is None and first["events-only"].items == 0
    rt.artifacts("shop")
    assert {d.name: d.indexes for d in svc.datasets()}["shop"] == "ready"
    # another process sees the indexes on disk: built, not loaded; the CLI prints the same summary
    r = CliRunner().invoke(app, ["datasets", "--workspace", str(tmp_path), "--json"],
                           env={"SHOPLENS_EMBEDDER": "hashing-16"})
    assert r.exit_code == 0, r.output
    cli = {d["name"]: d for d in json.loads(r.stdout)["datasets"]}
    assert cli["shop"] == {"name": "shop", "users": 2, "items": 3, "events": 3, "indexes": "built",
                           "indexes_ready": True, "embedder": "hashing-16"}
    table = CliRunner().invoke(app, ["datasets", "--workspace", str(tmp_path)], env={"SHOPLENS_EMBEDDER": "hashing-16"})
    assert table.exit_code == 0 and "shop" in table.stdout and "built" in table.stdout


# ---- the policy: a deadline degrades, a strict task without the model fails ------------------------


async def test_deadline_degrades_and_strict_profile_raises(tmp_path: Path) -> None:
    import asyncio
    from datetime import UTC, datetime

    from agent.app.service import ShopLensService
    from agent.domain.errors import ModelUnavailableError
    from agent.domain.schemas import BehaviorEvent
    from agent.llm.fake import FakeModel

    class _Slow(FakeModel):
        async def complete(self, messages, **kw):  # type: ignore[no-untyped-def, override]
            await asyncio.sleep(30)
            raise AssertionError("not reached")

    class _RT(Runtime):
        async def connect_model(self) -> FakeModel:
            return _Slow()

    rt = _RT(Settings(workspace=tmp_path, embedder="hashing-16", request_timeout_s=0.3))
    rt.store.add_items("shop", [CatalogItem(item_id=str(i), title=f"MUG {i}") for i in range(3)])
    rt.store.add_events("shop", [BehaviorEvent(user_id="a", item_id=str(i % 3), event_type="purchase",
                                               timestamp=datetime(2011, 1, 1 + i, tzinfo=UTC)) for i in range(6)])
    svc = ShopLensService(rt)
    p = await svc.profile("shop", "a")
    assert p.meta.degraded and "model did not answer within 0.3 s" in (p.meta.degraded_reason or "")
    assert p.summary.startswith("[template]")
    with pytest.raises(ModelUnavailableError, match="the profile summary needs it.*use_llm=false"):
        await svc.profile("shop", "a", strict=True)
