"""Choosing, building and checking the item ANN index: exact for small catalogues, HNSW or IVF above.

Pure functions over numpy arrays (no torch). The pipeline calls one function::

    index, manifest_entry, report = choose_and_build(item_emb, user_vecs_holdout, IndexPolicy())
    if not report.passed:
        raise ...  # refuse to publish: report.reason says why
    faiss.write_index(index, str(staging / "items.faiss"))
    manifest["index"] = manifest_entry

Why these choices (measured on this machine, see shared/PERF-NOTES.md and bench/retrieval.py):
exact search is 0.67 ms per query at 100k items and 10 ms at 1M, so it is only used where it fits
the latency budget. HNSW (M 32) is fastest at a few hundred thousand items; above that IVF-Flat
(nlist ~ 4 sqrt(n)) beats HNSW's p99 and builds 4x faster; IVF-SQ8 takes 28 % of the memory when a
budget asks for it. The search-time parameter (efSearch / nprobe) is not a constant: it is tuned on
the held-out *user* vectors to the smallest value whose recall@k clears the floor, because synthetic
recall curves differ from trained embeddings.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

INDEX_TYPES = ("Flat", "HNSW", "IVF")


@dataclass(frozen=True)
class IndexPolicy:
    """How the index is chosen and checked. Sizes are item counts; memory in bytes."""

    # Exact search up to here: PERF-NOTES measured 0.67 ms p50 for 100k items, so 50k keeps exact
    # search near 0.35 ms, inside the retrieval share of a request budget.
    exact_max_items: int = 50_000
    # HNSW up to here, IVF above (HNSW's p99 and build time grow faster than IVF's past ~0.5M).
    hnsw_max_items: int = 500_000
    # None: no limit. Otherwise the first candidate whose estimated size fits is used (IVF-SQ8 last).
    memory_budget_bytes: int | None = None
    recall_floor: float = 0.95
    # Tune to floor + margin, so a slightly different query mix in serving still clears the floor.
    recall_margin: float = 0.005
    k: int = 100
    max_queries: int = 2000
    hnsw_m: int = 32
    hnsw_ef_construction: int = 64
    ef_search_grid: tuple[int, ...] = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
    nprobe_grid: tuple[int, ...] = (4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.recall_floor <= 1:
            raise ValueError(f"IndexPolicy.recall_floor must be in (0, 1], got {self.recall_floor!r}")
        if self.exact_max_items < 0 or self.hnsw_max_items < self.exact_max_items:
            raise ValueError(
                f"IndexPolicy needs 0 <= exact_max_items <= hnsw_max_items, got {self.exact_max_items}, "
                f"{self.hnsw_max_items}"
            )


@dataclass(frozen=True)
class IndexSpec:
    """One index configuration: what the manifest's "index" entry records (plus ntotal and recall)."""

    type: str  # "Flat" | "HNSW" | "IVF"
    factory: str  # faiss.index_factory string, inner product metric
    params: dict[str, Any] = field(default_factory=dict)  # build (M, nlist, ...) and search (efSearch, nprobe)

    def with_params(self, **params: Any) -> IndexSpec:
        return replace(self, params={**self.params, **params})


@dataclass(frozen=True)
class RecallReport:
    """The quality gate of the index: recall@k against exact search on held-out user vectors."""

    type: str
    factory: str
    params: dict[str, Any]
    k: int
    n_queries: int
    recall: float
    floor: float
    passed: bool
    build_s: float
    # Every (spec factory, search param, recall) tried while tuning, in order.
    tried: list[dict[str, Any]] = field(default_factory=list)
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def nlist_for(n_items: int) -> int:
    """About 4 sqrt(n) inverted lists (1M -> 4000), rounded to a hundred, at least 39 points per list."""
    nlist = max(16, int(round(4 * math.sqrt(n_items) / 100) * 100))
    return max(1, min(nlist, n_items // 39))


def estimate_memory_bytes(spec: IndexSpec, n_items: int, dim: int) -> int:
    """Resident size of the index once loaded (vectors, codes, graph links, ids), roughly."""
    if spec.type == "Flat":
        return n_items * (4 * dim + 8) + n_items * 48  # IDMap2 also keeps a reverse hash map
    if spec.type == "HNSW":
        m = int(spec.params.get("M", 32))
        return int(n_items * (4 * dim + 8 + 2 * m * 4 * 1.1))  # level-0 links 2M ints, upper levels ~10 %
    if spec.type == "IVF":
        code = dim if spec.params.get("encoding") == "SQ8" else 4 * dim
        return n_items * (code + 8) + int(spec.params.get("nlist", 0)) * dim * 4
    raise ValueError(f"unknown index type {spec.type!r}; expected one of {INDEX_TYPES}")


def flat_spec() -> IndexSpec:
    return IndexSpec("Flat", "IDMap2,Flat", {})


def hnsw_spec(policy: IndexPolicy) -> IndexSpec:
    return IndexSpec(
        "HNSW",
        f"IDMap,HNSW{policy.hnsw_m},Flat",
        {"M": policy.hnsw_m, "efConstruction": policy.hnsw_ef_construction, "efSearch": 128},
    )


def ivf_spec(n_items: int, encoding: str = "Flat") -> IndexSpec:
    nlist = nlist_for(n_items)
    return IndexSpec("IVF", f"IVF{nlist},{encoding}", {"nlist": nlist, "encoding": encoding, "nprobe": 32})


def candidates(n_items: int, dim: int, policy: IndexPolicy) -> list[IndexSpec]:
    """Index configurations in order of preference for this catalogue; the first that passes is used.

    Exact search is always last (recall 1), unless it is first; configurations over the memory
    budget are left out.
    """
    if n_items <= policy.exact_max_items:
        order = [flat_spec()]
    elif n_items <= policy.hnsw_max_items:
        order = [hnsw_spec(policy), ivf_spec(n_items), ivf_spec(n_items, "SQ8"), flat_spec()]
    else:
        order = [ivf_spec(n_items), hnsw_spec(policy), ivf_spec(n_items, "SQ8"), flat_spec()]
    if policy.memory_budget_bytes is not None:
        order = [s for s in order if estimate_memory_bytes(s, n_items, dim) <= policy.memory_budget_bytes]
    return order


def choose_index(n_items: int, dim: int, policy: IndexPolicy | None = None) -> IndexSpec:
    """The preferred configuration for a catalogue of n_items vectors of dimension dim."""
    policy = policy or IndexPolicy()
    found = candidates(n_items, dim, policy)
    if not found:
        raise ValueError(
            f"no index type fits memory_budget_bytes={policy.memory_budget_bytes} for {n_items} items of dim {dim}"
        )
    return found[0]


def build_index(item_vecs: F32, spec: IndexSpec, ids: I64 | None = None, seed: int = 0) -> faiss.Index:
    """Build spec over item_vecs (n, D) float32; search ids are ``ids`` (default 1..n, the bundle's item indices)."""
    vecs = np.ascontiguousarray(item_vecs, dtype=np.float32)
    n, dim = vecs.shape
    ids = np.arange(1, n + 1, dtype=np.int64) if ids is None else np.ascontiguousarray(ids, dtype=np.int64)
    index = faiss.index_factory(dim, spec.factory, faiss.METRIC_INNER_PRODUCT)
    if spec.type == "HNSW":
        hnsw = faiss.downcast_index(faiss.downcast_index(index).index)
        hnsw.hnsw.efConstruction = int(spec.params.get("efConstruction", 40))
    elif spec.type == "IVF":
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.seed = seed
        index.train(vecs)
    index.add_with_ids(vecs, ids)
    return index


def search_params(
    spec_type: str, params: dict[str, Any], sel: faiss.IDSelector | None = None
) -> faiss.SearchParameters:
    """The per-search parameters of an index type: efSearch for HNSW, nprobe for IVF, and the selector."""
    if spec_type == "HNSW":
        p = faiss.SearchParametersHNSW()
        p.efSearch = int(params["efSearch"])
    elif spec_type == "IVF":
        p = faiss.SearchParametersIVF()
        p.nprobe = int(params["nprobe"])
    else:
        p = faiss.SearchParameters()
    if sel is not None:
        p.sel = sel
    return p


@contextlib.contextmanager
def blas_for_batches() -> Iterator[None]:
    """Let exact batched search use BLAS (PERF-NOTES: 6x faster for ground truth); restored afterwards."""
    old = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = 20
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_threshold = old


def exact_topk(item_vecs: F32, queries: F32, k: int) -> tuple[F32, I64]:
    """Exact inner-product top-k over item_vecs (n, D) with ids 1..n: (scores, ids), each (Q, k)."""
    index = faiss.IndexFlatIP(item_vecs.shape[1])
    index.add(np.ascontiguousarray(item_vecs, dtype=np.float32))
    with blas_for_batches():
        scores, labels = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return scores, np.where(labels >= 0, labels + 1, -1)


def recall_at_k(found: I64, truth: I64) -> float:
    """Mean over queries of |found ∩ truth| / |truth| (both (Q, k) id arrays; -1 = none)."""
    hits = 0
    total = 0
    for f, t in zip(found, truth, strict=True):
        t = t[t >= 0]
        hits += len(np.intersect1d(f[f >= 0], t, assume_unique=False))
        total += len(t)
    return hits / max(total, 1)


def measure_recall(index: faiss.Index, spec: IndexSpec, queries: F32, truth: I64) -> float:
    _, found = index.search(queries, truth.shape[1], params=search_params(spec.type, spec.params))
    return recall_at_k(found, truth)


def _tune(
    index: faiss.Index, spec: IndexSpec, queries: F32, truth: I64, policy: IndexPolicy, tried: list[dict[str, Any]]
) -> tuple[IndexSpec, float]:
    """The smallest search parameter reaching floor + margin (or the best one seen)."""
    if spec.type == "Flat":
        recall = measure_recall(index, spec, queries, truth)
        tried.append({"factory": spec.factory, "param": None, "recall": recall})
        return spec, recall
    name, grid = ("efSearch", policy.ef_search_grid) if spec.type == "HNSW" else ("nprobe", policy.nprobe_grid)
    if spec.type == "IVF":
        grid = tuple(v for v in grid if v <= spec.params["nlist"]) or (spec.params["nlist"],)
    target = min(1.0, policy.recall_floor + policy.recall_margin)
    best = (spec, -1.0)
    for value in grid:
        candidate = spec.with_params(**{name: int(value)})
        recall = measure_recall(index, candidate, queries, truth)
        tried.append({"factory": spec.factory, "param": {name: int(value)}, "recall": round(recall, 5)})
        if recall > best[1]:
            best = (candidate, recall)
        if recall >= target:
            return candidate, recall
    return best


def choose_and_build(
    item_emb: F32, user_vecs: F32, policy: IndexPolicy | None = None
) -> tuple[faiss.Index, dict[str, Any], RecallReport]:
    """Choose, build and tune the index over a bundle's item embeddings; check recall on real user vectors.

    item_emb: (n + 1, D) float32 as written to item_emb.npy (row 0 is padding and is not indexed).
    user_vecs: (Q, D) float32 query vectors of held-out users (the user tower on their histories).
    Returns the built index (search ids 1..n), the manifest "index" entry, and the report. The first
    candidate that clears the floor is returned; if none does, the best one, with report.passed False.
    """
    policy = policy or IndexPolicy()
    vecs = np.ascontiguousarray(item_emb[1:], dtype=np.float32)
    n, dim = vecs.shape
    queries = np.ascontiguousarray(user_vecs[: policy.max_queries], dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != dim or len(queries) == 0:
        raise ValueError(f"user_vecs must be (Q >= 1, {dim}) float32, got {user_vecs.shape}")
    k = min(policy.k, n)
    _, truth = exact_topk(vecs, queries, k)
    specs = candidates(n, dim, policy)
    if not specs:
        raise ValueError(f"no index type fits memory_budget_bytes={policy.memory_budget_bytes} for {n} items")
    tried: list[dict[str, Any]] = []
    best: tuple[faiss.Index, IndexSpec, float, float] | None = None
    for spec in specs:
        start = time.perf_counter()
        index = build_index(vecs, spec, seed=policy.seed)
        build_s = time.perf_counter() - start
        tuned, recall = _tune(index, spec, queries, truth, policy, tried)
        if best is None or recall > best[2]:
            best = (index, tuned, recall, build_s)
        if recall >= policy.recall_floor:
            break
        del index
    assert best is not None
    index, spec, recall, build_s = best
    passed = recall >= policy.recall_floor
    report = RecallReport(
        type=spec.type,
        factory=spec.factory,
        params=dict(spec.params),
        k=k,
        n_queries=len(queries),
        recall=round(recall, 5),
        floor=policy.recall_floor,
        passed=passed,
        build_s=round(build_s, 3),
        tried=tried,
        reason="" if passed else f"recall@{k} {recall:.4f} is below the floor {policy.recall_floor}",
    )
    return index, manifest_entry(spec, n, recall, k, len(queries)), report


def manifest_entry(spec: IndexSpec, ntotal: int, recall: float, k: int = 100, n_queries: int = 0) -> dict[str, Any]:
    """The manifest's "index" entry; the retrieval service reads type, params (efSearch / nprobe) and ntotal."""
    return {
        "type": spec.type,
        "factory": spec.factory,
        "metric": "inner_product",
        "params": dict(spec.params),
        "ntotal": int(ntotal),
        "recall": {"k": int(k), "value": round(float(recall), 5), "queries": int(n_queries), "against": "exact"},
    }


def check_recall_floor(report: RecallReport, floor: float | None = None) -> RecallReport:
    """Re-check a report against a (possibly stricter) floor; the caller refuses to publish when not passed."""
    floor = report.floor if floor is None else floor
    passed = report.recall >= floor
    reason = "" if passed else f"recall@{report.k} {report.recall:.4f} is below the floor {floor}"
    return replace(report, floor=floor, passed=passed, reason=reason)


def sweep(item_emb: F32, user_vecs: F32, policy: IndexPolicy, latency_queries: int = 200) -> list[dict[str, Any]]:
    """Recall@k against exact search and single-query latency of Flat, HNSW and IVF over their search grids.

    For the evaluation report's recall-against-latency plot: it builds every index type whatever the catalogue
    size, so call it only where building them is cheap. Latency is the median of one-query searches (a
    serving request searches one user) on one thread; recall is over up to policy.max_queries queries.
    """
    vecs = np.ascontiguousarray(item_emb[1:], dtype=np.float32)
    n, _ = vecs.shape
    queries = np.ascontiguousarray(user_vecs[: policy.max_queries], dtype=np.float32)
    k = min(policy.k, n)
    _, truth = exact_topk(vecs, queries, k)
    timed = queries[:latency_queries]
    points: list[dict[str, Any]] = []
    for spec in (flat_spec(), hnsw_spec(policy), ivf_spec(n)):
        index = build_index(vecs, spec, seed=policy.seed)
        if spec.type == "Flat":
            grid: list[tuple[str | None, int]] = [(None, 0)]
        elif spec.type == "HNSW":
            grid = [("efSearch", v) for v in policy.ef_search_grid]
        else:
            grid = [("nprobe", v) for v in policy.nprobe_grid if v <= spec.params["nlist"]] or [
                ("nprobe", spec.params["nlist"])
            ]
        for name, value in grid:
            tuned = spec.with_params(**{name: value}) if name else spec
            recall = measure_recall(index, tuned, queries, truth)
            params = search_params(tuned.type, tuned.params)
            times = []
            with _one_omp_thread():
                for q in timed:
                    t = time.perf_counter()
                    index.search(q[None], k, params=params)
                    times.append(time.perf_counter() - t)
            points.append(
                {
                    "type": spec.type,
                    "factory": spec.factory,
                    "param": {name: value} if name else None,
                    "recall": round(recall, 5),
                    "latency_ms_p50": round(float(np.median(times)) * 1e3, 4),
                }
            )
    return points


# -- retrieval shards -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardBuild:
    """One retrieval shard's index, built as retrieval_svc builds it, and its recall@k against exact search."""

    shard: int
    count: int
    ntotal: int
    k: int
    n_queries: int
    recall: float
    index: npt.NDArray[np.uint8]  # faiss.serialize_index of the shard's index (search ids are item indices)

    def load(self) -> faiss.Index:
        return faiss.deserialize_index(self.index)

    def as_dict(self) -> dict[str, Any]:
        return {"shard": f"{self.shard}/{self.count}", "ntotal": self.ntotal, "recall": round(self.recall, 5)}


def shard_items(n_items: int, shard: int, count: int) -> I64:
    """Item indices (ascending) of shard ``shard`` of ``count``: j with (j - 1) % count == shard, as served."""
    if not (count >= 1 and 0 <= shard < count):
        raise ValueError(f"shard must be i/n with 0 <= i < n, got {shard}/{count}")
    return np.arange(1 + shard, n_items + 1, count, dtype=np.int64)


@contextlib.contextmanager
def _one_omp_thread() -> Iterator[None]:
    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(old)


def build_shard(
    shard: int,
    count: int,
    item_emb: F32,
    spec: IndexSpec,
    queries: F32,
    k: int,
    full: npt.NDArray[np.uint8] | None = None,
) -> ShardBuild:
    """Shard ``shard`` of ``count`` as retrieval_svc.ann.AnnIndex serves it, checked on queries (Q, D).

    Flat and HNSW: a new index over the shard's vectors with the bundle's parameters (HNSW is built on one
    OpenMP thread, which makes the graph reproducible; a service builds it multi-threaded, a graph of the same
    quality). IVF: ``full`` (the serialized bundle index) with the other shards' items removed, so the coarse
    quantizer is the bundle's. Recall@min(k, shard size) is measured with the bundle's search parameters.
    """
    n_items = item_emb.shape[0] - 1
    ids = shard_items(n_items, shard, count)
    if ids.size == 0:
        raise ValueError(f"shard {shard}/{count} holds no item: {n_items} items cannot fill {count} shards")
    vecs = np.ascontiguousarray(item_emb[ids], dtype=np.float32)
    if spec.type == "IVF":
        if full is None:
            raise ValueError("build_shard: an IVF shard is cut from the full index; pass full=serialize_index(index)")
        index = faiss.deserialize_index(full)
        others = np.ones(n_items + 1, dtype=np.bool_)
        others[ids] = False
        bits = np.packbits(others, bitorder="little")
        index.remove_ids(faiss.IDSelectorBitmap(n_items + 1, faiss.swig_ptr(bits)))
    else:
        with _one_omp_thread():
            index = build_index(vecs, spec, ids=ids)
    k = min(k, ids.size)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    _, local = exact_topk(vecs, queries, k)
    truth = np.where(local > 0, ids[np.clip(local - 1, 0, None)], -1)
    _, found = index.search(queries, k, params=search_params(spec.type, spec.params))
    recall = recall_at_k(found, truth)
    return ShardBuild(shard, count, int(index.ntotal), k, len(queries), recall, faiss.serialize_index(index))
