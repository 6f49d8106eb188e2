"""The model's share of the served next-item score (agent/tasks/llm_weight.py,
`shoplens train --llm`): the weight choice on tables with a known answer, the served blend's
NDCG by hand, the saved file's checks, and the fit through the facade with an oracle model (which
earns a weight), an adversarial one (which does not), and a resumed run."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest

from agent.app.service import ShopLensService
from agent.domain.errors import ArtifactMismatchError
from agent.domain.schemas import CatalogItem
from agent.llm.base import Completion, Usage
from agent.llm.fake import FakeCall, FakeModel
from agent.llm.verbalizer import LABELS
from agent.settings import Settings
from agent.tasks.llm_weight import (
    GRID,
    LLM_WEIGHT_FILE,
    PARTIAL_FILE,
    SETS_FILE,
    FittedLlmWeight,
    ScoredSet,
    choose_weight,
    load_llm_weight,
    ndcg10_of_set,
    recheck,
    save_llm_weight,
    served_llm_weight,
)
from tests.test_chat import FakeRuntime
from tests.test_fusion import DS, N_ITEMS, TITLES, chain_events


# ---- the choice ----------------------------------------------------------------------------------
def test_a_weight_that_helps_every_fold_is_chosen_and_served() -> None:
    rng = np.random.default_rng(0)
    base = rng.uniform(20, 80, size=(40, 1))
    profile = np.asarray([0.0, 2.0, 4.0, 6.0, 3.0, 1.0, -8.0])  # best at GRID[3] = 0.3
    table = base + profile + rng.normal(0, 1.0, size=(40, len(GRID)))
    table[:, 0] = base[:, 0]
    c = choose_weight(table, seed=0)
    assert (c.best, c.served, c.n) == (0.3, 0.3, 40)
    assert c.ci_low > 0 and 4.0 < c.gain < 7.0
    assert list(c.mean_by_weight) == ["0", "0.1", "0.2", "0.3", "0.5", "0.7", "1"]


def test_a_model_that_does_not_help_gets_weight_zero() -> None:
    rng = np.random.default_rng(1)
    base = rng.uniform(20, 80, size=(40, 1))
    table = base + rng.normal(-1.0, 15.0, size=(40, len(GRID)))  # noise around a small loss
    table[:, 0] = base[:, 0]
    c = choose_weight(table, seed=0)
    assert c.served == 0.0 and c.ci_low <= 0
    # a tie goes to the smaller weight: a flat table chooses 0
    assert choose_weight(np.full((10, len(GRID)), 50.0)).best == 0.0


def test_the_choice_refuses_a_grid_without_zero_and_too_few_windows() -> None:
    with pytest.raises(ValueError, match="must start at 0"):
        choose_weight(np.zeros((10, 2)), grid=(0.5, 1.0))
    with pytest.raises(ValueError, match="3 scored window"):
        choose_weight(np.zeros((3, len(GRID))))


def test_a_sets_ndcg_is_the_served_blends_by_hand() -> None:
    s = ScoredSet(user_id="u", target="t", kind="random", fused={"a": 1.0, "b": 0.5, "t": 0.25},
                  llm={"a": 0.0, "b": 0.0, "t": 1.0})
    assert ndcg10_of_set(s, 0.0) == pytest.approx(1 / math.log2(4))  # third by fusion alone
    assert ndcg10_of_set(s, 1.0) == 1.0
    assert ndcg10_of_set(s, 0.5) == 1.0  # t: 0.5 + 0.125 > a: 0.5
    # w=0.2: a 0.8, b 0.4, t 0.2 + 0.2 = 0.4; the tie goes by item id, b before t
    assert ndcg10_of_set(s, 0.2) == pytest.approx(1 / math.log2(4))


# ---- the saved file ------------------------------------------------------------------------------
def fitted(**kw: object) -> FittedLlmWeight:
    base: dict[str, object] = dict(weight=0.3, best_weight=0.3, dataset=DS, catalogue_hash="c", events_hash="e",
                                   model="sha-model", scorer="verbalizer", prompt="next_item_rank.v1@abc",
                                   n_windows=30, n_sets=52, seed=0,
                                   metrics={"gain": 2.0, "ci_low": 0.5, "ci_high": 3.5}, fitted_at="2026-12-06T10:00:00")
    return FittedLlmWeight(**(base | kw))  # type: ignore[arg-type]


def test_the_file_round_trips_and_is_checked(tmp_path: Path) -> None:
    f = fitted()
    path = save_llm_weight(f, tmp_path)
    assert path.name == LLM_WEIGHT_FILE and load_llm_weight(tmp_path, DS) == f
    with pytest.raises(ArtifactMismatchError, match="was fitted for dataset 'chain-shop', not 'other'"):
        load_llm_weight(tmp_path, "other")
    body = json.loads(path.read_text())
    body["weight"] = 1.0  # hand-edited
    path.write_text(json.dumps(body))
    with pytest.raises(ArtifactMismatchError, match="sha256 does not match its content"):
        load_llm_weight(tmp_path, DS)
    assert load_llm_weight(tmp_path / "nothing", DS) is None


def test_the_weight_is_served_only_for_the_model_scorer_and_prompt_it_was_fitted_for() -> None:
    f = fitted()
    ident = {"model": "sha-model", "scorer": "verbalizer", "prompt": "next_item_rank.v1@abc"}
    w, note = served_llm_weight(f, DS, **ident)  # type: ignore[arg-type]
    assert w == 0.3 and note.startswith("model ranking weight 0.3 (cross-fitted paired NDCG@10 gain +2.00 "
                                        "[+0.50, +3.50]")
    for k, other in (("model", "sha-other"), ("scorer", "pointwise"), ("prompt", "next_item_rank.v1@def")):
        w, note = served_llm_weight(f, DS, **(ident | {k: other}))  # type: ignore[arg-type]
        assert w == 0.0 and "was fitted for model sha-model" in note and "--llm" in note
    w, note = served_llm_weight(replace(f, weight=0.0), DS, **ident)  # type: ignore[arg-type]
    assert w == 0.0 and note.startswith("model ranking off (weight 0): no significant gain")
    w, note = served_llm_weight(None, DS, **ident)  # type: ignore[arg-type]
    assert w == 0.0 and f"`shoplens train --dataset {DS} --llm`" in note


# ---- the fit through the facade --------------------------------------------------------------------
TITLE_ID = {t: i for i, t in TITLES.items()}


def chain_verbalizer(prefer_target: bool):  # noqa: ANN201 - a FakeModel responder
    """A verbalizer that knows the chain (next = last + 7 mod 40): it puts nearly all its
    probability on the true next item's label, or (adversarial) spreads it over the others."""

    def answer(call: FakeCall) -> Completion:
        text = call.messages[-1]["content"]
        history, _, cands = text.partition("Candidate products:")
        last = re.findall(r"((?:alpha|beta)\d+ product)", history)[-1]
        nxt = TITLES[f"i{(int(TITLE_ID[last][1:]) + 7) % N_ITEMS}"]
        listed = {line[0]: line[3:].strip() for line in cands.splitlines() if line[:3] in {f"{x}. " for x in LABELS}}
        good = [lab for lab, t in listed.items() if (t == nxt) == prefer_target]
        top = {lab: math.log(0.99 / len(good)) if lab in good else math.log(0.0001) for lab in listed}
        return Completion(text=max(top, key=lambda k: top[k]), top_logprobs=[top], usage=Usage(50, 1), model="fake")

    return answer


def chain_service(tmp_path: Path, model: FakeModel) -> ShopLensService:
    """The chain shop, served with popularity alone (a fusion the chain-knowing model can improve)."""
    rt = FakeRuntime(Settings(workspace=tmp_path, embedder="hashing-64"), model)
    rt.store.add_items(DS, [CatalogItem(item_id=i, title=t) for i, t in TITLES.items()])
    rt.store.add_events(DS, chain_events())
    rt.artifacts(DS).fusion_weights = {"embedding": 0.0, "covisit": 0.0, "similar_users": 0.0, "popularity": 1.0,
                                       "recent": 0.0}
    return ShopLensService(rt)


async def test_an_oracle_model_earns_a_weight_and_the_dataset_is_then_ranked_by_it(tmp_path: Path) -> None:
    model = FakeModel(responder=chain_verbalizer(prefer_target=True))
    svc = chain_service(tmp_path, model)
    seen: list[tuple[int, int]] = []
    fit, path = await svc.train_llm_weight(DS, windows=12, seed=0, progress=lambda d, t: seen.append((d, t)))
    assert path == svc.runtime.settings.index_dir(DS) / LLM_WEIGHT_FILE and seen[-1] == (12, 12)
    assert fit.n_windows == 12 and fit.weight > 0 and fit.metrics["ci_low"] > 0  # type: ignore[operator]
    assert fit.metrics["mean_by_weight"]["1"] == 100.0  # type: ignore[index]  # the oracle alone is perfect
    assert not (path.parent / PARTIAL_FILE).exists()  # a finished fit leaves no partial file
    rechecked = asdict(recheck(path.parent / SETS_FILE))  # its kept sets give the saved choice back
    assert rechecked == {k: fit.metrics[k] for k in rechecked}
    # two verbalizer permutations per scored set, nothing else (no explanations)
    assert len(model.calls) == 2 * fit.n_sets and all(c.schema is None for c in model.calls)
    # served from now on: a question to the pipeline is ranked by the model, and says so
    pred = await svc.next_item(DS, "u3", config=replace(svc.next_item_config(k=3), explain=False))
    assert any("llm" in i.source_scores for i in pred.items)
    assert any(n.startswith(f"model ranking weight {fit.weight:g} (cross-fitted") for n in pred.meta.notes)
    await svc.runtime.aclose()


async def test_a_model_that_hurts_keeps_weight_zero_and_is_not_asked_to_rank(tmp_path: Path) -> None:
    svc = chain_service(tmp_path, FakeModel(responder=chain_verbalizer(prefer_target=False)))
    fit, _ = await svc.train_llm_weight(DS, windows=12, seed=0)
    assert (fit.weight, fit.best_weight) == (0.0, 0.0) and fit.metrics["gain"] <= 0  # type: ignore[operator]
    model = FakeModel(responder=chain_verbalizer(prefer_target=False))
    svc.runtime.fake = model  # type: ignore[attr-defined]
    pred = await svc.next_item(DS, "u3", config=replace(svc.next_item_config(k=3), explain=False))
    assert model.calls == [] and not any("llm" in i.source_scores for i in pred.items)
    assert any(n.startswith("model ranking off (weight 0): no significant gain") for n in pred.meta.notes)
    await svc.runtime.aclose()


async def test_an_interrupted_fit_resumes_without_asking_the_model_again(tmp_path: Path) -> None:
    oracle = chain_verbalizer(prefer_target=True)
    calls = 0

    def crashing(call: FakeCall) -> Completion:
        nonlocal calls
        calls += 1
        if calls > 8:  # four sets scored (two permutations each), then the process dies
            raise RuntimeError("killed")
        return oracle(call)

    svc = chain_service(tmp_path, FakeModel(responder=crashing))
    with pytest.raises(RuntimeError, match="killed"):
        await svc.train_llm_weight(DS, windows=12, seed=0)
    partial = svc.runtime.settings.index_dir(DS) / PARTIAL_FILE
    assert len(partial.read_text().splitlines()) == 4
    again = FakeModel(responder=oracle)
    svc.runtime.fake = again  # type: ignore[attr-defined]
    resumed, _ = await svc.train_llm_weight(DS, windows=12, seed=0)
    assert len(again.calls) == 2 * (resumed.n_sets - 4)  # only the sets not scored before
    fresh = chain_service(tmp_path / "fresh", FakeModel(responder=oracle))
    whole, _ = await fresh.train_llm_weight(DS, windows=12, seed=0)
    assert (resumed.weight, resumed.metrics, resumed.n_sets) == (whole.weight, whole.metrics, whole.n_sets)
    await svc.runtime.aclose()
    await fresh.runtime.aclose()


def test_the_train_command_fits_the_fusion_then_the_model_weight_and_says_what_is_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    import ui.cli as cli

    chain_service(tmp_path, FakeModel())  # the chain shop in tmp_path's store
    monkeypatch.setenv("SHOPLENS_EMBEDDER", "hashing-64")
    monkeypatch.setattr(cli, "Runtime", lambda settings: FakeRuntime(
        settings, FakeModel(responder=chain_verbalizer(prefer_target=True))))
    res = CliRunner().invoke(cli.app, ["train", "--dataset", DS, "--users", "60", "--llm", "--llm-windows", "10",
                                       "--workspace", str(tmp_path)])
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    assert "fitted on 60 windows" in out and "mean NDCG@10 by model weight: 0: " in out
    served = load_llm_weight(tmp_path / "indexes" / DS, DS)
    assert served is not None and served.n_windows == 10
    assert f"served weight: {served.weight:g}" in out
    assert f"saved{tmp_path / 'indexes' / DS / LLM_WEIGHT_FILE}" in "".join(out.split())  # rich wraps paths
    # too few windows for the check is refused by the option, naming it
    res = CliRunner().invoke(cli.app, ["train", "--dataset", DS, "--llm", "--llm-windows", "3",
                                       "--workspace", str(tmp_path)])
    assert res.exit_code == 2 and "--llm-windows" in res.output


async def test_the_harness_fits_the_weight_on_its_own_store_then_measures_what_that_serves(tmp_path: Path) -> None:
    """`eval next-item --ranker pipeline --fit-llm-weight N`: the fit runs on the pipeline store
    (training events only) with the run's model, and the ranked cases use the weight it serves."""
    from eval.runner import RunConfig, arun_next_item, read_cases

    svc = chain_service(tmp_path / "ws", FakeModel())  # the chain shop in the workspace's store
    await svc.runtime.aclose()
    model = FakeModel(responder=chain_verbalizer(prefer_target=True))
    cfg = RunConfig(dataset=DS, protocol="leave-one-out", candidates="random", users=20, ranker="pipeline",
                    seed=0, fit_llm_weight=10, workspace=tmp_path / "ws", out=tmp_path / "run",
                    extra={"embedder": "hashing-64"})
    run = await arun_next_item(cfg, model=model, progress=False)
    info = json.loads((run / "config.json").read_text())
    fit = info["llm_weight_fit"]
    assert fit["n_windows"] == 10 and fit["served_weight"] == info["pipeline"]["llm_weight"]
    # co-visitation already ranks the chain perfectly on this store: nothing for the model to add
    assert fit["metrics"]["mean_by_weight"]["0"] == 100.0 and fit["served_weight"] == 0.0
    assert not any("llm" in s for r in read_cases(run) for s in r["extra"]["source_scores"].values())
    assert len(model.calls) == 2 * fit["n_sets"]  # the fit's verbalizer passes; the cases asked nothing
