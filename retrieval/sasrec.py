"""SASRec: self-attentive sequential recommendation, small and CPU-friendly.

Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018 (arXiv 1808.09781).
A stack of causal self-attention blocks reads a user's item sequence; the hidden state at
position t, dotted with the (shared, Sec. III-E) item embeddings, scores the item at t + 1.

Two departures from the paper, both common in later re-implementations:

* Loss: softmax cross-entropy at every position, over the whole catalogue or (``n_negatives``)
  over the target plus uniformly sampled negatives shared by the step, instead of the paper's
  binary cross-entropy with one sampled negative per position. It converges in far fewer
  epochs. On one CPU thread, 1,024 shared negatives make the output layer ~15x cheaper than
  the full ~17k-item softmax (an epoch on LLMRank Games: ~50 s measured, ~150 s estimated).
* Positions count from the oldest item of the (last ``max_len``) window, so a training prefix
  and an inference history of the same length see the same position embeddings. The paper
  left-pads to ``max_len`` and so ties positions to the sequence end.

Usage::

    model = SASRec().fit(sequences, epochs=20, batch_size=128, lr=1e-3, seed=0)
    model.score(history, candidates)   # {candidate: logit}, higher is better
    model.save("var/models/sasrec-games"); SASRecModel.load("var/models/sasrec-games")

Knows nothing about agent/ or eval/: plain torch.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

FORMAT_VERSION = 1
PAD = 0  # row 0 of the item embedding is padding; item ids map to rows 1..n_items


@dataclass(frozen=True)
class SASRecConfig:
    """Architecture; the defaults are the paper's Amazon settings unless noted.

    Attributes:
        hidden: embedding and hidden size d (paper: 50; 64 here).
        n_blocks: self-attention blocks (paper: 2).
        n_heads: attention heads (paper: 1; must divide ``hidden``).
        max_len: only the last ``max_len`` items of a sequence are read (paper: 50 on Amazon).
        dropout: dropout rate (paper: 0.5 on the sparse Amazon sets).
    """

    hidden: int = 64
    n_blocks: int = 2
    n_heads: int = 1
    max_len: int = 50
    dropout: float = 0.5


class _Block(nn.Module):
    """One pre-norm block: causal self-attention then a point-wise feed-forward (Sec. III-B/C)."""

    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.hidden, eps=1e-8)
        self.attn = nn.MultiheadAttention(
            cfg.hidden, cfg.n_heads, dropout=cfg.dropout, batch_first=True
        )
        self.ffn_norm = nn.LayerNorm(cfg.hidden, eps=1e-8)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.hidden, cfg.hidden), nn.ReLU(), nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, cfg.hidden), nn.Dropout(cfg.dropout),
        )

    def forward(self, h: torch.Tensor, causal: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        q = self.attn_norm(h)
        a, _ = self.attn(q, h, h, attn_mask=causal, need_weights=False)
        h = (q + a) * keep
        h = h + self.ffn(self.ffn_norm(h))
        return h * keep


class _Network(nn.Module):
    """Embeddings + blocks; ``forward`` maps ``(batch, L)`` row ids to ``(batch, L, hidden)``."""

    def __init__(self, n_items: int, cfg: SASRecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.item = nn.Embedding(n_items + 1, cfg.hidden, padding_idx=PAD)
        self.pos = nn.Embedding(cfg.max_len, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_blocks))
        self.norm = nn.LayerNorm(cfg.hidden, eps=1e-8)
        for emb in (self.item, self.pos):
            nn.init.normal_(emb.weight, std=0.02)
        with torch.no_grad():
            self.item.weight[PAD].zero_()

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        length = rows.shape[1]
        keep = (rows != PAD).unsqueeze(-1).float()
        h = self.item(rows) * math.sqrt(self.cfg.hidden)
        h = self.drop(h + self.pos(torch.arange(length, device=rows.device))) * keep
        causal = torch.ones(length, length, dtype=torch.bool, device=rows.device).triu(1)
        for block in self.blocks:
            h = block(h, causal, keep)
        return self.norm(h)


def _pad_right(rows: Sequence[Sequence[int]]) -> torch.Tensor:
    """Right-pad row-id lists with ``PAD`` into a ``(len(rows), longest)`` int64 tensor."""
    longest = max(len(r) for r in rows)
    return torch.tensor([list(r) + [PAD] * (longest - len(r)) for r in rows], dtype=torch.long)


class SASRecModel:
    """A trained SASRec with its item vocabulary; scores candidates for a history.

    Args:
        network: the trained module.
        items: item ids; ``items[k]`` is embedding row ``k + 1``.
        config: the architecture the network was built with.
        info: training facts kept in the saved config (epochs, loss, seconds, ...).
    """

    def __init__(
        self, network: _Network, items: Sequence[str], config: SASRecConfig,
        info: dict[str, object] | None = None,
    ) -> None:
        self.network = network.eval()
        self.items = list(items)
        self.row = {item: k + 1 for k, item in enumerate(self.items)}
        self.config = config
        self.info = dict(info or {})

    def _history_rows(self, history: Sequence[str]) -> list[int]:
        """Known items of ``history``, last ``max_len``; unknown ids are dropped."""
        return [self.row[i] for i in history if i in self.row][-self.config.max_len :]

    @torch.inference_mode()
    def score_batch(
        self, histories: Sequence[Sequence[str]], candidates_lists: Sequence[Sequence[str]]
    ) -> list[dict[str, float]]:
        """Score each history's candidates: the next-item logit (higher is better).

        Args:
            histories: per user, item ids oldest first.
            candidates_lists: per user, the candidate ids to score.

        Returns:
            Per user, ``{candidate: score}`` for every candidate. A candidate never seen in
            training gets ``min(known candidates' scores) - 1`` (strictly last; finite, so
            per-case z-scoring still works). A history with no known item gives every known
            candidate 0.0.

        Raises:
            ValueError: the two sequences differ in length.
        """
        if len(histories) != len(candidates_lists):
            raise ValueError(f"{len(histories)} histories but {len(candidates_lists)} lists")
        out: list[dict[str, float]] = [{} for _ in histories]
        rows = [self._history_rows(h) for h in histories]
        live = sorted((k for k, r in enumerate(rows) if r), key=lambda k: len(rows[k]))
        user_vecs: dict[int, torch.Tensor] = {}
        for start in range(0, len(live), 1024):
            chunk = live[start : start + 1024]
            hidden = self.network(_pad_right([rows[k] for k in chunk]))
            last = torch.tensor([len(rows[k]) - 1 for k in chunk])
            vecs = hidden[torch.arange(len(chunk)), last]
            user_vecs.update(zip(chunk, vecs, strict=True))
        emb = self.network.item.weight
        for k, cands in enumerate(candidates_lists):
            known = [c for c in cands if c in self.row]
            if k in user_vecs and known:
                logits = emb[[self.row[c] for c in known]] @ user_vecs[k]
                scores = dict(zip(known, logits.tolist(), strict=True))
            else:
                scores = dict.fromkeys(known, 0.0)
            floor = min(scores.values()) - 1.0 if scores else 0.0
            out[k] = {c: scores.get(c, floor) for c in cands}
        return out

    def score(self, history: Sequence[str], candidates: Sequence[str]) -> dict[str, float]:
        """Score one history's candidates; see :meth:`score_batch`."""
        return self.score_batch([history], [candidates])[0]

    def save(self, folder: str | Path) -> None:
        """Write ``model.pt`` (state dict), ``items.json`` and ``config.json`` (manifest)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(self.network.state_dict(), folder / "model.pt")
        (folder / "items.json").write_text(json.dumps(self.items), encoding="utf-8")
        manifest = {
            "format": "shoplens.sasrec", "version": FORMAT_VERSION,
            "config": asdict(self.config), "n_items": len(self.items),
            "items_sha256": _items_hash(self.items), "info": self.info,
        }
        (folder / "config.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")

    @classmethod
    def load(cls, folder: str | Path) -> SASRecModel:
        """Read a folder written by :meth:`save`.

        Raises:
            FileNotFoundError: a file is missing.
            ValueError: wrong format or version, or the vocabulary does not match the manifest.
        """
        folder = Path(folder)
        manifest = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        if manifest.get("format") != "shoplens.sasrec" or manifest.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{folder}: format {manifest.get('format')!r} v{manifest.get('version')}, "
                f"expected 'shoplens.sasrec' v{FORMAT_VERSION}"
            )
        items = json.loads((folder / "items.json").read_text(encoding="utf-8"))
        if len(items) != manifest["n_items"] or _items_hash(items) != manifest["items_sha256"]:
            raise ValueError(f"{folder}: items.json does not match config.json")
        config = SASRecConfig(**manifest["config"])
        network = _Network(len(items), config)
        network.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
        return cls(network, items, config, manifest.get("info"))


def _softmax_loss(
    hidden: torch.Tensor, targets: torch.Tensor, emb: torch.Tensor,
    n_negatives: int | None, gen: torch.Generator,
) -> torch.Tensor:
    """Cross-entropy of ``(n, hidden)`` states against target rows ``(n,)`` (row ids >= 1).

    Full softmax over rows 1..n_items, or the target plus ``n_negatives`` shared uniform rows
    (a negative equal to a row's own target is masked out of that row).
    """
    n_items = emb.shape[0] - 1
    if n_negatives is None or n_negatives >= n_items:
        return nn.functional.cross_entropy(hidden @ emb[1:].T, targets - 1)
    neg = torch.randint(1, n_items + 1, (n_negatives,), generator=gen)
    pos_logit = (hidden * emb[targets]).sum(-1, keepdim=True)
    neg_logit = hidden @ emb[neg].T
    neg_logit = neg_logit.masked_fill(neg.unsqueeze(0) == targets.unsqueeze(1), float("-inf"))
    logits = torch.cat([pos_logit, neg_logit], dim=1)
    return nn.functional.cross_entropy(logits, torch.zeros_like(targets))


def _length_batches(
    lengths: Sequence[int], batch_size: int, rng: random.Random
) -> list[list[int]]:
    """Batches of similar length (little padding), in random order.

    Sequences are shuffled, stably sorted by length, cut into batches, and the batches
    shuffled: each batch is a random draw from one length range.
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    order.sort(key=lambda k: lengths[k])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def _items_hash(items: Sequence[str]) -> str:
    return hashlib.sha256("\x1f".join(items).encode()).hexdigest()[:16]


class SASRec:
    """Trainer: next-item prediction at every position of every sequence (Sec. III-F).

    Args:
        config: architecture; default :class:`SASRecConfig`.
    """

    def __init__(self, config: SASRecConfig | None = None) -> None:
        self.config = config or SASRecConfig()

    def fit(
        self,
        sequences: Sequence[Sequence[str]],
        *,
        epochs: int = 20,
        batch_size: int = 128,
        lr: float = 1e-3,
        seed: int = 0,
        max_minutes: float | None = None,
        weight_decay: float = 0.0,
        validate: Callable[[SASRecModel], float] | None = None,
        patience: int = 3,
        n_negatives: int | None = None,
        progress: bool = True,
    ) -> SASRecModel:
        """Train with softmax cross-entropy and Adam (Kingma & Ba; the paper's optimiser).

        Args:
            sequences: item-id sequences, oldest first. Each of length >= 2 yields
                ``len - 1`` training targets (inputs: its last ``max_len + 1`` items). Whatever
                is passed is what the model knows: leave evaluated users' targets out.
            epochs: passes over the data (at most).
            batch_size: sequences per step.
            lr: Adam learning rate.
            seed: seeds initialisation, dropout and the batch order (deterministic on CPU for a
                fixed thread count); the global torch RNG state is left as it was.
            max_minutes: stop after this much wall time (checked every step).
            weight_decay: AdamW decoupled weight decay.
            validate: called after each epoch with the current model; higher is better. The
                best epoch's weights are returned, and training stops after ``patience``
                epochs without improvement.
            patience: see ``validate``.
            n_negatives: ``None``: full softmax over the catalogue. Otherwise sampled softmax:
                each step shares this many uniformly drawn negatives across its targets (a
                uniform proposal needs no log-Q correction; it matches random-negative
                evaluation). Cuts the output-layer cost by ``n_items / n_negatives``.
            progress: show a tqdm bar per epoch.

        Returns:
            The trained model (best validated epoch when ``validate`` is given).

        Raises:
            ValueError: no sequence has two or more items.
        """
        cfg = self.config
        items = sorted({i for s in sequences for i in s}, key=lambda x: (len(x), x))
        row = {item: k + 1 for k, item in enumerate(items)}
        data = [[row[i] for i in s[-(cfg.max_len + 1) :]] for s in sequences if len(s) >= 2]
        if not data:
            raise ValueError("no sequence with two or more items to learn from")
        lengths = [len(d) for d in data]
        t0 = time.monotonic()
        deadline = None if max_minutes is None else t0 + 60.0 * max_minutes
        order_rng = random.Random(seed)
        history: list[dict[str, float]] = []
        best: tuple[float, int, dict[str, torch.Tensor]] | None = None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            sample_gen = torch.Generator().manual_seed(seed + 1)
            net = _Network(len(items), cfg)
            opt = torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.9, 0.98),
                                    weight_decay=weight_decay)
            stopped = False
            for epoch in range(1, epochs + 1):
                net.train()
                batches = _length_batches(lengths, batch_size, order_rng)
                total, count = 0.0, 0
                bar = tqdm(batches, desc=f"sasrec epoch {epoch}/{epochs}", disable=not progress,
                           mininterval=2.0)
                for batch in bar:
                    seqs = _pad_right([data[k] for k in batch])
                    inputs, targets = seqs[:, :-1], seqs[:, 1:]
                    hidden = net(inputs)
                    real = targets != PAD
                    loss = _softmax_loss(hidden[real], targets[real], net.item.weight,
                                         n_negatives, sample_gen)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += loss.item() * int(real.sum())
                    count += int(real.sum())
                    bar.set_postfix(loss=f"{total / count:.3f}", refresh=False)
                    if deadline is not None and time.monotonic() > deadline:
                        stopped = True
                        break
                bar.close()
                entry = {"epoch": epoch, "loss": total / max(count, 1),
                         "seconds": time.monotonic() - t0}
                if validate is not None:
                    entry["validation"] = validate(SASRecModel(net, items, cfg))
                    if best is None or entry["validation"] > best[0]:
                        best = (entry["validation"], epoch, copy.deepcopy(net.state_dict()))
                history.append(entry)
                if progress:
                    tqdm.write(f"sasrec {entry}")
                if stopped or (best is not None and epoch - best[1] >= patience):
                    break
        if best is not None:
            net.load_state_dict(best[2])
        info: dict[str, object] = {
            "n_sequences": len(data), "n_targets": sum(len(s) - 1 for s in data),
            "epochs_run": len(history), "best_epoch": best[1] if best else len(history),
            "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "seed": seed,
            "loss": "full softmax cross-entropy" if n_negatives is None
            else f"sampled softmax, {n_negatives} uniform negatives per step",
            "seconds": round(time.monotonic() - t0, 1),
            "history": history,
        }
        return SASRecModel(net, items, cfg, info)
