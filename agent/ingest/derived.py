"""A catalogue derived from the events themselves: the item attributes an events file carries per
row (title, brand, category, price, description) folded into one `CatalogItem` per item, with a
readable title from brand + category when the file has no titles.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter, defaultdict

_PATH_SEPARATORS = (">", "/", "|")
_DOTTED = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)+$")  # electronics.smartphone


def category_leaf(category: str) -> str:
    """The most specific part of a category path, readable: ``electronics.smartphone`` ->
    ``smartphone``, ``Home > Kitchen > Mugs`` -> ``Mugs``, a bare id ``2520377`` -> ``category
    2520377``; underscores become spaces."""
    text = category.strip()
    for sep in _PATH_SEPARATORS:
        if sep in text:
            parts = [p for p in (x.strip() for x in text.split(sep)) if p]
            text = parts[-1] if parts else text
            break
    else:
        if _DOTTED.match(text):
            text = text.split(".")[-1]
    text = text.replace("_", " ").strip()
    return f"category {text}" if text.isdigit() else text


def derived_title(item_id: str, brand: str | None, category: str | None) -> str | None:
    """A readable title for an item the data gives no title: ``samsung smartphone (item
    1004856)``; brand alone ``samsung (item 1004856)``; category alone ``smartphone (item
    1004856)``. None when neither is known. The id keeps titles of same-brand, same-category items
    apart (the model and the embedder would otherwise see duplicates)."""
    parts = [p for p in ((brand or "").strip(), category_leaf(category) if category else "") if p]
    if not parts:
        return None
    return f"{' '.join(parts)} (item {item_id})"


class ItemAttributes:
    """Per-item attribute values seen on event rows; `fold` picks one value per field.

    Text fields take their most frequent value (ties: the first seen); price takes the median of
    the numeric values (a price that is not a number is counted in `bad_prices`).
    """

    def __init__(self) -> None:
        self.values: dict[str, dict[str, Counter[str]]] = defaultdict(lambda: defaultdict(Counter))
        self.prices: dict[str, list[float]] = defaultdict(list)
        self.bad_prices = 0

    def add(self, item_id: str, field: str, value: object) -> None:
        if field == "price":
            try:
                self.prices[item_id].append(float(str(value)))
            except ValueError:
                self.bad_prices += 1
            return
        text = str(value).strip()
        if text:
            self.values[item_id][field][text] += 1

    def __contains__(self, item_id: str) -> bool:
        return item_id in self.values or item_id in self.prices

    def fold(self, item_id: str) -> dict[str, object]:
        """One value per field for `item_id` (no title added here)."""
        out: dict[str, object] = {f: c.most_common(1)[0][0] for f, c in self.values.get(item_id, {}).items() if c}
        if self.prices.get(item_id):
            out["price"] = round(statistics.median(self.prices[item_id]), 4)
        return out

    def ambiguous(self) -> dict[str, int]:
        """{field: items seen with more than one value} (the report says which value was kept)."""
        n: Counter[str] = Counter()
        for fields in self.values.values():
            for f, c in fields.items():
                n[f] += len(c) > 1
        n["price"] = sum(len(set(p)) > 1 for p in self.prices.values())
        return {f: k for f, k in n.items() if k}
