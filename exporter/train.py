"""Training loops: the two-tower retriever (next item, full softmax) and the listwise ranker."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from tqdm import tqdm

from exporter.config import ExportConfig
from exporter.models import Ranker, TwoTower
from exporter.sequences import Sequences


def seed_everything(seed: int, threads: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    torch.set_num_threads(threads)


def training_windows(seqs: Sequences, history_len: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Cut every user sequence into non-overlapping (input, target) windows of history_len next-item steps.

    Windows end at the sequence end and step back by history_len, so every event is a target exactly
    once and the newest events always see a full context. Returns (inputs, targets), both (W, L),
    right-aligned and 0-padded; targets[w, p] is the item after inputs[w, p].
    """
    lengths = np.diff(seqs.indptr)
    n_windows = np.where(lengths >= 2, (lengths - 2) // history_len + 1, 0)
    users = np.repeat(np.arange(seqs.n_users), n_windows)
    step = np.arange(n_windows.sum()) - np.repeat(np.cumsum(n_windows) - n_windows, n_windows)
    ends = seqs.indptr[1:][users] - step * history_len  # exclusive end of the target span
    starts = seqs.indptr[:-1][users]
    tgt_idx = ends[:, None] + np.arange(-history_len, 0)[None, :]
    inp_idx = tgt_idx - 1
    targets = np.where(inp_idx >= starts[:, None], seqs.items[np.clip(tgt_idx, 0, None)], 0)
    inputs = np.where(inp_idx >= starts[:, None], seqs.items[np.clip(inp_idx, 0, None)], 0)
    return inputs.astype(np.int64), targets.astype(np.int64)


def train_two_tower(
    seqs: Sequences,
    n_items: int,
    genres: npt.NDArray[np.float32] | None,
    config: ExportConfig,
    progress: bool = True,
    label: str = "two-tower",
    on_epoch: Callable[[int, TwoTower], None] | None = None,
) -> TwoTower:
    """Fit the retriever on all positions of every training window; returns the model in eval mode.

    on_epoch(epoch, model) runs after each epoch (1-based), the model in eval mode; it may raise to stop the fit
    (`recsys tune` prunes trials with it). It must not draw from torch's global generator (dropout masks come
    from it), so that a fit with the hook trains exactly the model a fit without it does.
    """
    seed_everything(config.seed, config.torch_threads)
    genre_t = torch.from_numpy(genres) if (config.tt_use_genres and genres is not None and genres.size) else None
    model = TwoTower(
        n_items, config.tt_dim, config.history_len, config.tt_layers, config.tt_heads, config.tt_dropout, genre_t
    )
    inputs, targets = training_windows(seqs, config.history_len)
    inputs_t, targets_t = torch.from_numpy(inputs), torch.from_numpy(targets)
    opt = torch.optim.AdamW(model.parameters(), lr=config.tt_lr, weight_decay=config.tt_weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    n = len(inputs)
    steps = max(1, config.tt_epochs * ((n + config.tt_batch_size - 1) // config.tt_batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.tt_lr, total_steps=steps, pct_start=0.1)
    model.train()
    bar = tqdm(range(config.tt_epochs), desc=label, disable=not progress, leave=False)
    for epoch in bar:
        perm = torch.randperm(n, generator=gen)
        total, count = 0.0, 0
        for start in range(0, n, config.tt_batch_size):
            idx = perm[start : start + config.tt_batch_size]
            x, y = inputs_t[idx], targets_t[idx]
            valid = (x > 0) & (y > 0)
            # bf16 matmuls (AVX-512 BF16) make a step ~3x faster on CPU; the softmax and loss stay fp32.
            states, table = model(x)
            # Only the (positions x items) logits matmul runs in bf16 (AVX-512 BF16 is ~6x faster there);
            # autocasting the small layers costs more in casts than it saves. Column 0 (padding) is left out
            # of the softmax rather than masked: one less pass over the logits.
            h, t = states[valid], table[1:]
            if config.tt_bf16:
                h, t = h.bfloat16(), t.bfloat16()
            loss = nn.functional.cross_entropy((h @ t.T).float(), y[valid] - 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            n_valid = int(valid.sum())
            total += float(loss.detach()) * n_valid
            count += n_valid
        bar.set_postfix(loss=f"{total / max(count, 1):.3f}")
        if on_epoch is not None:
            model.eval()
            on_epoch(epoch + 1, model)
            model.train()
    model.eval()
    return model


@torch.no_grad()
def user_vectors(model: TwoTower, histories: npt.NDArray[np.int64], batch: int = 1024) -> npt.NDArray[np.float32]:
    """(B, D) user vectors (state at the last position) for right-aligned histories (B, L)."""
    model.eval()
    table = model.items()
    out = [
        model.user(table, torch.from_numpy(histories[s : s + batch]))[:, -1, :] for s in range(0, len(histories), batch)
    ]
    return torch.cat(out).numpy().astype(np.float32) if out else np.zeros((0, table.shape[1]), np.float32)


@torch.no_grad()
def item_table(model: TwoTower) -> npt.NDArray[np.float32]:
    """(n + 1, D) item embeddings; row 0 is zeros."""
    model.eval()
    return model.items().numpy().astype(np.float32)


@dataclass(frozen=True)
class RankerExamples:
    """Listwise ranker examples: one user moment each, with its candidates and the true next item's slot."""

    histories: npt.NDArray[np.int64]  # (E, L)
    candidates: list[npt.NDArray[np.int64]]  # E x (C_e,)
    dense: list[npt.NDArray[np.float32]]  # E x (C_e, F)
    target_pos: npt.NDArray[np.int64]  # (E,)

    def __len__(self) -> int:
        return len(self.target_pos)


def pad_batch(
    candidates: list[npt.NDArray[np.int64]], dense: list[npt.NDArray[np.float32]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack ragged candidate lists: (candidates (B, Cmax), dense (B, Cmax, F), valid (B, Cmax) bool)."""
    cmax = max(len(c) for c in candidates)
    f = dense[0].shape[1]
    cands = np.zeros((len(candidates), cmax), dtype=np.int64)
    feats = np.zeros((len(candidates), cmax, f), dtype=np.float32)
    valid = np.zeros((len(candidates), cmax), dtype=bool)
    for r, (c, d) in enumerate(zip(candidates, dense, strict=True)):
        cands[r, : len(c)], feats[r, : len(c)], valid[r, : len(c)] = c, d, True
    return torch.from_numpy(cands), torch.from_numpy(feats), torch.from_numpy(valid)


def _subsample(n: int, target: int, keep: int, rng: np.random.Generator) -> npt.NDArray[np.int64]:
    """The target first, then up to keep - 1 other candidate slots drawn without replacement."""
    others = np.delete(np.arange(n), target)
    if others.size > keep - 1:
        others = rng.choice(others, size=keep - 1, replace=False)
    return np.concatenate([[target], others]).astype(np.int64)


def train_ranker(
    examples: RankerExamples, n_items: int, config: ExportConfig, progress: bool = True, label: str = "ranker"
) -> Ranker:
    """Listwise softmax over each example's candidates (the true next item is one of them).

    Each epoch redraws `ranker_train_candidates` of every example's candidates (a sampled listwise
    softmax): a third of the cost of the full list at the same accuracy on ML-100K.
    """
    seed_everything(config.seed + 1, config.torch_threads)
    n_dense = examples.dense[0].shape[1]
    model = Ranker(
        n_items,
        config.ranker_dim,
        config.history_len,
        n_dense,
        config.ranker_cross_layers,
        config.ranker_hidden,
        config.ranker_dropout,
    )
    stacked = np.concatenate(examples.dense)
    model.set_normalization(torch.from_numpy(stacked.mean(0)), torch.from_numpy(stacked.std(0)))
    opt = torch.optim.AdamW(model.parameters(), lr=config.ranker_lr, weight_decay=config.ranker_weight_decay)
    rng = np.random.default_rng(config.seed + 1)
    hist_t = torch.from_numpy(examples.histories)
    zeros = torch.zeros(config.ranker_batch_size, dtype=torch.int64)
    keep = config.ranker_train_candidates
    model.train()
    bar = tqdm(range(config.ranker_epochs), desc=label, disable=not progress, leave=False)
    for _ in bar:
        perm = rng.permutation(len(examples))
        total = 0.0
        for start in range(0, len(perm), config.ranker_batch_size):
            idx = perm[start : start + config.ranker_batch_size]
            picks = [_subsample(len(examples.candidates[i]), int(examples.target_pos[i]), keep, rng) for i in idx]
            cands, feats, valid = pad_batch(
                [examples.candidates[i][p] for i, p in zip(idx, picks, strict=True)],
                [examples.dense[i][p] for i, p in zip(idx, picks, strict=True)],
            )
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.tt_bf16):
                scores = model(hist_t[idx], cands, feats)
            # The target sits at slot 0 of every subsample.
            loss = nn.functional.cross_entropy(scores.float().masked_fill(~valid, -1e9), zeros[: len(idx)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        bar.set_postfix(loss=f"{total / max(len(perm), 1):.3f}")
    model.eval()
    return model


@torch.no_grad()
def ranker_scores(
    model: Ranker,
    histories: npt.NDArray[np.int64],
    candidates: list[npt.NDArray[np.int64]],
    dense: list[npt.NDArray[np.float32]],
    batch: int = 256,
) -> list[npt.NDArray[np.float32]]:
    """Per-case ranker scores (C_e,) in candidate order, batched with padding."""
    model.eval()
    out: list[npt.NDArray[np.float32]] = []
    for s in range(0, len(candidates), batch):
        cands, feats, _ = pad_batch(candidates[s : s + batch], dense[s : s + batch])
        scores = model(torch.from_numpy(histories[s : s + batch]), cands, feats).numpy()
        out += [scores[r, : len(c)] for r, c in enumerate(candidates[s : s + batch])]
    return out


class Stopwatch:
    """Wall seconds per named step, for the manifest's training report."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + now - self._t, 3)
        self._t = now
