"""The lexicon baseline, also the labelled fallback when the model is down: a tiny zh/en/emoji
word list with English negation. Not calibrated; its answers say they came from here."""

from __future__ import annotations

import re

from agent.domain.predictions import POLARITIES, Polarity

_ZH_NEG = ["不好", "不满意", "不行", "不值", "不能用", "不推荐", "差", "失望", "退货", "退款", "垃圾", "太慢", "很慢",
           "坏了", "破", "假货", "问题", "后悔", "难用", "骗", "糟糕", "投诉", "不舒服", "异味", "掉色", "卡顿", "没用"]
_ZH_POS = ["好", "不错", "满意", "喜欢", "很快", "值得", "推荐", "舒服", "漂亮", "划算", "给力", "赞", "棒", "完美",
           "实惠", "方便", "清晰", "流畅", "超值", "好用", "挺好"]
_EN_NEG = {"bad", "poor", "terrible", "broken", "broke", "disappointed", "disappointing", "waste", "return",
           "returned", "worst", "awful", "useless", "junk", "hate", "refund", "defective", "horrible", "fail",
           "failed", "problem", "problems", "unhappy", "garbage", "cheaply", "flimsy", "slow", "rash", "burn"}
_EN_POS = {"good", "great", "excellent", "love", "loved", "loves", "perfect", "happy", "recommend", "nice", "best",
           "awesome", "amazing", "comfortable", "easy", "fast", "worth", "fantastic", "satisfied", "beautiful",
           "wonderful", "works", "soft", "favorite", "pleased", "impressed", "smooth", "well"}
_EN_NEGATORS = {"not", "no", "never", "don't", "dont", "doesn't", "didn't", "isn't", "wasn't", "won't", "can't",
                "cannot", "hardly", "without"}
_EMOJI_POS = set("😀😃😄😁😆😊🙂😍🥰😘👍💯❤💕💖✨🎉🌟⭐👌🙏😎🤩")
_EMOJI_NEG = set("😞😠😡🤬😢😭👎💩😤😒🙁☹😫😩🤮🤢💔")


def lexicon_probabilities(text: str) -> dict[str, float]:
    """A tiny zh/en/emoji lexicon with negation; returns heuristic label probabilities.

    Not calibrated: confidence grows with the vote margin (0.4 for a tie, at most 0.9).
    """
    pos = neg = 0
    rest = text
    for w in _ZH_NEG:
        neg += rest.count(w)
        rest = rest.replace(w, " ")
    for w in _ZH_POS:
        pos += rest.count(w)
    tokens = re.findall(r"[a-z']+", text.lower())
    for i, t in enumerate(tokens):
        negated = any(x in _EN_NEGATORS for x in tokens[max(0, i - 3):i])
        if t in _EN_POS:
            neg, pos = (neg + 1, pos) if negated else (neg, pos + 1)
        elif t in _EN_NEG:
            neg, pos = (neg, pos + 1) if negated else (neg + 1, pos)
    pos += sum(1 for c in text if c in _EMOJI_POS)
    neg += sum(1 for c in text if c in _EMOJI_NEG)
    margin = pos - neg
    if margin == 0:
        return {"negative": 0.3, "neutral": 0.4, "positive": 0.3}
    top = min(0.9, 0.55 + 0.1 * abs(margin))
    other = (1 - top) / 2
    label = "positive" if margin > 0 else "negative"
    return {p: (top if p == label else other) for p in POLARITIES}


def lexicon_polarity(text: str) -> Polarity:
    probs = lexicon_probabilities(text)
    return max(POLARITIES, key=lambda p: probs[p])
