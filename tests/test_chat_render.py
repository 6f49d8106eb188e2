"""The chat's tables and charts (`ui.chat.render`): human column names in the question's
language, no hash or constant columns (said in a note instead), CSV that reads back equal, and
charts of the numbers a task answer carries (audience, profile, churn, intent, at-risk customers).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from agent.chat.results import AtRiskCustomer, ChurnSegment, TaskResult

render = pytest.importorskip("ui.chat.render", reason="the ui extra (pandas, gradio) is not installed")

HASH = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b"


def segment() -> ChurnSegment:
    def c(uid: str, p: float, last: str, day: int) -> AtRiskCustomer:
        return AtRiskCustomer(customer_id=uid, probability=p, risk_band="high", recency_days=3.0, n_orders=1,
                              orders_last_90d=1, monetary=12.5, drivers=["frequency: 1 order in total (median 3) "
                                                                         "(raises risk)"],
                              last_purchase_event=last, last_purchase_at=f"2011-10-{day}T10:00:00+00:00")
    return ChurnSegment(dataset="d", month=10, year=2011, as_of="2011-11-01T00:00:00+00:00", n_buyers=9,
                        baseline="b", customers=[c("16454", 0.91, HASH, 28), c("14792", 0.87, HASH[::-1], 14)])


def test_a_segment_table_reads_in_english_and_chinese_without_hashes_or_constant_columns() -> None:
    raw = render.items_frame(segment())
    en, note = render.readable_table(raw, "en")
    assert list(en.columns) == ["Rank", "Customer", "P(churn)", "Last order date"]
    assert list(en["Customer"]) == ["16454", "14792"]
    # the event hashes are gone; what was the same on every row is said once, not dropped silently
    assert HASH not in en.to_csv() and HASH[::-1] not in en.to_csv()
    assert note == ("Same on every row: Risk = high; Days since last order = 3.0; Orders = 1; Spend = 12.5; "
                    "Drivers = frequency: 1 order in total (median 3) (raises risk)")
    zh, note_zh = render.readable_table(raw, "zh")
    assert list(zh.columns) == ["排名", "客户", "流失概率", "最近购买日期"]
    assert note_zh.startswith("每行相同：风险 = high；距上次购买天数 = 3.0")


def test_one_row_keeps_every_column_and_key_columns_are_never_dropped() -> None:
    one = pd.DataFrame([{"rank": 1, "customer_id": "A", "risk": "high"}])
    assert list(render.readable_table(one, "en")[0].columns) == ["Rank", "Customer", "Risk"]
    two = pd.DataFrame([{"rank": 1, "item": "MUG", "score": 0.5}, {"rank": 2, "item": "MUG", "score": 0.5}])
    out, note = render.readable_table(two, "en")
    assert list(out.columns) == ["Rank", "Product"] and note == "Same on every row: Score = 0.5"
    assert render.readable_table(None, "en") == (None, "")


def test_csv_round_trips_with_chinese_headers(tmp_path: Path) -> None:
    zh, _ = render.readable_table(render.items_frame(segment()), "zh")
    path = render.write_csv(zh, tmp_path / "csv", "churn_segment/../10月")
    assert path.parent == tmp_path / "csv" and path.name == "shoplens-churn_segment-..-10.csv"
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")  # BOM: Excel opens the Chinese headers as UTF-8
    back = pd.read_csv(path, encoding="utf-8-sig", dtype={"客户": str})
    assert list(back.columns) == list(zh.columns) and list(back["客户"]) == ["16454", "14792"]
    assert list(back["流失概率"]) == [0.91, 0.87]


def audience() -> TaskResult:
    ev = {"ref": "E2", "event_id": HASH, "item_id": "85123A", "event_type": "purchase",
          "timestamp": "2011-10-02T09:00:00+00:00", "summary": "purchase of WHITE HANGING HEART T-LIGHT HOLDER"}
    users = [{"rank": r, "user_id": u, "score": s, "source_scores": {}, "model_probability": None,
              "reason": f"bought it {n} times", "reason_source": "fallback", "evidence": [ev]}
             for r, (u, s, n) in enumerate([("17850", 0.93, 12), ("13047", 0.71, 4)], 1)]
    return TaskResult(tool="audience", data={"item_id": "85123A", "n": 2, "users": users})


def test_an_audience_answer_is_a_table_of_named_customers_and_a_chart() -> None:
    table, note = render.readable_table(render.items_frame(audience()), "en")
    assert list(table["Customer"]) == ["17850", "13047"]
    assert list(table.columns) == ["Rank", "Customer", "Score", "Why"]  # model P is empty; evidence constant
    assert note == "Same on every row: Cited events = E2 2011-10-02 purchase of WHITE HANGING HEART T-LIGHT HOLDER"
    bars, title = render.chart_frame(audience(), "zh")
    assert title == "各目标客户得分" and bars.to_dict("records") == [
        {"name": "17850", "value": 0.93}, {"name": "13047", "value": 0.71}]


def test_profile_churn_and_intent_answers_become_tables_and_charts() -> None:
    profile = TaskResult(tool="profile", data={"attributes": [
        {"name": "theme", "value": "heart", "weight": 0.6, "kind": "observed", "evidence": []},
        {"name": "price_tier", "value": "low", "weight": None, "kind": "inferred", "evidence": []}]})
    t, _ = render.readable_table(render.items_frame(profile), "en")
    assert list(t["Attribute"]) == ["theme", "price_tier"] and list(t["Observed or inferred"]) == ["observed", "inferred"]
    assert render.chart_frame(profile, "en")[0].to_dict("records") == [{"name": "theme: heart", "value": 0.6}]
    churn = TaskResult(tool="churn", data={"probability": 0.7, "baseline_probability": 0.6, "model_probability": None,
                                           "drivers": [{"name": "recency", "value": 200.0, "effect": "raises_risk",
                                                        "detail": "200 days since the last order"}]})
    t, _ = render.readable_table(render.items_frame(churn), "zh")
    assert t.to_dict("records") == [{"因素": "recency", "影响": "raises_risk", "说明": "200 days since the last order"}]
    bars, title = render.chart_frame(churn, "en")
    assert title == "P(churn)" and bars.to_dict("records") == [{"name": "baseline", "value": 0.6},
                                                               {"name": "served", "value": 0.7}]
    intent = TaskResult(tool="intent", data={"probability": 0.2, "baseline_probability": 0.25,
                                             "model_probability": 0.1, "stage": "browsing", "reason": "r"})
    t, _ = render.readable_table(render.items_frame(intent), "en")
    assert list(t["Field"]) == ["probability", "baseline_probability", "model_probability", "stage", "reason"]
    assert render.chart_frame(intent, "zh")[1] == "购买概率"


def test_csv_cells_that_a_spreadsheet_would_run_open_as_text(tmp_path: Path) -> None:
    hostile = pd.DataFrame([{"Product": '=HYPERLINK("http://x.example","click")', "Score": -0.5},
                            {"Product": "@SUM(A1:A9)", "Score": 0.25}, {"Product": " =2+2", "Score": 1.0},
                            {"Product": "MUG", "Score": 0.0}])
    path = render.write_csv(hostile, tmp_path, "t")
    back = pd.read_csv(path, encoding="utf-8-sig")
    assert list(back["Product"]) == ["'=HYPERLINK(\"http://x.example\",\"click\")", "'@SUM(A1:A9)", "' =2+2", "MUG"]
    assert list(back["Score"]) == [-0.5, 0.25, 1.0, 0.0]  # numbers stay numbers


def test_long_numeric_or_hex_ids_in_key_columns_stay_and_bad_numbers_are_not_plotted() -> None:
    ids = pd.DataFrame([{"rank": 1, "customer_id": "1234567890123456", "score": 0.5},
                        {"rank": 2, "customer_id": "deadbeefdeadbeefdeadbeefdeadbeef00", "score": 0.4}])
    assert list(render.readable_table(ids, "en")[0].columns) == ["Rank", "Customer", "Score"]
    nan = TaskResult(tool="churn", data={"probability": float("nan"), "baseline_probability": 0.4})
    bars, _ = render.chart_frame(nan, "en")
    assert bars.to_dict("records") == [{"name": "baseline", "value": 0.4}]
