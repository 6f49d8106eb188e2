"""The served churn blend: the RFM baseline and the model's P(churn), combined only where the
model earned it on validation users (issue 16).

No model weight is set by hand. ``shoplens train --dataset D --task churn`` scores validation
users at the validation cut-off (`churn_cutoffs`: Online Retail 2011-06-01, any other dataset two
horizons before its end) with the served churn pipeline, and fits `agent.tasks.stack.Stack` over
{baseline, llm} with the baseline as the reference: the model gets a weight only when a candidate
with it beats the baseline alone by more than one SE of cross-validated log loss; otherwise the
served probability is the baseline's, unchanged, and every answer's ``meta.notes`` says "the model
has weight 0 in this blend: <why>". A fit whose labels reach the test period (`check_validation_as_of`)
is refused, so `shoplens eval churn` measures on users and days the blend never saw.

The result, ``churn_blend-<h>d.json`` beside the dataset's indexes (signed, `agent.tasks.signed_json`),
names the model (GGUF sha256 or served model id), the verbalizer prompt (name@sha256) and the
baseline it was fitted with: a blend is never applied to another model, prompt or baseline
(weight 0, said in ``meta.notes``). The baseline is saved as the dataset's served churn baseline
at the same time, so the blend's baseline member is the one served.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from agent.tasks.common import LogisticBaseline
from agent.tasks.signed_json import content_sha256, load_signed, write_signed
from agent.tasks.stack import Stack

FORMAT = "shoplens.churn_blend.v1"
MEMBERS = ("baseline", "llm")  # Stack member names: the RFM baseline, the model's verbalizer P(churn)
# Online Retail's published dates at 90 days: the baseline trains at the first, the eval tests at the second.
ONLINE_RETAIL = ("online-retail", 90, datetime(2011, 6, 1, tzinfo=UTC), datetime(2011, 9, 1, tzinfo=UTC))
WEIGHT0 = "the model has weight 0 in this blend"


def blend_file(horizon_days: int) -> str:
    """``churn_blend-90d.json``: one file per horizon, because the label depends on it."""
    return f"churn_blend-{horizon_days}d.json"


def train_command(dataset: str, horizon_days: int) -> str:
    return f"`shoplens train --dataset {dataset} --task churn" + ("" if horizon_days == 90 else
                                                                  f" --horizon-days {horizon_days}") + "`"


def churn_cutoffs(end: datetime, dataset: str, horizon_days: int) -> tuple[datetime, datetime]:
    """(validation cut-off, test cut-off). Online Retail at 90 days keeps its published dates;
    any other dataset (or horizon) gets ``end - 2 x horizon`` and ``end - horizon`` (`end`: the
    data's end, `agent.tasks.rows.robust_end`), so validation labels end where the test period starts."""
    name, h, val, test = ONLINE_RETAIL
    if (dataset, horizon_days) == (name, h):
        return val, test
    return end - timedelta(days=2 * horizon_days), end - timedelta(days=horizon_days)


def check_validation_as_of(as_of: datetime, horizon_days: int, test_as_of: datetime) -> None:
    """Refuse validation labels that reach the test period.

    Raises:
        ValueError: ``as_of + horizon_days`` is after `test_as_of` (the message names ``--as-of``
            and the latest cut-off allowed).
    """
    label_end = as_of + timedelta(days=horizon_days)
    if label_end > test_as_of:
        latest = test_as_of - timedelta(days=horizon_days)
        raise ValueError(
            f"--as-of {as_of:%Y-%m-%d}: the validation labels (no purchase {as_of:%Y-%m-%d} .. {label_end:%Y-%m-%d}, "
            f"{horizon_days} days) reach the test period that starts {test_as_of:%Y-%m-%d} (`shoplens eval churn`); "
            f"fit the served churn blend at --as-of {latest:%Y-%m-%d} or earlier")


@dataclass
class ServedChurnBlend:
    """What a churn answer's probability is: the stack (the model has a weight) or None (the
    baseline's probability, unchanged), and the `meta.notes` line that says which and why."""

    stack: Stack | None
    note: str

    def probability(self, p_base: float, p_model: float | None, notes: list[str] | None = None
                    ) -> tuple[float, Literal["blend", "baseline"]]:
        """(P(churn), source); `notes` get a line when the model gave no probability."""
        if self.stack is None:
            return p_base, "baseline"
        if p_model is None:
            if notes is not None:
                notes.append("the model gave no probability: the baseline probability is served")
            return p_base, "baseline"
        return self.stack.predict({"baseline": p_base, "llm": p_model}), "blend"


def untrained(dataset: str | None, horizon_days: int) -> ServedChurnBlend:
    """Weight 0: no blend was fitted for this dataset and horizon."""
    how = f" (fit one with {train_command(dataset, horizon_days)})" if dataset else ""
    return ServedChurnBlend(None, f"{WEIGHT0}: no churn blend fitted for {dataset or 'this dataset'} at "
                                  f"{horizon_days} days{how}")


def baseline_key(bl: LogisticBaseline) -> dict[str, Any]:
    """The numbers that make a baseline the same one (its description is not compared)."""
    return {"features": list(bl.features), "coef": [float(c) for c in bl.coef], "intercept": float(bl.intercept)}


@dataclass
class FittedChurnBlend:
    """A dataset's fitted churn blend, with what it was fitted for and on."""

    dataset: str
    horizon_days: int
    as_of: str  # the validation cut-off (ISO)
    test_as_of: str  # the test period's start; as_of + horizon_days <= test_as_of
    baseline: dict[str, Any]  # `LogisticBaseline` fields (less blend): the member it was fitted with
    stack: dict[str, Any]  # `Stack` fields
    model: str  # the GGUF's sha256, or the served model's id
    prompt: str  # the verbalizer prompt, "name@sha256"
    n_sampled: int  # validation users asked; those without a model probability are not fitted on
    seed: int
    fitted_at: str = ""
    format: str = FORMAT
    metrics: dict[str, Any] = field(default_factory=dict)  # the validation fit's numbers (`shoplens train` prints them)

    def sha256(self) -> str:
        return content_sha256(self, exclude=("fitted_at",))

    def fitted_stack(self) -> Stack:
        return Stack(**self.stack)

    def served_for(self, model: str | None, prompt: str, baseline: LogisticBaseline) -> ServedChurnBlend:
        """The blend for the model, prompt and baseline this process serves: the stack when they
        are the ones fitted and the model earned a weight, else weight 0 with the reason."""
        st, refit = self.fitted_stack(), train_command(self.dataset, self.horizon_days)
        if (model, prompt) != (self.model, self.prompt):
            return ServedChurnBlend(None, f"{WEIGHT0}: {blend_file(self.horizon_days)} was fitted for model "
                                          f"{self.model[:16]}, prompt {self.prompt}; this server runs "
                                          f"{str(model)[:16]}, {prompt} (rerun {refit})")
        fitted_bl = {k: self.baseline[k] for k in ("features", "coef", "intercept")}
        if baseline_key(baseline) != fitted_bl:
            return ServedChurnBlend(None, f"{WEIGHT0}: it was fitted with the baseline trained on "
                                          f"{self.baseline.get('trained_on')!r}, and the served baseline is "
                                          f"{baseline.trained_on!r} (rerun {refit})")
        where = f"validation users at {self.as_of[:10]}"
        if st.chosen == "baseline":
            return ServedChurnBlend(None, f"{WEIGHT0}: the fit on {where} did not beat the baseline by more "
                                          f"than one SE ({st.describe()})")
        return ServedChurnBlend(st, f"churn {st.describe()}; fitted on {where}")


def fit_churn_blend(y: list[int], p_base: list[float], p_model: list[float], *, dataset: str, horizon_days: int,
                    as_of: datetime, test_as_of: datetime, baseline: LogisticBaseline, model: str, prompt: str,
                    n_sampled: int, seed: int = 0) -> FittedChurnBlend:
    """`Stack.fit` over {baseline, llm} with the baseline as the reference, on validation users.

    Raises:
        ValueError: labels that reach the test period (`check_validation_as_of`), or cases of
            one class only / too few to cross-validate.
    """
    check_validation_as_of(as_of, horizon_days, test_as_of)
    st = Stack.fit(y, {"baseline": p_base, "llm": p_model}, seed=seed, reference="baseline")
    bl = {k: v for k, v in asdict(baseline).items() if k != "blend"}
    return FittedChurnBlend(dataset, horizon_days, as_of.isoformat(), test_as_of.isoformat(), bl, asdict(st), model,
                            prompt, n_sampled, seed, fitted_at=datetime.now(UTC).isoformat(timespec="seconds"))


def save_churn_blend(fitted: FittedChurnBlend, folder: Path) -> Path:
    """Write ``churn_blend-<h>d.json`` (with its sha256) into the dataset's index folder."""
    return write_signed(fitted, folder / blend_file(fitted.horizon_days))


def load_churn_blend(folder: Path, dataset: str, horizon_days: int) -> FittedChurnBlend | None:
    """The dataset's fitted churn blend at this horizon, or None when none was fitted.

    Raises:
        ArtifactMismatchError: fitted for another dataset, or edited (sha256).
    """
    path = folder / blend_file(horizon_days)
    if not path.exists():
        return None
    return load_signed(path, FittedChurnBlend, dataset,
                       f"re-run {train_command(dataset, horizon_days)} (or delete {path})")


def served_churn_blend(fitted: FittedChurnBlend | None, dataset: str, horizon_days: int, *, model: str | None,
                       prompt: str, baseline: LogisticBaseline) -> ServedChurnBlend:
    """`FittedChurnBlend.served_for`, or weight 0 when nothing was fitted."""
    if fitted is None:
        return untrained(dataset, horizon_days)
    return fitted.served_for(model, prompt, baseline)
