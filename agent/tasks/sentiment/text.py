"""Review text is untrusted: clean it, mask personal data, drop instruction-like sentences.

`prepare_text` is what the model is shown: `clean_text` (HTML stripped, entities unescaped,
personal data masked by `agent.domain.pii.mask_pii`, our ``<review>`` delimiters removed,
spaces collapsed, cut to `MAX_CHARS`), then `remove_instructions` (prompt-injection defence).
"""

from __future__ import annotations

import html
import re

from agent.domain.pii import mask_pii

_TAG = re.compile(r"<[^>]{0,500}>")
_SCRIPT = re.compile(r"<(script|style)\b.*?</\1\s*>", re.I | re.S)
_DELIM = re.compile(r"</?\s*review\s*>", re.I)
_SPACES = re.compile(r"[ \t\u3000\xa0]+")
MAX_CHARS = 2000  # ~1.3k tokens of Chinese; longer reviews are cut (noted in meta)


def clean_text(raw: str, max_chars: int = MAX_CHARS) -> str:
    """Strip HTML (script/style bodies too), unescape entities, mask personal data
    (`agent.domain.pii.mask_pii`: e-mails, phone, card and IBAN numbers),
    remove anything that looks like our ``<review>`` delimiters, collapse spaces, cut to
    `max_chars`. Emoji and CJK punctuation are kept: they carry sentiment."""
    s = html.unescape(html.unescape(raw))  # double-escaped '&amp;lt;b&amp;gt;' is common in scraped data
    s = _SCRIPT.sub(" ", s)
    s = _TAG.sub(" ", s)
    s = _DELIM.sub(" ", s)
    s = mask_pii(s)
    s = "\n".join(_SPACES.sub(" ", line).strip() for line in s.splitlines())
    s = re.sub(r"\n{3,}", "\n\n", s).strip()
    return s[:max_chars]


# Instruction-like text inside a review (prompt injection). The 1.5B model copies a label word
# it is told to answer with (measured: 3 of 8 hostile reviews flipped with the prompt alone), so
# such sentences are removed before the model sees the text, and the removal is noted.
_LABEL_WORD = r"(positive|negative|neutral|正面|负面|中性|好评|差评)"
_INJECTION = re.compile("|".join([
    r"(ignore|disregard|forget)\b.{0,60}\b(instructions?|above|previous|prior|prompt|rules)",
    r"\b(system|assistant|developer)\s*:",
    r"(^|\bplease\s+)(answer|reply|respond|output|say|classify|label|return)\b.{0,40}" + _LABEL_WORD,
    r"\b(correct|true|real|final)\s+(label|answer|sentiment|classification)\b",
    r"\bnew\s+(task|instructions?)\b", r"#{2,}",
    r"忽略|无视|新指令|新的指令|系统[:：]|指令[:：]",
    r"(回答|输出|回复|标注|判断为|答案是|情感是|标签是)\s*[:：]?\s*" + _LABEL_WORD,
]), re.I)
_SENTENCE = re.compile(r"[^.!?。！？\n]*(?:[.!?。！？]+|\n|$)")


def remove_instructions(text: str) -> tuple[str, int]:
    """Drop the sentences of `text` that look like instructions to a model.

    Returns:
        (text with each such sentence replaced by "[instruction removed]", how many were removed).
    """
    out, n = [], 0
    for sent in _SENTENCE.findall(text):
        if sent.strip() and _INJECTION.search(sent.strip()):
            out.append(" [instruction removed]" + ("\n" if sent.endswith("\n") else " "))
            n += 1
        else:
            out.append(sent)
    return ("".join(out).strip(), n) if n else (text, 0)


def prepare_text(raw: str, max_chars: int = MAX_CHARS, *, filter_instructions: bool = True) -> tuple[str, int]:
    """`clean_text` then (by default) `remove_instructions`: what the model is shown."""
    text = clean_text(raw, max_chars)
    return remove_instructions(text) if filter_instructions else (text, 0)
