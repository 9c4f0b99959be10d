"""The gateway's candidate plan, simulated offline: ANN + co-visitation + popular, minus the user's history,
and, for the evaluation only, the gateway's user-based CF source (gateway/usercf.py) replayed over a protocol.

The ranker is trained and evaluated on exactly the first three, so what it learns is what it serves. User-based
CF is off by default in the gateway and the ranker is not trained with it: the evaluation reports the quality
with and without its candidates, and that comparison decides whether it is switched on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from exporter.config import ExportConfig
from recsys_common.features import SOURCES, ItemTables, covisit_candidates, merge_sources, popular_candidates
from recsys_common.usercf import nearest, propose, recent_items, unit_rows, user_vector

I64 = npt.NDArray[np.int64]


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
    tables: ItemTables,
    seen: npt.NDArray[np.int64],
    user_vec: npt.NDArray[np.float32],
    plan: CandidatePlan,
    usercf: I64 | None = None,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """(candidates (C,), source_mask (C, 3)) for a user whose items so far are `seen` (oldest first).

    usercf: the user-based CF source's proposals (see usercf_proposals), merged as the gateway merges them: after
    ANN and co-visitation, before popular (GatewayConfig.source_priority). The mask keeps the ranker's SOURCES
    columns only, as ranking_svc does with a source name it does not know: an item only user-CF proposed carries
    no source bit at all (which, in the ranker's training examples, only its random negatives do).
    """
    exclude = np.unique(seen[seen > 0])
    ann, _ = ann_candidates(tables.item_emb, user_vec, plan.ann, exclude)
    cov, _ = covisit_candidates(tables, seen, plan.covisit, exclude)
    pop, _ = popular_candidates(tables, plan.popular, exclude)
    if usercf is None:
        return merge_sources([ann, cov, pop])
    merged = {"ann": ann, "covisit": cov, "usercf": usercf, "popular": pop}  # GatewayConfig.source_priority order
    cands, mask = merge_sources(list(merged.values()))
    return cands, np.ascontiguousarray(mask[:, [list(merged).index(s) for s in SOURCES]])


@dataclass(frozen=True)
class UserCFPlan:
    """The gateway's user-based CF source as the evaluation simulates it (defaults: GatewayConfig's usercf_*)."""

    candidates: int = 50  # usercf_candidates: proposals per request, its quota in the merge
    neighbours: int = 20  # usercf_neighbours
    items_per_user: int = 20  # usercf_items_per_user

    def as_dict(self) -> dict[str, int]:
        return {"candidates": self.candidates, "neighbours": self.neighbours, "items_per_user": self.items_per_user}


@dataclass(frozen=True)
class Activity:
    """What fed the gateway's active-users index during a protocol, in arrival order, and what each case saw of it.

    users[e], items[e]: the e-th event (a user number and a known item index); case c is asked after events
    [0, arrived[c]) and belongs to user case_users[c], who is never their own neighbour. The index holds every
    user with at least one arrived event: the gateway's with usercf_users at least the number of users and an
    idle limit longer than the protocol (no eviction).
    """

    users: I64  # (E,)
    items: I64  # (E,)
    arrived: I64  # (cases,)
    case_users: I64  # (cases,)

    def __post_init__(self) -> None:
        if self.users.shape != self.items.shape or self.arrived.shape != self.case_users.shape:
            raise ValueError("Activity: users/items and arrived/case_users must have the same lengths")
        if self.arrived.size and not 0 <= int(self.arrived.min()) <= int(self.arrived.max()) <= self.users.size:
            raise ValueError(f"Activity: arrived must lie in 0..{self.users.size}")

    @property
    def n_users(self) -> int:
        both = np.concatenate([self.users, self.case_users])
        return int(both.max()) + 1 if both.size else 0


def usercf_proposals(
    item_emb: npt.NDArray[np.float32],
    seen: Sequence[I64],
    activity: Activity,
    plan: UserCFPlan,
    history_len: int,
) -> list[I64]:
    """Per case, the items (best first) the gateway's user-based CF source proposes for it.

    The events are fed to an index of user rows in arrival order (recent_items, user_vector); each case is
    answered once exactly its arrived events are in, from its own history as the gateway sends it (the newest
    history_len known items, then the newest items_per_user of those), excluding its own row and every item it
    has seen. Cases are answered in arrival order, so the whole replay costs one pass over the events.
    """
    unit = unit_rows(item_emb)
    n_items, n_users = item_emb.shape[0] - 1, activity.n_users
    vectors = np.zeros((n_users, item_emb.shape[1]), dtype=np.float32)
    in_index = np.zeros(n_users, dtype=bool)
    recent: list[I64] = [np.zeros(0, dtype=np.int64)] * n_users
    out: list[I64] = [np.zeros(0, dtype=np.int64)] * len(seen)
    order = np.argsort(activity.arrived, kind="stable")
    fed = 0
    for group in np.split(order, np.flatnonzero(np.diff(activity.arrived[order])) + 1):
        if group.size == 0:
            continue
        upto = int(activity.arrived[group[0]])
        if upto > fed:
            users, items = activity.users[fed:upto], activity.items[fed:upto]
            by_user = np.argsort(users, kind="stable")  # each user's new events, still in arrival order
            users, items = users[by_user], items[by_user]
            starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
            for lo, hi in zip(starts.tolist(), [*starts[1:].tolist(), users.size], strict=True):
                u = int(users[lo])
                recent[u] = recent_items(np.concatenate([recent[u], items[lo:hi]]), plan.items_per_user)
                vec = user_vector(unit, recent[u])
                in_index[u] = vec is not None
                if vec is not None:
                    vectors[u] = vec
            fed = upto
        rows = np.flatnonzero(in_index)
        for c in group.tolist():
            query = user_vector(unit, np.asarray(seen[c], dtype=np.int64)[-history_len:][-plan.items_per_user :])
            if query is None:
                continue
            others = rows[rows != activity.case_users[c]]
            sims = vectors[others] @ query
            found = [(float(sims[t]), recent[others[t]]) for t in nearest(sims, plan.neighbours)]
            out[c], _ = propose(found, n_items, np.unique(seen[c]), plan.candidates)
    return out
