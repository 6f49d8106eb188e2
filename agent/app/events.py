"""Caller-supplied events and ids: validated one by one, masked, pseudonymised.

* `validate_events`: raw event dicts -> the events to store (each validated on its own; PII
  masked; user ids pseudonymised; the content-hash id computed over what is stored) plus one
  `EventError` per problem, with the field path (``events[3].timestamp``).
* `as_stored` / `unique_events`: one event as the store keeps it (its stored id), and a list
  with each id once, as the store keeps it: the one dedup rule, for inline events too.
* `Pseudonyms`: caller id <-> stored id under the operator's key.
* `parse_as_of`: a caller's ``as_of`` (ISO-8601 or unix s/ms) as a datetime.
* `loc_to_param` / `describe_errors`: pydantic error locations as field paths (the API's error
  envelope uses them too).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from agent.app.results import EventError
from agent.domain.errors import RequestError
from agent.domain.pii import mask_pii, pseudonymise
from agent.domain.schemas import BehaviorEvent, parse_timestamp

# Unix times whose magnitude no datetime can hold. `parse_timestamp` lets datetime's
# OverflowError/OSError escape for them (pydantic only converts ValueError), so they are turned
# into an unparseable value first and come back as a caller error at their field.
_MAX_UNIX = 1e14
_PSEUDONYM = re.compile(r"^p_[0-9a-f]{32}$")


def out_of_range_timestamp(value: object) -> bool:
    """True for a number (or numeric string) too large for any datetime."""
    try:
        num = float(value) if isinstance(value, str | int | float) and not isinstance(value, bool) else None
    except ValueError:
        return False
    return num is not None and abs(num) >= _MAX_UNIX


def guard_timestamp(value: object) -> object:
    """An event dict whose out-of-range timestamp is replaced by an unparseable marker."""
    if isinstance(value, dict) and out_of_range_timestamp(value.get("timestamp")):
        return value | {"timestamp": f"{value['timestamp']} (out of range)"}
    return value


def parse_as_of(value: str | int | float | datetime | None) -> datetime | None:
    """A caller's ``as_of`` as an aware UTC datetime (None stays None).

    Raises:
        RequestError: unparseable or out of range (param ``as_of``, code ``invalid_timestamp``).
    """
    if value is None or isinstance(value, datetime):
        return value
    if out_of_range_timestamp(value):
        raise RequestError(f"as_of: timestamp {value!r} is out of range", code="invalid_timestamp", param="as_of")
    try:
        return parse_timestamp(value)
    except ValueError as e:
        raise RequestError(f"as_of: {e}", code="invalid_timestamp", param="as_of") from e


def loc_to_param(loc: Sequence[Any]) -> str | None:
    """A pydantic error location as a field path: ('body', 'events', 3, 'timestamp') ->
    ``events[3].timestamp``; the leading 'body'/'query'/'path'/'header' is dropped."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out or None


def describe_errors(errors: Iterable[Mapping[str, Any]], prefix: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """Pydantic errors as [{param, message, code}], with `prefix` put before each location."""
    out = []
    for err in errors:
        loc = [*prefix, *err.get("loc", ())]
        msg = str(err.get("msg", "invalid"))
        out.append({"param": loc_to_param(loc), "message": msg, "code": str(err.get("type", "invalid"))})
    return out


class Pseudonyms:
    """Caller ids <-> stored ids. Without a key, ids are stored as given.

    With a key, a caller id maps to ``p_`` + HMAC-SHA256(key, id)[:32]; an id that already has
    that form (a stored id the service returned, e.g. an audience member) is kept as is.
    """

    def __init__(self, key: bytes | None):
        self.key = key

    @property
    def active(self) -> bool:
        return self.key is not None

    def stored(self, user_id: str) -> str:
        if self.key is None or _PSEUDONYM.match(user_id):
            return user_id
        return pseudonymise(user_id, self.key)


def validate_event(raw: Any, index: int, *, pseudonyms: Pseudonyms, mask: bool,
                   max_text_chars: int | None = None) -> tuple[BehaviorEvent | None, list[EventError]]:
    """One raw event -> the event to store, or its errors (at ``events[index]...``)."""
    text = raw.get("review_text") if isinstance(raw, dict) else None
    if isinstance(text, str) and max_text_chars is not None and len(text) > max_text_chars:
        return None, [EventError(index=index, param=f"events[{index}].review_text", code="text_too_long",
                                 message=f"{len(text)} characters exceed {max_text_chars}")]
    try:
        ev = as_stored(BehaviorEvent.model_validate(guard_timestamp(raw)), pseudonyms=pseudonyms, mask=mask)
    except ValidationError as e:
        return None, [EventError(index=index, **d) for d in describe_errors(e.errors(), ("events", index))]
    return ev, []


def as_stored(ev: BehaviorEvent, *, pseudonyms: Pseudonyms, mask: bool) -> BehaviorEvent:
    """The event as the store keeps it: user id pseudonymised, review text masked (with `mask`),
    and its `event_id` the client's, else the content hash recomputed over what is stored (so it
    never encodes a raw id). An event the store would key the same is the same event.

    Raises:
        ValidationError: the changed event is invalid (not expected: the changes keep the types).
    """
    changes: dict[str, Any] = {}
    if pseudonyms.active and (uid := pseudonyms.stored(ev.user_id)) != ev.user_id:
        changes["user_id"] = uid
    if mask and ev.review_text and (masked := mask_pii(ev.review_text)) != ev.review_text:
        changes["review_text"] = masked
    if not changes:
        return ev
    client_id = "" if ev.event_id == ev.content_hash() else ev.event_id
    return BehaviorEvent.model_validate(ev.model_dump() | changes | {"event_id": client_id})


def unique_events(events: Iterable[BehaviorEvent]) -> tuple[list[BehaviorEvent], int]:
    """The events with each `event_id` once, the first kept, as the store keeps them
    (``INSERT OR IGNORE`` on (dataset, event_id)); and how many were dropped. Give events
    through `as_stored` first, so ids are the ones the store would have."""
    seen: set[str] = set()
    out: list[BehaviorEvent] = []
    dropped = 0
    for e in events:
        if e.event_id in seen:
            dropped += 1
        else:
            seen.add(e.event_id)
            out.append(e)
    return out, dropped


def validate_events(raws: Sequence[Any], *, pseudonyms: Pseudonyms, mask: bool,
                    max_text_chars: int | None = None) -> tuple[list[BehaviorEvent], list[EventError]]:
    """Every raw event validated on its own: (good events in order, errors in order)."""
    good: list[BehaviorEvent] = []
    errors: list[EventError] = []
    for i, raw in enumerate(raws):
        ev, errs = validate_event(raw, i, pseudonyms=pseudonyms, mask=mask, max_text_chars=max_text_chars)
        if ev is not None:
            good.append(ev)
        errors.extend(errs)
    return good, errors


MAX_CANDIDATES = 200  # a request's own candidate set; LLMRank and LlamaRec rank 20


def check_candidates(candidates: Sequence[str], catalog: Mapping[str, Any]) -> None:
    """A request's own candidate set must be non-empty, at most `MAX_CANDIDATES` ids, and every
    id a catalogue item.

    Raises:
        RequestError: naming the field (``candidates`` or ``candidates[i]``) and the fix.
    """
    if not candidates:
        raise RequestError("candidates is empty: give at least one catalogue item id, or leave "
                           "it out to retrieve candidates", param="candidates")
    if len(candidates) > MAX_CANDIDATES:
        raise RequestError(f"candidates has {len(candidates)} ids; at most {MAX_CANDIDATES}",
                           param="candidates")
    for i, item in enumerate(candidates):
        if item not in catalog:
            raise RequestError(f"candidate {item!r} is not in the dataset's catalogue; give "
                               "catalogue item ids only", param=f"candidates[{i}]")
