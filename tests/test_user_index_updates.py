"""Users added through POST /v1/events join the similar-user index, co-visitation and popularity
at once, survive a restart, leave on DELETE, and show in /readyz (issue 17).

Through the real app (uvicorn on loopback, the fake model of test_api, the hashing embedder) on
the Online Retail fixture (23 users). The hand-built case: a new customer NEW buys everything
customer X (13047) bought plus Z, an item only 12473 has, and 12473 is not among X's similar
users. So Z gets a similar-user (and a co-visitation) score for X only once NEW is indexed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.app.runtime import Runtime
from tests.test_api import AUTH, DATASET, FakeLLM, agent_settings, serve_app
from ui.api.testing import live_server

X = "13047"  # 17 events in the fixture
NEW = "web-new-1"
Z = "21498"  # bought only by 12473, who is not among X's similar users
Y = "22180"  # bought only by 13747, also not among X's similar users: stays 0 throughout
VIEWER = "web-viewer"  # views one item, buys nothing: found by a campaign only through the user index
T0 = 1_300_000_000  # 2011-03-13, after the fixture's last event


@pytest.fixture(scope="module")
def llm_url() -> Iterator[str]:
    fake = FakeLLM()
    with live_server(fake.app) as url:
        yield url + "/v1"


@pytest.fixture
def workspace(tmp_path: Path, llm_url: str) -> Path:
    Runtime(agent_settings(tmp_path, llm_url)).ingest(DATASET, show_progress=False)
    return tmp_path


def _client(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers=AUTH, timeout=60)


def _sequence(c: httpx.Client, user: str) -> list[str]:
    """The user's item ids, oldest first, consecutive repeats collapsed (what the indexes count)."""
    out: list[str] = []
    for e in c.get(f"/v1/users/{user}/events", params={"dataset": DATASET}).json()["events"]:
        if not out or out[-1] != e["item_id"]:
            out.append(e["item_id"])
    return out


def _post(c: httpx.Client, user: str, items: list[str], event_type: str = "purchase", t0: int = T0) -> None:
    events = [{"user_id": user, "item_id": i, "event_type": event_type, "timestamp": t0 + 60 * n}
              for n, i in enumerate(items)]
    r = c.post("/v1/events", json={"dataset": DATASET, "events": events})
    assert r.status_code == 200 and r.json()["stored"] == len(items), r.text


def _scores_for_x(c: httpx.Client) -> dict[str, tuple[float, float]]:
    """item -> (similar_users, covisit) scaled scores of X's ranking of exactly [Z, Y]."""
    r = c.post("/v1/next-item", json={"dataset": DATASET, "user_id": X, "k": 2, "use_llm": False,
                                      "candidates": [Z, Y]})
    assert r.status_code == 200, r.text
    return {i["item_id"]: (i["source_scores"]["similar_users"], i["source_scores"]["covisit"])
            for i in r.json()["items"]}


def _audience(c: httpx.Client, **body: Any) -> dict[str, dict[str, float]]:
    r = c.post("/v1/audience", json={"dataset": DATASET, "use_llm": False, "n": 50, **body})
    assert r.status_code == 200, r.text
    return {u["user_id"]: u["source_scores"] for u in r.json()["users"]}


def _updates(c: httpx.Client) -> dict[str, Any]:
    r = c.get("/readyz")
    assert r.status_code == 200, r.text
    return dict(r.json()["index_updates"][DATASET])


def _indexed(ws: Path) -> list[str]:
    return list(json.loads((ws / "indexes" / DATASET / "users" / "ids.json").read_text()))


def test_a_new_user_joins_the_indexes_survives_a_restart_and_leaves_on_delete(workspace: Path, llm_url: str) -> None:
    with serve_app(workspace, llm_url) as url, _client(url) as c:
        x_items = _sequence(c, X)
        assert len(x_items) == 17 and Z not in x_items
        assert _scores_for_x(c) == {Z: (0.0, 0.0), Y: (0.0, 0.0)}
        title = c.post("/v1/next-item", json={"dataset": DATASET, "user_id": X, "k": 1, "use_llm": False,
                                              "candidates": [x_items[0]]}).json()["items"][0]["title"]
        assert VIEWER not in _audience(c, campaign_text=title) and X not in _audience(c, item_id=Z)

        _post(c, NEW, [Z] + x_items)  # Z first: NEW's user vector stays closest to X's
        _post(c, VIEWER, [x_items[0]], event_type="view")

        # (a) the new user's own next item draws on similar users
        r = c.post("/v1/next-item", json={"dataset": DATASET, "user_id": NEW, "k": 5, "use_llm": False})
        assert r.status_code == 200, r.text
        assert any(i["source_scores"]["similar_users"] > 0 for i in r.json()["items"]), r.json()["items"]
        # (b) NEW is now X's nearest similar user, the only one with Z; Z also co-occurs with X's items
        assert _scores_for_x(c) == {Z: (1.0, 1.0), Y: (0.0, 0.0)}
        # (c) the audience of Z has its buyer NEW; a campaign finds the viewer through the user index alone
        # (and X too now: X bought what NEW bought with Z, a co-purchase only NEW's counts hold)
        aud = _audience(c, item_id=Z)
        assert aud[NEW]["repeat"] > 0 and aud[X] == {"co_purchase": pytest.approx(aud[X]["co_purchase"])}
        assert aud[X]["co_purchase"] > 0 and "12473" in aud
        assert _audience(c, campaign_text=title)[VIEWER] == {"similar_users": 1.0}
        # (e) /readyz: both users indexed, nothing pending, co-visitation changes not yet saved
        up = _updates(c)
        last = up.pop("last_update")
        assert last is not None and last.endswith("+00:00")
        assert up == {"users_indexed": 25, "users_pending": 0, "users_updated": 2, "covisit_unsaved_users": 2,
                      "covisit_save_bound": "500 users or 3600 s", "last_error": None, "unsaved_users": 2}
    # the API defers the index files (every 200 users or 10 s); shutting down saves them
    assert {NEW, VIEWER} <= set(_indexed(workspace))

    # (d) a new app on the same workspace: the saved index, and co-visitation replayed from updates.json
    with serve_app(workspace, llm_url) as url, _client(url) as c:
        assert _scores_for_x(c) == {Z: (1.0, 1.0), Y: (0.0, 0.0)}
        assert _audience(c, campaign_text=title)[VIEWER] == {"similar_users": 1.0}
        up = _updates(c)
        assert (up["users_indexed"], up["users_updated"], up["covisit_unsaved_users"], up["last_update"]) == (
            25, 2, 2, last)

        # deleted: out of the index and every count (co-visitation saved at once), then back again
        r = c.delete(f"/v1/users/{NEW}", params={"dataset": DATASET})
        assert r.status_code == 200 and r.json()["deleted_events"] == 18, r.text
        assert _scores_for_x(c) == {Z: (0.0, 0.0), Y: (0.0, 0.0)}
        assert NEW not in _audience(c, item_id=Z) and NEW not in _indexed(workspace)
        assert (_updates(c)["users_indexed"], _updates(c)["covisit_unsaved_users"]) == (24, 0)
        _post(c, NEW, [Z] + x_items)
        assert _scores_for_x(c) == {Z: (1.0, 1.0), Y: (0.0, 0.0)}
        assert _updates(c)["users_indexed"] == 25


def test_concurrent_posts_for_different_new_users_all_land_in_the_index(workspace: Path, llm_url: str) -> None:
    users = [f"web-c{n}" for n in range(8)]
    with serve_app(workspace, llm_url) as url, _client(url) as c:
        items = _sequence(c, X)
        with ThreadPoolExecutor(len(users)) as pool:
            list(pool.map(lambda nu: _post(c, nu[1], items[nu[0]:nu[0] + 5]), enumerate(users)))
        up = _updates(c)
        assert (up["users_indexed"], up["users_updated"], up["users_pending"]) == (23 + 8, 8, 0)
    assert set(users) <= set(_indexed(workspace))  # saved at shutdown at the latest
    rt = Runtime(agent_settings(workspace, llm_url))
    arts = rt.artifacts(DATASET)
    assert {u: arts.user_items[u] for u in users} == {u: items[n:n + 5] for n, u in enumerate(users)}
    assert arts.updates.events == rt.store.counts(DATASET)["events"]
