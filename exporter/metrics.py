"""Top-k metrics for one held-out target per case: hit rate and NDCG."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def target_rank(ranked: npt.ArrayLike, target: int) -> int:
    """0-based position of target in ranked, or -1 when absent."""
    hits = np.flatnonzero(np.asarray(ranked) == target)
    return int(hits[0]) if hits.size else -1


def hit_rate_at_k(ranked: npt.ArrayLike, target: int, k: int) -> float:
    """1.0 when target is among the first k of ranked, else 0.0."""
    rank = target_rank(np.asarray(ranked)[:k], target)
    return 1.0 if rank >= 0 else 0.0


def ndcg_at_k(ranked: npt.ArrayLike, target: int, k: int) -> float:
    """1 / log2(rank + 2) for a 0-based rank < k, else 0.0 (ideal DCG of one target is 1)."""
    rank = target_rank(np.asarray(ranked)[:k], target)
    return float(1.0 / np.log2(rank + 2)) if rank >= 0 else 0.0


def ndcg_per_case(topk: npt.NDArray[np.int64], targets: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    """NDCG@k of each case: 1 / log2(rank + 2) where the target is in the case's top-k row, else 0."""
    match = topk == targets[:, None]
    return np.where(match.any(axis=1), 1.0 / np.log2(np.argmax(match, axis=1) + 2.0), 0.0)


def summarize(topk: npt.NDArray[np.int64], targets: npt.NDArray[np.int64], n_items: int) -> dict[str, float]:
    """HR@k, NDCG@k and catalogue coverage over cases: topk (n_cases, k) item indices, targets (n_cases,).

    Coverage is the share of the n_items catalogue that appears in at least one top-k list.
    """
    k = topk.shape[1] if topk.ndim == 2 else 0
    if len(targets) == 0:
        return {"hr": 0.0, "ndcg": 0.0, "coverage": 0.0, "cases": 0, "k": k}
    hit = (topk == targets[:, None]).any(axis=1)
    ndcg = ndcg_per_case(topk, targets)
    covered = np.unique(topk[topk > 0]).size
    return {
        "hr": float(hit.mean()),
        "ndcg": float(ndcg.mean()),
        "coverage": float(covered / max(n_items, 1)),
        "cases": int(len(targets)),
        "k": int(k),
    }
