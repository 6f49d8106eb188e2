"""Scripts and languages of free text: one CJK test, and the two questions ShopLens asks of a text.

* `detect_language` (``zh`` / ``en`` / ``mixed`` / ``other``): what a review is written in, from
  script counts. Sentiment reports it with every answer.
* `reply_language` (``zh`` / ``en``): which language to answer a merchandiser in: Chinese as
  soon as the question holds one Han character ("帮我找找 tea light holder" is a Chinese
  question), else English. The chat uses it.
* `has_cjk` / `is_han`: the script tests under both, and under the embedder choice for a
  catalogue (Chinese, Japanese or Korean titles get the multilingual embedder).
* `strip_markup` / `cut_at_word`: catalogue and review text is normalised on the way in (HTML
  tags and entities out, whitespace collapsed) and long titles are cut at a word.
"""

from __future__ import annotations

import html
import re
from typing import Literal

Language = Literal["zh", "en", "mixed", "other"]
ReplyLanguage = Literal["zh", "en"]

# Han ideographs: the unified block, extension A, compatibility ideographs, extension B.
_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df"
HAN = re.compile(f"[{_HAN}]")
# CJK scripts: Han plus Japanese kana and Korean Hangul syllables.
CJK = re.compile(f"[{_HAN}\u3040-\u30ff\uac00-\ud7af]")
_LATIN_WORD = re.compile(r"[A-Za-z]{2,}")


def is_han(c: str) -> bool:
    """Whether the single character `c` is a Han ideograph."""
    return HAN.fullmatch(c) is not None


def has_cjk(text: str) -> bool:
    """Whether `text` holds any Chinese, Japanese or Korean character (Han, kana, Hangul)."""
    return CJK.search(text) is not None


def detect_language(text: str) -> Language:
    """zh / en / mixed / other from script counts: Han characters vs Latin words.

    A Han character carries about as much as a Latin word, so the two counts are compared
    directly; 'mixed' when the minority script has >= 20% and at least 2 units; 'other' for
    text with neither (emoji only, Cyrillic, ...).
    """
    han = sum(1 for c in text if is_han(c))
    words = len(_LATIN_WORD.findall(text))
    if han == 0 and words == 0:
        return "other"
    other_letters = sum(1 for c in text if c.isalpha() and not is_han(c) and not c.isascii())
    if han == 0 and other_letters > sum(1 for c in text if c.isascii() and c.isalpha()):
        return "other"
    minority = min(han, words)
    if minority >= 2 and minority / (han + words) >= 0.2:
        return "mixed"
    return "zh" if han >= words else "en"


def reply_language(text: str) -> ReplyLanguage:
    """'zh' when `text` has any Han ideograph, else 'en' (the language to answer in)."""
    return "zh" if HAN.search(text) else "en"


# HTML markup in catalogue and review text (scraped exports carry it): a tag that starts with a
# letter, "/" or "!" (so "<3" and "a < b" are left alone), or a named or numeric entity.
_MARKUP = re.compile(r"<[A-Za-z/!][^>]{0,500}>|&(#\d{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,30});")
_SCRIPT = re.compile(r"<(script|style)\b.*?</\1\s*>", re.I | re.S)
_TAG = re.compile(r"<[A-Za-z/!][^>]{0,500}>")
_ENTITY = re.compile(r"&(#\d{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,30});")


def strip_markup(text: str) -> str:
    """`text` with HTML tags removed (script and style bodies too), then entities unescaped
    (twice when the first pass leaves entities: scraped data often holds ``&amp;amp;``), and
    whitespace runs collapsed to one space. Tags are removed before unescaping, so an escaped
    ``&lt;set of 2&gt;`` stays as the text "<set of 2>". Text without markup is returned
    unchanged, so catalogues without it keep their hashes (and the indexes keyed by them)."""
    if not _MARKUP.search(text):
        return text
    s = html.unescape(_TAG.sub(" ", _SCRIPT.sub(" ", text)))
    if _ENTITY.search(s):
        s = html.unescape(s)
    return " ".join(s.split())


def cut_at_word(text: str, max_chars: int) -> str:
    """`text` if it fits in `max_chars`, else cut at the last space before the limit (hard at
    the limit when there is none, as in Chinese) and ended with "…" (the result has at most
    `max_chars` characters)."""
    if len(text) <= max_chars:
        return text
    head = text[: max_chars - 1]
    space = head.rfind(" ")
    if space >= max_chars // 2:
        head = head[:space]
    return head.rstrip(" ,;:-") + "…"
