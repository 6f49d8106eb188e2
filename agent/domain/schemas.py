"""Input schemas: behaviour events and catalogue items.

These are the contract between loaders, the SQLite store, the API and the prediction
pipeline. Every loader produces `BehaviorEvent` and `CatalogItem`; nothing downstream reads
raw dataset rows.
"""

from __future__ import annotations

import hashlib
import math
import re
from datetime import UTC, datetime
from typing import Annotated, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from agent.domain.text import cut_at_word, strip_markup

EventType = Literal[
    "view", "click", "cart", "remove_from_cart", "favourite", "purchase", "review"
]
EVENT_TYPES: tuple[str, ...] = get_args(EventType)

# Aliases seen in real data (Taobao's pv/fav/buy, US spelling) mapped onto the closed set.
EVENT_ALIASES: dict[str, str] = {
    "pv": "view",
    "page_view": "view",
    "fav": "favourite",
    "favorite": "favourite",
    "wishlist": "favourite",
    "buy": "purchase",
    "order": "purchase",
    "add_to_cart": "cart",
    "addtocart": "cart",
    "remove": "remove_from_cart",
    "rate": "review",
    "rating": "review",
}

# Earliest plausible e-commerce timestamp; anything before is a unit or parsing error.
MIN_PLAUSIBLE_TS = datetime(1995, 1, 1, tzinfo=UTC)
# Milliseconds since the epoch pass this bound (year ~2286 in seconds); seconds never do.
_MS_THRESHOLD = 1e11

def no_nul(v: str) -> str:
    """`v` unchanged, or a ValueError when it holds a NUL character: PostgreSQL refuses them in
    text and no id or review needs one, so it is a clear 422 naming the field, not a store error."""
    if "\x00" in v:
        raise ValueError("contains a NUL character (\\u0000): remove it")
    return v


NoNul = AfterValidator(no_nul)
# Ids are stored without surrounding spaces (BehaviorEvent strips them), so a request that names
# one with spaces around it must find the same id.
Stripped = BeforeValidator(lambda v: v.strip() if isinstance(v, str) else v)
NonEmptyStr = Annotated[str, Field(min_length=1, max_length=256), NoNul]


def parse_timestamp(value: object) -> datetime:
    """Parse a timestamp into an aware UTC datetime.

    Accepts unix seconds or milliseconds (int/float/numeric string; milliseconds are detected by
    magnitude, > 1e11), ISO-8601 strings (naive ones are taken as UTC), and datetimes.

    Raises:
        ValueError: unparseable, out of datetime's range (in UTC; e.g. year 1 at +14:00),
            before 1995-01-01, or more than one day in the future; the message says which and
            how to fix it. Nothing else is raised (pydantic turns a ValueError into a field
            error; any other exception would escape validation as a server error).
    """
    if isinstance(value, datetime):
        ts = value if value.tzinfo else value.replace(tzinfo=UTC)
    elif isinstance(value, bool) or value is None:
        raise ValueError(f"timestamp must be unix seconds, milliseconds or ISO-8601, got {value!r}")
    else:
        num: float | None = None
        if isinstance(value, int | float):
            num = float(value)
        elif isinstance(value, str):
            try:
                num = float(value.strip())
            except ValueError:
                num = None
        if num is not None:
            if not math.isfinite(num):
                raise ValueError(f"timestamp {value!r} is not a finite number")
            if abs(num) > _MS_THRESHOLD:
                num /= 1000.0
            try:
                ts = datetime.fromtimestamp(num, tz=UTC)
            except (OverflowError, OSError, ValueError) as e:
                raise ValueError(f"timestamp {value!r} is out of range for unix seconds/ms") from e
        else:
            try:
                ts = datetime.fromisoformat(str(value).strip().replace("Z", "+00:00"))
            except ValueError as e:
                raise ValueError(
                    f"timestamp {value!r} is neither a unix time nor ISO-8601 "
                    "(e.g. 2011-12-09T12:50:00Z)"
                ) from e
            if ts.tzinfo is None:
                ts = ts.replace(tzinfo=UTC)
    try:
        ts = ts.astimezone(UTC)
    except OverflowError as e:  # year 1 at +14:00 or 9999-12-31 at -14:00: no UTC datetime holds it
        raise ValueError(
            f"timestamp {_shown(value)} is out of range: in UTC it falls outside years 1-9999; "
            "give a time between 1995 and now as unix seconds/ms or ISO-8601 (e.g. 2011-12-09T12:50:00Z)"
        ) from e
    if ts < MIN_PLAUSIBLE_TS:
        raise ValueError(f"timestamp {ts.isoformat()} is before 1995: check the unit or format")
    now = datetime.now(UTC)
    if (ts - now).total_seconds() > 86_400:
        raise ValueError(f"timestamp {ts.isoformat()} is in the future (now {now:%Y-%m-%d})")
    return ts


def _shown(value: object) -> str:
    """A timestamp as the caller wrote it: a string as is, a datetime in ISO-8601, else repr."""
    if isinstance(value, datetime):
        return value.isoformat()
    return value if isinstance(value, str) else repr(value)


class BehaviorEvent(BaseModel):
    """One thing a user did to an item, at one instant (UTC).

    `event_id` is a stable content hash when the source gives none, so re-ingesting the same
    data is idempotent and exact duplicates collapse.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: Annotated[str, NoNul] = Field(default="", max_length=128, description="client id or content hash")
    user_id: NonEmptyStr
    item_id: NonEmptyStr
    event_type: EventType
    timestamp: datetime = Field(description="UTC; unix s/ms or ISO-8601 accepted")
    quantity: int | None = Field(default=None, ge=-100_000, le=100_000)
    unit_price: float | None = Field(default=None, ge=0, le=1_000_000, description="currency units")
    rating: float | None = Field(default=None, ge=1, le=5, description="stars 1-5")
    review_text: Annotated[str, NoNul] | None = Field(default=None, max_length=20_000)
    session_id: Annotated[str, NoNul] | None = Field(default=None, max_length=128)
    basket_id: Annotated[str, NoNul] | None = Field(
        default=None, max_length=128, description="order/invoice id grouping purchases"
    )

    @field_validator("user_id", "item_id", mode="before")
    @classmethod
    def _ids_to_str(cls, v: object) -> object:
        if isinstance(v, int | float) and not isinstance(v, bool):
            v = str(int(v)) if float(v).is_integer() else str(v)
        return v.strip() if isinstance(v, str) else v

    @field_validator("quantity", "unit_price", "rating", mode="before")
    @classmethod
    def _not_a_boolean(cls, v: object) -> object:
        # lax mode would read JSON true as 1 (a quantity of one, a 1-star rating)
        if isinstance(v, bool):
            raise ValueError("a boolean is not a number")
        return v

    @field_validator("event_type", mode="before")
    @classmethod
    def _normalise_type(cls, v: object) -> object:
        if isinstance(v, str):
            key = v.strip().lower()
            key = EVENT_ALIASES.get(key, key)
            if key not in EVENT_TYPES:
                raise ValueError(
                    f"unknown event_type {v!r}; use one of {', '.join(EVENT_TYPES)}"
                )
            return key
        return v

    @field_validator("timestamp", mode="before")
    @classmethod
    def _parse_ts(cls, v: object) -> datetime:
        return parse_timestamp(v)

    @field_validator("review_text", mode="before")
    @classmethod
    def _plain_review(cls, v: object) -> object:
        # HTML from a scraped export would reach prompts as markup; nothing left is no review
        if isinstance(v, str):
            v = strip_markup(v)
            return v if v.strip() else None
        return v

    @model_validator(mode="after")
    def _fill_id(self) -> BehaviorEvent:
        if not self.event_id:
            object.__setattr__(self, "event_id", self.content_hash())
        return self

    def content_hash(self) -> str:
        """sha1 over every field but `event_id` (hex, 40 chars): equal events hash equal."""
        payload = self.model_dump(exclude={"event_id"}, mode="json")
        raw = "\x1f".join(f"{k}={payload[k]}" for k in sorted(payload))
        return hashlib.sha1(raw.encode("utf-8")).hexdigest()


# Line breaks and other control characters (C0, DEL, NEL, the Unicode line/paragraph separators)
_BREAKS = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]+")


def one_line(text: str) -> str:
    """`text` with every run of line breaks and control characters replaced by one space.

    Catalogue text is rendered into prompts one item per line: a title holding a line break
    could otherwise forge prompt lines ("B. <another product>", "Ignore previous
    instructions..."). Text without such characters is returned unchanged (so catalogue hashes,
    and the indexes keyed by them, stay the same)."""
    return _BREAKS.sub(" ", text).strip() if _BREAKS.search(text) else text


MAX_TITLE_CHARS = 300  # longer titles are cut at a word ("…"); the loader summary counts them


class CatalogItem(BaseModel):
    """A product in a catalogue. Only `item_id` and `title` are required."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    item_id: NonEmptyStr
    title: str = Field(min_length=1, max_length=MAX_TITLE_CHARS)
    category: str | None = Field(default=None, max_length=500)
    brand: str | None = Field(default=None, max_length=200)
    price: float | None = Field(default=None, ge=0, le=1_000_000)
    description: str | None = Field(default=None, max_length=20_000)

    @field_validator("item_id", mode="before")
    @classmethod
    def _id_to_str(cls, v: object) -> object:
        if isinstance(v, int) and not isinstance(v, bool):
            return str(v)
        return v.strip() if isinstance(v, str) else v

    @field_validator("category", "brand", mode="before")
    @classmethod
    def _one_line(cls, v: object) -> object:
        return one_line(strip_markup(v)) if isinstance(v, str) else v

    @field_validator("title", mode="before")
    @classmethod
    def _real_title(cls, v: object) -> object:
        # markup out, on one line, not blank, long ones cut at a word
        if isinstance(v, str):
            v = one_line(strip_markup(v))
            if not v.strip():
                raise ValueError("title is empty or only whitespace/markup: give the item a title, or leave the "
                                 "catalogue row out")
            return cut_at_word(v, MAX_TITLE_CHARS)
        return v

    @field_validator("description", mode="before")
    @classmethod
    def _plain_description(cls, v: object) -> object:
        return strip_markup(v) if isinstance(v, str) else v

    def text(self) -> str:
        """The text embedded for retrieval: title, category and brand (description excluded:
        long, noisy and absent for most datasets)."""
        parts = [self.title]
        if self.category:
            parts.append(f"category: {self.category}")
        if self.brand:
            parts.append(f"brand: {self.brand}")
        return " | ".join(parts)
