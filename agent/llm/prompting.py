"""Versioned prompt templates (package data in `prompts/`), rendered strictly.

Each task prompt is ``prompts/<name>.v<N>.yaml``, validated by `PromptTemplate` (unknown keys
are an error). Templates are Jinja2 with `StrictUndefined`: a missing variable raises instead of
rendering an empty string. Once an eval report cites ``next_item_rank.v1``, change it by adding
``v2``.
"""

from __future__ import annotations

import hashlib
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
