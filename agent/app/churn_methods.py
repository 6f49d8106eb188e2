"""The facade's churn-blend methods (part of `ShopLensService`): fitting the served churn blend on
validation users (`shoplens train --task churn`) and finding the one a churn answer is served with.

The procedure and the artifact are `agent.tasks.churn_blend`; this module runs the served churn
pipeline over the validation users (resuming an interrupted fit) and wires the runtime's model
identity, the dataset's index folder and the baseline cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.app.answers import prompt_id
from agent.app.service_base import ServiceBase
from agent.tasks.binary_stats import compare_scorers
from agent.tasks.churn import PROB_PROMPT, ChurnService
from agent.tasks.churn_blend import (
    FittedChurnBlend,
    ServedChurnBlend,
    blend_file,
    check_validation_as_of,
    churn_cutoffs,
    fit_churn_blend,
    load_churn_blend,
    save_churn_blend,
    served_churn_blend,
)
from agent.tasks.common import LogisticBaseline
from agent.tasks.profile import catalogue_prices
from agent.tasks.rows import churn_rows, fit_churn_baseline, horizon_key, robust_end
from agent.tasks.stack import cross_fitted

log = logging.getLogger(__name__)


class ChurnBlendMethods(ServiceBase):
    """The churn-blend part of `ShopLensService`."""

    def served_churn_blend(self, dataset: str, horizon_days: int, baseline: LogisticBaseline) -> ServedChurnBlend:
        """The blend a churn answer at this horizon is served with: the fitted one when it was
        fitted for this model, prompt and baseline and gave the model a weight, else weight 0
        (`agent.tasks.churn_blend.served_churn_blend`; the note says which and why).

        Raises:
            ArtifactMismatchError: the blend file belongs to another dataset or was edited.
        """
        fitted = load_churn_blend(self.runtime.settings.index_dir(dataset), dataset, horizon_days)
        return served_churn_blend(fitted, dataset, horizon_days, model=self.runtime.model_identity(),
                                  prompt=prompt_id(PROB_PROMPT), baseline=baseline)

    async def train_churn_blend(self, dataset: str, *, horizon_days: int = 90, n: int = 300, seed: int = 0,
                                as_of: datetime | None = None,
                                progress: Callable[[int, int], None] | None = None) -> tuple[FittedChurnBlend, Path]:
        """Fit and save the served churn blend (`agent.tasks.churn_blend`) on `n` validation users.

        The users are a seeded sample of the buyers before `as_of` (default: the validation
        cut-off, `churn_cutoffs`); each goes through `ChurnService.predict` (the served prompt,
        no explanation call) for the baseline's and the model's P(churn). The baseline is fitted
        on every buyer at `as_of` and saved as the dataset's served churn baseline for this
        horizon, so the blend's baseline member is the one served. Scored users are appended to
        ``churn_blend-<h>d.partial.jsonl``; a rerun with the same data, model, prompt and seed
        resumes from it. About one verbalizer call per user (~15 s each with the embedded 1.5B
        model on 2 cores, docs/tasks_results.md).

        Raises:
            ValueError: an unknown dataset, labels that reach the test period (names ``--as-of``),
                or validation users of one class only.
            ModelUnavailableError: the model cannot be reached.
        """
        store = self.runtime.store
        if not store.has_dataset(dataset):
            raise ValueError(f"--dataset {dataset}: no such dataset (datasets: {', '.join(store.datasets()) or 'none'}); "
                             "load it with `shoplens ingest`")
        val_as_of, test_as_of = churn_cutoffs(robust_end(store, dataset), dataset, horizon_days)
        as_of = val_as_of if as_of is None else (as_of if as_of.tzinfo else as_of.replace(tzinfo=UTC))
        check_validation_as_of(as_of, horizon_days, test_as_of)  # before any work
        catalog = self.runtime.state.catalog(dataset)
        rows = churn_rows(store, dataset, as_of, horizon_days, catalog)
        if not rows:
            raise ValueError(f"--as-of {as_of:%Y-%m-%d}: no {dataset} buyers before it; give a later --as-of")
        base = fit_churn_baseline(rows, f"{dataset} users at {as_of:%Y-%m-%d}, horizon {horizon_days} d")
        pick = random.Random(seed).sample(rows, min(n, len(rows)))
        model_id, prompt = self.runtime.model_identity(), prompt_id(PROB_PROMPT)
        key = hashlib.sha256(json.dumps({"dataset": dataset, "as_of": as_of.isoformat(), "h": horizon_days,
                                         "model": model_id, "prompt": prompt, "seed": seed, "n_rows": len(rows),
                                         "baseline": [base.coef, base.intercept]}, sort_keys=True).encode()).hexdigest()[:16]
        folder = self.runtime.settings.index_dir(dataset)
        partial = folder / blend_file(horizon_days).replace(".json", ".partial.jsonl")
        done = _read_partial(partial, key)
        todo = [r for r in pick if r.user_id not in done]
        if todo:
            model = await self._source()()
            svc = ChurnService(model, base, explain=False, model_sha256=self.runtime.model_sha256)
            prices = catalogue_prices(catalog)
            folder.mkdir(parents=True, exist_ok=True)
            for r in todo:
                evs = store.user_events(dataset, r.user_id, before=as_of)
                p = await svc.predict(r.user_id, evs, catalog, as_of=as_of, horizon_days=horizon_days,
                                      dataset=dataset, prices=prices)
                done[r.user_id] = {"key": key, "user_id": r.user_id, "label": r.label,
                                   "p_base": p.baseline_probability, "p_model": p.model_probability}
                with partial.open("a", encoding="utf-8") as fh:  # flushed per user: a stop loses one at most
                    fh.write(json.dumps(done[r.user_id]) + "\n")
                if progress is not None:
                    progress(len(done), len(pick))
        recs = [done[r.user_id] for r in pick if r.user_id in done and done[r.user_id]["p_model"] is not None]
        y, pb, pm = [x["label"] for x in recs], [x["p_base"] for x in recs], [x["p_model"] for x in recs]
        fitted = fit_churn_blend(y, pb, pm, dataset=dataset, horizon_days=horizon_days, as_of=as_of,
                                 test_as_of=test_as_of, baseline=base, model=model_id, prompt=prompt,
                                 n_sampled=len(pick), seed=seed)
        cf, chosen = cross_fitted(y, {"baseline": pb, "llm": pm}, seed=seed, reference="baseline")
        fitted.metrics = {"validation": compare_scorers(y, {"baseline": pb, "model": pm, "blend_crossfit": cf},
                                                        reference="baseline", seed=seed),
                          "crossfit_chosen": chosen, "no_model_probability": len(pick) - len(recs)}
        path = save_churn_blend(fitted, folder)
        base.save(self.runtime.state.baselines.path(f"churn-{horizon_key('churn', horizon_days)}", dataset))
        return fitted, path


def _read_partial(path: Path, key: str) -> dict[str, dict[str, Any]]:
    """user id -> record of an interrupted fit with the same `key` (others, and a torn line, are skipped)."""
    out: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                continue
            if d.get("key") == key:
                out[d["user_id"]] = d
    return out
