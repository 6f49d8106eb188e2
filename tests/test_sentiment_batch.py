"""Review scoring as a batch job (issue 20): stored scores, resume, concurrency, the summary.

The model is `agent.llm.fake.FakeModel` answering the one-call joint format (a label token's
log-probabilities, then ``term | label`` lines) behind the real service and the real SQLite score
store; one ``real_model`` test runs `shoplens sentiment --file` twice on the packaged model.
"""

from __future__ import annotations

import asyncio
import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from agent.app.runtime import Runtime
from agent.app.sentiment_scores import FILE_NAME, REUSED_NOTE, SentimentScoreStore
from agent.app.service import ShopLensService
from agent.llm.base import Completion, ModelUnavailableError, Usage
from agent.llm.fake import FakeCall, FakeModel, Reply
from agent.settings import Settings
from agent.tasks.sentiment import SentimentConfig, SentimentFailure, SentimentResult
from ui.cli import app

ONE_CALL = SentimentConfig(joint=True)
REVIEWS = ["The battery dies fast but the screen is great.", "质量很好，物流也快", "<p> </p>", "Love it!"]


def _reply(call: FakeCall) -> Reply:
    review = call.messages[-1]["content"]
    neg = "dies" in review
    top = {"negative": math.log(0.8 if neg else 0.1), "positive": math.log(0.1 if neg else 0.8),
           "neutral": math.log(0.1)}
    lines = ["negative" if neg else "positive"]
    if "battery" in review:
        lines += ["battery | negative", "screen | positive"]
    if "物流" in review:
        lines += ["物流 | positive"]
    return Completion(text="\n".join(lines), top_logprobs=[top], usage=Usage(300, 9), model="fake")


class _Rt(Runtime):
    def __init__(self, settings: Settings, fake: FakeModel):
        super().__init__(settings)
        self.fake = fake

    async def connect_model(self) -> FakeModel:
        return self.fake


def _service(tmp_path: Path, fake: FakeModel) -> ShopLensService:
    s = Settings(workspace=tmp_path, model_retries=0, model_cooldown_s=0, model_max_concurrency=4)
    return ShopLensService(_Rt(s, fake))


def test_a_rerun_reads_stored_scores_and_a_grown_batch_scores_only_new_texts(tmp_path: Path) -> None:
    fake = FakeModel(responder=_reply)
    store = SentimentScoreStore(tmp_path / FILE_NAME)
    svc = _service(tmp_path, fake)
    first = asyncio.run(svc.sentiment(REVIEWS, aspects=True, config=ONE_CALL, scores=store, deadline_s=None))
    assert len(fake.calls) == 3 and store.count() == 3  # the empty review fails without a call
    assert isinstance(first.results[2], SentimentFailure) and first.results[2].index == 2
    again = asyncio.run(svc.sentiment(REVIEWS, aspects=True, config=ONE_CALL, scores=store, deadline_s=None))
    assert len(fake.calls) == 3 and again.meta.reused == 3  # no model call at all
    for a, b in zip(first.results, again.results, strict=True):
        if isinstance(a, SentimentResult):
            assert isinstance(b, SentimentResult) and REUSED_NOTE in b.meta.notes
            assert (b.polarity, b.confidence, b.aspects) == (a.polarity, a.confidence, a.aspects)
    grown = asyncio.run(svc.sentiment([*REVIEWS, "Screen cracked, it dies in a day"], aspects=True,
                                      config=ONE_CALL, scores=store, deadline_s=None))
    assert len(fake.calls) == 4 and grown.meta.reused == 3
    assert grown.results[4].polarity == "negative"  # type: ignore[union-attr]
    # aspects off is another answer: scored again, not read from the aspects-on scores
    asyncio.run(svc.sentiment(REVIEWS[:1], aspects=False, scores=store, deadline_s=None))
    assert len(fake.calls) == 5
    store.close()


def test_lexicon_answers_are_not_stored_so_they_are_retried(tmp_path: Path) -> None:
    store = SentimentScoreStore(tmp_path / FILE_NAME)
    down = _service(tmp_path, FakeModel(responder=lambda c: ModelUnavailableError("down")))
    out = asyncio.run(down.sentiment(REVIEWS[:2], aspects=True, config=ONE_CALL, scores=store, deadline_s=None))
    assert out.meta.by_lexicon == 2 and store.count() == 0
    store.close()


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path: Path) -> None:
    fake = FakeModel(responder=_reply)
    store = SentimentScoreStore(tmp_path / FILE_NAME)
    svc = _service(tmp_path, fake)
    texts = [f"Love it, order {i}" for i in range(6)]

    def stop_after_two(i: int, r: Any) -> None:
        if i == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        asyncio.run(svc.sentiment(texts, aspects=True, config=ONE_CALL, scores=store, deadline_s=None,
                                  on_done=stop_after_two))
    assert store.count() == 2  # each score is kept as it is made
    out = asyncio.run(svc.sentiment(texts, aspects=True, config=ONE_CALL, scores=store, deadline_s=None))
    assert len(fake.calls) == 6 and out.meta.reused == 2
    store.close()


def test_concurrent_requests_keep_the_file_order(tmp_path: Path) -> None:
    fake = FakeModel(responder=_reply)
    seen: list[int] = []
    out = asyncio.run(_service(tmp_path, fake).sentiment(
        [REVIEWS[0], REVIEWS[3]] * 4, aspects=True, config=ONE_CALL, deadline_s=None, concurrency=4,
        on_done=lambda i, r: seen.append(i)))
    assert [r.polarity for r in out.results] == ["negative", "positive"] * 4  # type: ignore[union-attr]
    assert sorted(seen) == list(range(8))
    with pytest.raises(ValueError, match="concurrency must be >= 1"):
        asyncio.run(_service(tmp_path, fake).sentiment(REVIEWS, concurrency=0, deadline_s=None))


def test_the_file_summary_counts_polarities_aspects_and_names_failed_rows(tmp_path: Path) -> None:
    from ui.sentiment_cli import write_scored

    fake = FakeModel(responder=_reply)
    out = asyncio.run(_service(tmp_path, fake).sentiment(REVIEWS, aspects=True, config=ONE_CALL, deadline_s=None))
    rows = [{"review": t} for t in REVIEWS]
    summary = write_scored(tmp_path / "out.csv", rows, ["review"], out.results)
    assert summary["polarity_counts"] == {"negative": 1, "positive": 2}
    assert summary["top_aspects"] == [{"aspect": "battery", "n": 1, "negative": 1},
                                      {"aspect": "screen", "n": 1, "positive": 1},
                                      {"aspect": "物流", "n": 1, "positive": 1}]
    assert summary["bad_rows"] == [{"row": 4, "error": "review text is empty after removing HTML and whitespace"}]
    with (tmp_path / "out.csv").open(encoding="utf-8") as f:
        written = list(csv.DictReader(f))
    assert [r["polarity"] for r in written] == ["negative", "positive", "", "positive"]


@pytest.mark.real_model
@pytest.mark.slow
def test_real_model_file_batch_reruns_from_stored_scores(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] not installed: run `make setup`")
    src = tmp_path / "reviews.csv"
    with src.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "review"])
        w.writerows([[1, "The battery dies in two hours, but the screen is bright."], [2, "质量很好，物流也快"],
                     [3, "Arrived broken, support never answered."]])
    runner = CliRunner()
    args = ["sentiment", "--workspace", str(tmp_path), "--file", str(src), "--aspects", "--one-call",
            "--out", str(tmp_path / "a.csv")]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    s1 = json.loads(first.stdout)
    assert s1["scored_now"] == 3 and s1["reused_stored"] == 0 and s1["degraded"] == 0
    assert s1["polarity_counts"].get("negative", 0) >= 1 and s1["polarity_counts"].get("positive", 0) >= 1
    reviews = " ".join(["The battery dies in two hours, but the screen is bright.", "质量很好，物流也快",
                        "Arrived broken, support never answered."]).lower()
    assert s1["top_aspects"] and all(a["aspect"] in reviews for a in s1["top_aspects"])  # never invented
    second = runner.invoke(app, args[:-1] + [str(tmp_path / "b.csv")])
    s2 = json.loads(second.stdout)
    assert s2["scored_now"] == 0 and s2["reused_stored"] == 3
    assert (tmp_path / "a.csv").read_text(encoding="utf-8") == (tmp_path / "b.csv").read_text(encoding="utf-8")


def test_dataset_trends_score_unrated_reviews_once_and_list_the_last_windows_aspects(tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from agent.domain.schemas import BehaviorEvent
    from ui.sentiment_cli import _dataset_trends, _ScoreOptions

    t0 = datetime(2024, 1, 1, tzinfo=UTC)

    def rev(i: int, day: int, text: str, stars: float | None = None) -> BehaviorEvent:
        return BehaviorEvent(user_id=f"u{i}", item_id="P1", event_type="review", timestamp=t0 + timedelta(days=day),
                             rating=stars, review_text=text)

    fake = FakeModel(responder=_reply)
    svc = _service(tmp_path, fake)
    rt = svc.runtime
    # window 1 (days 0-89): praised; window 2 (days 90-179): the battery dies; one rated 5 stars
    events = [rev(i, 10 + i, "Love it, great screen") for i in range(3)]
    events += [rev(10 + i, 100 + i, f"The battery dies fast ({i})") for i in range(3)]
    events += [rev(20, 150, "The battery dies fast but the screen is great.", stars=5)]
    rt.store.add_events("shop", events)
    opts = _ScoreOptions(aspects=True, no_llm=False, concurrency=1, store=True, one_call=True)
    trends = asyncio.run(_dataset_trends(rt, "shop", "item", 90, 3, 20.0, opts, n_windows=2))
    assert len(fake.calls) == 5  # five distinct texts, the rated one too (for its aspects)
    (t,) = trends
    assert [(w.n, w.negative) for w in t.windows] == [(3, 0), (4, 3)]  # the rating wins over the text
    assert t.turned == "worse" and t.from_text == 6
    assert t.extra["top_aspects_last_window"][0] == {"aspect": "battery", "polarity": "negative", "n": 4}
    again = asyncio.run(_dataset_trends(rt, "shop", "item", 90, 3, 20.0, opts, n_windows=2))
    assert len(fake.calls) == 5 and again[0].windows[-1].negative == 3  # nothing new: no model call
    rt.store.add_events("shop", [rev(30, 170, "Screen cracked and the battery dies")])
    asyncio.run(_dataset_trends(rt, "shop", "item", 90, 3, 20.0, opts, n_windows=2))
    assert len(fake.calls) == 6  # only the new review
