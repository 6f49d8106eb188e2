"""The task routes (/v1/purchase-intent, /v1/session-intent, /v1/churn, /v1/profile, /v1/sentiment,
/v1/audience)
on the real app under uvicorn on a loopback port, over HTTP.

The model is `agent.llm.fake.FakeModel` behind the API's model guard; a switch makes it fail
like a dead server. A second app runs with the model not started at all (marked unavailable).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.app.runtime import Runtime
from agent.llm.base import Completion, ModelUnavailableError, Usage
from agent.llm.fake import FakeCall, FakeModel, Reply
from tests.test_api import AUTH, DATASET, OP, USER, agent_settings, assert_envelope, serve_app

TASK_ROUTES = ["/v1/purchase-intent", "/v1/click", "/v1/session-intent", "/v1/churn", "/v1/profile", "/v1/sentiment", "/v1/audience"]


class FakeModelRuntime(Runtime):
    """A Runtime whose model is a FakeModel (behind the real guard) answering every task's calls;
    `down` kills it."""

    def __init__(self, *a: Any, **kw: Any):
        super().__init__(*a, **kw)
        self.down = False
        self.fake = FakeModel(responder=self._respond)

    async def connect_model(self) -> FakeModel:
        return self.fake

    def _respond(self, call: FakeCall) -> Reply:
        if self.down:
            return ModelUnavailableError("fake model server down")
        if call.top_logprobs:  # the 1-token verbalizer calls (intent/churn/audience yes-no, sentiment)
            top = {"yes": math.log(0.6), "no": math.log(0.3), "negative": math.log(0.08),
                   "positive": math.log(0.01), "neutral": math.log(0.01)}
            return Completion(text="yes", top_logprobs=[top], usage=Usage(50, 1), model="fake")
        props = (call.schema or {}).get("properties", {})
        if "stage" in props:
            ans: dict[str, Any] = {"stage": "considering", "reason": "Looked at this item recently.",
                                   "evidence": ["E1"]}
        elif "action" in props:
            ans = {"action": "loyalty_reward", "reason": "Orders regularly in small baskets.", "evidence": ["E1"]}
        elif "summary" in props:
            ans = {"summary": "Buys home decorations in regular small orders.",
                   "claims": [{"text": "Reorders home decorations.", "evidence": ["E1"], "inferred": False}]}
        elif "aspects" in props:
            ans = {"aspects": []}
        else:
            ans = {"reason": "Bought similar items before.", "evidence": ["E1"]}
        return Completion(text=json.dumps(ans), usage=Usage(80, 20), model="fake")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ws = tmp_path_factory.mktemp("ws-tasks")
    Runtime(agent_settings(ws)).ingest(DATASET, show_progress=False)
    return ws


@pytest.fixture(scope="module")
def runtime(workspace: Path) -> FakeModelRuntime:
    return FakeModelRuntime(agent_settings(workspace, model_retries=0, model_cooldown_s=0))


@pytest.fixture(scope="module")
def api(workspace: Path, runtime: FakeModelRuntime) -> Iterator[httpx.Client]:
    with serve_app(workspace, runtime=runtime, max_sentiment_texts=5) as url, \
            httpx.Client(base_url=url, headers=AUTH, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def api_no_model(workspace: Path) -> Iterator[httpx.Client]:
    """The model is not started: every call to it is 'unavailable' at once."""
    with serve_app(workspace, start_model=False) as url, httpx.Client(base_url=url, headers=AUTH, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def item(runtime: FakeModelRuntime) -> str:
    return runtime.store.user_events(DATASET, USER)[-1].item_id


@pytest.fixture
def model_dies(runtime: FakeModelRuntime) -> Iterator[None]:
    runtime.down = True
    yield
    runtime.down = False


def bodies(item: str) -> dict[str, dict[str, Any]]:
    return {
        "/v1/purchase-intent": {"dataset": DATASET, "user_id": USER, "item_id": item},
        "/v1/click": {"dataset": DATASET, "user_id": USER, "item_id": item},
        "/v1/session-intent": {"dataset": DATASET, "user_id": USER},
        "/v1/churn": {"dataset": DATASET, "user_id": USER},
        "/v1/profile": {"dataset": DATASET, "user_id": USER},
        "/v1/sentiment": {"texts": ["Arrived broken, support never answered.", "Lovely mug!"]},
        "/v1/audience": {"dataset": DATASET, "item_id": item, "n": 5},
    }


# ---- happy paths (model answering) ---------------------------------------------------------------


def test_purchase_intent_with_model(api: httpx.Client, item: str) -> None:
    r = api.post("/v1/purchase-intent", json=bodies(item)["/v1/purchase-intent"])
    assert r.status_code == 200, r.text
    p = r.json()
    assert p["user_id"] == USER and p["item_id"] == item and 0 <= p["probability"] <= 1
    assert p["probability_source"] == "blend" and p["model_probability"] is not None
    assert p["reason_source"] == "model" and p["evidence"][0]["event_id"]
    assert not p["meta"]["degraded"], p["meta"]


def test_purchase_intent_scorers(api: httpx.Client, item: str) -> None:
    """baseline and llm answer alone and say so; bert without a trained encoder is a 422 that
    names `scorer` and the train command (no silent fallback to another scorer)."""
    body = bodies(item)["/v1/purchase-intent"]
    p = api.post("/v1/purchase-intent", json=body | {"scorer": "baseline"}).json()
    assert p["probability_source"] == "baseline" and p["probability"] == p["baseline_probability"]
    assert p["model_probability"] is None and p["scorer"] == "baseline"  # the yes/no call was not made
    p = api.post("/v1/purchase-intent", json=body | {"scorer": "llm"}).json()
    assert p["probability_source"] == "llm" and p["probability"] == pytest.approx(0.6 / 0.9, abs=1e-4)
    r = api.post("/v1/purchase-intent", json=body | {"scorer": "bert"})
    assert_envelope(r, 422, param="scorer")
    assert f"shoplens train --dataset {DATASET} --task purchase --model bert" in r.json()["error"]["message"]


def test_click_without_a_trained_click_encoder_is_a_422_naming_dataset_and_the_train_command(
        api: httpx.Client, item: str) -> None:
    """/v1/click has no fallback scorer: untrained, it says how to train one."""
    r = api.post("/v1/click", json={"dataset": DATASET, "user_id": USER, "item_id": item})
    err = assert_envelope(r, 422, param="dataset")
    assert f"shoplens train --dataset {DATASET} --task click --model bert" in err["message"]


def test_session_intent_with_model(api: httpx.Client) -> None:
    r = api.post("/v1/session-intent", json={"dataset": DATASET, "user_id": USER})
    assert r.status_code == 200, r.text
    p = r.json()
    assert p["user_id"] == USER and 0 <= p["probability"] <= 1 and p["horizon_hours"] is None
    assert p["probability_source"] == "blend" and p["model_probability"] is not None
    assert p["session"]["n_events"] >= 1 and p["reason_source"] == "model" and p["evidence"][0]["event_id"]
    assert p["meta"]["prompt_versions"] == ["session_intent.v1", "session_intent_explain.v1"]
    r = api.post("/v1/session-intent", json={"dataset": DATASET, "user_id": USER, "horizon_hours": 24,
                                             "as_of": "2000-01-01T00:00:00Z"})
    p = r.json()  # no events before as_of: the labelled base rate, no model call
    assert r.status_code == 200 and p["cold_start"] and p["probability_source"] == "cold_start_base_rate", r.text


def test_churn_with_model(api: httpx.Client) -> None:
    r = api.post("/v1/churn", json={"dataset": DATASET, "user_id": USER, "horizon_days": 60})
    assert r.status_code == 200, r.text
    p = r.json()
    assert p["user_id"] == USER and p["horizon_days"] == 60 and p["risk_band"] and p["drivers"]
    assert p["action"] == "loyalty_reward" and p["model_probability"] is not None
    # no churn blend fitted for this dataset: the model has weight 0, the baseline's probability is served
    assert p["probability_source"] == "baseline" and p["probability"] == p["baseline_probability"]
    assert any(n.startswith("the model has weight 0 in this blend: no churn blend fitted") for n in p["meta"]["notes"])
    assert not p["meta"]["degraded"], p["meta"]


def test_profile_with_model(api: httpx.Client) -> None:
    r = api.post("/v1/profile", json={"dataset": DATASET, "user_id": USER})
    assert r.status_code == 200, r.text
    p = r.json()
    assert p["user_id"] == USER and p["attributes"] and p["summary_source"] == "model"
    assert p["claims"][0]["evidence"][0]["event_id"] and not p["meta"]["degraded"]


def test_sentiment_batch_with_model_keeps_order_and_reports_bad_records(api: httpx.Client) -> None:
    r = api.post("/v1/sentiment", json={"texts": ["Arrived broken, support never answered.", "<p> </p>",
                                                  "Great mug, fast delivery"]})
    assert r.status_code == 200, r.text
    out = r.json()
    ok, bad, ok2 = out["results"]
    assert ok["polarity"] == "negative" and ok["source"] == "model" and not ok["meta"]["degraded"]
    assert bad["index"] == 1 and "empty" in bad["error"]
    assert ok2["source"] == "model"
    assert out["meta"] == {"degraded": False, "degraded_reason": None, "n": 3, "by_model": 2, "by_lexicon": 0,
                           "failed": 1, "reused": 0}


def test_audience_with_model(api: httpx.Client, item: str) -> None:
    r = api.post("/v1/audience", json={"dataset": DATASET, "item_id": item, "n": 5})
    assert r.status_code == 200, r.text
    p = r.json()
    assert p["item_id"] == item and 1 <= len(p["users"]) <= 5
    assert [u["rank"] for u in p["users"]] == list(range(1, len(p["users"]) + 1))
    assert p["users"][0]["reason_source"] == "model" and not p["meta"]["degraded"]
    r = api.post("/v1/audience", json={"dataset": DATASET, "campaign_text": "christmas decorations", "n": 3})
    assert r.status_code == 200 and len(r.json()["users"]) <= 3


# ---- bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("route", "body", "param"), [
    ("/v1/purchase-intent", {"dataset": DATASET, "user_id": USER}, "item_id"),
    ("/v1/session-intent", {"dataset": DATASET, "user_id": USER, "horizon_hours": 0}, "horizon_hours"),
    ("/v1/churn", {"dataset": DATASET, "user_id": USER, "horizon_days": 0}, "horizon_days"),
    ("/v1/profile", {"dataset": DATASET, "user_id": USER, "as_of": "yesterday-ish"}, "as_of"),
    ("/v1/sentiment", {"texts": ["fine", 42]}, "texts[1]"),
    ("/v1/sentiment", {"texts": ["fine", ""]}, "texts[1]"),
    ("/v1/audience", {"dataset": DATASET, "n": 5}, "item_id"),
    ("/v1/audience", {"dataset": DATASET, "item_id": "X", "n": "many"}, "n"),
    ("/v1/churn", {"dataset": "no-such", "user_id": USER}, "dataset"),
    ("/v1/purchase-intent", {"dataset": DATASET, "user_id": USER, "item_id": "X", "scorer": "gpt"}, "scorer"),
    ("/v1/click", {"dataset": DATASET, "user_id": USER, "item_id": "X", "scorer": "llm"}, "scorer"),
    ("/v1/click", {"dataset": DATASET, "user_id": USER, "item_id": "X", "horizon_hours": -1}, "horizon_hours"),
    ("/v1/click", {"dataset": DATASET, "user_id": USER}, "item_id"),
    ("/v1/audience", {"dataset": DATASET, "item_id": "X", "predicted": "views"}, "predicted"),
    ("/v1/audience", {"dataset": DATASET, "campaign_text": "mugs", "predicted": "click"}, "predicted"),
    ("/v1/audience", {"dataset": DATASET, "item_id": "X", "predicted": "click"}, "predicted"),
])
def test_invalid_input_422_names_the_param(api: httpx.Client, route: str, body: dict[str, Any], param: str) -> None:
    assert_envelope(api.post(route, json=body), 422, param=param)


@pytest.mark.parametrize("route", ["/v1/purchase-intent", "/v1/session-intent", "/v1/churn", "/v1/profile"])
def test_unknown_user_404_names_no_other_user(api: httpx.Client, item: str, route: str) -> None:
    body = bodies(item)[route] | {"user_id": "1785"}
    err = assert_envelope(api.post(route, json=body), 404, code="unknown_user", param="user_id")
    assert "'1785'" in err["message"] and "17850" not in err["message"]  # no enumeration of stored ids


def test_oversized_sentiment_batch_and_text_413(api: httpx.Client) -> None:
    assert_envelope(api.post("/v1/sentiment", json={"texts": ["ok"] * 6}), 413, code="too_many_texts", param="texts")
    assert_envelope(api.post("/v1/sentiment", json={"texts": ["ok", "x" * 2_001]}), 413, code="text_too_long",
                    param="texts[1]")


@pytest.mark.parametrize("route", TASK_ROUTES)
def test_task_routes_need_a_key(api: httpx.Client, item: str, route: str) -> None:
    url = f"{api.base_url}{route}"
    assert_envelope(httpx.post(url, json=bodies(item)[route]), 401, code="missing_api_key")
    assert_envelope(httpx.post(url, json=bodies(item)[route], headers={"Authorization": "Bearer nope"}), 403)


# ---- the model down ---------------------------------------------------------------------------------


def _down_checks(c: httpx.Client, item: str) -> None:
    b = bodies(item)
    for route in ("/v1/purchase-intent", "/v1/session-intent", "/v1/churn"):
        r = c.post(route, json=b[route])
        assert r.status_code == 200, r.text
        p = r.json()
        assert p["meta"]["degraded"] and p["meta"]["degraded_reason"], p["meta"]
        assert p["probability_source"] == "baseline" and p["model_probability"] is None
        assert p["reason_source"] == "fallback"
    r = c.post("/v1/sentiment", json=b["/v1/sentiment"])
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["meta"]["degraded"] and out["meta"]["by_lexicon"] == 2 and out["meta"]["degraded_reason"]
    assert {x["source"] for x in out["results"]} == {"lexicon"} and out["results"][0]["polarity"] == "negative"
    r = c.post("/v1/audience", json=b["/v1/audience"])
    assert r.status_code == 200, r.text
    p = r.json()
    assert p["meta"]["degraded"] and p["meta"]["degraded_reason"] and p["users"]
    assert {u["reason_source"] for u in p["users"]} == {"fallback"}
    r = c.post("/v1/profile", json=b["/v1/profile"])
    err = assert_envelope(r, 503, code="model_unavailable", param=None)
    assert "use_llm=false" in err["message"] and int(r.headers["retry-after"]) >= 1
    r = c.post("/v1/profile", json=b["/v1/profile"] | {"use_llm": False})
    assert r.status_code == 200 and r.json()["summary"].startswith("[template]"), r.text


def test_model_not_started_fallbacks_degrade_profile_503(api_no_model: httpx.Client, item: str) -> None:
    _down_checks(api_no_model, item)
    m = api_no_model.get("/metrics", headers=OP).text
    assert 'shoplens_degraded_answers_total{route="/v1/purchase-intent"}' in m


def test_model_dying_mid_request_fallbacks_degrade_profile_503(api: httpx.Client, item: str,
                                                               model_dies: None) -> None:
    _down_checks(api, item)


# ---- the OpenAPI document ----------------------------------------------------------------------------


def test_task_routes_are_in_openapi(api: httpx.Client) -> None:
    doc = httpx.get(f"{api.base_url}/openapi.json").json()
    assert set(TASK_ROUTES) <= set(doc["paths"])
    for route in TASK_ROUTES:
        op = doc["paths"][route]["post"]
        assert "requestBody" in op and {"200", "401", "413", "422"} <= set(op["responses"]), route
    assert "503" in doc["paths"]["/v1/profile"]["post"]["responses"]
    assert "404" in doc["paths"]["/v1/churn"]["post"]["responses"]
