"""A calibrated stacker over binary scorers that never does worse than its best member on validation.

Members are named probability columns (the logistic baseline, the fine-tuned encoder, the LLM's
verbalizer). The candidates are each member alone (Platt-scaled: a logistic regression on its
logit) and the stack of all members (a logistic regression on all their logits). Each candidate's
log loss is cross-validated on the validation cases (stratified k-fold, case weights honoured).
The best single member is the one with the lowest loss; the stack replaces it only when its
paired gain is larger than one standard error of the per-case loss difference (the
one-standard-error rule: a gain the validation cases cannot tell from noise does not buy the
extra weights). The winner is refitted on all validation cases. So the served blend is, on
validation, at least as good as its best member by construction, and a member that adds nothing
measurable gets no weight. With a `reference` member (churn's RFM baseline), the same rule is
applied once more: whatever won must beat the reference alone by more than one SE, else the
reference serves. The fit's numbers go into ``meta`` (`Stack.describe`). `cross_fitted` scores
each case with a stack fitted without it (for an eval on the same cases).

Stacking: Wolpert, "Stacked generalization" (1992); Platt scaling: Platt (1999); the
one-standard-error rule: Breiman, Friedman, Olshen and Stone, "Classification and Regression
Trees" (1984), section 3.4.3. Why it is needed here: on Taobao purchases (22 positives in a fold's
validation users) the stack won by 0.00002 nats and lost 0.02 ROC AUC on the test users
(docs/tasks_results.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.tasks.encoder import log_loss

EPS = 1e-4


def _logit(p: Sequence[float] | np.ndarray) -> np.ndarray:
    a = np.clip(np.asarray(p, dtype=float), EPS, 1 - EPS)
    return np.log(a / (1 - a))


@dataclass
class Stack:
    """p = sigmoid(intercept + sum coef[m] * logit(p_m)) over `members` (a chosen single member
    has coefficients for itself only).

    Attributes:
        chosen: "stack" or the member used alone.
        cv_log_loss: each candidate's cross-validated log loss on validation (nats).
    """

    members: list[str]
    coef: dict[str, float]
    intercept: float
    chosen: str
    cv_log_loss: dict[str, float] = field(default_factory=dict)
    n_val: int = 0
    positives_val: int = 0
    stack_gain: dict[str, float] = field(default_factory=dict)  # {"mean", "se"}: best member's loss − stack's
    reference: str | None = None  # the member that serves unless another candidate beats it by > 1 SE
    reference_gain: dict[str, Any] = field(default_factory=dict)  # {"candidate", "mean", "se"}: reference's loss − its

    def predict(self, probs: Mapping[str, float | None]) -> float:
        """P(label 1) from each member's probability.

        Raises:
            KeyError: a member with a non-zero coefficient is missing or None (the caller
                falls back and says so).
        """
        z = self.intercept
        for m, c in self.coef.items():
            p = probs.get(m)
            if p is None:
                raise KeyError(m)
            z += c * float(_logit([p])[0])
        return 1.0 / (1.0 + math.exp(-z))

    def describe(self) -> str:
        """One line for ``meta.notes``: what was chosen, its weights and the validation losses."""
        w = ", ".join(f"{m} {c:+.3f}" for m, c in self.coef.items())
        losses = ", ".join(f"{k} {v:.4f}" for k, v in self.cv_log_loss.items())
        gain = (f"; the stack's gain over the best member {self.stack_gain['mean']:+.5f} nats "
                f"(SE {self.stack_gain['se']:.5f}: {'kept' if self.chosen == 'stack' else 'within 1 SE, not used'})"
                if self.stack_gain else "")
        rg = self.reference_gain
        ref = (f"; {rg['candidate']}'s gain over {self.reference} alone {rg['mean']:+.5f} nats (SE {rg['se']:.5f}: "
               f"{'kept' if self.chosen != self.reference else f'within 1 SE, {self.reference} serves'})"
               if rg else "")
        return (f"blend: {self.chosen} (logit weights {w}; intercept {self.intercept:+.3f}); cross-validated "
                f"log loss on {self.n_val} validation cases ({self.positives_val} positive): {losses}{gain}{ref}")

    @classmethod
    def fit(cls, y: Sequence[int], members: Mapping[str, Sequence[float]], weights: Sequence[float] | None = None,
            folds: int = 5, seed: int = 0, reference: str | None = None) -> Stack:
        """Choose and fit the blend on validation cases.

        Args:
            y: 0/1 labels, shape (n,).
            members: name -> probabilities, each shape (n,).
            weights: per-case weights (1 / sampling rate), default 1.
            reference: a member that serves unless the candidate chosen otherwise beats its
                cross-validated log loss by more than one SE (paired, per case).

        Raises:
            ValueError: no members, unequal lengths, `y` of one class only, or an unknown `reference`.
        """
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import StratifiedKFold

        names = list(members)
        ya = np.asarray(y, dtype=int)
        if not names or any(len(members[m]) != len(ya) for m in names):
            raise ValueError("a blend needs at least one member, each with one probability per label")
        if reference is not None and reference not in names:
            raise ValueError(f"reference {reference!r} is not a member ({', '.join(names)})")
        if len(set(ya.tolist())) < 2:
            raise ValueError(f"a blend needs both classes on validation (got {len(ya)} cases of one class)")
        wa = np.ones(len(ya)) if weights is None else np.asarray(weights, dtype=float)
        x = np.column_stack([_logit(members[m]) for m in names])
        k = max(2, min(folds, int(ya.sum()), int(len(ya) - ya.sum())))
        cands = {m: [i] for i, m in enumerate(names)}
        if len(names) > 1:
            cands["stack"] = list(range(len(names)))
        cv: dict[str, float] = {}
        per_case: dict[str, np.ndarray] = {}
        for cand, cols in cands.items():
            pred = np.zeros(len(ya))
            for tr, te in StratifiedKFold(k, shuffle=True, random_state=seed).split(x, ya):
                lr = LogisticRegression(C=1e4, max_iter=2000).fit(x[tr][:, cols], ya[tr], sample_weight=wa[tr])
                pred[te] = lr.predict_proba(x[te][:, cols])[:, 1]
            cv[cand] = round(log_loss(ya.tolist(), pred, wa.tolist()), 6)
            pc = np.clip(pred, 1e-7, 1 - 1e-7)
            per_case[cand] = -(ya * np.log(pc) + (1 - ya) * np.log(1 - pc))
        best = min((c for c in cv if c != "stack"), key=lambda c: cv[c])
        def paired(worse: str, better: str) -> tuple[float, float]:  # (mean, SE) of worse's loss − better's
            d = per_case[worse] - per_case[better]
            mean = float(np.sum(wa * d) / np.sum(wa))
            return mean, float(np.sqrt(np.sum(wa**2 * (d - mean) ** 2)) / np.sum(wa))

        gain: dict[str, float] = {}
        if "stack" in cv:
            mean, se = paired(best, "stack")
            gain = {"mean": round(mean, 6), "se": round(se, 6)}
            if mean > se:
                best = "stack"
        ref_gain: dict[str, Any] = {}
        if reference is not None and best != reference:
            mean, se = paired(reference, best)
            ref_gain = {"candidate": best, "mean": round(mean, 6), "se": round(se, 6)}
            if not mean > se:
                best = reference
        cols = cands[best]
        lr = LogisticRegression(C=1e4, max_iter=2000).fit(x[:, cols], ya, sample_weight=wa)
        coef = {names[c]: round(float(v), 6) for c, v in zip(cols, lr.coef_[0], strict=True)}
        return cls(names, coef, round(float(lr.intercept_[0]), 6), best, cv, len(ya), int(ya.sum()), gain,
                   reference, ref_gain)


def cross_fitted(y: Sequence[int], members: Mapping[str, Sequence[float]], *, folds: int = 5, seed: int = 0,
                 reference: str | None = None) -> tuple[list[float], list[str]]:
    """Each case scored by a `Stack` fitted (`Stack.fit`, its own inner CV and one-SE rules)
    on the other folds' cases only: an honest estimate of the blend procedure on these cases.

    A fold whose stack chose `reference` scores its cases with the reference's own probability
    unchanged (as a served weight-0 blend does), not a recalibration of it.

    Args:
        y: 0/1 labels, shape (n,) (fewer folds than `folds` when a class has fewer cases).
        members: name -> probabilities, each shape (n,).

    Returns:
        (P(label 1) per case, shape (n,); the member or "stack" each fold chose, one per fold).

    Raises:
        ValueError: as `Stack.fit` (no members, unequal lengths, one class only).
    """
    from sklearn.model_selection import StratifiedKFold

    ya = np.asarray(y, dtype=int)
    if len(set(ya.tolist())) < 2:
        raise ValueError(f"a blend needs both classes (got {len(ya)} cases of one class)")
    k = max(2, min(folds, int(ya.sum()), int(len(ya) - ya.sum())))
    out, chosen = np.zeros(len(ya)), []
    for tr, te in StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(ya)), ya):
        st = Stack.fit(ya[tr].tolist(), {m: [members[m][i] for i in tr] for m in members}, seed=seed,
                       reference=reference)
        chosen.append(st.chosen)
        for i in te:
            out[i] = (members[st.chosen][i] if st.chosen == reference
                      else st.predict({m: members[m][i] for m in members}))
    return out.tolist(), chosen
