"""Which kind of protocol a next-item configuration is, its default ranker, and the checks that
refuse one that cannot run before anything is built or written (`eval.runner.arun_next_item`).

Built-in protocols run on the shared data files and keep their published numbers
(docs/results.md); every other dataset/protocol pair is a generic protocol over the store
(`eval.store_suite`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from eval.suites import _workspace, sasrec_dir

if TYPE_CHECKING:
    from eval.runner import RunConfig

# The built-in protocols on the shared data files: (protocol, dataset) -> how it is known.
BUILTIN: dict[tuple[str, str], str] = {
    ("llmrank", "amazon-games"): "LLMRank's candidate lists (Games-200, Games-6k)",
    ("full", "amazon-games"): "LlamaRec's full catalogue on the Games-200 users",
    ("full", "amazon-industrial"): "the full catalogue on MiniOneRec's test rows",
    ("leave-last-basket", "online-retail"): "each customer's last invoice, fused retrieval of 20",
}
BUILTIN_DATASETS = ("amazon-games", "amazon-industrial")  # file-based: need not be in the store
BUILTIN_PROTOCOLS = ("llmrank", "full")
LLMRANK_CANDIDATES = ("random", "bm25", "bert", "pop", "bpr", "gru4rec", "sasrec", "6k-random", "6k-pop")


def is_builtin(config: RunConfig) -> bool:
    """True for a built-in protocol (published numbers, shared data files); False for a generic
    protocol over the store. Online Retail's ``leave-last-basket`` is the built-in one with the
    default ``random`` candidates and the generic one with ``retrieved`` / ``full``."""
    key = (config.protocol, config.dataset)
    if key == ("leave-last-basket", "online-retail"):
        return config.candidates == "random"
    return key in BUILTIN


def default_ranker(dataset: str, protocol: str, candidates: str = "random") -> str:
    """``fused`` on the built-in protocols (as before), the served ``pipeline`` elsewhere."""
    key = (protocol, dataset)
    builtin = key in BUILTIN and not (key == ("leave-last-basket", "online-retail") and candidates != "random")
    return "fused" if builtin else "pipeline"


def check_config(config: RunConfig, stored: Sequence[str] | None = None) -> None:
    """Refuse a configuration that cannot run, before anything is built or written.

    Args:
        config: the run.
        stored: datasets with events in the run's store; None: read them from the store of
            ``config.workspace`` (the built-in file datasets need not be there).

    Raises:
        ValueError: naming the flag at fault, what exists and the fix: an unknown dataset (the
            message lists the datasets that exist), a protocol the dataset does not have, a
            candidate set the protocol does not take.
    """
    from eval.store_protocols import CANDIDATE_SETS, STORE_PROTOCOLS

    p, d, c = config.protocol, config.dataset, config.candidates
    if p not in (*BUILTIN_PROTOCOLS, *STORE_PROTOCOLS):
        raise ValueError(f"--protocol {p}: unknown; known: {', '.join((*STORE_PROTOCOLS, *BUILTIN_PROTOCOLS))}")
    if is_builtin(config):
        if p == "llmrank" and c not in LLMRANK_CANDIDATES:
            raise ValueError(f"--candidates {c}: llmrank ranks LLMRank's candidate files: "
                             f"{', '.join(LLMRANK_CANDIDATES)}")
        if p != "llmrank" and c != "random":
            raise ValueError(f"--candidates {c}: --protocol {p} on {d} retrieves its own 20 candidates "
                             "(fused sources over the whole catalogue); leave --candidates out")
        return
    if p in BUILTIN_PROTOCOLS:
        known = ", ".join(f"{pp} on {dd}" for pp, dd in BUILTIN if pp == p)
        raise ValueError(f"--protocol {p} exists only for the shared data files ({known}); on "
                         f"{d} use --protocol {' | '.join(STORE_PROTOCOLS)} with --candidates "
                         f"{' | '.join(CANDIDATE_SETS)} (e.g. --protocol leave-one-out --candidates "
                         f"{'full' if p == 'full' else 'random'})")
    if c not in CANDIDATE_SETS:
        raise ValueError(f"--candidates {c}: --protocol {p} takes {', '.join(CANDIDATE_SETS)} "
                         "(LLMRank's candidate files belong to --protocol llmrank on amazon-games)")
    if config.cutoff is not None and p != "temporal":
        raise ValueError(f"--cutoff applies to --protocol temporal (got --protocol {p})")
    from eval.store_suite import parse_cutoff

    parse_cutoff(config.cutoff)
    if sasrec_dir(config) is not None:
        raise ValueError("--sasrec / fused-sasrec: the SASRec source is trained on LLMRank's amazon-games "
                         "item ids only; it does not apply to a stored dataset's protocol")
    if stored is None:
        stored = stored_datasets(config)
    if d not in stored:
        from agent.ingest import LOADERS

        have = ", ".join(stored) or "none"
        fix = (f"load it with `shoplens ingest {d}`" if d in LOADERS else
               f"load yours with `shoplens ingest --events FILE --name {d}`")
        raise ValueError(f"--dataset {d}: no such dataset in the store at {_workspace(config)} (datasets "
                         f"there: {have}; built-in eval data: {', '.join(BUILTIN_DATASETS)} with "
                         f"--protocol llmrank | full); {fix}, or pass --workspace")


def stored_datasets(config: RunConfig) -> list[str]:
    """Datasets with events or items in the store of ``config.workspace`` (creates no folder)."""
    from agent.data.store import EventStore

    path = _workspace(config) / "shoplens.sqlite3"
    if not path.exists():
        return []
    store = EventStore(path)
    try:
        return store.datasets()
    finally:
        store.close()
