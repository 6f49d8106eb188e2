"""Progressive next-item answers (agent/app/progressive.py, ShopLensService.next_item_progressive):
the fast ranking comes back before the model is called, the model's refinement arrives in
stages (refined, then explained), a failing model leaves the fast answer standing, and the
number of refinements at once is bounded. The model is a gated fake: each call waits until the
test opens its gate, so "before" and "after" are exact, not timed."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest

from agent.app.progressive import Job, ProgressiveJobs, stage_of
from agent.app.runtime import Runtime
from agent.app.service import ShopLensService
from agent.domain.errors import UnknownRecommendationError
from agent.domain.predictions import explanation_schema_labels
from agent.domain.schemas import BehaviorEvent
from agent.llm.base import ChatModel, Completion, Message, ModelUnavailableError, Usage
from agent.llm.verbalizer import LABELS
from tests.test_chat import DS, FakeRuntime, make_runtime

USER = "17850"


class GatedModel:
    """A `ChatModel` whose ranking calls wait for `rank_gate` and explanation calls (with a JSON
    schema) for `explain_gate`; a call is logged only once its gate opens."""

    model_id = "gated-fake"

    def __init__(self, fail: Exception | None = None) -> None:
        self.rank_gate, self.explain_gate = asyncio.Event(), asyncio.Event()
        self.calls: list[str] = []
        self.fail = fail

    async def complete(self, messages: list[Message], *, schema: dict | None = None, max_tokens: int = 512,
                       temperature: float = 0.0, top_logprobs: int = 0) -> Completion:
        await (self.explain_gate if schema else self.rank_gate).wait()
        self.calls.append("explain" if schema else "rank")
        if self.fail is not None:
            raise self.fail
        if schema:  # one valid reason per label, citing the last event
            labels = explanation_schema_labels(schema)
            text = json.dumps({"reasons": [{"item": lab, "why": "goes with the customer's orders"}
                                           for lab in labels], "intent_summary": "Restocking the shop."})
            return Completion(text=text, usage=Usage(80, 20), model=self.model_id)
        # the verbalizer: prefers titles late in the alphabet, whatever their position, so the
        # model reorders fusion
        listed = {line[0]: line[3:] for line in messages[-1]["content"].splitlines()
                  if line[:3] in {f"{x}. " for x in LABELS}}
        order = sorted(listed, key=lambda lab: listed[lab], reverse=True)
        top = {lab: math.log(0.9 * 0.1 ** i) for i, lab in enumerate(order)}
        return Completion(text=order[0], top_logprobs=[top], usage=Usage(50, 1), model=self.model_id)

    async def stream(self, messages: list[Message], *, max_tokens: int = 512, temperature: float = 0.0):  # noqa: ANN201
        raise ModelUnavailableError("not used")
        yield ""


def service(tmp_path: Path, model: GatedModel | Exception, *, llm_weight: float = 0.5) -> ShopLensService:
    """The tiny shop with a fitted model weight of `llm_weight` (as `shoplens train --llm` saves
    it when the model showed a gain; 0: it did not, or was never fitted)."""
    rt = make_runtime(tmp_path, model)
    arts = rt.artifacts(DS)
    arts.llm_weight, arts.llm_weight_note = llm_weight, f"model ranking weight {llm_weight:g} (test)"
    return ShopLensService(rt)


async def until(job: Job, stage: str, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        async for s, _ in job.follow():
            if s == stage:
                return
    raise AssertionError(f"the job ended without reaching {stage}: {job.state} {job.error}")


async def test_fast_answer_comes_before_any_model_call_and_equals_the_no_llm_pipeline(tmp_path: Path) -> None:
    model = GatedModel()
    svc = service(tmp_path, model)
    ans = await svc.next_item_progressive(DS, USER, k=3, wait_s=0)
    assert model.calls == []  # the model was not reached: nothing waited for it
    assert ans.refinement.state == "running" and ans.refinement.stage == "fast"
    assert ans.refinement.stages_done == ["fast"] and len(ans.recommendation_id) == 32
    plain = await svc.next_item(DS, USER, config=svc.next_item_config(k=3, use_model=False), use_model=False)
    assert [i.item_id for i in ans.items] == [i.item_id for i in plain.items]
    assert all(i.reason_source == "fallback" and "llm" not in i.source_scores for i in ans.items)
    model.rank_gate.set(), model.explain_gate.set()
    job = svc.progressive.get(ans.recommendation_id)
    await job.wait(10)
    assert job.state == "done" and job.stage == "explained", job.error


async def test_refined_ranking_is_served_before_the_explanation_then_the_reasons(tmp_path: Path) -> None:
    model = GatedModel()
    svc = service(tmp_path, model)
    ans = await svc.next_item_progressive(DS, USER, k=3, wait_s=0)
    job = svc.progressive.get(ans.recommendation_id)
    model.rank_gate.set()
    await until(job, "refined")
    refined = job.snapshot()
    assert refined.refinement.stage == "refined" and refined.refinement.state == "running"
    assert "explain" not in model.calls  # the reasons have not been asked for yet
    assert all("llm" in i.source_scores and i.reason_source == "fallback" for i in refined.items)
    # the fake prefers the last-listed candidate, so the model's ranking differs from fusion's
    assert [i.item_id for i in refined.items] != [i.item_id for i in ans.items]
    model.explain_gate.set()
    await job.wait(10)
    final = job.snapshot()
    assert final.refinement.state == "done" and final.refinement.stages_done == ["fast", "refined", "explained"]
    assert [i.item_id for i in final.items] == [i.item_id for i in refined.items]  # reasons do not re-rank
    assert all(i.reason_source == "model" for i in final.items) and final.user_id == USER
    assert stage_of(final) == "explained" and final.meta.degraded is False
    # the poll of an explained answer can still return an earlier stage on request
    assert job.snapshot("fast").items == ans.items


async def test_a_failing_model_fails_the_refinement_and_the_fast_answer_stands(tmp_path: Path) -> None:
    model = GatedModel(fail=ModelUnavailableError("server down"))
    model.rank_gate.set(), model.explain_gate.set()
    svc = service(tmp_path, model)
    ans = await svc.next_item_progressive(DS, USER, k=3, wait_s=10)
    assert ans.refinement.state == "failed" and ans.refinement.stage == "fast"
    assert "server down" in (ans.refinement.error or "")
    assert ans.meta.degraded is False  # the fast answer is what it says: the pipeline without the model


class GuardedFakeRuntime(FakeRuntime):
    """The tiny shop's runtime with the real `Runtime.model` (the guard) over the fake."""

    model = Runtime.model

    async def connect_model(self) -> ChatModel:
        assert not isinstance(self.fake, Exception)
        return self.fake


async def test_a_model_known_down_is_not_asked_again_until_its_cool_down_ends(tmp_path: Path) -> None:
    """Behind the real guard: the first refinement fails and starts the cool-down; refinements
    asked for during it are skipped at once with the reason (they could only recompute the fast
    answer), and the model is called again once it ends."""
    model = GatedModel(fail=ModelUnavailableError("connection refused"))
    model.rank_gate.set(), model.explain_gate.set()
    rt = make_runtime(tmp_path, model)
    rt.settings.model_cooldown_s, rt.settings.model_retries = 0.3, 0
    rt.__class__ = GuardedFakeRuntime  # this instance only: the real guard over the fake
    svc = ShopLensService(rt)
    first = await svc.next_item_progressive(DS, USER, k=3, wait_s=10)
    assert first.refinement.state == "failed" and len(model.calls) == 1
    second = await svc.next_item_progressive(DS, USER, k=3, wait_s=10)
    assert second.refinement.state == "skipped" and len(model.calls) == 1
    assert (second.refinement.error or "").startswith("model failing (")
    assert "connection refused" in second.refinement.error and "ask again later" in second.refinement.error
    assert second.items == first.items  # the fast answer stands
    await asyncio.sleep(0.35)
    third = await svc.next_item_progressive(DS, USER, k=3, wait_s=10)
    assert third.refinement.state == "failed" and len(model.calls) == 2


async def test_without_the_model_nothing_is_started(tmp_path: Path) -> None:
    model = GatedModel()
    model.rank_gate.set(), model.explain_gate.set()
    svc = service(tmp_path, model)
    ans = await svc.next_item_progressive(DS, USER, k=3, wait_s=1, use_model=False)
    assert ans.refinement.state == "skipped" and "use_llm=false" in (ans.refinement.error or "")
    assert model.calls == []
    ev = [BehaviorEvent(user_id="new", item_id="85123A", event_type="view", timestamp="2011-10-01T00:00:00Z")]
    one = await svc.next_item_progressive(DS, "new", events=ev, k=3, wait_s=5)
    assert one.refinement.state == "done" and one.refinement.stage == "explained"  # one event is history
    assert model.calls == ["rank", "rank", "explain"]  # two verbalizer permutations, one explanation


async def test_a_dataset_without_a_fitted_weight_goes_from_fast_straight_to_explained(tmp_path: Path) -> None:
    model = GatedModel()
    model.rank_gate.set(), model.explain_gate.set()
    svc = service(tmp_path, model, llm_weight=0.0)
    fast = await svc.next_item(DS, USER, use_model=False)
    ans = await svc.next_item_progressive(DS, USER, k=3, wait_s=5)
    assert ans.refinement.state == "done" and ans.refinement.stage == "explained"
    assert model.calls == ["explain"]  # the model never ranked
    assert [i.item_id for i in ans.items] == [i.item_id for i in fast.items[:3]]  # the fast order stands
    assert "model ranking weight 0 (test)" in ans.meta.notes


async def test_the_number_of_refinements_at_once_is_bounded(tmp_path: Path) -> None:
    model = GatedModel()
    svc = service(tmp_path, model)
    svc.state.progressive = ProgressiveJobs(max_running=1)
    first = await svc.next_item_progressive(DS, USER, k=3, wait_s=0)
    second = await svc.next_item_progressive(DS, USER, k=3, wait_s=0)
    assert first.refinement.state == "running"
    assert second.refinement.state == "skipped" and "1 refinements are already running" in second.refinement.error
    assert [i.item_id for i in second.items] == [i.item_id for i in first.items]
    with pytest.raises(UnknownRecommendationError, match="never returned by POST /v1/next-item"):
        svc.progressive.get("0" * 32)
    await svc.progressive.aclose()
    assert svc.progressive.get(first.recommendation_id).state == "failed"


async def test_every_stage_shown_is_logged_for_feedback(tmp_path: Path) -> None:
    model = GatedModel()
    model.rank_gate.set(), model.explain_gate.set()
    svc = service(tmp_path, model)
    ans = await svc.next_item_progressive(DS, USER, k=3, wait_s=10)
    assert ans.refinement.stage == "explained"
    top = ans.items[0].item_id
    assert await svc.record_feedback(ans.recommendation_id, top, "impression") == 1
    assert await svc.record_feedback(ans.recommendation_id, top, "click") == 1
    report = svc.feedback_report(DS)
    assert report.by_stage["explained"].clicks == 1 and report.by_stage["explained"].impressions == 1


async def test_bench_section_times_each_stage_against_the_rate_limit(tmp_path: Path) -> None:
    from bench.progressive import progressive
    from bench.report import tables

    model = GatedModel()
    model.rank_gate.set(), model.explain_gate.set()
    rt = service(tmp_path, model).runtime  # a dataset the model ranks (fitted weight 0.5)
    rates = {"pp_tok_s": 100.0, "gen_tok_s": 10.0, "gen_json_tok_s": 5.0}
    res = await progressive(rt, model, DS, [USER, "12347"], rates, k=3, fast_users=4)
    r = res["records"][0]
    assert r["state"] == "done" and r["calls"] == 3
    assert r["fast_s"] <= r["refined_s"] <= r["explained_s"]
    # two verbalizer calls of 50 prompt + 1 completion tokens; one explanation of 80 + 20
    assert r["rank_estimate_s"] == pytest.approx(2 * (50 / 100 + 1 / 10))
    assert r["explain_estimate_s"] == pytest.approx(80 / 100 + 20 / 5)
    assert res["fast_idle"]["n"] == 4 and res["catalogue_items"] == 7
    titles = [t for t, _, _ in tables({"progressive": res})]
    assert titles[0].startswith("Progressive next-item") and titles[1].startswith("Fast path (no model), 7 items")
