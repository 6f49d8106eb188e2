"""`shoplens eval faithfulness`: how the sentences the model writes fare against the verifier,
through the same service the API, the CLI and the chat call, with the real model.

Per answer (``--task next_item|churn|intent|profile|audience|chat``, ``--n`` users of
``--dataset``, seeded sample; an audience answer is for the item the user bought last):
the verifier's counts (`Meta.verification`): model-written sentences checked, verified as
written, repaired in the one repair round, replaced by the labelled template; and every
returned sentence with its source. Reported (report.md, metrics.json): the shares with 95%
Wilson intervals over sentences, the unlabelled template fallbacks (a template sentence
without its ``[retrieval fallback]`` / ``[template]`` / ``[cold start]`` label: must be 0),
and examples of each outcome.

**Does the verifier catch what it should?** ``seeded`` (no model needed, recomputed from the
recorded answers): each returned model sentence that passes the verifier against facts rebuilt
from the answer alone gets one wrong clause added per failure class (a product it does not
cite, an event it does not cite, an invented number, a first-place claim for a lower rank, a
popularity claim without popularity data, a risk or intent word on the wrong side, a summary
that ranks a lower item first); each must be caught. The catch rate per class is reported.

Resumable: cases.jsonl is appended per answer; a rerun with the same --out skips done users.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm

from agent.app.feedback import wilson_interval
from agent.app.runtime import Runtime
from agent.app.service import ShopLensService
from agent.chat.checked import LABEL, split_sentences
from agent.chat.results import ANSWER_PROMPT
from agent.chat.router import ChatAgent
from agent.chat.tools import ToolContext, interactive_config
from agent.domain.verify import Direction, Facts, TitleIndex, verify_sentence
from agent.settings import Settings
from agent.tasks.next_item import why_facts
from eval.runs import read_jsonl, run_folder

FaithTask = Literal["next_item", "churn", "intent", "profile", "audience", "chat"]
TASKS: tuple[FaithTask, ...] = ("next_item", "churn", "intent", "profile", "audience", "chat")
# the chat's question per customer, by language (what a merchandiser asks most)
CHAT_QUESTIONS = {"en": "What will customer {uid} buy next, and why?", "zh": "客户{uid}接下来会买什么？为什么？"}
CHAT_LABELS = tuple(x.strip() for x in LABEL.values())
# CHAT_LABELS has "[template]" too; "[retrieval]" labels the audience's retrieval reasons
LABELS = ("[retrieval fallback]", "[retrieval]", "[cold start]", *CHAT_LABELS)
N_EXAMPLES = 3
MODEL_DOWN_WAIT_S = 20.0


# ---- one answer -> one case record ---------------------------------------------------------


def _cited(evidence: Sequence[Any]) -> list[list[str]]:
    """Evidence as recorded in a case: [ref, item id, event line] each."""
    return [[e.ref, e.item_id, e.summary] for e in evidence]


def next_item_record(pred: Any) -> dict[str, Any]:
    """A next-item answer as a case: each reason (with what `why_facts` needs) and the summary."""
    return {
        "sentences": [{"key": f"#{i.rank}", "text": i.reason, "source": i.reason_source, "rank": i.rank,
                       "title": i.title, "source_scores": i.source_scores,
                       "cited": _cited(i.evidence)} for i in pred.items]
        + [{"key": "summary", "text": pred.intent_summary, "source": pred.summary_source}],
        "top_titles": [i.title for i in pred.items],
    }


def reason_record(pred: Any, direction: Direction) -> dict[str, Any]:
    """A churn or intent answer as a case: its one reason, its evidence and its direction."""
    return {"sentences": [{"key": "reason", "text": pred.reason, "source": pred.reason_source,
                           "cited": _cited(pred.evidence),
                           "direction": direction}],
            "probability": pred.probability}


def profile_record(pred: Any) -> dict[str, Any]:
    """A profile as a case: its summary and each claim (a claim the verifier replaced starts
    with ``[template]``) with its evidence."""
    return {"sentences": [{"key": "profile_summary", "text": pred.summary, "source": pred.summary_source}]
            + [{"key": f"claim{i}", "text": c.text, "source": "template" if c.text.startswith("[template]") else "model",
                "cited": _cited(c.evidence)} for i, c in enumerate(pred.claims)]}


def audience_record(pred: Any) -> dict[str, Any]:
    """An audience as a case: the targeting reason of each user the model scored (the others'
    retrieval reasons are not model sentences and are not recorded)."""
    return {"sentences": [{"key": f"user{u.rank}", "text": u.reason, "source": u.reason_source,
                           "cited": _cited(u.evidence)}
                          for u in pred.users if u.model_probability is not None],
            "item_id": pred.item_id}


def chat_record(events: Sequence[Any]) -> dict[str, Any]:
    """A chat turn as a case: the answer's sentences (`split_sentences`), each labelled model
    or template (the template part starts at its label), the template's facts that open a
    next-item answer by design (source "facts": not the model's, not a fallback), and the done
    event's counts."""
    facts = "".join(e.text for e in events if e.kind == "token" and getattr(e, "source", None) == "facts")
    text = "".join(e.text for e in events if e.kind == "token" and getattr(e, "source", None) != "facts")
    done = events[-1]
    cut = min((i for i in (text.find(lab) for lab in CHAT_LABELS) if i >= 0), default=len(text))
    head, rest = split_sentences(text[:cut])
    # before any label: the model's verified sentences, or (no model answer) the tool's message
    # ("which item?", "no customer ...": the answer itself, not a fallback)
    src = "model" if done.answer_source == "model" else "message"
    sentences = [{"key": f"s{i}", "text": x.strip(), "source": src} for i, x in enumerate([*head, rest]) if x.strip()]
    if cut < len(text):
        sentences.append({"key": "template", "text": text[cut:].strip(), "source": "template"})
    if facts.strip():
        sentences.insert(0, {"key": "facts", "text": facts.strip(), "source": "facts"})
    return {"sentences": sentences, "answer": facts + text, "answer_source": done.answer_source,
            "verification": done.verification.model_dump() if done.verification else None,
            "degraded": done.answer_source != "model", "degraded_reason": done.text or None}


def _direction(p: float, band: str | None = None) -> Direction:
    if band in ("low", "medium", "high"):
        return band  # type: ignore[return-value]
    return "high" if p >= 0.5 else "low"


# ---- the run -----------------------------------------------------------------------------------


def run_faithfulness_eval(settings: Settings, *, task: FaithTask, dataset: str = "online-retail", n: int = 100,
                          seed: int = 0, out: Path | None = None, k: int = 5, min_events: int = 3,
                          lang: Literal["en", "zh"] = "en", prompt: str | None = None,
                          facts_first: bool = True) -> Path:
    """Ask the served pipeline for `n` answers of `task` and record the verifier's account.

    Args:
        task: next_item (k items with reasons and a summary), churn or intent (one reason each),
            chat (the merchandiser chat's answer to "what will customer X buy next, and why?").
        lang: the chat question's language (the answer's); the tasks answer in English.
        prompt: chat: the answer prompt (default `agent.chat.results.ANSWER_PROMPT`).
        facts_first: chat: the served default, the ranking from the template and the why from the
            model (``chat_rationale.v1``); False: the model writes the whole answer (`prompt`).
        dataset: a stored dataset (`shoplens ingest` first).
        n: users sampled (seeded); users with fewer than `min_events` events are skipped.
        out: the run folder (default ``<workspace>/runs/<time>-faithfulness-<task>``); an existing
            one resumes.

    Returns:
        The run folder (config.json, cases.jsonl, metrics.json, report.md).

    Raises:
        ValueError: an unknown task or dataset, or no user with `min_events` events.
    """
    if task not in TASKS:
        raise ValueError(f"--task must be one of {', '.join(TASKS)}, not {task!r}")
    rt = Runtime(settings)
    svc = ShopLensService(rt)
    users = svc.active_users(dataset)
    random.Random(seed).shuffle(users)
    sample: list[str] = []
    for u in users:  # the seeded order, users with too short a history skipped
        if len(sample) == n:
            break
        if len(rt.store.user_events(dataset, u)) >= min_events:
            sample.append(u)
    if not sample:
        raise ValueError(f"no user of {dataset!r} has {min_events} events; lower --min-events")
    d = run_folder(f"faithfulness-{task}", out, settings.workspace / "runs")
    done = {r["user_id"] for r in read_cases(d) if "error" not in r}  # an error is retried
    (d / "config.json").write_text(json.dumps({"task": task, "dataset": dataset, "n": n, "seed": seed, "k": k,
                                               "min_events": min_events, "sampled": len(sample), "lang": lang,
                                               "prompt": prompt or ANSWER_PROMPT if task == "chat" else None,
                                               "facts_first": facts_first if task == "chat" else None},
                                              indent=2))
    asyncio.run(_ask(svc, task, dataset, [u for u in sample if u not in done], d / "cases.jsonl", k, lang,
                     prompt or ANSWER_PROMPT, facts_first))
    arts = rt.artifacts(dataset)
    return write_report(d, arts.title_index, {i: it.title for i, it in arts.catalog.items()})


async def _ask(svc: ShopLensService, task: FaithTask, dataset: str, users: Sequence[str], path: Path, k: int,
               lang: Literal["en", "zh"], prompt: str, facts_first: bool) -> None:
    with path.open("a") as fh:
        for uid in tqdm(users, desc=f"faithfulness {task}", unit="answer"):
            t0 = time.perf_counter()
            for _attempt in range(2):
                try:
                    rec = await _one(svc, task, dataset, uid, k, lang, prompt, facts_first)
                except Exception as e:  # one bad case never aborts the run; it is counted
                    rec = {"error": f"{type(e).__name__}: {e}"}
                if not _model_down(rec):
                    break
                # the model timed out (a busy CPU) and the guard holds calls back for a few
                # seconds: wait it out once instead of recording answers the model never saw
                await asyncio.sleep(MODEL_DOWN_WAIT_S)
            if _model_down(rec):
                rec = {"error": f"model unavailable: {rec.get('degraded_reason')}"}
            rec |= {"user_id": uid, "task": task, "seconds": round(time.perf_counter() - t0, 2)}
            fh.write(json.dumps(rec, ensure_ascii=False, default=str) + "\n")
            fh.flush()


def _model_down(rec: dict[str, Any]) -> bool:
    """Whether the answer was degraded because the model could not answer (then it measures
    nothing about the model's sentences: the case is retried, else recorded as an error that a
    rerun with the same --out retries)."""
    return "model unavailable" in str(rec.get("degraded_reason") or "") or "model failing" in str(
        rec.get("degraded_reason") or "")


async def _one(svc: ShopLensService, task: FaithTask, dataset: str, uid: str, k: int,
               lang: Literal["en", "zh"], prompt: str, facts_first: bool = True) -> dict[str, Any]:
    """One answer of `task` for `uid`, from the service (or the chat agent), as a case record."""
    if task == "chat":
        agent = ChatAgent(ToolContext(svc.runtime, svc, dataset, interactive_config(svc, k)), answer_prompt=prompt,
                          facts_first=facts_first)
        t0, events, marks = time.perf_counter(), [], {}
        async for e in agent.ask(CHAT_QUESTIONS[lang].format(uid=uid)):
            events.append(e)
            if e.kind == "evidence" and e.result is not None and e.result.kind == "next_item":
                marks.setdefault("table_s", round(time.perf_counter() - t0, 2))
            if e.kind == "token" and e.text.strip():
                marks.setdefault("first_words_s", round(time.perf_counter() - t0, 2))
        return chat_record(events) | marks
    pred: Any
    if task == "next_item":
        pred = await svc.next_item(dataset, uid, config=svc.next_item_config(k=k))
        rec = next_item_record(pred)
    elif task == "churn":
        pred = await svc.churn(dataset, uid)
        rec = reason_record(pred, _direction(pred.probability, pred.risk_band))
    elif task == "profile":
        pred = await svc.profile(dataset, uid)
        rec = profile_record(pred)
    else:
        page = await svc.user_events(dataset, uid, limit=1_000)
        item = page.events[-1].item_id
        if task == "audience":  # who to target for the item this user bought last
            pred = await svc.audience(dataset, item_id=item, n=20)
            rec = audience_record(pred)
        else:
            pred = await svc.intent(dataset, uid, item)
            rec = reason_record(pred, _direction(pred.probability)) | {"item_id": item}
    meta = pred.meta
    return rec | {"verification": meta.verification.model_dump() if meta.verification else None,
                  "degraded": meta.degraded, "degraded_reason": meta.degraded_reason, "model_id": meta.model_id}


# ---- the report (no model: from cases.jsonl) -----------------------------------------------------


def read_cases(d: Path) -> list[dict[str, Any]]:
    """The run's cases, one per user: a retried user's last record wins."""
    recs = read_jsonl(d / "cases.jsonl") if (d / "cases.jsonl").exists() else []
    return list({r["user_id"]: r for r in recs}.values())


def summarise(recs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The verifier's counts over the recorded answers, with 95% Wilson intervals on the shares
    of model-written sentences, and the unlabelled template fallbacks (must be 0)."""
    ok = [r for r in recs if "error" not in r]
    v = Counter[str]()
    for r in ok:
        for key in ("checked", "verified", "repaired", "replaced"):
            v[key] += (r.get("verification") or {}).get(key, 0)
    sentences = [s for r in ok for s in r["sentences"]]
    # a template sentence that is not the model's must say so, except the facts a next-item chat
    # answer opens with by design (the ranking, from the template)
    unlabelled = [s["text"] for s in sentences
                  if s["source"] not in ("model", "facts", "message") and not s["text"].startswith(LABELS)]

    def share(x: int) -> dict[str, Any]:
        ci = wilson_interval(x, v["checked"])
        return {"n": x, "share": round(x / v["checked"], 4) if v["checked"] else None,
                "ci95": [round(c, 4) for c in ci] if ci else None}

    return {"answers": len(recs), "errors": len(recs) - len(ok),
            "answers_with_model_sentences": sum(bool((r.get("verification") or {}).get("checked")) for r in ok),
            "degraded": sum(bool(r.get("degraded")) for r in ok),
            "sentences_returned": len(sentences),
            "model_sentences_checked": v["checked"], "verified_as_written": share(v["verified"]),
            "verified_after_repair": share(v["repaired"]), "passed": share(v["verified"] + v["repaired"]),
            "replaced_by_template": share(v["replaced"]), "unlabelled_template_fallbacks": len(unlabelled),
            "seconds_per_answer": round(sum(r["seconds"] for r in ok) / max(1, len(ok)), 1),
            # chat: when the merchandiser sees the ranked table and the first words (p50, s)
            **{f"p50_{k}": round(statistics.median(xs), 1)
               for k in ("table_s", "first_words_s") if (xs := [r[k] for r in ok if k in r])}}


def seeded_checks(recs: Sequence[dict[str, Any]], catalogue: TitleIndex | None, titles: dict[str, str]) -> dict[str, Any]:
    """Wrong sentences made from the returned right ones, per failure class: caught / seeded.

    Args:
        recs: cases.jsonl records.
        catalogue: the dataset's titles (`DatasetArtifacts.title_index`); None: an empty one.
        titles: item id -> title (to rebuild each reason's facts from its evidence).
    """
    cat = catalogue or TitleIndex([])
    spare = sorted(t for t in titles.values() if len(t.split()) >= 3)[:50]  # products to misname
    caught, seeded, base_rejected = Counter[str](), Counter[str](), 0
    for r in recs:
        if "error" in r or r.get("task") == "chat":  # a chat answer's facts (the tool result) are not kept
            continue
        tops = r.get("top_titles") or []
        for s in r["sentences"]:
            if s["source"] != "model":
                continue
            facts = _facts(s, r, titles)
            if verify_sentence(s["text"], facts, cat):
                base_rejected += 1  # the rebuilt facts are narrower than the pipeline's: not seeded
                continue
            for cls, wrong in _corruptions(s, facts, tops, spare):
                seeded[cls] += 1
                caught[cls] += bool(verify_sentence(wrong, facts, cat))
    return {"base_sentences_rejected_by_rebuilt_facts": base_rejected,
            "classes": {c: {"seeded": seeded[c], "caught": caught[c],
                            "rate": round(caught[c] / seeded[c], 4) if seeded[c] else None} for c in sorted(seeded)}}


def _facts(s: dict[str, Any], r: dict[str, Any], titles: dict[str, str]) -> Facts:
    cited = [(ref, titles.get(iid, f"item {iid}"), summary) for ref, iid, summary in s.get("cited", [])]
    if s["key"] == "summary":
        return Facts(titles=r.get("top_titles", []), refs=[], numbers=[], may_rank_first=True,
                     top_title=(r.get("top_titles") or [None])[0], ranked=r.get("top_titles", []))
    if "rank" in s:
        return why_facts(s["title"], s["rank"], s["source_scores"], cited)
    # a churn or intent reason was checked against its whole prompt's numbers, which the answer
    # does not keep: its own numbers stand in for them (it passed), an added one must not pass
    extra = [titles[r["item_id"]]] if r.get("item_id") in titles else []
    return Facts(titles=[*extra, *(t for _, t, _ in cited)], refs=[c[0] for c in cited],
                 numbers=[c[2] for c in cited] + [s["text"]], direction=s.get("direction"), may_rank_first=True)


def _corruptions(s: dict[str, Any], facts: Facts, tops: Sequence[str], spare: Sequence[str]) -> list[tuple[str, str]]:
    text = s["text"].rstrip()
    allowed = {t.lower() for t in facts.titles}
    out: list[tuple[str, str]] = []
    if s["key"] == "summary":
        if len(tops) > 1:
            out.append(("summary_ranks_a_lower_item_first", f"Most likely to buy {tops[-1]} next."))
        return out
    other = next((t for t in [*tops, *spare] if t.lower() not in allowed and len(t.split()) > 1), None)
    if other:
        out.append(("uncited_product", f"{text} Goes well with {other}."))
    n_ref = max((int(r[1:]) for r in facts.refs if r[1:].isdigit()), default=0) + 7
    out.append(("uncited_event", f"{text} As E{n_ref} shows."))
    if not facts.number_ok("977"):
        out.append(("invented_number", f"{text} Bought 977 of them."))
    if not facts.may_rank_first:
        out.append(("first_place_for_a_lower_rank", f"{text} The most likely next buy."))
    if not facts.popular and "rank" in s:
        out.append(("popularity_without_data", f"{text} A best-seller."))
    if facts.direction in ("high", "low"):
        out.append(("wrong_direction", f"{text} {'Low risk' if facts.direction == 'high' else 'High risk'}."))
    return out


def write_report(d: Path, catalogue: TitleIndex | None = None, titles: dict[str, str] | None = None) -> Path:
    """metrics.json and report.md from cases.jsonl (no model)."""
    recs = read_cases(d)
    cfg = json.loads((d / "config.json").read_text()) if (d / "config.json").exists() else {}
    metrics = {"config": cfg, **summarise(recs), "seeded": seeded_checks(recs, catalogue, titles or {})}
    (d / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False))
    (d / "report.md").write_text(render_report(metrics, recs))
    return d


def _pct(x: dict[str, Any]) -> str:
    if x.get("share") is None:
        return "n/a"
    lo, hi = x["ci95"]
    return f"{100 * x['share']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] (n={x['n']})"


def render_report(m: dict[str, Any], recs: Sequence[dict[str, Any]]) -> str:
    """The run's report: the verifier's shares with their intervals, the seeded catch rates and
    examples of each outcome."""
    cfg = m.get("config", {})
    lines = [f"# Faithfulness: {cfg.get('task')} on {cfg.get('dataset')}", "",
             f"Answers {m['answers']} ({m['errors']} errors, {m['degraded']} degraded), "
             f"{m['answers_with_model_sentences']} with model sentences; {m['model_sentences_checked']} model "
             f"sentences checked, {m['sentences_returned']} sentences returned; {m['seconds_per_answer']} s an answer"
             + (f" (median {m['p50_table_s']} s to the ranked table, {m.get('p50_first_words_s')} s to the first "
                "words)" if "p50_table_s" in m else "") + ".",
             "", "| outcome of a model sentence | share [95% Wilson CI] |", "|---|---|",
             f"| verified as written | {_pct(m['verified_as_written'])} |",
             f"| verified after the one repair | {_pct(m['verified_after_repair'])} |",
             f"| passed (returned as the model's) | {_pct(m['passed'])} |",
             f"| replaced by the labelled template | {_pct(m['replaced_by_template'])} |", "",
             f"Unlabelled template fallbacks: {m['unlabelled_template_fallbacks']}.", "",
             "## Seeded wrong sentences (does the verifier catch what it should?)", "",
             f"Right sentences not seeded (rejected by facts rebuilt from the answer alone): "
             f"{m['seeded']['base_sentences_rejected_by_rebuilt_facts']}", "",
             "| failure class | seeded | caught | rate |", "|---|---|---|---|"]
    for c, x in m["seeded"]["classes"].items():
        lines.append(f"| {c} | {x['seeded']} | {x['caught']} | {x['rate']} |")
    lines += ["", "## Examples", ""]
    by: dict[str, list[str]] = {"verified as written": [], "repaired": [], "replaced": []}
    for r in recs:
        v = r.get("verification") or {}
        viol = v.get("violations", [])
        model = [s for s in r.get("sentences", []) if s["source"] == "model"]
        if v.get("replaced"):
            tpl = [s["text"] for s in r["sentences"] if s["source"] != "model"][:1]
            by["replaced"].append(f"user {r['user_id']}: {'; '.join(viol[:3])} -> shown: {tpl}")
        elif v.get("repaired"):
            by["repaired"].append(f"user {r['user_id']}: first round: {'; '.join(viol[:3])}")
        elif model:
            by["verified as written"].append(f"user {r['user_id']}: {model[0]['text']}")
    for name, ex in by.items():
        lines.append(f"**{name}**")
        lines += [f"- {e}" for e in ex[:N_EXAMPLES]] or ["- (none)"]
        lines.append("")
    return "\n".join(lines)
