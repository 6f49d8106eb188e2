"""Personal data in free text and ids: masking and keyed pseudonymisation.

`mask_pii` replaces e-mail addresses, phone numbers, payment-card-like digit runs and IBANs in
review text with fixed placeholders before the text is stored, shown to a model or logged.
It is a regex pass, tuned to miss little in English and Chinese e-commerce reviews: it is not a
guarantee (names, street addresses and non-ASCII e-mail domains are not detected). It is the one
masker: the sentiment cleaner (`agent.tasks.sentiment`) and the history every task reads use it.

`pseudonymise` maps a user id to a stable keyed hash (HMAC-SHA256), so the store never holds
the raw id while the same caller id always maps to the same stored id. The key is the
operator's; without it the mapping cannot be reversed or recomputed.
"""

from __future__ import annotations

import hashlib
import hmac
import re

EMAIL_MASK = "[email]"
PHONE_MASK = "[phone]"
CARD_MASK = "[card]"
IBAN_MASK = "[iban]"

_EMAIL = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}")
# The edges are ASCII letters and digits, not \w: in Chinese reviews a number often touches a Han
# character ("电话13812345678"), and \w would count that character as part of a word.
# IBAN: two letters, two check digits, 11-30 alphanumerics (spaces allowed in groups of 4).
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,4})?(?![A-Za-z0-9])")
# 13-19 digits, optionally split by single spaces or dashes (card numbers).
_CARD = re.compile(r"(?<![A-Za-z0-9_+])\d(?:[ \-]?\d){12,18}(?![A-Za-z0-9_])")
# Phone numbers: optional +country, then 7-15 digits with spaces, dots, dashes or a (area).
_PHONE = re.compile(
    r"(?<![A-Za-z0-9_+])(?:(?:\+|00)\d{1,3}[ .\-]?)?(?:\(\d{1,5}\)[ .\-]?)?\d{2,5}(?:[ .\-]?\d{2,5}){1,4}"
    r"(?![A-Za-z0-9_])"
)
_MIN_PHONE_DIGITS = 7
_MAX_PHONE_DIGITS = 15


def _phone(m: re.Match[str]) -> str:
    text = m.group(0)
    digits = sum(c.isdigit() for c in text)
    if not (_MIN_PHONE_DIGITS <= digits <= _MAX_PHONE_DIGITS):
        return text
    # A bare run of digits with no separator and no '+' is more often an order number or a
    # year range than a phone; keep it unless it is long enough to dial (10+ digits).
    if text.isdigit() and digits < 10:
        return text
    # Dates, year ranges and decimals ("2021.05.03", "2020-2021", "12.99") are not phones.
    if (re.fullmatch(r"\d{1,4}([./\-])\d{1,2}\1\d{1,4}", text)
            or re.fullmatch(r"(?:19|20)\d\d ?[\-/] ?(?:19|20)\d\d", text)
            or re.fullmatch(r"\d+\.\d{1,2}", text)):
        return text
    return PHONE_MASK


def mask_pii(text: str) -> str:
    """`text` with e-mails, card numbers, IBANs and phone numbers replaced by placeholders.

    Example:
        ``mask_pii("mail me: ann@x.co.uk or +44 20 7946 0958")`` ->
        ``"mail me: [email] or [phone]"``
    """
    if not text:
        return text
    text = _EMAIL.sub(EMAIL_MASK, text)
    text = _IBAN.sub(IBAN_MASK, text)
    text = _CARD.sub(CARD_MASK, text)
    return _PHONE.sub(_phone, text)


def pseudonymise(user_id: str, key: bytes) -> str:
    """A stable pseudonym for `user_id` under the operator's `key`: ``"p_"`` + 32 hex chars
    (the first 128 bits of HMAC-SHA256(key, user_id)).

    Raises:
        ValueError: empty key.
    """
    if not key:
        raise ValueError("pseudonymisation key is empty")
    return "p_" + hmac.new(key, user_id.encode("utf-8"), hashlib.sha256).hexdigest()[:32]
