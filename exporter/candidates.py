"""The gateway's candidate plan, simulated offline: ANN + co-visitation + popular, minus the user's history.

The ranker is trained and evaluated on exactly these candidates, so what it learns is what it serves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from exporter.config import ExportConfig
from recsys_common.features import ItemTables, covisit_candidates, merge_sources, popular_candidates


@dataclass(frozen=True)
class CandidatePlan:
    ann: int = 200
    covisit: int = 100
    popular: int = 50

    @classmethod
    def from_config(cls, config: ExportConfig) -> CandidatePlan:
        return cls(config.cand_ann, config.cand_covisit, config.cand_popular)

    @property
    def total(self) -> int:
        return self.ann + self.covisit + self.popular

    def as_dict(self) -> dict[str, int]:
        return {"ann": self.ann, "covisit": self.covisit, "popular": self.popular}


def ann_candidates(
    item_emb: npt.NDArray[np.float32], user_vec: npt.NDArray[np.float32], n: int, exclude: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Exact inner-product top-n over items 1..n_items minus exclude: what the flat FAISS index returns."""
    scores = item_emb[1:] @ user_vec.reshape(-1)
    excl = np.asarray(exclude, dtype=np.int64)
    scores[excl[(excl > 0) & (excl < len(item_emb))] - 1] = -np.inf
    n = min(n, int(np.isfinite(scores).sum()))
    if n <= 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    top = np.argpartition(-scores, n - 1)[:n]
    top = top[np.lexsort((top, -scores[top]))]
    return (top + 1).astype(np.int64), scores[top].astype(np.float32)


def serving_candidates(
    tables: ItemTables, seen: npt.NDArray[np.int64], user_vec: npt.NDArray[np.float32], plan: CandidatePlan
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """(candidates (C,), source_mask (C, 3)) for a user whose items so far are `seen` (oldest first)."""
    exclude = np.unique(seen[seen > 0])
    ann, _ = ann_candidates(tables.item_emb, user_vec, plan.ann, exclude)
    cov, _ = covisit_candidates(tables, seen, plan.covisit, exclude)
    pop, _ = popular_candidates(tables, plan.popular, exclude)
    return merge_sources([ann, cov, pop])
