"""Prompt templates: loading, strict rendering, and snapshots of the rendered prompts.

Snapshots live in tests/snapshots/<prompt ref>.txt. After an intended prompt change, regenerate
them with ``UPDATE_SNAPSHOTS=1 pytest tests/test_prompts.py`` and review the diff.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jinja2
import pytest
import yaml
from pydantic import ValidationError

from agent.domain.history import build_history, themes
from agent.domain.schemas import BehaviorEvent, CatalogItem
from agent.llm.base import Message
from agent.llm.prompting import PromptTemplate, available_prompts, load_prompt, render

PROMPTS_DIR = Path(__file__).resolve().parents[1] / "prompts"
SNAPSHOTS = Path(__file__).resolve().parent / "snapshots"

CATALOG = {
    "85123A": CatalogItem(item_id="85123A", title="WHITE HANGING HEART T-LIGHT HOLDER"),
    "71053": CatalogItem(item_id="71053", title="WHITE METAL LANTERN"),
    "84406B": CatalogItem(item_id="84406B", title="CREAM CUPID HEARTS COAT HANGER"),
    "22752": CatalogItem(item_id="22752", title="SET 7 BABUSHKA NESTING BOXES"),
}


def fixed_history():
    rows = [
        ("85123A", "view", "2011-11-20T09:00:00Z", {}),
        ("85123A", "purchase", "2011-11-20T09:05:00Z",
         {"quantity": 6, "unit_price": 2.55, "basket_id": "536365"}),
        ("71053", "purchase", "2011-11-20T09:05:00Z",
         {"quantity": 6, "unit_price": 3.39, "basket_id": "536365"}),
        ("84406B", "cart", "2011-12-01T17:30:00Z", {}),
        ("22752", "review", "2011-12-08T12:00:00Z",
         {"rating": 4.0, "review_text": "Lovely  boxes,\nbut one\tlid was loose."}),
    ]
    events = [
        BehaviorEvent(user_id="17850", item_id=i, event_type=k, timestamp=ts, **kw)
        for i, k, ts, kw in rows
    ]
    return build_history("17850", events, CATALOG, as_of=datetime(2011, 12, 9, tzinfo=UTC))


def as_text(messages: list[Message]) -> str:
    return "".join(f"=== {m['role']} ===\n{m['content']}\n" for m in messages)


def check_snapshot(name: str, text: str) -> None:
    path = SNAPSHOTS / f"{name}.txt"
    if os.environ.get("UPDATE_SNAPSHOTS") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return
    if not path.exists():
        pytest.fail(
            f"snapshot {path} is missing: create it with "
            "`UPDATE_SNAPSHOTS=1 pytest tests/test_prompts.py`, review it and commit it"
        )
    expected = path.read_text(encoding="utf-8")
    assert text == expected, (
        f"rendered prompt differs from {path}; if the change is intended, add a new prompt "
        "version or rerun with UPDATE_SNAPSHOTS=1 and review the diff"
    )


def test_every_prompt_file_loads_and_its_ref_matches_the_file_name() -> None:
    files = sorted(p.name.removesuffix(".yaml") for p in PROMPTS_DIR.glob("*.yaml"))
    assert files, "no prompts found"
    assert available_prompts() == files
    for ref in files:
        tpl = load_prompt(ref)
        assert tpl.ref == ref
        raw = yaml.safe_load((PROMPTS_DIR / f"{ref}.yaml").read_text(encoding="utf-8"))
        assert f"{raw['name']}.v{raw['version']}" == ref
        assert len(tpl.sha256) == 16


def test_required_prompts_exist() -> None:
    assert {"next_item_rank.v1", "next_item_explain.v1"} <= set(available_prompts())


def test_bad_refs() -> None:
    with pytest.raises(ValueError, match="must look like 'next_item_rank.v1'"):
        load_prompt("next_item_rank")
    with pytest.raises(FileNotFoundError) as exc:
        load_prompt("next_item_rank.v99")
    assert "next_item_rank.v1" in str(exc.value)  # lists what exists


def test_template_schema_forbids_unknown_keys() -> None:
    base = {"name": "x", "version": 1, "description": "d", "system": "s", "user": "u"}
    assert PromptTemplate.model_validate(base).ref == "x.v1"
    with pytest.raises(ValidationError, match="extra"):
        PromptTemplate.model_validate({**base, "temperature": 0.2})
    with pytest.raises(ValidationError):
        PromptTemplate.model_validate({**base, "version": 0})


def test_missing_variable_raises() -> None:
    hist = fixed_history()
    rank = load_prompt("next_item_rank.v1")
    with pytest.raises(jinja2.UndefinedError, match="verb"):
        render(rank, candidates=[{"label": "A", "title": "MUG"}], **hist.prompt_vars())
    with pytest.raises(jinja2.UndefinedError):
        render(rank, verb="buy", **hist.prompt_vars())
    with pytest.raises(jinja2.UndefinedError):
        render(load_prompt("next_item_explain.v1"), **hist.prompt_vars())
    # a missing attribute of a given variable is an error too
    vars_ = hist.prompt_vars()
    vars_["user"] = {k: v for k, v in vars_["user"].items() if k != "span"}
    with pytest.raises(jinja2.UndefinedError, match="span"):
        render(rank, verb="buy", candidates=[], **vars_)


def test_history_view_refs_and_times() -> None:
    hist = fixed_history()
    assert hist.refs == ["E1", "E2", "E3", "E4", "E5"]
    assert [line.when for line in hist.lines] == [
        "2 weeks before", "2 weeks before", "2 weeks before", "7 days before", "same day"]
    # bought, or reviewed (22752): a reviewer has the item (OWNED_EVENT_TYPES)
    assert hist.purchased_items == {"85123A", "71053", "22752"}


def test_snapshot_next_item_rank_v1() -> None:
    hist = fixed_history()
    candidates = [
        {"label": "A", "title": "RED HANGING HEART T-LIGHT HOLDER"},
        {"label": "B", "title": "JUMBO BAG RED RETROSPOT"},
        {"label": "C", "title": "WHITE METAL LANTERN"},
    ]
    messages = render(load_prompt("next_item_rank.v1"), candidates=candidates, verb="buy",
                      **hist.prompt_vars())
    check_snapshot("next_item_rank.v1", as_text(messages))


def test_snapshot_next_item_explain_v1() -> None:
    hist = fixed_history()
    items = [
        {"label": "A", "title": "RED HANGING HEART T-LIGHT HOLDER",
         "hint": "similar to E2: WHITE HANGING HEART T-LIGHT HOLDER"},
        {"label": "B", "title": "JUMBO BAG RED RETROSPOT", "hint": ""},
    ]
    messages = render(load_prompt("next_item_explain.v1"), items=items, **hist.prompt_vars())
    check_snapshot("next_item_explain.v1", as_text(messages))


def test_snapshot_next_item_explain_v2_shares_the_ranking_prompts_prefix() -> None:
    hist = fixed_history()
    items = [{"label": "A", "title": "RED HANGING HEART T-LIGHT HOLDER", "hint": ""}]
    messages = render(load_prompt("next_item_explain.v2"), items=items, **hist.prompt_vars())
    check_snapshot("next_item_explain.v2", as_text(messages))
    rank = render(load_prompt("next_item_rank.v1"), candidates=[{"label": "A", "title": "X"}], verb="buy",
                  **hist.prompt_vars())
    # the same system text and the same history block: the server reuses the ranking call's prefix
    assert messages[0] == rank[0]
    head = rank[1]["content"].split("Candidate products:")[0]
    assert len(head) > 200 and messages[1]["content"].startswith(head)


def test_snapshot_next_item_explain_v3_facts_written_by_code_and_the_ranking_prefix() -> None:
    hist = fixed_history()
    items = [{"label": "A", "title": "RED HANGING HEART T-LIGHT HOLDER",
              "fact": "Similar to WHITE HANGING HEART T-LIGHT HOLDER (E2) in this customer's history."},
             {"label": "B", "title": "JUMBO BAG RED RETROSPOT", "fact": "A best-seller in this shop."}]
    messages = render(load_prompt("next_item_explain.v3"), items=items, max_words=12,
                      openings=["the same", "another", "a matching", "a similar"],
                      **hist.prompt_vars())
    check_snapshot("next_item_explain.v3", as_text(messages))
    rank = render(load_prompt("next_item_rank.v1"), candidates=[{"label": "A", "title": "X"}], verb="buy",
                  **hist.prompt_vars())
    assert messages[0] == rank[0]
    assert messages[1]["content"].startswith(rank[1]["content"].split("Candidate products:")[0])


def _session_prompt_vars() -> dict[str, object]:
    from datetime import timedelta

    from agent.tasks.session_intent import session_features, session_prompt

    t = datetime(2017, 12, 2, 20, 0, tzinfo=UTC)
    rows = [("22752", "purchase", -3 * 86_400), ("85123A", "view", -600), ("71053", "view", -540),
            ("85123A", "view", -420), ("85123A", "cart", -300), ("84406B", "favourite", -60)]
    events = [BehaviorEvent(user_id="1000", item_id=i, event_type=k, timestamp=t + timedelta(seconds=s))
              for i, k, s in rows]
    as_of = t + timedelta(seconds=1)
    f = session_features(events, as_of, CATALOG)
    return session_prompt("1000", events, CATALOG, as_of, f, None)[0]


def test_snapshot_session_intent_v1() -> None:
    check_snapshot("session_intent.v1", as_text(render(load_prompt("session_intent.v1"), **_session_prompt_vars())))


def test_snapshot_session_intent_explain_v1() -> None:
    messages = render(load_prompt("session_intent_explain.v1"), **_session_prompt_vars())
    check_snapshot("session_intent_explain.v1", as_text(messages))


def test_snapshot_encoder_case_v1() -> None:
    """The text the fine-tuned encoder reads for one Taobao-like case: ids-only titles become their
    category, the funnel and the user's last 3 events (marked same item / same cat)."""
    from agent.tasks.encoder_cases import verbalise
    from agent.tasks.intent import funnel_features

    cat = {i: CatalogItem(item_id=i, title=f"Taobao item {i} (category {c})", category=c)
           for i, c in [("5120034", "4145813"), ("77", "4145813"), ("88", "2520377")]}
    t = datetime(2017, 12, 1, 12, tzinfo=UTC)
    evs = [BehaviorEvent(user_id="1000", item_id=i, event_type=k, timestamp=t + timedelta(hours=h))
           for i, k, h in [("88", "view", -100), ("5120034", "view", -30), ("77", "cart", -5), ("5120034", "cart", -2)]]
    f = funnel_features(evs, "5120034", t, cat)
    check_snapshot("encoder_case.v1", verbalise(evs, "5120034", t, f, cat) + "\n")


def test_snapshot_purchase_intent_fewshot_v1() -> None:
    """Demonstrations (encoder_case.v1 texts with their answers) first, the case last, so every
    case of a fold shares the demonstration prefix."""
    from agent.tasks.encoder_cases import EncoderCase
    from eval.encoder_eval import fewshot_messages

    t = datetime(2017, 12, 1, 12, tzinfo=UTC)

    def case(user: str, text: str, label: int) -> EncoderCase:
        return EncoderCase(user_id=user, item_id="1", cutoff=t, label=label, text=text, funnel=None,  # type: ignore[arg-type]
                           source="touched")

    demos = [case("a", "item: cat 1. here: 2 views 1 carts 0 favs 0 buys, last 1.0 h ago", 1),
             case("b", "item: cat 2. here: 1 views 0 carts 0 favs 0 buys, last 60.0 h ago", 0)]
    msgs = fewshot_messages(demos, case("c", "item: cat 3. here: 3 views 0 carts 1 favs 0 buys", 0), 48.0)
    assert msgs[1]["content"].endswith("Case: item: cat 3. here: 3 views 0 carts 1 favs 0 buys\nAnswer (yes or no):")
    check_snapshot("purchase_intent_fewshot.v1", as_text(msgs))


def test_themes_are_ordered_by_count_then_first_appearance() -> None:
    titles = ["WHITE HANGING HEART HOLDER", "RED HEART HOLDER", "Set of 3 red boxes"]
    assert themes(titles) == ["heart", "holder", "red", "white", "hanging"]


def test_rendered_history_does_not_depend_on_the_hash_seed() -> None:
    code = (
        "from agent.domain.history import themes;"
        "print(themes(['WHITE HANGING HEART T-LIGHT HOLDER', 'WHITE METAL LANTERN',"
        " 'CREAM CUPID HEARTS COAT HANGER', 'SET 7 BABUSHKA NESTING BOXES']))"
    )
    root = Path(__file__).resolve().parents[1]
    outs = {
        subprocess.run(
            [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("0", "1", "2", "3")
    }
    assert len(outs) == 1, outs


def test_sentiment_aspects_v2_snapshot() -> None:
    messages = render(load_prompt("sentiment_aspects.v2"), text="The battery life is great but the 屏幕 is dim.",
                      max_aspects=5)
    check_snapshot("sentiment_aspects.v2", as_text(messages))


# ---- every other template: rendered from fixed inputs through the code that builds its variables

_T0 = datetime(2011, 9, 1, tzinfo=UTC)


def _retail_events() -> list[BehaviorEvent]:
    """Customer 17850: three baskets over four months, a cart and a review; fixed times."""
    from datetime import timedelta

    rows = [  # (item, type, days after _T0, extra)
        ("85123A", "purchase", 0, {"quantity": 6, "unit_price": 2.55, "basket_id": "536365"}),
        ("71053", "purchase", 0, {"quantity": 6, "unit_price": 3.39, "basket_id": "536365"}),
        ("84406B", "purchase", 35, {"quantity": 8, "unit_price": 2.75, "basket_id": "541001"}),
        ("85123A", "purchase", 70, {"quantity": 12, "unit_price": 2.55, "basket_id": "548002"}),
        ("22752", "view", 90, {}),
        ("22752", "cart", 90, {}),
        ("71053", "review", 95, {"rating": 5.0, "review_text": "Sturdy lantern, arrived quickly."}),
    ]
    return [BehaviorEvent(user_id="17850", item_id=i, event_type=k, timestamp=_T0 + timedelta(days=d, hours=n), **kw)
            for n, (i, k, d, kw) in enumerate(rows)]


def _fake_calls(predict: object) -> list[list[Message]]:
    """Run one prediction with a FakeModel that answers 'yes' to verbalizer calls and fails the
    rest (the task degrades); the messages of every call, in order."""
    import asyncio

    from agent.llm.base import Completion, ModelUnavailableError, Usage
    from agent.llm.fake import FakeCall, FakeModel

    def respond(call: FakeCall) -> Completion | Exception:
        if call.max_tokens == 1:
            return Completion(text="yes", usage=Usage(10, 1), model="fake", top_logprobs=[{"yes": -0.1, "no": -2.4}])
        return ModelUnavailableError("explanations are not part of this snapshot")

    fake = FakeModel(responder=respond)
    asyncio.run(predict(fake))  # type: ignore[operator]
    return [c.messages for c in fake.calls]


def test_snapshot_purchase_intent_v1_and_explain_v1() -> None:
    from agent.tasks.intent import IntentService

    calls = _fake_calls(lambda m: IntentService(m).predict(
        "17850", "22752", _retail_events(), CATALOG, as_of=datetime(2011, 12, 1, tzinfo=UTC), horizon_hours=48))
    assert len(calls) == 2
    check_snapshot("purchase_intent.v1", as_text(calls[0]))
    check_snapshot("purchase_intent_explain.v1", as_text(calls[1]))


def test_snapshot_churn_risk_v1_and_explain_v1() -> None:
    from agent.tasks.churn import ChurnService

    calls = _fake_calls(lambda m: ChurnService(m).predict(
        "17850", _retail_events(), CATALOG, as_of=datetime(2012, 1, 15, tzinfo=UTC)))
    assert len(calls) == 2
    check_snapshot("churn_risk.v1", as_text(calls[0]))
    check_snapshot("churn_explain.v1", as_text(calls[1]))


def test_snapshot_user_profile_v1() -> None:
    from agent.tasks.profile import ProfileService

    calls = _fake_calls(lambda m: ProfileService(m).predict(
        "17850", _retail_events(), CATALOG, as_of=datetime(2012, 1, 15, tzinfo=UTC)))
    check_snapshot("user_profile.v1", as_text(calls[0]))


def test_snapshot_audience_score_v1_both_asks() -> None:
    hist = fixed_history()
    tpl = load_prompt("audience_score.v1")
    text = "".join(f"##### ask={ask}\n" + as_text(render(tpl, target="WHITE HANGING HEART T-LIGHT HOLDER", ask=ask,
                                                           **hist.prompt_vars()))
                   for ask in ("probability", "reason"))
    check_snapshot("audience_score.v1", text)


def _titles_vars() -> dict[str, object]:
    return {"history": ["Mario Kart 8", "Zelda: Breath of the Wild", "Nintendo Switch Pro Controller"],
            "n_history": 7, "verb": "buy",
            "candidates": [{"label": "A", "title": "Splatoon 2"}, {"label": "B", "title": "FIFA 18 (PS4)"},
                           {"label": "C", "title": "Switch carrying case"}]}


def test_snapshot_next_item_rank_titles_v1_with_a_demonstration() -> None:
    demo = {"history": ["Halo 5", "Xbox One Controller"], "answer": "B",
            "candidates": [{"label": "A", "title": "Wii Fit"}, {"label": "B", "title": "Gears of War 4"}]}
    plain = render(load_prompt("next_item_rank_titles.v1"), examples=[], **_titles_vars())
    shot = render(load_prompt("next_item_rank_titles.v1"), examples=[demo], **_titles_vars())
    check_snapshot("next_item_rank_titles.v1", as_text(plain) + "##### with one demonstration\n" + as_text(shot))


def test_snapshot_next_item_pointwise_v1_two_candidates_share_the_prefix() -> None:
    hist = fixed_history()
    tpl = load_prompt("next_item_pointwise.v1")
    a = render(tpl, candidate="RED HANGING HEART T-LIGHT HOLDER", verb="buy", **hist.prompt_vars())
    b = render(tpl, candidate="WHITE METAL LANTERN", verb="buy", **hist.prompt_vars())
    assert a[0] == b[0]  # the same system message
    # everything up to the candidate's line is the same bytes: the server's prefix cache reuses it
    head = a[1]["content"].split("Candidate product:")[0]
    assert b[1]["content"].startswith(head) and len(head) > 200
    check_snapshot("next_item_pointwise.v1", as_text(a) + "##### second candidate\n" + as_text(b))


def test_snapshot_next_item_pointwise_titles_v1() -> None:
    v = {k: x for k, x in _titles_vars().items() if k != "candidates"}
    check_snapshot("next_item_pointwise_titles.v1",
                   as_text(render(load_prompt("next_item_pointwise_titles.v1"), candidate="Splatoon 2", **v)))


def test_snapshot_next_item_generate_v1() -> None:
    check_snapshot("next_item_generate.v1", as_text(render(load_prompt("next_item_generate.v1"), **_titles_vars())))


def test_snapshot_sentiment_aspects_v1() -> None:
    messages = render(load_prompt("sentiment_aspects.v1"), text="The battery life is great but the 屏幕 is dim.",
                      max_aspects=5)
    check_snapshot("sentiment_aspects.v1", as_text(messages))


@pytest.mark.parametrize("ref", ["sentiment_joint.v1", "sentiment_joint.v2"])
def test_snapshot_sentiment_joint(ref: str) -> None:
    messages = render(load_prompt(ref), text="The battery life is great but the 屏幕 is dim.")
    check_snapshot(ref, as_text(messages))


def test_snapshot_chat_route_v1() -> None:
    import asyncio

    from agent.chat.preparse import preparse
    from agent.chat.router import model_route
    from agent.llm.base import ModelUnavailableError
    from agent.llm.fake import FakeModel

    fake = FakeModel()  # no reply: the routing call is logged, then fails
    with pytest.raises(ModelUnavailableError):
        asyncio.run(model_route(fake, preparse("What will customer 17850 buy next, and why?"), max_attempts=1))
    check_snapshot("chat_route.v1", as_text(fake.calls[0].messages))


@pytest.mark.parametrize("prompt", ["chat_answer.v1", "chat_answer.v2"])
def test_snapshot_chat_answer_in_both_languages(prompt: str) -> None:
    from agent.chat.results import ItemDetails, ItemInfo, answer_messages

    result = ItemDetails(dataset="online-retail", n_customers=856,
                         item=ItemInfo(item_id="85123A", title="WHITE HANGING HEART T-LIGHT HOLDER", price=2.55))
    en = answer_messages("Tell me about item 85123A", "en", "item_details", result, prompt)
    zh = answer_messages("商品85123A怎么样？", "zh", "item_details", result, prompt)
    check_snapshot(prompt, as_text(en) + "##### zh\n" + as_text(zh))


def test_snapshot_chat_rationale_v1_in_both_languages() -> None:
    from agent.chat.results import ItemDetails, ItemInfo, answer_messages

    result = ItemDetails(dataset="online-retail", n_customers=856,
                         item=ItemInfo(item_id="85123A", title="WHITE HANGING HEART T-LIGHT HOLDER", price=2.55))
    head = "Customer 17850 is most likely to buy WHITE HANGING HEART T-LIGHT HOLDER."
    en = answer_messages("What will customer 17850 buy next?", "en", "next_item", result, head=head)
    zh = answer_messages("客户17850接下来会买什么？", "zh", "next_item", result, head=head)
    check_snapshot("chat_rationale.v1", as_text(en) + "##### zh\n" + as_text(zh))


def test_every_template_has_a_snapshot() -> None:
    have = {p.name.removesuffix(".txt") for p in SNAPSHOTS.glob("*.txt")}
    assert set(available_prompts()) <= have, sorted(set(available_prompts()) - have)
