"""Precompute on Ray: the batch of `agent.app.precompute.precompute` fanned out over ``ray.data``
actors and several OpenAI-compatible model replicas (vLLM servers).

    with ray_session("local"):        # or "auto", "ray://head:10001", "head:6379"
        report = precompute_on_ray(service, "online-retail", users, 5,
                                   base_urls=["http://gpu1:8000/v1", "http://gpu2:8000/v1"])

How the work is split: one ``map_batches`` actor pool per replica, the users dealt to the
replicas round-robin (user i goes to replica i mod n), and the pools unioned into one dataset
that the driver iterates. Each actor (`AnswerActor`) builds a `Runtime` once, over the same
workspace, with ``llm_base_url`` set to its replica: the same composition root and model client
as every other surface (`Runtime.connect_model`), no second client path. Why pools per replica
rather than one pool whose actors route each row to a replica: an actor then talks to exactly one
replica, so a replica never gets two actors' calls while another idles (on llama.cpp replicas that
serve one request at a time, a collision halves throughput); and the calls per replica are
balanced by construction (within one user of each other). The cost: the split is static, so a
slower replica finishes its share later instead of taking fewer users.

Memory: every actor loads the dataset's FAISS indexes and catalogue, so the actor count is
bounded: `actors_per_replica` (default 1) times the replicas. Within an actor, `concurrency`
users are in flight at once (one ``map_batches`` batch), under the actor's model guard.

Who stores: the driver. Actors return each answer with the events hash it was made from and its
pipeline version (`agent.app.precompute.ComputedAnswer`), and the driver commits it to its
`AnswerStore` as it arrives (progress bar, resume after a kill, the same `PrecomputeReport`). So
the answer store needs no shared disk and has one writer; the actors only read.

What a cluster needs: ShopLens installed at the same version on every node (with the ``batch``
extra; Ray itself at the pinned version), and the workspace (the event store
``shoplens.sqlite3`` and ``indexes/``) at the same path on every node: a copy on each node's
local disk made after the last ingest (SQLite's WAL mode needs every reader on one host, so not
over NFS). An actor whose copy lags makes answers whose events hash no longer matches the
driver's store: they are served as stale and the next run redoes them. The settings travel
pickled with the actors (the pseudonymisation key included: actors map caller ids to stored
ids). Prefer ``ray job submit -- shoplens precompute
--ray-address auto ...`` on the head node to a ``ray://`` client from outside the cluster.

Ray is the optional ``batch`` extra, imported only here and only when called (`import_ray`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from tqdm import tqdm

from agent.app.precompute import (
    ComputedAnswer,
    PrecomputeReport,
    compute_answer,
    count_done,
    count_failed,
    is_fresh,
    start_report,
    store_answer,
)
from agent.app.runtime import Runtime
from agent.app.service import ShopLensService
from agent.domain.errors import CallerError, RequestError
from agent.domain.predictions import NextItemPrediction
from agent.settings import Settings

log = logging.getLogger(__name__)

# A local Ray ("local"): its CPU count is a scheduling budget for the actors, which mostly wait on
# the model over HTTP; 2 is this project's reference box. The object store only carries user ids
# and answers (a few KB each): 256 MiB instead of Ray's default 30% of memory.
LOCAL_NUM_CPUS = 2
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20
# CPUs each actor reserves (retrieval and prompt rendering between model calls); lowered when the
# cluster has fewer CPUs than the actors would reserve, so every actor can start.
ACTOR_NUM_CPUS = 0.5
NO_MODEL = "(no model)"  # the replica name in a report when answers are made without the model
_ADDRESS = re.compile(r"(local|auto|ray://[^\s/:]+:\d+|[^\s/:]+:\d+)")
_COLUMNS = ("user_id", "replica", "error", "stored_id", "prediction", "events_sha256", "version")


def import_ray() -> ModuleType:
    """Ray, imported now (the default local path never pays for it).

    Raises:
        RequestError: Ray is not installed (code ``ray_missing``; the message names the extra).
    """
    try:
        import ray
        import ray.data  # noqa: F401 - ray.data is what runs the batch
    except ImportError as e:
        raise RequestError("running on Ray (--ray-address) needs Ray, ShopLens's optional 'batch' extra: "
                           "pip install -e '.[batch]' (make setup installs it)", param="ray_address",
                           code="ray_missing") from e
    return ray


def check_ray_address(address: str) -> str:
    """`address` if it is one Ray can be given: ``local`` (start a Ray on this machine), ``auto``
    (the cluster this node belongs to), ``ray://HOST:PORT`` (a Ray client) or ``HOST:PORT`` (a
    cluster's GCS).

    Raises:
        RequestError: anything else (param ``ray_address``).
    """
    if not _ADDRESS.fullmatch(address):
        raise RequestError(f"--ray-address must be 'local', 'auto', 'ray://HOST:10001' or HOST:PORT of a "
                           f"running cluster; got {address!r}", param="ray_address")
    return address


def replica_urls(base_urls: Sequence[str], settings: Settings, *, use_model: bool) -> list[str | None]:
    """The model replicas to fan out over: `base_urls`, else the configured ``llm_base_url``; None
    (one replica, no model) when answers are made without the model and no URL is given.

    Raises:
        RequestError: with the model, no URL at all (actors call model servers; they do not start
            the embedded one each), a URL that is not http(s)://..., or a URL given twice
            (param ``base_url``).
    """
    urls = list(base_urls) or ([settings.llm_base_url] if settings.llm_base_url else [])
    if not urls:
        if use_model:
            raise RequestError("precompute on Ray with the model needs the model servers' base URLs: "
                               "--base-url URL once per replica (or SHOPLENS_LLM_BASE_URL), e.g. "
                               "--base-url http://127.0.0.1:8001/v1; or --no-llm", param="base_url")
        return [None]
    for url in urls:
        if not re.match(r"https?://[^\s/]+", url):
            raise RequestError(f"--base-url must be an http(s):// URL such as http://127.0.0.1:8001/v1; "
                               f"got {url!r}", param="base_url")
    dupes = sorted({u for u in urls if urls.count(u) > 1})
    if dupes:
        raise RequestError(f"--base-url {dupes[0]} was given twice: name each replica once", param="base_url")
    return list(urls)


@contextlib.contextmanager
def ray_session(address: str) -> Iterator[None]:
    """Connect this process to Ray for the block, then disconnect (a local Ray is stopped).

    ``local`` starts a single-node Ray on 127.0.0.1 with `LOCAL_NUM_CPUS` CPUs, no dashboard, a
    small object store and usage stats off; other addresses connect to a running cluster. When
    Ray is already initialised in this process, the block uses it as it is and leaves it running
    (its owner stops it).

    Raises:
        RequestError: Ray is missing (`import_ray`) or `address` is malformed (`check_ray_address`).
        ConnectionError: no Ray cluster answers at `address`.
    """
    ray = import_ray()
    check_ray_address(address)
    if ray.is_initialized():
        yield
        return
    if address == "local":
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a local run reports nothing anywhere
        ray.init(num_cpus=LOCAL_NUM_CPUS, include_dashboard=False, _node_ip_address="127.0.0.1",
                 object_store_memory=LOCAL_OBJECT_STORE_BYTES, logging_level=logging.WARNING)
    else:
        ray.init(address=address, logging_level=logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # no per-run "Starting execution" lines
    try:
        yield
    finally:
        ray.shutdown()


class AnswerActor:
    """A ``ray.data`` callable class: one `Runtime` over the shared workspace, pointed at one
    model replica, built once per actor (the dataset's indexes loaded at start); each call
    computes a batch of users' answers, `concurrency` at a time, in the model's ``batch`` lane.

    A user whose answer fails comes back as a row with `error` set; the batch goes on.

    Args:
        settings: the driver's settings with ``llm_base_url`` set to this actor's replica.
        dataset, k, use_model: what to compute (as `precompute`).
        concurrency: users of one batch in flight at once.
    """

    def __init__(self, settings: Settings, dataset: str, k: int, use_model: bool, concurrency: int) -> None:
        self.dataset, self.k, self.use_model = dataset, k, use_model
        self.concurrency = max(1, concurrency)
        self.replica = settings.llm_base_url or NO_MODEL
        self.loop = asyncio.new_event_loop()  # the model client is bound to it: one loop per actor
        self.service = ShopLensService(Runtime(settings), use_model=use_model)
        self.loop.run_until_complete(self.service.ensure_indexes(dataset))

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        """Answers for ``batch["user_id"]`` (caller ids), as columns `_COLUMNS`: one row per user,
        `error` empty and `prediction` the `NextItemPrediction` JSON, or `error` set."""
        users = [str(u) for u in batch["user_id"]]
        rows = self.loop.run_until_complete(self._answers(users))
        return {c: [r[c] for r in rows] for c in _COLUMNS}

    async def _answers(self, users: list[str]) -> list[dict[str, str]]:
        slots = asyncio.Semaphore(self.concurrency)

        async def one(user_id: str) -> dict[str, str]:
            row = dict.fromkeys(_COLUMNS, "") | {"user_id": user_id, "replica": self.replica}
            async with slots:
                try:
                    a = await compute_answer(self.service, self.dataset, user_id, self.k, use_model=self.use_model)
                except Exception as e:  # noqa: BLE001 - one user's failure is reported, the batch goes on
                    if not isinstance(e, CallerError):
                        log.error("precompute on Ray: user %r failed", user_id, exc_info=e)
                    return row | {"error": f"{type(e).__name__}: {e}"}
            return row | {"stored_id": a.stored_id, "prediction": a.prediction.model_dump_json(),
                          "events_sha256": a.events_sha256, "version": a.version}

        return list(await asyncio.gather(*(one(u) for u in users)))


def precompute_on_ray(service: ShopLensService, dataset: str, users: Sequence[str], k: int = 5, *,
                      base_urls: Sequence[str] = (), use_model: bool = True, resume: bool = True,
                      progress: bool = True, concurrency: int = 1, actors_per_replica: int = 1,
                      failures: Path | None = None) -> PrecomputeReport:
    """`agent.app.precompute.precompute` on Ray: compute and store next-item answers for `users`
    (caller or stored ids) over the model replicas (see the module docstring for the split).
    Blocking: call it inside `ray_session`, outside a running event loop (or from a thread).

    The driver (this process) loads the dataset's indexes once before any actor starts (so
    missing ones are built once, not by every actor at the same time, and freshness is judged
    with the fusion weights the actors load), skips users whose stored answer is fresh
    (`is_fresh`, as the local path), and stores each answer the actors return.

    Args:
        service: the driver's facade; its settings are what the actors run with, each with
            ``llm_base_url`` replaced by its replica. With the model, its ``llm_base_url`` must be
            set (to any replica) so the pipeline version it checks freshness with names the
            served model, as the actors' does.
        base_urls: the replicas (OpenAI-compatible base URLs, e.g. ``http://host:8000/v1``);
            empty: the configured ``llm_base_url``.
        concurrency: users in flight at once per actor.
        actors_per_replica: actors (each with its own copy of the indexes) per replica.
        failures: a file to write every failed user to, one JSON object a line (as
            `agent.app.precompute.precompute`); None: none written.

    Returns:
        The run's report, with `replicas`: answers computed per base URL. A user that cannot be
        answered, or that a failed Ray task never returned, is counted in `failed` and listed in
        `errors`; the run goes on.

    Raises:
        RequestError: Ray is missing, no replica is given with the model, a base URL is
            malformed, or `service`'s settings name no model server (see `service`).
        UnknownDatasetError: the dataset was never ingested (nothing starts on Ray).
        RuntimeError: Ray is not initialised (use `ray_session`).
        KeyboardInterrupt: the run was stopped; every answer stored so far is kept.
    """
    ray = import_ray()
    if not ray.is_initialized():
        raise RuntimeError("Ray is not initialised: call precompute_on_ray inside `with ray_session(address):`")
    settings = service.runtime.settings
    replicas = replica_urls(base_urls, settings, use_model=use_model)
    if use_model and not settings.llm_base_url:
        raise RequestError("the driver's settings must name a model server (llm_base_url, e.g. the first "
                           "--base-url) so its pipeline version names the model the replicas serve",
                           param="base_url")
    _load_indexes(service, dataset)
    report = start_report(dataset, k, use_model, len(users), failures)
    t0 = time.perf_counter()
    bar = tqdm(total=len(users), unit="user", desc=f"precompute {dataset} on Ray", disable=not progress)
    try:
        todo: list[str] = []
        for user_id in users:
            if resume and is_fresh(service, dataset, user_id, k, use_model):
                report.skipped_fresh += 1
                bar.update(1)
            else:
                todo.append(user_id)
        if todo:
            _run(ray, service, dataset, todo, replicas, report, bar, concurrency=max(1, concurrency),
                 actors_per_replica=max(1, actors_per_replica))
    finally:
        bar.close()
        report.seconds = round(time.perf_counter() - t0, 3)
    return report


def _load_indexes(service: ShopLensService, dataset: str) -> None:
    """`AppState.ensure_indexes` without an event loop: the dataset's artifacts, loaded (or
    built) once in this process."""
    service.require_dataset(dataset)
    try:
        service.runtime.artifacts(dataset)
    except CallerError:
        raise
    except ValueError as e:
        raise RequestError(str(e), param="dataset", code="dataset_unusable") from e


def _run(ray: Any, service: ShopLensService, dataset: str, todo: list[str], replicas: list[str | None],
         report: PrecomputeReport, bar: tqdm, *, concurrency: int, actors_per_replica: int) -> None:
    """One actor pool per replica over its round-robin share of `todo`; store what comes back."""
    settings = service.runtime.settings
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    actor_cpus = min(ACTOR_NUM_CPUS, cpus / (len(replicas) * actors_per_replica))
    ray.data.DataContext.get_current().enable_progress_bars = False  # the driver's tqdm bar is the one
    pools = []
    for i, url in enumerate(replicas):
        share = todo[i::len(replicas)]
        if not share:
            continue
        args = dict(settings=settings.model_copy(update={"llm_base_url": url}), dataset=dataset,
                    k=report.k, use_model=report.use_model, concurrency=concurrency)
        pools.append(ray.data.from_items([{"user_id": u} for u in share]).map_batches(
            AnswerActor, fn_constructor_kwargs=args, batch_size=concurrency, num_cpus=actor_cpus,
            compute=ray.data.ActorPoolStrategy(size=actors_per_replica)))
    returned: set[str] = set()
    try:
        rows = pools[0].union(*pools[1:]) if len(pools) > 1 else pools[0]
        for row in rows.iter_rows():
            user_id = str(row["user_id"])
            returned.add(user_id)
            _store_row(service, dataset, row, report)
            bar.update(1)
            bar.set_postfix(done=report.done, fresh=report.skipped_fresh, failed=report.failed, refresh=False)
    except Exception as e:  # noqa: BLE001 - a task Ray gave up on: its users are reported, the rest kept
        log.error("precompute on Ray: the run failed after %d of %d users", len(returned), len(todo), exc_info=e)
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # Ray colours its remote tracebacks
        lines = [x.strip() for x in text.splitlines() if x.strip()]
        # the first line says what failed; with a remote traceback (an actor that died), the last
        # line is the exception that killed it
        said = lines[0] + (f" ... {lines[-1]}" if len(lines) > 1 else "") if lines else ""
        why = f"not computed: the Ray run failed: {type(e).__name__}" + (f": {said}" if said else "")
        for user_id in todo:
            if user_id not in returned:
                count_failed(report, user_id, why[:500])
                bar.update(1)


def _store_row(service: ShopLensService, dataset: str, row: dict[str, Any], report: PrecomputeReport) -> None:
    user_id = str(row["user_id"])
    if row["error"]:
        count_failed(report, user_id, str(row["error"]))
        return
    try:
        pred = NextItemPrediction.model_validate_json(row["prediction"])
        store_answer(service, dataset, ComputedAnswer(str(row["stored_id"]), pred, str(row["events_sha256"]),
                                                      str(row["version"])), use_model=report.use_model)
    except Exception as e:  # noqa: BLE001 - one user's failure is reported, the run goes on
        log.error("precompute on Ray: could not store user %r", user_id, exc_info=e)
        count_failed(report, user_id, f"{type(e).__name__}: {e}")
        return
    count_done(report, pred)
    report.replicas[str(row["replica"])] = report.replicas.get(str(row["replica"]), 0) + 1
