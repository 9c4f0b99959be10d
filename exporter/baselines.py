"""Reference models scored beside the project's under the same protocol: MostPop, ItemKNN, EASE and ALS.

Each baseline is fitted on the protocol's training interactions (a binary user x item matrix) and scores a
case from that case's history, the very `Cases.seen` the project's models see; seen items are excluded and
the top k taken by exporter.evaluate._top_k_full, as for the two-tower model. Under `replay` the models stay
frozen while histories grow: ItemKNN and EASE score the grown history directly, ALS folds it in (the user
step of ALS, solved for the case's history against the frozen item factors).

    results = evaluate_baselines(train, cases, k=10, settings=BaselineSettings())
    results["ease"]  # {"hr": ..., "ndcg": ..., "coverage": ..., "cases": ..., "k": ..., "fit_seconds": ...}
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from exporter.metrics import summarize

if TYPE_CHECKING:
    from exporter.config import ExportConfig
    from exporter.evaluate import Cases

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

BASELINES = ("most_pop", "itemknn", "ease", "als")
# Dense item x item models (ItemKNN, EASE) hold n_items^2 floats: 20k items is 1.6 GB, past that they are skipped.
DENSE_MAX_ITEMS = 20_000


@dataclass(frozen=True)
class BaselineSettings:
    """The baselines' hyper-parameters, recorded beside their figures (ALS depends on them)."""

    knn_neighbours: int = 100
    ease_lambda: float = 500.0
    als_factors: int = 64
    als_regularization: float = 0.05
    als_alpha: float = 10.0
    als_iterations: int = 20
    als_threads: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("knn_neighbours", "als_factors", "als_iterations", "als_threads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"BaselineSettings.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("ease_lambda", "als_regularization", "als_alpha"):
            if not getattr(self, name) > 0:
                raise ValueError(f"BaselineSettings.{name} must be > 0, got {getattr(self, name)!r}")

    @classmethod
    def from_config(cls, config: ExportConfig) -> BaselineSettings:
        try:
            return cls(
                knn_neighbours=config.knn_neighbours,
                ease_lambda=config.ease_lambda,
                als_factors=config.als_factors,
                als_regularization=config.als_regularization,
                als_alpha=config.als_alpha,
                als_iterations=config.als_iterations,
                als_threads=max(1, config.torch_threads),
                seed=config.seed,
            )
        except ValueError as exc:  # name the ExportConfig field, not this class
            raise ValueError(str(exc).replace("BaselineSettings.", "ExportConfig.")) from None

    def of(self, name: str) -> dict[str, Any]:
        """The settings that define one baseline, as the report states them."""
        s = asdict(self)
        keys = {
            "most_pop": [],
            "itemknn": ["knn_neighbours"],
            "ease": ["ease_lambda"],
            "als": ["als_factors", "als_regularization", "als_alpha", "als_iterations", "seed"],
        }[name]
        described = {"most_pop": "training counts", "itemknn": "cosine", "ease": "closed form", "als": "implicit"}
        return {"model": described[name], **{k: s[k] for k in keys}}


def train_matrix(user_rows: I64, items: I64, n_users: int, n_items: int) -> sp.csr_matrix:
    """Binary (n_users, n_items) float32 CSR from interaction pairs; items are indices 1..n (0 = unknown, dropped)."""
    user_rows, items = np.asarray(user_rows, np.int64), np.asarray(items, np.int64)
    if user_rows.shape != items.shape:
        raise ValueError(f"user_rows {user_rows.shape} and items {items.shape} must have the same shape")
    if items.size and (items.max() > n_items or items.min() < 0):
        raise ValueError(f"item indices must be in 0..{n_items}, got {items.min()}..{items.max()}")
    keep = items > 0
    m = sp.csr_matrix(
        (np.ones(int(keep.sum()), np.float32), (user_rows[keep], items[keep] - 1)), shape=(n_users, n_items)
    )
    m.sum_duplicates()
    m.data[:] = 1.0  # repeated (user, item) pairs count once
    return m


def history_matrix(seen: list[I64], n_items: int) -> sp.csr_matrix:
    """Binary (cases, n_items) CSR of each case's history (indices 1..n; 0 and repeats ignored)."""
    return train_matrix(np.repeat(np.arange(len(seen)), [len(s) for s in seen]),
                        np.concatenate(seen) if seen else np.zeros(0, np.int64), len(seen), n_items)  # fmt: skip


Scorer = Callable[[sp.csr_matrix], F32]  # (cases, n_items) binary histories -> (cases, n_items) scores


def fit_most_pop(train: sp.csr_matrix, settings: BaselineSettings) -> Scorer:
    """Training interaction counts; ties go to the smaller item index, as in recsys_common.features."""
    counts = np.asarray(train.sum(axis=0), dtype=np.float64).ravel()
    n = counts.size
    # Scores are ranks (exact in float32), so top-k selection cannot reorder equal counts.
    scores = np.empty(n, dtype=np.float32)
    scores[np.argsort(-counts, kind="stable")] = np.arange(n, 0, -1, dtype=np.float32)
    return lambda hist: np.broadcast_to(scores, (hist.shape[0], n)).copy()


def fit_itemknn(train: sp.csr_matrix, settings: BaselineSettings) -> Scorer:
    """Item-item cosine similarity, each history item keeping its `knn_neighbours` most similar items.

    score(u, j) = sum over history items i of sim(i, j), sim pruned to i's top neighbours (implicit's
    ItemItemRecommender convention: similarity rows belong to the item the user has).
    """
    x = train.astype(np.float32)
    co = np.asarray((x.T @ x).todense(), dtype=np.float32)
    norms = np.sqrt(np.diag(co)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sim = co / norms[:, None] / norms[None, :]
    sim[~np.isfinite(sim)] = 0.0
    np.fill_diagonal(sim, 0.0)
    k = min(settings.knn_neighbours, sim.shape[1])
    if k < sim.shape[1]:
        # Zero all but each row's top k (ties at the k-th value broken by argpartition, as any top-k would).
        drop = np.argpartition(-sim, k - 1, axis=1)[:, k:]
        np.put_along_axis(sim, drop, 0.0, axis=1)
    return lambda hist: np.asarray(hist @ sim, dtype=np.float32)


def fit_ease(train: sp.csr_matrix, settings: BaselineSettings) -> Scorer:
    """EASE (Steck 2019): B = I - P diagMat(1 / diag(P)), P = (X^T X + lambda I)^-1, diag(B) = 0."""
    x = train.astype(np.float64)
    gram = np.asarray((x.T @ x).todense(), dtype=np.float64)
    gram[np.diag_indices_from(gram)] += settings.ease_lambda
    p = np.linalg.inv(gram)
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    b32 = b.astype(np.float32)
    return lambda hist: np.asarray(hist @ b32, dtype=np.float32)


def fit_als(train: sp.csr_matrix, settings: BaselineSettings) -> Scorer:
    """Implicit-feedback ALS from the `implicit` library (CPU, confidence alpha * r, fixed random_state).

    A case's user factors are recomputed from its history against the frozen item factors (fold-in).
    """
    # Imported before the limit: threadpoolctl limits the BLAS libraries loaded when it is entered.
    from implicit.cpu.als import AlternatingLeastSquares

    # implicit runs its own threads; OpenBLAS threads inside them oversubscribe the cores (implicit warns).
    with threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(
            factors=settings.als_factors,
            regularization=settings.als_regularization,
            alpha=settings.als_alpha,
            iterations=settings.als_iterations,
            random_state=settings.seed,
            num_threads=settings.als_threads,
        )
        model.fit(train.astype(np.float32).tocsr(), show_progress=False)
    items = np.asarray(model.item_factors, dtype=np.float32)

    def score(hist: sp.csr_matrix) -> F32:
        with threadpool_limits(1, "blas"):
            users = model.recalculate_user(np.arange(hist.shape[0]), hist.astype(np.float32).tocsr())
        return np.asarray(users, dtype=np.float32) @ items.T

    return score


FITTERS: dict[str, Callable[[sp.csr_matrix, BaselineSettings], Scorer]] = {
    "most_pop": fit_most_pop,
    "itemknn": fit_itemknn,
    "ease": fit_ease,
    "als": fit_als,
}


def evaluate_baselines(
    train: sp.csr_matrix,
    cases: Cases,
    k: int,
    settings: BaselineSettings,
    names: tuple[str, ...] = ("itemknn", "ease", "als"),
    chunk: int = 2048,
) -> dict[str, dict[str, Any]]:
    """HR@k, NDCG@k, coverage, fit and scoring seconds and settings of each named baseline on the cases.

    train: binary (n_users, n_items) training matrix (item index j is column j - 1).
    """
    from exporter.evaluate import _top_k_full

    unknown = [n for n in names if n not in FITTERS]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; choose from {list(FITTERS)}")
    n_items = train.shape[1]
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        if name in ("itemknn", "ease") and n_items > DENSE_MAX_ITEMS:
            skipped = f"{n_items} items > {DENSE_MAX_ITEMS} (a dense item x item matrix)"
            out[name] = {"skipped": skipped, "settings": settings.of(name)}
            continue
        t = time.perf_counter()
        scorer = FITTERS[name](train, settings)
        fit_s = time.perf_counter() - t
        tops = []
        for s in range(0, len(cases.seen), chunk):
            seen = cases.seen[s : s + chunk]
            scores = np.array(scorer(history_matrix(seen, n_items)), dtype=np.float32)
            tops.append(_top_k_full(scores, seen, k))
        top = np.concatenate(tops) if tops else np.zeros((0, k), np.int64)
        out[name] = {
            **summarize(top, cases.targets, n_items),
            "fit_seconds": round(fit_s, 3),
            "score_seconds": round(time.perf_counter() - t - fit_s, 3),
            "settings": settings.of(name),
        }
    return out
