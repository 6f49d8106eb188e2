"""Aspect-based sentiment extraction: SemEval-2014 Task 4 laptops, term and joint F1.

    shoplens eval aspects --n 60                  # the model (SentimentAnalyzer, aspects on)
    shoplens eval aspects --n 60 --ranker train-lexicon

The polarity-per-given-aspect accuracy lives in `eval.sentiment_eval` (set ``laptops``). This
eval asks the harder question the product answers: given only the sentence, which aspect terms
does it judge, and how? Metrics (micro-averaged over sentences, exact match of the normalised
term, as SemEval-2014 subtask 1 scores terms):

* term P / R / F1: extracted aspect terms against the gold terms;
* joint P / R / F1: (term, polarity) pairs (the reference numbers issue 4 quotes for
  SemEval-2014: GPT-4 zero-shot 57.6, fine-tuned 83.8 joint F1);
* polarity accuracy on the terms both sides found.

Data: ``sentiment/Laptops_Test_Gold.xml.seg`` (three lines per aspect: the sentence with ``$T$``,
the term, the polarity -1/0/1). Sentences are grouped from those lines, so only sentences with at
least one non-conflict aspect are present (the ``.seg`` files leave out the rest); the report
says so. Baseline ``train-lexicon`` is SemEval-2014's own: tag every term seen as an aspect in
``Laptops_Train`` that occurs in the sentence, with that term's most frequent training polarity.

A run folder holds ``config.json``, ``cases.jsonl`` (gold, predicted aspects, raw answers; an
interrupted run resumes), ``metrics.json`` and ``report.md``; `rescore` needs no model.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from eval.runs import read_jsonl, run_folder

_POL = {"-1": "negative", "0": "neutral", "1": "positive"}
RANKERS = ("llm", "train-lexicon")


@dataclass
class Sentence:
    """One test sentence and its gold (term, polarity) pairs."""

    id: str
    text: str
    gold: list[tuple[str, str]]


def normalise_term(term: str) -> str:
    """Lowercase, inner whitespace collapsed, surrounding punctuation and quotes stripped."""
    return re.sub(r"\s+", " ", term.lower()).strip(" \t\"'.,;:!?()[]")


_DETOK = [(re.compile(r" ([.,!?;:%)\]])"), r"\1"), (re.compile(r"([(\[$]) "), r"\1"),
          (re.compile(r" (n't|'s|'ve|'re|'ll|'d|'m)\b"), r"\1")]


def detokenize(text: str) -> str:
    """Undo the SemEval files' tokenisation ("I 've upgraded ( twice ) ." -> "I've upgraded
    (twice)."), so the model sees text as a customer wrote it and its copied spans match."""
    for pat, rep in _DETOK:
        text = pat.sub(rep, text)
    return text


def load_aspect_sentences(path: Path) -> list[Sentence]:
    """Group a ``.seg`` file's (sentence-with-$T$, term, polarity) triples into sentences.

    Returns:
        Sentences in file order; ids are ``s<k>`` by first appearance.
    Raises:
        FileNotFoundError: `path` is absent.
        ValueError: a polarity line is not -1, 0 or 1 (names the line number).
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    by_text: dict[str, list[tuple[str, str]]] = {}
    for i in range(0, len(lines) - 2, 3):
        tmpl, term, pol = lines[i], lines[i + 1].strip(), lines[i + 2].strip()
        if pol not in _POL:
            raise ValueError(f"{path}:{i + 3}: polarity {pol!r} is not -1, 0 or 1")
        by_text.setdefault(tmpl.replace("$T$", term), []).append((term, _POL[pol]))
    out = []
    for k, (text, gold) in enumerate(by_text.items()):
        clean = detokenize(text)  # kept tokenised when a gold term would stop being a substring
        out.append(Sentence(f"s{k}", clean if all(t in clean for t, _ in gold) else text, gold))
    return out


def prf(tp: int, n_pred: int, n_gold: int) -> dict[str, float]:
    """Precision, recall and F1 in [0, 1] from counts (0 where undefined)."""
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gold if n_gold else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


def aspect_metrics(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Micro term and joint P/R/F1 (x100) over case records with ``gold`` and ``pred`` lists of
    [term, polarity]. A failed case has ``pred`` = [] and counts (its gold terms are misses)."""
    t_tp = j_tp = n_pred = n_gold = pol_ok = 0
    for r in records:
        gold = {(normalise_term(t), p) for t, p in r["gold"]}
        pred = {(normalise_term(t), p) for t, p in r["pred"]}
        g_terms, p_terms = {t for t, _ in gold}, {t for t, _ in pred}
        n_gold, n_pred = n_gold + len(g_terms), n_pred + len(p_terms)
        t_tp += len(g_terms & p_terms)
        j_tp += len(gold & pred)
        pol_ok += sum(1 for t in g_terms & p_terms if {p for x, p in gold if x == t} & {p for x, p in pred if x == t})
    term, joint = prf(t_tp, n_pred, n_gold), prf(j_tp, n_pred, n_gold)
    n = len(records)
    return {"n_sentences": n, "n_gold_terms": n_gold, "n_pred_terms": n_pred,
            **{f"term_{k}": round(100 * v, 2) for k, v in term.items()},
            **{f"joint_{k}": round(100 * v, 2) for k, v in joint.items()},
            "polarity_acc_on_matched": round(100 * pol_ok / t_tp, 2) if t_tp else None,
            "valid_rate": round(100 * sum(bool(r.get("valid")) for r in records) / n, 2) if n else 0.0,
            "seconds_per_sentence": round(sum(r.get("seconds", 0.0) for r in records) / n, 3) if n else 0.0}


class TrainLexicon:
    """SemEval-2014's baseline: terms seen as aspects in training, their most frequent polarity."""

    def __init__(self, train: Sequence[Sentence]):
        pols: dict[str, Counter[str]] = defaultdict(Counter)
        for s in train:
            for t, p in s.gold:
                pols[normalise_term(t)][p] += 1
        self.polarity = {t: c.most_common(1)[0][0] for t, c in pols.items() if t}
        # longest first, so "battery life" wins over "battery"
        self.terms = sorted(self.polarity, key=len, reverse=True)

    def predict(self, text: str) -> list[tuple[str, str]]:
        low, out = f" {normalise_term(text)} ", []
        for t in self.terms:
            if re.search(rf"(?<![\w]){re.escape(t)}(?![\w])", low) and not any(t in o for o, _ in out):
                out.append((t, self.polarity[t]))
        return out


def _sample(sentences: list[Sentence], n: int, seed: int) -> list[Sentence]:
    if n <= 0 or n >= len(sentences):
        return sentences
    return random.Random(seed).sample(sentences, n)


async def _llm_cases(todo: Sequence[Sentence], write: Any, config: dict[str, Any], profile: str | None,
                     joint: bool = False) -> None:
    from agent.app.runtime import Runtime
    from agent.settings import load_settings
    from agent.tasks.sentiment import SentimentAnalyzer, SentimentConfig

    rt = Runtime(load_settings(llm_profile=profile))
    try:
        model = await rt.model()
        an = SentimentAnalyzer(model, model_sha256=rt.model_sha256, config=SentimentConfig(joint=joint))
        tpl = an.joint_tpl if joint else an.aspects_tpl
        config.update(model_id=model.model_id, model_sha256=rt.model_sha256, prompt=tpl.ref,
                      prompt_sha=tpl.sha256)
        for s in tqdm(todo, desc="aspects llm", unit="sentence"):
            t0 = time.perf_counter()
            rec: dict[str, Any] = {"id": s.id, "text": s.text, "gold": s.gold, "pred": [], "valid": False}
            try:
                res = await an.analyze(s.text, aspects=True)
                rec.update(pred=[[a.aspect, a.polarity] for a in res.aspects],
                           spans=[a.span for a in res.aspects], valid=res.aspects_source == "model",
                           notes=res.meta.notes, calls=res.meta.attempts,
                           completion_tokens=res.meta.completion_tokens)
            except Exception as e:  # one bad case never aborts the run; it counts as all misses
                rec["error"] = f"{type(e).__name__}: {e}"
            rec["seconds"] = round(time.perf_counter() - t0, 3)
            write(rec)
    finally:
        await rt.aclose()


def run_aspect_eval(n: int = 60, *, ranker: str = "llm", seed: int = 2024, data_dir: Path | None = None,
                    runs_dir: Path = Path("runs"), out: Path | None = None, profile: str | None = None,
                    joint: bool = False) -> Path:
    """Run one aspect-extraction eval and write its folder; resumes when `out` has cases.

    Args:
        joint: the one-call path (`SentimentConfig.joint_prompt`, ``--one-call``); False (served):
            the polarity pass plus a JSON aspects call with one repair (`sentiment_aspects.v2`).

    Raises:
        ValueError: unknown `ranker`, or `out` holds a run of another configuration.
        FileNotFoundError: the SemEval files are absent from ``<data_dir>/sentiment``.
    """
    from agent.settings import PROJECT_ROOT

    if ranker not in RANKERS:
        raise ValueError(f"unknown ranker {ranker!r}; known: {', '.join(RANKERS)}")
    d = (data_dir or PROJECT_ROOT.parent / "shared" / "data") / "sentiment"
    test = _sample(load_aspect_sentences(d / "Laptops_Test_Gold.xml.seg"), n, seed)
    run_dir = run_folder(f"aspects-{ranker}-n{n}", out, runs_dir)
    config: dict[str, Any] = {"task": "aspects", "set": "semeval14-laptops-test", "ranker": ranker, "n": n,
                              "seed": seed, "joint": joint if ranker == "llm" else None,
                              "sentence_ids": [s.id for s in test]}
    cfg_path = run_dir / "config.json"
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        keys = ("ranker", "n", "seed", "joint")
        was = {k: old[k] if k in old else (False if old.get("ranker") == "llm" else None) for k in keys}
        if was != {k: config[k] for k in keys}:  # runs before "joint" was recorded used two calls
            raise ValueError(f"{run_dir} holds another configuration ({old.get('ranker')}, n={old.get('n')}, "
                             f"seed={old.get('seed')}); pick a new --out")
    cases = run_dir / "cases.jsonl"
    done = {json.loads(ln)["id"] for ln in cases.read_text().splitlines() if ln.strip()} if cases.exists() else set()
    todo = [s for s in test if s.id not in done]
    with cases.open("a", encoding="utf-8") as fh:
        def write(rec: dict[str, Any]) -> None:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            fh.flush()

        if ranker == "train-lexicon":
            lex = TrainLexicon(load_aspect_sentences(d / "Laptops_Train.xml.seg"))
            for s in todo:
                write({"id": s.id, "text": s.text, "gold": s.gold, "pred": lex.predict(s.text),
                       "valid": True, "seconds": 0.0})
        else:
            asyncio.run(_llm_cases(todo, write, config, profile, joint))
    cfg_path.write_text(json.dumps(config, indent=2, ensure_ascii=False))
    rescore(run_dir)
    return run_dir


def rescore(run_dir: Path) -> dict[str, Any]:
    """Recompute metrics.json and report.md from cases.jsonl (no model)."""
    cfg = json.loads((run_dir / "config.json").read_text())
    recs = read_jsonl(run_dir / "cases.jsonl")
    m = aspect_metrics(recs)
    (run_dir / "metrics.json").write_text(json.dumps(m, indent=2))
    lines = [f"# Aspect extraction: {cfg['set']} / {cfg['ranker']}", "",
             f"n={m['n_sentences']} sentences (only sentences with >= 1 non-conflict aspect), seed={cfg['seed']}, "
             f"prompt={cfg.get('prompt', '-')} model={cfg.get('model_id', '-')}", "",
             "| metric | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in m.items()]]
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
    return m
