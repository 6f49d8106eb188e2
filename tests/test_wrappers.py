"""The shared model guard (agent.llm.wrappers): lanes, deadlines, retries, streaming."""

from __future__ import annotations

import asyncio

import pytest

from agent.domain.errors import ModelRequestError, ModelUnavailableError
from agent.llm.base import Completion
from agent.llm.fake import FakeModel
from agent.llm.wrappers import GuardConfig, GuardedModel, NullObserver, PrioritySlots, lane

MSG = [{"role": "user", "content": "hi"}]


class SlowModel:
    """Answers after `delay` seconds with the text it was asked for (the user message)."""

    model_id = "slow"

    def __init__(self, delay: float):
        self.delay = delay
        self.order: list[str] = []

    async def complete(self, messages, **kw):  # noqa: ANN001, ANN003, ANN201
        await asyncio.sleep(self.delay)
        self.order.append(messages[-1]["content"])
        return Completion(text=messages[-1]["content"])

    async def stream(self, messages, **kw):  # noqa: ANN001, ANN003, ANN201
        for w in ("a ", "b ", "c"):
            await asyncio.sleep(self.delay)
            yield w


async def test_interactive_overtakes_queued_batch_calls() -> None:
    inner = SlowModel(0.05)
    g = GuardedModel(inner, GuardConfig(max_concurrency=1, timeout_s=10))

    async def call(name: str, which: str) -> None:
        with lane(which):  # type: ignore[arg-type]
            await g.complete([{"role": "user", "content": name}])

    first = asyncio.create_task(call("b0", "batch"))
    await asyncio.sleep(0.01)  # b0 holds the only slot
    batch = [asyncio.create_task(call(f"b{i}", "batch")) for i in range(1, 4)]
    await asyncio.sleep(0.01)
    fast = asyncio.create_task(call("i1", "interactive"))
    await asyncio.gather(first, *batch, fast)
    assert inner.order == ["b0", "i1", "b1", "b2", "b3"]


async def test_deadline_covers_the_queue_and_a_timed_out_waiter_frees_nothing_it_never_held() -> None:
    g = GuardedModel(SlowModel(0.3), GuardConfig(max_concurrency=1, timeout_s=0.1, cooldown_s=0))
    await g.slots.acquire(0)  # another call holds the only slot throughout
    with pytest.raises(ModelUnavailableError, match=r"model busy: no free slot within 0.1 s \(1 calls running, 0 waiting\)"):
        await g.complete(MSG)  # waited 0.1 s for the slot: that counts
    assert g.slots.in_use == 1 and g.slots.waiting == 0
    g.slots.release()
    with pytest.raises(ModelUnavailableError, match="timed out after 0.1 s"):
        await g.complete(MSG)  # had the slot; the 0.3 s call ran past the deadline
    assert g.slots.in_use == 0 and g.slots.waiting == 0


async def test_a_wait_for_a_slot_starts_no_cooldown_but_a_call_past_its_deadline_does() -> None:
    g = GuardedModel(SlowModel(0.2), GuardConfig(max_concurrency=1, timeout_s=0.05, cooldown_s=60))
    await g.slots.acquire(0)
    with pytest.raises(ModelUnavailableError, match="model busy"):
        await g.complete(MSG)
    assert g.cooling_down() is None  # busy is not failing: the next call is still tried
    g.slots.release()
    with pytest.raises(ModelUnavailableError, match="timed out after 0.05 s"):
        await g.complete(MSG)  # got the slot, then the 0.2 s call ran past the deadline
    assert g.cooling_down() is not None and g.last_ok == 0


async def test_a_call_that_could_not_finish_in_time_is_refused_at_once_not_queued() -> None:
    """Admission: with the slot held and calls of ~1 s, a call with nobody ahead would finish in
    about 1.5 s (half a call's wait, then its own) and queues under a 1.6 s deadline; one more
    behind it would need ~2.5 s and is refused at once, without a cool-down. An interactive call
    is not behind queued batch calls, so it is still admitted."""
    g = GuardedModel(SlowModel(0.0), GuardConfig(max_concurrency=1, timeout_s=1.6, cooldown_s=60))
    g.call_s = 1.0
    await g.slots.acquire(0)
    with lane("batch"):
        queued = asyncio.create_task(g.complete(MSG))
        await asyncio.sleep(0.01)
        assert g.slots.waiting == 1
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(ModelUnavailableError, match=r"model busy: 1 calls running and 1 waiting ahead at about "
                                                        r"1 s a call; this one would not finish within 1.6 s") as e:
            await g.complete(MSG)
        assert asyncio.get_running_loop().time() - t0 < 0.05 and e.value.retry_after_s == 0.5
    assert g.cooling_down() is None
    interactive = asyncio.create_task(g.complete([{"role": "user", "content": "urgent"}]))
    await asyncio.sleep(0.01)
    assert g.slots.waiting == 2  # admitted: queued ahead of the batch call
    g.slots.release()
    assert (await interactive).text == "urgent" and (await queued).text == "hi"
    assert g.call_s is not None and g.call_s < 1.0  # the fast calls pulled the average down


async def test_background_work_is_never_queued_behind_a_full_model() -> None:
    g = GuardedModel(SlowModel(0.0), GuardConfig(max_concurrency=1, timeout_s=10, cooldown_s=60))
    with lane("background"):
        assert (await g.complete(MSG)).text == "hi"  # a free slot: background work runs
        await g.slots.acquire(0)
        with pytest.raises(ModelUnavailableError, match=r"model busy: 1 calls running; background work is not queued"):
            await g.complete(MSG)
    assert g.slots.waiting == 0 and g.cooling_down() is None
    g.slots.release()


async def test_a_success_is_timed_for_readiness() -> None:
    g = GuardedModel(SlowModel(0.0), GuardConfig())
    assert g.last_ok == 0 and not g.busy()
    await g.complete(MSG)
    assert g.last_ok > 0


async def test_a_stream_that_waits_too_long_for_a_slot_starts_no_cooldown() -> None:
    g = GuardedModel(SlowModel(0.2), GuardConfig(max_concurrency=1, timeout_s=0.05, cooldown_s=60))
    await g.slots.acquire(0)  # someone else holds the only slot
    with pytest.raises(ModelUnavailableError, match="model busy"):
        async for _ in g.stream(MSG):
            pass
    g.slots.release()
    assert g.cooling_down() is None and g.slots.in_use == 0


async def test_retries_unavailable_once_then_names_attempts() -> None:
    fake = FakeModel.with_replies([ModelUnavailableError("down"), "ok"])
    g = GuardedModel(fake, GuardConfig(retries=1, cooldown_s=0))
    assert (await g.complete(MSG)).text == "ok"
    assert len(fake.calls) == 2
    fake = FakeModel.with_replies([ModelUnavailableError("down 1"), ModelUnavailableError("down 2")])
    g = GuardedModel(fake, GuardConfig(retries=1, cooldown_s=0))
    with pytest.raises(ModelUnavailableError, match="down 2") as e:
        await g.complete(MSG)
    assert e.value.attempts == 2


async def test_rejected_request_is_not_retried_and_starts_no_cooldown() -> None:
    fake = FakeModel.with_replies([ModelRequestError("bad top_logprobs", status_code=400), "ok"])
    g = GuardedModel(fake, GuardConfig(retries=2, cooldown_s=60))
    with pytest.raises(ModelRequestError):
        await g.complete(MSG)
    assert len(fake.calls) == 1
    assert (await g.complete(MSG)).text == "ok"


async def test_cooldown_fails_fast_after_a_failure() -> None:
    fake = FakeModel.with_replies([ModelUnavailableError("down")])
    g = GuardedModel(fake, GuardConfig(retries=0, cooldown_s=30))
    with pytest.raises(ModelUnavailableError):
        await g.complete(MSG)
    with pytest.raises(ModelUnavailableError, match="not retried for") as e:
        await g.complete(MSG)
    assert e.value.retry_after_s is not None and 29 < e.value.retry_after_s <= 30
    assert len(fake.calls) == 1


async def test_max_tokens_is_capped() -> None:
    fake = FakeModel.with_replies(["x"])
    await GuardedModel(fake, GuardConfig(max_tokens_cap=64)).complete(MSG, max_tokens=5000)
    assert fake.calls[0].max_tokens == 64


async def test_stream_holds_a_slot_until_the_consumer_stops() -> None:
    obs = NullObserver()
    g = GuardedModel(SlowModel(0.01), GuardConfig(max_concurrency=1), observer=obs)
    chunks = []
    agen = g.stream(MSG)
    async for c in agen:
        chunks.append(c)
        assert g.slots.in_use == 1
        break
    await agen.aclose()
    assert chunks == ["a "] and g.slots.in_use == 0
    assert "".join([c async for c in g.stream(MSG)]) == "a b c"
    assert obs.calls == {"cancelled": 1, "ok": 1}


async def test_fake_stream_is_the_reply_word_by_word_and_logged() -> None:
    fake = FakeModel.with_replies(["one two three"])
    assert [c async for c in fake.stream(MSG)] == ["one ", "two ", "three"]
    assert len(fake.calls) == 1


async def test_priority_slots_hand_a_cancelled_grant_on() -> None:
    slots = PrioritySlots(1)
    await slots.acquire(0)
    waiter = asyncio.create_task(slots.acquire(2))
    other = asyncio.create_task(slots.acquire(2))
    await asyncio.sleep(0)
    waiter.cancel()
    slots.release()
    await asyncio.sleep(0)
    await other
    assert slots.in_use == 1
    slots.release()
    assert slots.in_use == 0
