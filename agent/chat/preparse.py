"""The chat's deterministic pre-parser: ids, a month, a product title and the language of a
merchandiser question, read by pure code before any model call (`agent.chat.router` routes on it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from agent.domain.text import ReplyLanguage as Language
from agent.domain.text import reply_language

# ASCII look-arounds, not \b: in Chinese text the id touches ideographs, which are \w too.
_ASIN = re.compile(r"(?<![A-Za-z0-9])(B0[0-9A-Z]{8})(?![A-Za-z0-9])")  # Amazon ASINs: B0009RF9DW
_CODE = re.compile(r"(?<![A-Za-z0-9_-])(\d{4,6}[A-Za-z]{1,3}|\d{4,12})(?![A-Za-z0-9_-])")  # 85123A, 17850
_CUSTOMER_WORDS = re.compile(r"customer|client|shopper|user|buyer|客户|顾客|用户|会员|买家", re.I)
# "customer Bob", "client named Alice Smith": a customer by a name (or an id that is not a number);
# the tools then answer "no customer Bob" (or find it), never a segment of other customers.
_NAMED_CUSTOMER = re.compile(
    r"\b(?:customer|client|shopper|buyer)\s+(?:named\s+|called\s+)?"
    r"(?!(?:Segment|Segments|List|Lists|Base|Churn|Data|Who|What|Which|Id|ID)\b)"
    r"([A-Z][a-z]+(?:\s[A-Z][a-z]+)?|[A-Za-z]+[-_][A-Za-z0-9-_]+)\b")
_ITEM_WORDS = re.compile(r"item|product|sku|stock ?code|article|商品|产品|货品|单品|物品", re.I)
_TITLE = re.compile(r"[\"“'‘「《]([^\"”'’」》]{3,80})[\"”'’」》]|((?:[A-Z0-9][A-Z0-9&'.,/-]*\s+){1,}[A-Z0-9][A-Z0-9&'.,/-]*)")
_MONTHS_EN = ["january", "february", "march", "april", "may", "june", "july", "august",
              "september", "october", "november", "december"]
_MONTHS_ZH = ["一", "二", "三", "四", "五", "六", "七", "八", "九", "十", "十一", "十二"]


# The reply language ('zh' as soon as one Han character appears): `agent.domain.text.reply_language`.
# `detect_language` is its old name here, kept until the chat's callers say `reply_language`
# (agent.domain.text.detect_language is the other meaning: zh / en / mixed / other).
detect_language = reply_language


@dataclass
class ParsedQuestion:
    """What pure code can read from a question before any model call."""

    question: str
    language: Language
    customer_ids: list[str] = field(default_factory=list)
    item_ids: list[str] = field(default_factory=list)
    month: int | None = None
    days: int | None = None  # "last 30 days", "past 2 weeks", "最近30天": a window ending at the data's end
    title: str | None = None  # a quoted or UPPER-CASE product title


def _month(text: str) -> int | None:
    """A calendar month named in the question (English name/abbreviation, 10月, 十月)."""
    low = text.lower()
    for i, name in enumerate(_MONTHS_EN, 1):
        pat = r"\bin may\b|\bmay (19|20)\d\d\b" if name == "may" else rf"\b({name}|{name[:3]})\b"
        if re.search(pat, low):
            return i
    m = re.search(r"(\d{1,2})\s*月", text)
    if m and 1 <= int(m.group(1)) <= 12:
        return int(m.group(1))
    for i in range(12, 0, -1):
        if _MONTHS_ZH[i - 1] + "月" in text:
            return i
    return None


_THIS_MONTH = re.compile(r"\bthis month\b|本月|这个月|这月")
_LAST_MONTH = re.compile(r"\b(?:last|previous|past) month\b|上个月|上月")


# Days per unit of a window ("3 months" = 90 days); "days" is read as "day".
_UNIT_DAYS = {"day": 1, "week": 7, "month": 30, "天": 1, "日": 1, "周": 7, "星期": 7, "个月": 30}
_EN_UNIT, _ZH_UNIT = r"(day|week|month)s?", "(天|日|周|星期|个月)"
_LAST_DAYS = re.compile(rf"\b(?:last|past|previous|recent)\s+(\d{{1,5}})\s*{_EN_UNIT}\b"
                        rf"|(?:最近|过去|近)\s*(\d{{1,5}})\s*{_ZH_UNIT}")
_LAST_WEEK = re.compile(r"\b(?:last|past|previous|this) week\b|最近一周|过去一周|上周|上星期|近一周|本周|这周")
# a number with a unit of time is a window, never an id ("last 9999 days")
_WITH_UNIT = re.compile(rf"\s*(?:{_EN_UNIT}|{_ZH_UNIT})", re.I)


def _days(text: str) -> int | None:
    """A window of days ending now: "last 30 days", "past 2 weeks", "last 3 months" (90),
    "最近30天", "过去2周", "近3个月", "last week" / "this week" / "上周" (7); None when the question
    names none. A window outside 1..366 days is clamped to it (the segment tool's range)."""
    if m := _LAST_DAYS.search(text.lower()):
        n, unit = (int(m.group(1)), m.group(2)) if m.group(1) else (int(m.group(3)), m.group(4))
        return min(max(n * _UNIT_DAYS[unit], 1), 366)
    return 7 if _LAST_WEEK.search(text.lower()) else None


def _relative_month(text: str, today: datetime | None) -> int | None:
    """"this month" / "本月" (the month of `today`, the dataset's end) or "last month" / "上个月"
    (the one before), else None; without `today`, None."""
    if today is None:
        return None
    low = text.lower()
    if _LAST_MONTH.search(low):
        return (today.month - 2) % 12 + 1
    if _THIS_MONTH.search(low):
        return today.month
    return None


def preparse(question: str, *, has_user: Any = None, has_item: Any = None,
             today: datetime | None = None) -> ParsedQuestion:
    """Ids, month, title and language from the question text.

    A relative month ("this month", "last month", "本月", "上个月") is read against `today`: the
    dataset's end, not the wall clock (a shop's export ends when it ends). A window of days
    ("last 30 days", "最近30天", "last week") is kept as `days` (the tools count it back from the
    dataset's end) and then no month is read.

    A number is a customer id or an item code by the nearest preceding keyword (customer/客户
    vs item/product/商品); without one, by what the store knows (`has_user`/`has_item`
    callables), and otherwise a pure number of 5 digits is taken as a customer (Online Retail's
    CustomerID) and an alphanumeric code as an item (StockCode like 85123A).
    """
    days = _days(question)
    p = ParsedQuestion(question=question, language=detect_language(question), days=days,
                       month=None if days else _month(question) or _relative_month(question, today))
    for m in _ASIN.finditer(question):
        p.item_ids.append(m.group(1))
    for m in _CODE.finditer(question):
        tok = m.group(1)
        if tok in p.item_ids or (len(tok) == 4 and tok.isdigit() and 1990 <= int(tok) <= 2100):
            continue
        if tok.isdigit() and _WITH_UNIT.match(question, m.end()):  # "last 9999 days": a window
            continue
        before = question[max(0, m.start() - 24): m.start()]
        cw = [x.end() for x in _CUSTOMER_WORDS.finditer(before)]
        iw = [x.end() for x in _ITEM_WORDS.finditer(before)]
        if cw or iw:
            is_customer = (max(cw) if cw else -1) > (max(iw) if iw else -1)
        elif has_user is not None and has_item is not None and has_user(tok) != has_item(tok.upper()):
            is_customer = bool(has_user(tok))
        else:
            is_customer = tok.isdigit() and len(tok) == 5
        (p.customer_ids if is_customer else p.item_ids).append(tok if is_customer else tok.upper())
    for m in _TITLE.finditer(question):
        cand = (m.group(1) or m.group(2) or "").strip(" ?.,!？。")
        if len(cand) >= 6 and not _ASIN.fullmatch(cand) and cand.upper() not in p.item_ids:
            p.title = cand
            break
    if not p.customer_ids and (named := _NAMED_CUSTOMER.search(question)):
        p.customer_ids.append(named.group(1))
    p.customer_ids = list(dict.fromkeys(p.customer_ids))
    p.item_ids = list(dict.fromkeys(p.item_ids))
    return p
