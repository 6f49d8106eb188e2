"""Versioned prompt templates (package data in `prompts/`), rendered strictly.

Each task prompt is ``prompts/<name>.v<N>.yaml``, validated by `PromptTemplate` (unknown keys
are an error). Templates are Jinja2 with `StrictUndefined`: a missing variable raises instead of
rendering an empty string. Once an eval report cites ``next_item_rank.v1``, change it by adding
``v2``.
"""

from __future__ import annotations

import hashlib
import math
import re
from functools import lru_cache
from importlib import resources
from typing import Any

import jinja2
import yaml
from pydantic import BaseModel, ConfigDict, Field

from agent.llm.base import Message

_REF = re.compile(r"^(?P<name>[a-z_]+)\.v(?P<version>\d+)$")


class PromptTemplate(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z_]+$")
    version: int = Field(ge=1)
    description: str
    system: str
    user: str

    @property
    def ref(self) -> str:
        """The citable id, e.g. ``next_item_rank.v1``."""
        return f"{self.name}.v{self.version}"

    @property
    def sha256(self) -> str:
        return hashlib.sha256((self.system + "\x1e" + self.user).encode()).hexdigest()[:16]


class _PackageLoader(jinja2.BaseLoader):
    def get_source(self, environment: jinja2.Environment, template: str) -> tuple[str, str, Any]:
        try:
            src = resources.files("prompts").joinpath(template).read_text(encoding="utf-8")
        except FileNotFoundError as e:
            raise jinja2.TemplateNotFound(template) from e
        return src, template, lambda: True


@lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=_PackageLoader(),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # prompts are plain text, not HTML
        keep_trailing_newline=False,
        trim_blocks=False,
    )


@lru_cache(maxsize=64)
def load_prompt(ref: str) -> PromptTemplate:
    """Load ``name.vN`` from the `prompts` package.

    Raises:
        ValueError: malformed reference.
        FileNotFoundError: no such template (lists the available ones).
    """
    m = _REF.match(ref)
    if not m:
        raise ValueError(f"prompt reference {ref!r} must look like 'next_item_rank.v1'")
    fname = f"{ref}.yaml"
    root = resources.files("prompts")
    if not root.joinpath(fname).is_file():
        raise FileNotFoundError(f"no prompt {ref!r}; available: {', '.join(available_prompts())}")
    data = yaml.safe_load(root.joinpath(fname).read_text(encoding="utf-8"))
    tpl = PromptTemplate.model_validate(data)
    if tpl.ref != ref:
        raise ValueError(f"{fname} declares {tpl.ref}; file name and content must agree")
    return tpl


def available_prompts() -> list[str]:
    return sorted(
        p.name.removesuffix(".yaml")
        for p in resources.files("prompts").iterdir()
        if p.name.endswith(".yaml")
    )


def render(tpl: PromptTemplate, **variables: Any) -> list[Message]:
    """Render system and user messages.

    Raises:
        jinja2.UndefinedError: a variable the template uses was not given.
    """
    env = _env()
    system = env.from_string(tpl.system).render(**variables).strip()
    user = env.from_string(tpl.user).render(**variables).strip()
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


# ---- prompt-token budget ------------------------------------------------------------------------

# Tokens per character by class, fitted as an upper bound on the packaged Qwen2.5 tokenizer
# (tests/test_prompt_budget.py re-checks it on the real GGUF vocabulary): 300 blocks of 10
# Online Retail titles (upper case), Amazon Games titles (mixed case) and Chinese reviews each;
# the estimate / real count ratio was 1.02-1.39 (mean 1.10-1.20) on every block.
_PER_CHAR = {"upper": 0.45, "lower": 0.22, "digit": 1.0, "other_ascii": 0.45, "non_ascii": 0.72}
_PER_MESSAGE = 8  # the chat template's role markers and newlines, per message (+3 for the reply's)


def estimate_tokens(text: str) -> int:
    """An upper-bound estimate of `text`'s token count for Qwen2.5-family tokenizers, without the
    tokenizer (pure, microseconds): upper-case letters 0.45, lower-case 0.22, digits 1.0 (one
    token each), other ASCII 0.45 and non-ASCII characters (CJK, accents) 0.72 tokens each."""
    up = lo = dg = other = na = 0
    for c in text:
        if not c.isascii():
            na += 1
        elif c.isupper():
            up += 1
        elif c.islower():
            lo += 1
        elif c.isdigit():
            dg += 1
        else:
            other += 1
    p = _PER_CHAR
    return math.ceil(up * p["upper"] + lo * p["lower"] + dg * p["digit"] + other * p["other_ascii"]
                     + na * p["non_ascii"])


def estimate_prompt_tokens(messages: list[Message]) -> int:
    """`estimate_tokens` over a rendered chat prompt, with the chat template's per-message markers:
    an upper bound on the ``usage.prompt_tokens`` the server will report (see `estimate_tokens`)."""
    return sum(estimate_tokens(str(m["content"])) + _PER_MESSAGE for m in messages) + 3
