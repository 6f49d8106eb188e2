"""The composition root: build every dependency once from `Settings`, close them at exit.

The CLI, the API, the chat and the eval harness all get their store, embedder, artifacts and
model from a `Runtime`; nothing is built at import time. The model it hands out is already
wrapped in the one guard (`agent.llm.wrappers.GuardedModel`, bounds from `Settings`), so every
surface's model calls are bounded, retried, capped and observed the same way. Surfaces add
their own observers (the API's Prometheus metrics) with `add_observer`.

Per-runtime state that every `ShopLensService` over this runtime shares (catalogue caches, index
states, fitted baselines, the write lock) is `Runtime.state` (`agent.app.state.AppState`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from functools import cached_property
from pathlib import Path

from agent.app.answers import AnswerStore, prompt_id
from agent.app.baselines import drop_fitted_baselines
from agent.app.feedback import FeedbackStore
from agent.app.model_holder import ModelHolder, ModelSource
from agent.app.state import AppState
from agent.data.artifacts import DatasetArtifacts, build_artifacts, catalog_hash, load_artifacts
from agent.data.store import EventStore
from agent.data.user_updates import flush as flush_updates
from agent.domain.text import has_cjk
from agent.ingest import IngestReport, LoadResult, check_dataset_name, ingest, load_dataset
from agent.ingest.generic import NoValidEventsError, load_generic
from agent.ingest.mapping import ColumnMap
from agent.ingest.report import LoadReport
from agent.llm.base import ChatModel, Usage
from agent.llm.openai_compat import OpenAICompatModel, detect_dialect
from agent.llm.servers.embedded import PROFILES, EmbeddedServer, assemble_model
from agent.llm.wrappers import GuardConfig, GuardedModel, Lane, ModelObserver, NullObserver
from agent.settings import Settings
from agent.tasks.fusion import load_fusion
from agent.tasks.llm_weight import load_llm_weight, served_llm_weight
from agent.tasks.next_item import NextItemConfig
from agent.tasks.opinion import penalties_from_events
from retrieval.embedder import Embedder, make_embedder
from retrieval.index import IndexMismatchError

log = logging.getLogger(__name__)

ENGLISH_EMBEDDER = "all-MiniLM-L6-v2"
MULTILINGUAL_EMBEDDER = "multilingual-e5-small"


def guard_config(settings: Settings) -> GuardConfig:
    """The guard's bounds from `Settings` (see its comments for the defaults)."""
    return GuardConfig(timeout_s=settings.model_call_timeout_s, retries=settings.model_retries,
                       max_concurrency=settings.model_max_concurrency, cooldown_s=settings.model_cooldown_s)


class Observers:
    """Fans each guarded call out to every registered observer. The first one is an in-memory
    counter (`counters`: calls by outcome, tokens) that every surface can read."""

    def __init__(self) -> None:
        self.counters = NullObserver()
        self._all: list[ModelObserver] = [self.counters]

    def add(self, observer: ModelObserver) -> None:
        self._all.append(observer)

    def call_started(self, lane: Lane) -> None:
        for o in self._all:
            o.call_started(lane)

    def call_finished(self, lane: Lane, outcome: str, seconds: float, usage: Usage | None) -> None:
        for o in self._all:
            o.call_finished(lane, outcome, seconds, usage)


class Runtime:
    """Lazily built, shared dependencies for one ShopLens process."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._artifacts: dict[str, DatasetArtifacts] = {}
        self._server: EmbeddedServer | None = None
        self._model: ChatModel | None = None
        self._guarded: GuardedModel | None = None
        self._embedders: dict[str, Embedder] = {}
        self._model_lock = asyncio.Lock()  # two first callers must not start two servers
        self.model_sha256: str | None = None
        self.observers = Observers()
        self.holder: ModelHolder | None = None

    @cached_property
    def store(self) -> EventStore:
        """The event store: PostgreSQL at `settings.database_url` when set (shared by replicas),
        else the workspace's SQLite file. Opening it applies pending schema migrations."""
        url = self.settings.database_url
        return EventStore(url=url.get_secret_value()) if url is not None else EventStore(self.settings.db_path)

    @cached_property
    def feedback(self) -> FeedbackStore:
        """What each recommendation showed and the feedback logged against it
        (``<workspace>/feedback.sqlite3``), opened on first use; `aclose` closes it."""
        return FeedbackStore(self.settings.workspace / "feedback.sqlite3")

    @cached_property
    def answers(self) -> AnswerStore:
        """Precomputed next-item answers and the refresh queue (``<workspace>/answers.sqlite3``,
        `agent.app.answers`), opened on first use; `aclose` closes it."""
        return AnswerStore(self.settings.workspace / "answers.sqlite3")

    @cached_property
    def state(self) -> AppState:
        """What every service over this runtime shares (caches, index states, baselines)."""
        return AppState(self)

    @cached_property
    def embedder(self) -> Embedder:
        """The default embedder (English catalogues); see `embedder_for` for per-dataset choice."""
        name = self.settings.embedder
        return self._embedder(ENGLISH_EMBEDDER if name == "auto" else name)

    def _embedder(self, name: str) -> Embedder:
        if name not in self._embedders:
            self._embedders[name] = make_embedder(name)
        return self._embedders[name]

    def embedder_name_for(self, dataset: str) -> str:
        """The name of the embedder for a dataset (builds nothing): the configured one, or with
        "auto" the multilingual model when >= 20% of a sample of its titles contain CJK characters."""
        if self.settings.embedder != "auto":
            return self.settings.embedder
        titles = [it.title for it in list(self.store.items(dataset).values())[:500]]
        cjk = sum(1 for t in titles if has_cjk(t))
        return MULTILINGUAL_EMBEDDER if titles and cjk / len(titles) >= 0.2 else ENGLISH_EMBEDDER

    def embedder_for(self, dataset: str) -> Embedder:
        """The embedder for a dataset (see `embedder_name_for`), built once and shared."""
        return self._embedder(self.embedder_name_for(dataset))

    # ---- data ---------------------------------------------------------------------------
    def ingest(self, dataset: str, *, rebuild_index: bool = True, show_progress: bool = True) -> LoadReport:
        """Load a built-in dataset from `settings.data_dir`, store it, and (re)build its indexes."""
        return self.store_loaded(dataset, load_dataset(dataset, self.settings.data_dir),
                                 rebuild_index=rebuild_index, show_progress=show_progress)

    def ingest_file(self, name: str, events: Path, *, mapping: ColumnMap, catalog: Path | None = None,
                    rebuild_index: bool = True, show_progress: bool = True) -> IngestReport:
        """Load a user's own export (`agent.ingest.generic.load_generic`) into the dataset `name`,
        store it (the mapping is saved in its ingest record) and (re)build its indexes.

        Raises:
            RequestError: a bad name (`check_dataset_name`), a mapping the file does not fit
                (`MissingFieldsError` names the field, the columns and the fix).
            NoValidEventsError: every row was dropped (carries the load report).
            FileNotFoundError, ValueError: a missing file, an unknown format.
        """
        result = load_generic(events, mapping, catalog_path=catalog, dataset=check_dataset_name(name))
        if not result.events:
            raise NoValidEventsError(events, result.report)
        return self.store_loaded(name, result, rebuild_index=rebuild_index, show_progress=show_progress)

    def store_loaded(self, dataset: str, result: LoadResult, *, rebuild_index: bool = True,
                     show_progress: bool = True) -> IngestReport:
        """Write a loader's result into the store (idempotent), (re)build the dataset's indexes and
        drop what was fitted on its old events when any event is new (cached task baselines; this
        process's caches always)."""
        report = ingest(self.store, dataset, result, progress=show_progress)
        if report.events_new:
            drop_fitted_baselines(self.workspace / "tasks", dataset)
        if rebuild_index:
            self._artifacts[dataset] = build_artifacts(
                self.store, dataset, self.embedder_for(dataset), self.settings.index_dir(dataset),
                show_progress=show_progress,
            )
        if "state" in self.__dict__:
            self.state.forget(dataset)
        return report

    def artifacts(self, dataset: str) -> DatasetArtifacts:
        """Artifacts for an ingested dataset; rebuilt when missing or stale.

        The dataset's fusion weights from `shoplens train` (``fusion.json``) are attached.

        Raises:
            ValueError: the dataset was never ingested.
            ArtifactMismatchError: ``fusion.json`` belongs to another dataset or was edited.
        """
        if dataset not in self._artifacts:
            folder = self.settings.index_dir(dataset)
            emb = self.embedder_for(dataset)
            try:
                self._artifacts[dataset] = load_artifacts(self.store, dataset, emb.name, emb.dim, folder)
            except FileNotFoundError:
                log.info("building indexes for %s (first use)", dataset)
                self._artifacts[dataset] = build_artifacts(self.store, dataset, emb, folder)
            except IndexMismatchError as e:
                log.warning("rebuilding indexes for %s: %s", dataset, e)
                self._artifacts[dataset] = build_artifacts(self.store, dataset, emb, folder)
            arts = self._artifacts[dataset]
            arts.review_penalties = penalties_from_events(
                self.store.iter_events(dataset, event_types=("review",))
            )
            fusion = load_fusion(folder, dataset, catalog_hash(arts.catalog), arts.user_items)
            if fusion is not None:
                arts.fusion_weights, arts.fusion_note = fusion.served()
            arts.llm_weight, arts.llm_weight_note = self.served_llm_weight(dataset)
        return self._artifacts[dataset]

    def model_identity(self) -> str:
        """What names the configured model without starting it: the packaged GGUF's sha256, or
        ``SHOPLENS_LLM_MODEL`` for a server."""
        s = self.settings
        return s.llm_model if s.llm_base_url else PROFILES[s.llm_profile].sha256

    def scorer_identity(self) -> tuple[str, str]:
        """(the configured next-item LLM scorer, its prompt as ``name@sha256``)."""
        scorer = self.settings.llm_scorer
        return scorer, prompt_id(NextItemConfig(llm_scorer=scorer).scorer_prompt)

    def served_llm_weight(self, dataset: str) -> tuple[float, str]:
        """(the model weight this process serves `dataset` with, the `meta.notes` line): the
        fitted ``llm_weight.json`` when it was fitted for this model, scorer and prompt and
        showed a significant gain, else 0 (`agent.tasks.llm_weight`).

        Raises:
            ArtifactMismatchError: ``llm_weight.json`` belongs to another dataset or was edited.
        """
        scorer, prompt = self.scorer_identity()
        fitted = load_llm_weight(self.settings.index_dir(dataset), dataset)
        return served_llm_weight(fitted, dataset, model=self.model_identity(), scorer=scorer, prompt=prompt)

    def loaded_artifacts(self, dataset: str) -> DatasetArtifacts | None:
        """The dataset's artifacts if this process has loaded them, else None (builds nothing)."""
        return self._artifacts.get(dataset)

    def loaded_datasets(self) -> list[str]:
        """The datasets whose artifacts this process holds, sorted (builds nothing)."""
        return sorted(self._artifacts)

    def ensure_ingested(self, dataset: str) -> LoadReport | None:
        """Ingest `dataset` unless the store already holds its catalogue.

        Returns:
            The load report when it was ingested now (the caller shows it), else None.

        Raises:
            ValueError, FileNotFoundError: see `ingest`.
        """
        if self.store.counts(dataset)["items"]:
            return None
        return self.ingest(dataset)

    # ---- model --------------------------------------------------------------------------
    def guard_config(self) -> GuardConfig:
        return guard_config(self.settings)

    def add_observer(self, observer: ModelObserver) -> None:
        """Tell `observer` about every guarded model call from now on (any surface's)."""
        self.observers.add(observer)

    def background_model(self, *, start: bool = True, retry_after_s: float = 5.0, probe_cache_s: float = 5.0,
                         probe_timeout_s: float = 30.0) -> ModelHolder:
        """Hold the model for a long-running surface (a server): loaded in the background, and
        every service over this runtime then gets "still loading" at once instead of waiting
        (see `agent.app.model_holder.ModelHolder` for the arguments)."""
        self.holder = ModelHolder(self, start=start, retry_after_s=retry_after_s, probe_cache_s=probe_cache_s,
                                  probe_timeout_s=probe_timeout_s)
        return self.holder

    def model_server_exit_code(self) -> int | None:
        """The embedded model server's exit code once it died on its own (reaped: no zombie is
        left), else None: running, never started, stopped by `aclose`, or a remote server."""
        return self._server.exit_code() if self._server is not None else None

    async def restart_model_server(self) -> None:
        """Start the embedded model server again, on the same port (the model client keeps its
        base URL), and wait until it answers. Call it from the event-loop thread: the server's
        parent-death signal belongs to the thread that forks it.

        Raises:
            RuntimeError: no embedded server was ever started in this runtime.
            ModelUnavailableError: it exited again or was not ready within
                `llm_startup_timeout_s` (it is stopped; call again to retry).
        """
        if self._server is None:
            raise RuntimeError("no embedded model server to restart")
        self._server.spawn()
        await asyncio.to_thread(self._server.wait_ready, self.settings.llm_startup_timeout_s)

    def model_down(self) -> str | None:
        """Why a model call would fail at once right now, or None (it would be tried): the
        background holder's model still loading, failed to start or disabled, or the guard
        cooling down after a failure. Starts and waits for nothing: the fast path asks it before
        starting a refinement that could only recompute the fast answer."""
        if self.holder is not None and (why := self.holder.unavailable()) is not None:
            return why
        return self._guarded.cooling_down() if self._guarded is not None else None

    def model_source(self) -> ModelSource:
        """Where services get the model: the background holder when a server started one, else
        `model` (which starts the model and waits for it)."""
        return self.holder.get if self.holder is not None else self.model

    async def model(self) -> ChatModel:
        """The configured model (a remote OpenAI-compatible server, or the embedded one, started
        on first use), wrapped in the shared guard: one per runtime, so every surface shares its
        concurrency cap and cool-down.

        Raises:
            ModelUnavailableError: the server cannot be started or reached.
            ModelIntegrityError: the packaged GGUF fails its sha256 check.
        """
        async with self._model_lock:
            if self._guarded is None:
                if self._model is None:
                    self._model = await self.connect_model()
                self._guarded = GuardedModel(self._model, self.guard_config(), self.observers)
            return self._guarded

    async def connect_model(self) -> ChatModel:
        """Start the embedded server (or connect to ``llm_base_url``) and return the raw,
        unguarded model; `model()` calls it once and guards the result. The seam a test overrides
        to put a fake behind the real guard.

        Raises:
            ModelUnavailableError: the server cannot be started or reached.
            ModelIntegrityError: the packaged GGUF fails its sha256 check.
        """
        s = self.settings
        if s.llm_base_url:
            dialect = s.llm_dialect
            if dialect == "auto":
                dialect = await detect_dialect(s.llm_base_url, s.llm_api_key)
            return OpenAICompatModel(s.llm_base_url, s.llm_model, dialect, api_key=s.llm_api_key,
                                     timeout_s=s.llm_timeout_s)
        profile = PROFILES[s.llm_profile]
        path = await asyncio.to_thread(assemble_model, profile, s.models_dir)
        self.model_sha256 = profile.sha256
        s.workspace.mkdir(parents=True, exist_ok=True)
        self._server = EmbeddedServer(path, model_alias=profile.name, n_threads=s.llm_threads,
                                      n_ctx=s.llm_ctx, log_path=s.workspace / "llm-server.log", nice=s.llm_nice)
        self._server.spawn()  # from the event-loop thread, which lives as long as the process
        await asyncio.to_thread(self._server.wait_ready, s.llm_startup_timeout_s)
        return OpenAICompatModel(self._server.base_url, profile.name, "llamacpp",
                                 timeout_s=s.llm_timeout_s, model_id=profile.name)

    def flush_artifacts(self) -> list[str]:
        """Save the user-side artifact files that deferred updates (``POST /v1/events``) left
        unsaved, for every loaded dataset (`agent.data.user_updates.flush`); a failure is logged
        (a restart catches up from the store). Returns the datasets written."""
        done = []
        for d in self.loaded_datasets():
            arts = self.loaded_artifacts(d)
            try:
                if arts is not None and flush_updates(arts, self.settings.index_dir(d)):
                    done.append(d)
            except OSError:
                log.exception("could not save the updated indexes of %s (a restart catches up from the store)", d)
        return done

    async def aclose(self) -> None:
        """Save deferred index updates, close the model client, stop the embedded server (even if
        the client was bound to an event loop that has since closed) and close the event, feedback
        and answer stores (reopened on next use)."""
        await asyncio.to_thread(self.flush_artifacts)
        model, self._model, self._guarded = self._model, None, None
        server, self._server = self._server, None
        feedback: FeedbackStore | None = self.__dict__.pop("feedback", None)
        answers: AnswerStore | None = self.__dict__.pop("answers", None)
        store: EventStore | None = self.__dict__.get("store")  # kept: usable again after close
        try:
            if model is not None:
                aclose = getattr(model, "aclose", None)  # fakes have nothing to close
                if aclose is not None:
                    with contextlib.suppress(RuntimeError):  # "Event loop is closed"
                        await aclose()
        finally:
            if server is not None:
                server.stop()
            if feedback is not None:
                feedback.close()
            if answers is not None:
                answers.close()
            if store is not None:  # its pooled connections (a PostgreSQL server's are limited)
                store.close()

    @property
    def workspace(self) -> Path:
        return self.settings.workspace
