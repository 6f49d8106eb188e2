"""`shoplens eval audience` on any stored dataset: periods, audiences and metrics checked by hand.

A toy shop is written into a temporary workspace's store (hashing embedder: no model, no
network). Who bought, carted or viewed what, and when, is fixed below, so the held-out audience
of each item, the derived periods and the repeat-buyer and baseline rankings are worked out in
the comments.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import get_args

import pytest
from typer.testing import CliRunner

from agent.data.store import EventStore
from agent.domain.schemas import BehaviorEvent, CatalogItem
from agent.settings import Settings
from agent.tasks.audience import AudienceIndex
from eval.audience_eval import (
    AUDIENCE_EVENT_TYPES,
    AUDIENCE_MONTH,
    audience_periods,
    run_audience_eval,
)
from retrieval.embedder import HashingEmbedder
from retrieval.index import VectorIndex
from ui.tasks_cli import AudienceEventType

T0 = datetime(2024, 1, 1, tzinfo=UTC)
TITLES = {"a": "Red mug", "b": "Blue mug", "c": "Green teapot", "d": "Yellow plate"}
# (user, item, event type, day). 12 events, so the robust end (the top 0.5% ignored) is the last
# one: x1's view on day 40. With --days 10 the held-out period is days 30..40, validation 20..30.
#   purchases of a: u_old day 2; r1 days 5, 10 and 32 (a repeat buyer); v1 day 22 (validation);
#   n1 day 33 (new: viewed b on day 3); c1 day 34 (cold: no event before the period)
#   carts of b: r1 days 8 and 36 (repeat); v1 day 35 (new)
EVENTS = [("u_old", "a", "purchase", 2), ("r1", "a", "purchase", 5), ("r1", "b", "cart", 8),
          ("r1", "a", "purchase", 10), ("r1", "a", "purchase", 32), ("r1", "b", "cart", 36),
          ("n1", "b", "view", 3), ("n1", "a", "purchase", 33), ("c1", "a", "purchase", 34),
          ("v1", "a", "purchase", 22), ("v1", "b", "cart", 35), ("x1", "d", "view", 40)]
# NDCG@5 with one relevant user at rank 1 among 3 relevant: 1 / (1 + 1/log2 3 + 1/log2 4)
NDCG_1_OF_3 = 1 / (1 + 1 / math.log2(3) + 1 / 2)
NDCG_1_OF_2 = 1 / (1 + 1 / math.log2(3))


def _day(d: int) -> datetime:
    return T0 + timedelta(days=d)


def _events() -> list[BehaviorEvent]:
    return [BehaviorEvent(user_id=u, item_id=i, event_type=t, timestamp=_day(d))  # type: ignore[arg-type]
            for u, i, t, d in EVENTS]


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A workspace whose store holds the toy dataset ``shop``."""
    monkeypatch.setenv("SHOPLENS_EMBEDDER", "hashing-64")  # for the CLI's own Settings
    store = EventStore(tmp_path / "ws" / "shoplens.sqlite3")
    store.add_items("shop", [CatalogItem(item_id=i, title=t) for i, t in TITLES.items()])
    store.add_events("shop", _events())
    store.close()
    return tmp_path / "ws"


def _settings(ws: Path) -> Settings:
    return Settings(workspace=ws, embedder="hashing-64")


def _run(ws: Path, **kw: object) -> tuple[dict, dict, str]:  # type: ignore[type-arg]
    d = run_audience_eval(_settings(ws), dataset="shop", days=10, n=5, **kw)  # type: ignore[arg-type]
    return (json.loads((d / "config.json").read_text()), json.loads((d / "metrics.json").read_text()),
            (d / "report.md").read_text())


def test_build_counts_purchases_by_default_and_other_types_when_asked() -> None:
    emb = HashingEmbedder(64)
    ids = sorted(TITLES)
    index = VectorIndex.build(ids, emb.embed([TITLES[i] for i in ids]), name="items", embedder=emb.name,
                              content_hash="x")
    events = sorted(_events(), key=lambda e: (e.user_id, e.timestamp))
    catalog = {i: CatalogItem(item_id=i, title=t) for i, t in TITLES.items()}
    by_default = AudienceIndex.build(events, catalog, index, cutoff=_day(30))
    assert set(by_default.buyers) == {"a"} and set(by_default.buyers["a"]) == {"u_old", "r1", "v1"}
    carts = AudienceIndex.build(events, catalog, index, cutoff=_day(30), event_types=("cart",))
    assert carts.buyers == {"b": {"r1": pytest.approx(0.5 ** (22 / 90))}}  # one cart, 22 days before


def test_periods_are_derived_from_the_data_end_and_online_retail_keeps_its_month(ws: Path) -> None:
    store = EventStore(ws / "shoplens.sqlite3")
    p = audience_periods(store, "shop", 10)
    assert p.held_out == (_day(30), _day(40)) and p.validation == (_day(20), _day(30)) and p.how == "derived"
    assert audience_periods(store, "shop").held_out == (_day(10), _day(40))  # default: 30 days
    with pytest.raises(ValueError, match="--dataset online-retail: no such dataset"):
        audience_periods(store, "online-retail")
    store.add_items("online-retail", [CatalogItem(item_id="85123A", title="WHITE HANGING HEART T-LIGHT HOLDER")])
    store.add_events("online-retail", [BehaviorEvent(user_id="17850", item_id="85123A", event_type="purchase",
                                                     timestamp=datetime(2011, 12, 9, 12, tzinfo=UTC))])
    published = audience_periods(store, "online-retail")
    assert published.held_out == AUDIENCE_MONTH and published.how == "published"
    assert published.validation == (datetime(2011, 10, 9, tzinfo=UTC), datetime(2011, 11, 9, tzinfo=UTC))
    assert audience_periods(store, "online-retail", 30).how == "derived"
    store.close()


def test_purchase_audience_on_a_derived_period(ws: Path) -> None:
    config, metrics, report = _run(ws)
    assert config["dataset"] == "shop" and config["event_type"] == "purchase" and config["days"] == 10
    assert config["held_out"] == ["2024-01-31T00:00:00+00:00", "2024-02-10T00:00:00+00:00"]
    assert config["validation"] == ["2024-01-21T00:00:00+00:00", "2024-01-31T00:00:00+00:00"]
    # x1's view on day 40 is the held-out end itself: outside [start, end)
    assert config["skipped"] == {"events_at_or_after_held_out_end": 1, "items_beyond_n_items": 0,
                                 "items_without_new_audience": 0, "tuning": None}
    # one item (a) with audience {r1, n1, c1}; new {n1, c1}; c1 has no earlier event
    info = metrics["_info"]
    assert (info["items"], info["audience_members"], info["cold_audience_members"]) == (1, 3, 1)
    assert info["tuning"]["validation_items"] == 1  # a, bought by v1 on day 22
    # repeat buyers before day 30: r1 (days 5 and 10) > v1 (day 22) > u_old (day 2): r1 first
    repeat = metrics["repeat only"]
    assert repeat["HR@5 all"] == 1.0 and repeat["Recall@5 all"] == round(1 / 3, 4)
    assert repeat["NDCG@5 all"] == round(NDCG_1_OF_3, 4) == 0.4693
    assert repeat["Recall@5 new"] == 0.0 and repeat["NDCG@5 new"] == 0.0
    # baseline: title words of "Red mug" -> r1 4 (two purchases of a, 2 words each), u_old 2, v1 2
    assert metrics["category popularity (baseline)"] == repeat
    assert "fused (weights tuned on the validation period)" in metrics
    assert "fractions in [0, 1]" in report and "n = 1 item (" in report
    # paired per item against the untuned fusion; the baseline ranks like repeat here
    paired = metrics["_paired"]
    assert paired["n_items"] == 1 and paired["reference"].startswith("fused (weights before tuning")
    fused = metrics["fused (weights before tuning: 0.4/0.35/0.25)"]["NDCG@5 all"]
    diff = paired["repeat only"]["NDCG@5 all diff"]
    assert diff == pytest.approx(NDCG_1_OF_3 - fused, abs=2e-4)
    assert paired["repeat only"]["NDCG@5 all diff_ci"] == [diff, diff]  # one item: every resample is it
    assert "## Paired differences from the untuned fusion" in report


def test_cart_audience_without_validation_carts_skips_tuning(ws: Path) -> None:
    config, metrics, _ = _run(ws, event_type="cart")
    assert config["event_type"] == "cart"
    assert config["skipped"]["tuning"].startswith("no cart events in the validation period 2024-01-21 00:00")
    assert not any("tuned" in k for k in metrics)
    # b's held-out carters {r1, v1}; r1 carted b on day 8, so r1 leads and v1 is new
    repeat = metrics["repeat only"]
    assert (repeat["HR@5 all"], repeat["Recall@5 all"], repeat["NDCG@5 all"]) == (1.0, 0.5, round(NDCG_1_OF_2, 4))
    assert repeat["Recall@5 new"] == 0.0


def test_unknown_dataset_empty_period_and_cold_audience_are_refused_before_a_run_folder(ws: Path) -> None:
    with pytest.raises(ValueError, match="--dataset nope: no such dataset") as e:
        run_audience_eval(_settings(ws), dataset="nope")
    assert "shop" in str(e.value) and "shoplens ingest" in str(e.value)
    with pytest.raises(ValueError) as e:
        run_audience_eval(_settings(ws), dataset="shop", days=2)
    msg = str(e.value)
    assert "--dataset shop has no purchase events in the held-out period 2024-02-08 00:00 .. 2024-02-10 00:00 UTC" in msg
    assert "purchase 7 (2024-01-03 .. 2024-02-04), cart 3 (2024-01-09 .. 2024-02-06)" in msg
    assert "--days" in msg and "--event-type" in msg
    with pytest.raises(ValueError, match="no favourite events"):
        run_audience_eval(_settings(ws), dataset="shop", days=10, event_type="favourite")
    # days 3..40: the only audience (n1's view of b on day 3) has no earlier event: all zeros by construction
    with pytest.raises(ValueError, match="none of the 1 users with view events on the 1 item evaluated in the held-out period 2024-01-04"):
        run_audience_eval(_settings(ws), dataset="shop", days=37, event_type="view")
    assert not (ws / "runs").exists()


def test_cli_takes_dataset_days_and_event_type(ws: Path) -> None:
    from ui.cli import app

    assert get_args(AudienceEventType) == AUDIENCE_EVENT_TYPES
    r = CliRunner().invoke(app, ["eval", "audience", "--dataset", "shop", "--days", "10", "--event-type", "cart",
                                 "-n", "5", "--workspace", str(ws), "--out", str(ws / "runs" / "cart")])
    assert r.exit_code == 0, r.output
    run_dir = Path(r.output.strip().splitlines()[-1])
    assert run_dir == ws / "runs" / "cart"
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["dataset"], config["event_type"], config["n"]) == ("shop", "cart", 5)
    assert json.loads((run_dir / "metrics.json").read_text())["repeat only"]["Recall@5 all"] == 0.5
    r = CliRunner().invoke(app, ["eval", "audience", "--dataset", "nope", "--workspace", str(ws)])
    assert r.exit_code == 2 and "--dataset nope: no such dataset" in r.output
    r = CliRunner().invoke(app, ["eval", "audience", "--dataset", "shop", "--event-type", "bogus",
                                 "--workspace", str(ws)])
    assert r.exit_code == 2 and "'bogus' is not one of" in r.output
