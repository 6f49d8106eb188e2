"""Salvage a model reply that a lenient reader would accept as JSON, without inventing content.

Small models under a loose (or no) grammar answer with the right JSON wrapped in something
else: a Markdown code fence, a ``<think>...</think>`` block before it, single quotes, trailing
commas, prose around it, or a run of whitespace inside the object that stops at the token limit
before the closing brace. `salvage_json` recovers the JSON text of such a reply so that
`agent.llm.structured.structured_call` can validate it with the schema as usual, before it
spends a repair round (a whole second model call).

It never makes up content: it removes wrapping (think blocks, fences, prose, whitespace),
rewrites single-quoted strings and drops trailing commas exactly, closes brackets only when the
reply was cut at a boundary between values, and hands what strict parsing still refuses
(unquoted keys, Python literals, missing commas) to the kept `json-repair` library. A reply cut
inside a string, a number, a literal or after a key's colon is refused (closing it would invent
a shorter value or an empty one). Whatever it returns still goes through the schema: a salvaged
object missing a required field is rejected there, and the normal repair round follows.

Why not json-repair for everything: its own string reader changes some escapes (``\\f``, ``\\/``
and surrogate pairs such as ``\\ud83d\\ude00`` come back as written, not decoded; 0.64.6), and
it closes a reply cut mid-string or after a colon with a shortened or empty value. So it only
sees what the exact steps above cannot read.
"""

from __future__ import annotations

import json
import re

import json_repair

__all__ = ["salvage_json"]

_THINK_OPEN = re.compile(r"\s*<think>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"</think>", re.IGNORECASE)
_FENCE_OPEN = re.compile(r"```[A-Za-z0-9_+-]*")
_CLOSED_SCALAR = re.compile(r"(?:-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|true|false|null|True|False|None)\s+\Z")
_CLOSERS = {"{": "}", "[": "]"}


def salvage_json(text: str) -> str | None:
    """The JSON inside a model reply that strict parsing refused, or None when there is none.

    Removes leading ``<think>...</think>`` blocks (and everything up to a lone ``</think>``),
    starts after a Markdown code fence that opens before the JSON, and takes the first top-level
    JSON object or array (prose, the closing fence and anything after it dropped), with
    single-quoted strings rewritten and trailing commas dropped; a value cut off by the token
    limit is closed only at a boundary between values (see `_first_value`). What strict parsing
    still refuses goes to `json-repair` (unquoted keys, Python literals, missing commas).

    Args:
        text: the model's raw reply.

    Returns:
        Compact JSON text of one object or array, or None: no JSON value in the reply, a reply
        cut inside a value (closing it would invent content), an unclosed ``<think>`` block, or
        nothing json-repair could read.
    """
    body = _after_thinking(text)
    if body is None:
        return None
    fence = _FENCE_OPEN.search(body)
    first = _first_bracket(body)
    if fence is not None and first is not None and fence.start() < first:
        body = body[fence.end():]  # the closing fence comes after the value and is dropped with it
    candidate = _first_value(body)
    if candidate is None:
        return None
    try:
        obj = json.loads(candidate, strict=False)  # strict=False: raw control characters in strings
    except ValueError:
        try:  # unquoted keys, Python literals, missing commas: json-repair's heuristics
            obj = json_repair.loads(candidate)
        except Exception:  # json-repair's own failure on odd input: not salvageable, never fatal
            return None
    if not isinstance(obj, dict | list):  # json-repair answers '' for text with no JSON in it
        return None
    return json.dumps(obj)


def _after_thinking(text: str) -> str | None:
    """`text` after its leading ``<think>...</think>`` blocks (None: a block never closed), or
    after the first lone ``</think>`` when the reply does not start with JSON or a code fence
    (a chat template that opens the block in the prompt). A ``</think>`` inside JSON that
    follows prose without a fence is taken for the tag: that reply goes to the repair round."""
    body = text
    while (m := _THINK_OPEN.match(body)) is not None:
        end = _THINK_CLOSE.search(body, m.end())
        if end is None:
            return None  # still thinking at the token limit: there is no answer
        body = body[end.end():]
    end = _THINK_CLOSE.search(body)
    if (end is not None and body.lstrip()[:1] not in ("{", "[", "`")
            and _FENCE_OPEN.search(body, 0, end.start()) is None):  # not a tag inside fenced JSON
        body = body[end.end():]  # reasoning (braces and all) up to the tag the template opened
    return body


def _first_bracket(text: str) -> int | None:
    """Index of the first ``{`` or ``[`` in `text`, or None."""
    hits = [i for i in (text.find("{"), text.find("[")) if i >= 0]
    return min(hits) if hits else None


def _last_significant(out: list[str]) -> int:
    """Index in `out` of the last piece that is not whitespace (-1: none)."""
    j = len(out) - 1
    while j >= 0 and out[j].isspace():
        j -= 1
    return j


def _first_value(text: str) -> str | None:
    """The first top-level object or array in `text` as JSON text, or None.

    Strings in single quotes are rewritten in double quotes (only the opening quote closes a
    string), and commas before a closing bracket are dropped, both exactly, so that strict
    parsing reads most replies with no guessing. A reply cut before its value closed is closed
    only at a boundary between values: after ``,``, ``{``, ``[``, a closed value, or a whole
    number or literal followed by whitespace; a dangling object key is dropped. A cut inside a
    string, a number or a literal, or after a key's colon, gives None.
    """
    start = _first_bracket(text)
    if start is None:
        return None
    out: list[str] = []  # the value so far, one piece per character (or escape) read
    stack: list[str] = []  # the closing brackets still owed
    quote: str | None = None
    key_start, before_key = -1, ""  # where the last string began in `out`, what came before it
    i, n = start, len(text)
    while i < n:
        ch = text[i]
        if quote is not None:
            if ch == "\\" and i + 1 < n:  # an escape: kept as written (\' becomes a bare ')
                out.append("'" if quote == "'" and text[i + 1] == "'" else text[i:i + 2])
                i += 2
                continue
            if ch == quote:
                out.append('"')
                quote = None
            else:
                out.append('\\"' if ch == '"' else ch)
        elif ch in "\"'":
            j = _last_significant(out)
            key_start, before_key = len(out), out[j] if j >= 0 else ""
            quote = ch
            out.append('"')
        elif ch in _CLOSERS:
            stack.append(_CLOSERS[ch])
            out.append(ch)
        elif ch in "}]":
            if not stack or ch != stack[-1]:
                return None  # brackets that do not nest: not one JSON value
            j = _last_significant(out)
            if j >= 0 and out[j] == ",":
                del out[j]  # a trailing comma
            stack.pop()
            out.append(ch)
            if not stack:
                return "".join(out)
        else:
            out.append(ch)
        i += 1
    if quote is not None:
        return None  # cut inside a string: closing it would shorten the value
    cut = text[start:]
    if cut.rstrip()[-1:] not in {",", "{", "[", "}", "]", '"', "'"} and not _CLOSED_SCALAR.search(cut):
        return None  # cut inside a number or literal, or after a key's colon
    value = "".join(out).rstrip()
    if stack[-1] == "}" and value.endswith('"') and before_key in ("{", ","):
        value = "".join(out[:key_start]).rstrip()  # a key whose value never came
    return value.removesuffix(",") + "".join(reversed(stack))
