"""The verifier: checks one model-written sentence against the structured answer it explains.

Every sentence a task returns from the model (a next-item rationale, the intent summary, a
churn or intent reason) is checked here before it is returned; a violation gets one repair
round with the violations fed back, then the task's template sentence, labelled
(`agent.tasks.verified`). What is checked, from the facts the pipeline itself holds:

* **products**: every catalogue title named, and every run of two or more capitalised words
  (Online Retail's titles are upper case), is a product the sentence may name (`Facts.titles`:
  the item it explains and the events it cites); a part of a title is fine in English, but a
  Chinese sentence quotes titles in full (a half-translated "手 Warm器" is caught);
* **event references**: every ``E<n>`` in the text is one the answer cites (`Facts.refs`);
* **numbers**: every number (quantity, price, date part, count, probability, with ``%`` read
  both as a share and as a number) is one the facts hold, to rounding;
* **ordering**: "most likely", "top pick", "最可能" ... only where `Facts.may_rank_first` (the
  top-ranked item's reason), and a summary that ranks names the top item first;
* **popularity**: "best-seller", "popular", "热销" ... only where `Facts.popular` (the
  popularity or similar-user source scored the item);
* **direction**: "high risk", "unlikely to buy" ... agree with `Facts.direction` (the
  probability's side of 0.5, or the churn risk band).

Pure: no model, no I/O. Each violation is one sentence written for the model's repair round.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from agent.domain.text import has_cjk

Direction = Literal["high", "low", "medium"]

_REF = re.compile(r"\bE\d+\b")
_NUMBER = re.compile(r"(?<![\w.])\d+(?:,\d{3})*(?:\.\d+)?%?")
# Two or more capitalised words ("HOT WATER BOTTLE"); single acronyms (LED, USB) are no product.
_CAPS_RUN = re.compile(r"\b[A-Z][A-Z0-9'&/.-]+(?:\s+[A-Z0-9][A-Z0-9'&/.-]*)+\b")
_LATIN_RUN = re.compile(r"[A-Za-z][A-Za-z0-9'&/.-]*(?:\s+[A-Za-z0-9][A-Za-z0-9'&/.-]*)*")
_ORDERING = re.compile(
    r"\b(?:most likely|likeliest|top (?:pick|choice|recommendation)|first choice|number one|best bet|#1)\b"
    # a prediction of the next purchase is a claim about the top of the ranking too:
    # "will (likely) buy X next", "X is their next purchase", "likely that ... will buy"
    r"|\bwill (?:\w+ ){0,2}(?:buy|purchase|order)\b[^.;]{0,90}\bnext\b|\bnext (?:purchase|buy|order)\b"
    r"|\blikely that\b[^.;]{0,60}\bwill (?:\w+ ){0,2}(?:buy|purchase|order)\b"
    r"|最可能|最有可能|首选|第一选择|排名第一|下一(?:个|次|件)?(?:会)?(?:购买|买)"
    r"|接下来(?:很|最)?(?:可能)?会?(?:购买|买)", re.I)
_POPULAR = re.compile(r"\b(?:best[- ]?sell\w*|popular\w*|trending|top[- ]selling)\b|热销|畅销|爆款|很受欢迎", re.I)
_HIGH = re.compile(r"\b(?:high(?:er)? (?:risk|churn|intent|chance|probability)|(?<!un)likely to (?:churn|leave|lapse|buy|"
                   r"purchase|order)|at risk|ready to buy|about to (?:buy|order))\b|高风险|很可能购买|即将购买", re.I)
_LOW = re.compile(r"\b(?:low(?:er)? (?:risk|churn|intent|chance|probability)|unlikely to (?:churn|leave|lapse|buy|"
                  r"purchase|order)|likely to (?:return|stay|come back)|not (?:ready|likely) to buy)\b|低风险|不太可能", re.I)
_PHRASE_BREAK = re.compile(r"[,，、;；]")
# Catalogue titles shorter than this are not looked for (one common word is not a product mention).
_MIN_TITLE_CHARS = 6


class TitleIndex:
    """Every catalogue title, to find the products a text names: verbatim (case-insensitive, on
    word boundaries), or in other words when every content word of a title of three or more
    content words is in the text ("a regency cakestand 3-tier" names REGENCY CAKESTAND 3 TIER).

    Args:
        titles: the catalogue's titles (any order, repeats fine). Titles under 6 characters and
            one-word titles are skipped: "Halo" in a sentence is no product mention.
    """

    def __init__(self, titles: Iterable[str]) -> None:
        keep = {t.strip().lower() for t in titles if len(t.strip()) >= _MIN_TITLE_CHARS and len(t.split()) > 1}
        self._titles = sorted(keep, key=len, reverse=True)
        self._words = [(t, w) for t in self._titles if len(w := content_words(t)) >= 3]

    def __len__(self) -> int:
        return len(self._titles)

    def named(self, text: str) -> list[str]:
        """The catalogue titles `text` names verbatim (lower-cased), longest first, none inside
        another match; case-insensitive, on word boundaries."""
        low, taken, out = text.lower(), [False] * len(text), []
        for t in self._titles:
            if t not in low:
                continue
            for m in re.finditer(rf"(?<!\w){re.escape(t)}(?!\w)", low):
                if not any(taken[m.start():m.end()]):
                    taken[m.start():m.end()] = [True] * (m.end() - m.start())
                    out.append(t)
        return out

    def named_as_written(self, text: str) -> list[str]:
        """`named`, each in `text`'s own casing (the catalogue's, for a fact text)."""
        return [_orig(text, t) for t in self.named(text)]

    def paraphrased(self, text: str) -> list[str]:
        """The catalogue titles (lower-cased) whose every content word is in `text`, verbatim or
        not; a title whose words are all within a longer such title is left out."""
        have = content_words(text)
        hits = [t for t, w in self._words if w <= have]
        return [t for t in hits if not any(t != o and content_words(t) < content_words(o) for o in hits)]


def content_words(text: str) -> frozenset[str]:
    """The lower-cased words of 3+ letters of `text`, split on anything but letters and digits,
    less a few function words ("set", "of", "the" ... and digits do not say which product)."""
    words = re.split(r"[\W_]+", text.lower())
    return frozenset(w for w in words if len(w) > 2 and not w.isdigit() and w not in _FUNCTION_WORDS)


_FUNCTION_WORDS = frozenset(["the", "and", "for", "with", "set", "sets", "of", "pack", "box", "one", "two", "three", "four", "five", "six", "piece", "pcs", "this", "that", "which", "their", "its", "from"])


@dataclass(frozen=True)
class Facts:
    """What one model-written sentence may say.

    Attributes:
        titles: the product titles it may name (the item it explains, the items of the events it
            may cite, the ranked items for a summary), verbatim.
        refs: the event references it may use (``E3``).
        numbers: texts whose numbers it may state (event lines, funnel facts, probabilities).
        may_rank_first: whether an ordering claim ("most likely") is allowed in it.
        top_title: for a summary, the top-ranked item's title: a ranking claim must name it first
            (first among `ranked` when given: a history item named before it does not count).
        ranked: the ranked items' titles, best first (empty: the first of all `titles` named).
        popular: whether it may call the item a best-seller or popular.
        direction: the side its risk or intent words must agree with (None: no such words checked).
        max_chars: the schema's length cap of the field: a sentence that reaches it was cut off by
            constrained decoding mid-word (None: not checked).
        echo: texts it must not merely repeat (the facts it is placed after).
        event_titles: the titles of the items the customer's cited events are about: a product
            the sentence says the customer bought, ordered, viewed or carted must be one of them
            (None: not checked).
    """

    titles: Sequence[str]
    refs: Collection[str] = ()
    numbers: Sequence[str] = ()
    may_rank_first: bool = False
    top_title: str | None = None
    ranked: Sequence[str] = ()
    popular: bool = False
    direction: Direction | None = None
    max_chars: int | None = None
    echo: Sequence[str] = ()
    event_titles: Sequence[str] | None = None
    _allowed: set[float] = field(default_factory=set, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        nums: set[float] = set()
        for text in [*self.numbers, *self.titles]:
            nums.update(_values(text))
        self._allowed.update(nums)

    def number_ok(self, token: str) -> bool:
        """Whether the number `token` ("12", "0.82", "82%", "1,250") is one the facts hold, to
        rounding (the last digit written)."""
        pct = token.endswith("%")
        raw = token.rstrip("%").replace(",", "")
        x = float(raw)
        step = 10.0 ** -len(raw.split(".")[1]) if "." in raw else 1.0
        candidates = [x, x / 100] if pct else [x]
        for a in self._allowed:
            for c, s in zip(candidates, [step, step / 100] if pct else [step], strict=True):
                if abs(c - a) <= s / 2 + 1e-9:
                    return True
        return False


def _values(text: str) -> set[float]:
    out: set[float] = set()
    for tok in _NUMBER.findall(text):
        raw = tok.rstrip("%").replace(",", "")
        x = float(raw)
        out.add(x)
        if tok.endswith("%"):
            out.add(x / 100)
    return out


def verify_sentence(text: str, facts: Facts, catalogue: TitleIndex) -> list[str]:
    """The violations of one model-written sentence (empty: verified).

    Args:
        text: the sentence as the model wrote it (English or Chinese).
        facts: what it may say (`Facts`).
        catalogue: every product title of the shop (`TitleIndex`), to see which products it names.

    Returns:
        One message per violation, written so the model can fix it on a repair round, e.g.
        ``"names 'WHITE HANGING HEART T-LIGHT HOLDER', which is not the product explained or an
        event it cites"``.
    """
    out: list[str] = []
    if facts.max_chars is not None and len(text) >= facts.max_chars:
        out.append(f"is cut off at the {facts.max_chars}-character limit; say it in fewer words")
    said = content_words(text)
    if len(said) >= 2 and any(said <= content_words(e) for e in facts.echo):
        out.append("repeats the facts it follows; say what the product has in common with the cited events")
    allowed = {t.lower() for t in facts.titles}
    named = catalogue.named(text)
    for t in named:
        if t not in allowed and not any(t in a for a in allowed):
            out.append(f"names '{_orig(text, t)}', which is not the product explained or an event it cites")
    allowed_words = [content_words(a) for a in allowed]
    # in other words: within one phrase (no comma or semicolon: "themes of jumbo, bag, apples"
    # lists themes, not a product), and not with the words of titles it names verbatim
    # ("REGENCY CAKESTAND 3 TIER and SET OF 3 CAKE TINS" does not name SET OF 3 REGENCY CAKE TINS)
    paraphrased = list(dict.fromkeys(t for part in _PHRASE_BREAK.split(_mask(text, named))
                                     for t in catalogue.paraphrased(part)))
    for t in paraphrased:
        if t in named or t in allowed or any(content_words(t) <= w for w in allowed_words):
            continue
        out.append(f"names {t.upper()!r} in other words, which is not the product explained or an event it cites")
    if facts.event_titles is not None:
        out += _claimed_events(text, [*named, *(t for t in paraphrased if t not in named)], facts.event_titles)
    # titles found are masked so their words and numbers are not checked again
    masked = _mask(text, named)
    zh = has_cjk(text)
    runs = _LATIN_RUN if zh else _CAPS_RUN
    for m in runs.finditer(masked):
        run = _REF.sub("", m.group(0)).strip(" .,'/-&")
        if not run or (not zh and len(run.split()) < 2) or (zh and not re.search(r"[A-Za-z]{2,}", run)):
            continue
        low = run.lower()
        if zh:
            if low in allowed:
                continue
            whole = next((a for a in facts.titles if _within(low, a.lower())), None)
            out.append(f"quotes '{run}' from '{whole}': in Chinese, quote product titles in full and unchanged"
                       if whole else f"'{run}' is no product title here: quote product titles in full and unchanged")
        elif not any(_within(low, a) for a in allowed):
            out.append(f"names '{run}', which is not the product explained or an event it cites; "
                       "quote titles exactly as given")
    for ref in _REF.findall(masked):
        if ref not in facts.refs:
            out.append(f"cites {ref}, which is not among its evidence {sorted(facts.refs, key=_ref_key) or '(none)'}")
    for tok in _NUMBER.findall(_REF.sub(" ", masked)):
        if not facts.number_ok(tok):
            out.append(f"states {tok}, which is not in the data; use only numbers shown")
    claim = _ORDERING.search(text)
    if claim and not facts.may_rank_first:
        out.append(f"says '{claim.group(0)}' of an item that is not ranked first")
    elif claim and facts.top_title is not None:
        pool = {t.lower() for t in facts.ranked} or allowed
        first = min(((text.lower().find(t), -len(t), t) for t in pool if t in text.lower()), default=None)
        if first is None or first[2] != facts.top_title.lower():
            out.append(f"says '{claim.group(0)}' but does not name the top-ranked item '{facts.top_title}' first")
    pop = _POPULAR.search(text)
    if pop and not facts.popular:
        out.append(f"says '{pop.group(0)}', but no popularity data supports it")
    out += _direction(text, facts.direction)
    return out


_DID = re.compile(r"\b(?:bought|purchased|ordered|viewed|carted|added|reviewed)\b|买了|购买了|买过|浏览了|加购了", re.I)


def _claimed_events(text: str, mentioned: Sequence[str], event_titles: Sequence[str]) -> list[str]:
    """Products the text says the customer bought (ordered, viewed, ...) right before naming
    them, that none of the cited events is about."""
    low, mine, out = text.lower(), [t.lower() for t in event_titles], []
    for t in mentioned:
        at = low.find(t)
        if at < 0:  # named in other words: where its first content word is
            at = min((i for w in content_words(t) if (i := low.find(w)) >= 0), default=-1)
        verb = _DID.search(low[max(0, at - 40):at]) if at >= 0 else None
        if verb and not any(t == m or _within(t, m) or content_words(t) <= content_words(m) for m in mine):
            out.append(f"says the customer {verb.group(0)} {t.upper()!r}, but no cited event is about it"
                       + (f" (they are about {', '.join(repr(m.upper()) for m in mine)})" if mine else ""))
    return out


def _direction(text: str, direction: Direction | None) -> list[str]:
    if direction is None:
        return []
    hi, lo = _HIGH.search(text), _LOW.search(text)
    if direction == "low" and hi:
        return [f"says '{hi.group(0)}', but the probability is low"]
    if direction == "high" and lo:
        return [f"says '{lo.group(0)}', but the probability is high"]
    if direction == "medium":
        band = re.search(r"\b(?:high|low) risk\b|高风险|低风险", text, re.I)
        if band:
            return [f"says '{band.group(0)}', but the risk is medium"]
    return []


def _within(part: str, title: str) -> bool:
    """Whether `part` is whole words of `title` (both lower-cased): "hand warmer" is within
    "hand warmer union jack", "warm" is not."""
    return re.search(rf"(?<!\w){re.escape(part)}(?!\w)", title) is not None


def _mask(text: str, named: Sequence[str]) -> str:
    low, out = text.lower(), list(text)
    for t in named:
        for m in re.finditer(rf"(?<!\w){re.escape(t)}(?!\w)", low):
            out[m.start():m.end()] = " " * (m.end() - m.start())
    return "".join(out)


def _orig(text: str, low_title: str) -> str:
    i = text.lower().find(low_title)
    return text[i:i + len(low_title)] if i >= 0 else low_title


def _ref_key(ref: str) -> int:
    return int(ref[1:]) if ref[1:].isdigit() else 0


def claims_popularity(text: str) -> bool:
    """Whether `text` calls something a best-seller or popular (the claim `Facts.popular` allows)."""
    return _POPULAR.search(text) is not None


def refs_in(text: str) -> list[str]:
    """The event references (``E3``) a text names, in order, without repeats."""
    return list(dict.fromkeys(_REF.findall(text)))
