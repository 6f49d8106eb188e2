"""`shoplens eval faithfulness` without the model: the summary of recorded answers (hand-counted),
the seeded wrong sentences built from them (each class caught), and a chat turn's record."""

from __future__ import annotations

from typing import Any

import pytest

from agent.app.feedback import wilson_interval
from agent.chat.router import ChatEvent
from agent.domain.predictions.common import Verification
from agent.domain.verify import TitleIndex
from eval.faithfulness_eval import chat_record, seeded_checks, summarise

TITLES = {"W": "HAND WARMER UNION JACK", "R": "HAND WARMER RED LOVE HEART", "B": "HOT WATER BOTTLE KEEP CALM",
          "T": "WHITE HANGING HEART T-LIGHT HOLDER"}
FACT = "Customers who bought HAND WARMER UNION JACK (E20) often bought this too."


def next_item_case(user: str, verification: dict[str, Any], second_source: str = "model") -> dict[str, Any]:
    cited = [["E20", "W", "bought 12 × HAND WARMER UNION JACK at 1.85 each (order 536365)"]]
    return {"user_id": user, "task": "next_item", "seconds": 30.0, "degraded": False, "verification": verification,
            "top_titles": [TITLES["R"], TITLES["B"]],
            "sentences": [
                {"key": "#1", "rank": 1, "title": TITLES["R"], "source": "model", "cited": cited,
                 "source_scores": {"covisit": 1.0}, "text": f"{FACT} Another novelty warmer for cold days."},
                {"key": "#2", "rank": 2, "title": TITLES["B"], "source": second_source, "cited": cited,
                 "source_scores": {"covisit": 0.5},
                 "text": (f"{FACT} Keeps hands warm in winter." if second_source == "model"
                          else f"[retrieval fallback] {FACT}")},
                {"key": "summary", "source": "model", "text": "Stocking up on winter warmers."}]}


RECS = [
    next_item_case("1", dict(checked=3, verified=3, repaired=0, replaced=0, violations=[])),
    next_item_case("2", dict(checked=3, verified=1, repaired=1, replaced=1, violations=["#2: ..."]), "fallback"),
    {"user_id": "3", "task": "next_item", "seconds": 1.0, "error": "UnknownUserError: no such user"},
]


def test_summary_counts_sentences_and_intervals() -> None:
    m = summarise(RECS)
    assert (m["answers"], m["errors"], m["answers_with_model_sentences"]) == (3, 1, 2)
    assert m["model_sentences_checked"] == 6 and m["sentences_returned"] == 6
    assert m["verified_as_written"]["n"] == 4 and m["passed"]["n"] == 5 and m["replaced_by_template"]["n"] == 1
    assert m["passed"]["share"] == round(5 / 6, 4)
    lo, hi = wilson_interval(5, 6)  # type: ignore[misc]
    assert m["passed"]["ci95"] == [round(lo, 4), round(hi, 4)]
    assert m["unlabelled_template_fallbacks"] == 0
    unlabelled = next_item_case("4", dict(checked=3, verified=2, repaired=0, replaced=1), "fallback")
    unlabelled["sentences"][1]["text"] = FACT  # a template sentence shown without its label
    assert summarise([unlabelled])["unlabelled_template_fallbacks"] == 1


def test_every_seeded_wrong_sentence_is_caught() -> None:
    got = seeded_checks(RECS, TitleIndex(TITLES.values()), TITLES)
    assert got["base_sentences_rejected_by_rebuilt_facts"] == 0
    classes = got["classes"]
    # 3 model reasons seeded (2 in case 1, 1 in case 2); the 2nd-ranked ones get a false first place
    assert {c: (x["seeded"], x["caught"]) for c, x in classes.items()} == {
        "first_place_for_a_lower_rank": (1, 1), "invented_number": (3, 3), "popularity_without_data": (3, 3),
        "summary_ranks_a_lower_item_first": (2, 2), "uncited_event": (3, 3), "uncited_product": (3, 3)}


def test_a_chat_turn_is_split_into_model_and_template_sentences() -> None:
    v = Verification(checked=2, verified=1, repaired=0, replaced=1, violations=["x"])
    events = [ChatEvent("token", "Customer 17850 will buy HAND WARMER RED LOVE HEART. "),
              ChatEvent("token", "\n\n[template] Customer 17850 is most likely to buy next:\n1. ..."),
              ChatEvent("done", "1 sentence(s) failed", answer_source="model", verification=v)]
    rec = chat_record(events)
    assert [(s["source"], s["text"][:20]) for s in rec["sentences"]] == [
        ("model", "Customer 17850 will "), ("template", "[template] Customer ")]
    assert rec["verification"]["replaced"] == 1 and rec["degraded"] is False
    # the served default opens with the template's ranking (facts), then the model's why
    head = ChatEvent("token", "Customer 17850 is most likely to buy HAND WARMER RED LOVE HEART. ", source="facts")
    rec = chat_record([head, ChatEvent("token", "It matches E20. ", source="model"),
                       ChatEvent("done", "", answer_source="model", verification=v)])
    assert [(s["source"], s["text"][:14]) for s in rec["sentences"]] == [("facts", "Customer 17850"),
                                                                         ("model", "It matches E20")]
    # a tool's message ("which item?") is neither the model's nor a fallback
    ask = chat_record([ChatEvent("token", "which product? give an item id or its title"),
                       ChatEvent("done", "", answer_source="template")])
    assert {s["source"] for s in ask["sentences"]} == {"message"}
    assert summarise([ask | {"user_id": "3", "seconds": 1.0}])["unlabelled_template_fallbacks"] == 0
    m = summarise([rec | {"user_id": "1", "seconds": 9.0, "table_s": 2.0, "first_words_s": 6.0},
                   rec | {"user_id": "2", "seconds": 9.0, "table_s": 4.0, "first_words_s": 8.0}])
    assert m["unlabelled_template_fallbacks"] == 0 and (m["p50_table_s"], m["p50_first_words_s"]) == (3.0, 7.0)


@pytest.mark.parametrize("task", ["next_item", "churn", "intent", "profile", "audience", "chat"])
def test_the_cli_names_each_task(task: str) -> None:
    from typer.testing import CliRunner

    from ui.cli import app

    r = CliRunner().invoke(app, ["eval", "faithfulness", "--help"])
    assert r.exit_code == 0 and task in r.output


def test_report_only_without_a_run_folder_is_a_clear_error(tmp_path: Any) -> None:
    from typer.testing import CliRunner

    from ui.cli import app

    r = CliRunner().invoke(app, ["eval", "faithfulness", "--report-only", "--workspace", str(tmp_path)])
    assert r.exit_code == 2
    assert "--report-only needs --out with a cases.jsonl of an earlier run" in r.output


def test_a_user_retried_after_the_model_was_down_counts_once(tmp_path: Any) -> None:
    import json

    from eval.faithfulness_eval import _model_down, read_cases

    down = {"user_id": "1", "error": "model unavailable: model failing (no answer within 150 s)"}
    assert _model_down({"degraded_reason": "model unavailable for explanations (model call timed out after 150 s)"})
    assert not _model_down({"degraded_reason": None})
    (tmp_path / "cases.jsonl").write_text("\n".join(json.dumps(r) for r in [down, RECS[0] | {"user_id": "1"}]))
    assert [r.get("error") for r in read_cases(tmp_path)] == [None]


def test_profile_and_audience_answers_become_cases_whose_claims_are_seeded() -> None:
    from types import SimpleNamespace as NS

    from eval.faithfulness_eval import audience_record, profile_record

    ev = NS(ref="E20", item_id="W", summary="bought 12 × HAND WARMER UNION JACK at 1.85 each (order 536365)")
    prof = NS(summary="Buys hand warmers in winter.", summary_source="model", claims=[
        NS(text="Reorders the HAND WARMER UNION JACK (E20).", evidence=[ev]),
        NS(text="[template] bought 12 × HAND WARMER UNION JACK at 1.85 each (order 536365)", evidence=[ev])])
    rec = profile_record(prof)
    assert [(s["key"], s["source"]) for s in rec["sentences"]] == [
        ("profile_summary", "model"), ("claim0", "model"), ("claim1", "template")]
    aud = NS(item_id="W", users=[
        NS(rank=1, reason="Reorders union jack warmers (E20).", reason_source="model", evidence=[ev],
           model_probability=0.8),
        NS(rank=2, reason="[retrieval] Bought HAND WARMER UNION JACK before.", reason_source="fallback", evidence=[],
           model_probability=0.4),  # scored, reason replaced: still a model sentence's outcome
        NS(rank=3, reason="[retrieval] Bought HAND WARMER UNION JACK before.", reason_source="fallback", evidence=[],
           model_probability=None)])  # never asked: not recorded
    arec = audience_record(aud)
    assert [(s["key"], s["source"]) for s in arec["sentences"]] == [("user1", "model"), ("user2", "fallback")]
    cases = [rec | {"user_id": "p", "task": "profile"}, arec | {"user_id": "a", "task": "audience"}]
    got = seeded_checks(cases, TitleIndex(TITLES.values()), TITLES)
    # seeded: the profile summary, its one model claim and the audience's model reason
    assert {c: (x["seeded"], x["caught"]) for c, x in got["classes"].items()} == {
        "invented_number": (3, 3), "uncited_event": (3, 3), "uncited_product": (3, 3)}
    assert summarise([c | {"seconds": 1.0, "verification": None} for c in cases])["unlabelled_template_fallbacks"] == 0
