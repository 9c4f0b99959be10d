"""Retriever: turns a user context or a vector into the nearest items, with exclusions inside the search.

A Retriever is one immutable snapshot of one bundle version (catalogue, user tower, index, filters).
Hot swap replaces the whole object (recsys_common.snapshot); a request holds one reference from start
to end, so it can never mix two versions, and every result names the version that produced it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import faiss
import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from recsys_common.bundle import Bundle
from recsys_common.catalog import Catalog
from recsys_common.errors import BundleMismatch, InvalidRequest
from recsys_common.features import pad_history
from retrieval_svc.ann import AnnIndex, FilterPolicy, Hits, ItemFilter, Shard

UNAVAILABLE_FILE = "unavailable.json"
# Equal float32 scores are ordered by item id (the string), so every server and every shard merge
# (gateway.clients.ShardedRetrievalClient) breaks ties alike. A few extra hits are asked of the index
# so that a tie straddling the k-th place is cut the same way too.
TIE_EXTRA = 8


@dataclass(frozen=True)
class SearchResult:
    item_ids: list[str]
    scores: npt.NDArray[np.float32]
    bundle_version: str
    method: str = "ann"  # "ann" | "exact" | "fallback" (see retrieval_svc.ann)
    query_vector: npt.NDArray[np.float32] | None = None  # what was searched with (the user tower's output)


@dataclass(frozen=True)
class Query:
    """One search: either recent item ids (through the user tower) or a raw vector."""

    k: int
    recent_item_ids: Sequence[str] = ()
    vector: npt.NDArray[np.float32] | None = None
    exclude_item_ids: Sequence[str] = ()
    exclude_context: bool = False


def _ort_session(path: str, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # No busy-waiting worker threads: on shared cores they steal time from FAISS and gRPC (PERF-NOTES).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


def read_unavailable(bundle: Bundle) -> list[str]:
    """The bundle's optional unavailable.json: {"item_ids": [...]} (items that must never be returned)."""
    if UNAVAILABLE_FILE not in bundle.manifest["files"]:
        return []
    raw = json.loads(bundle.file(UNAVAILABLE_FILE).read_text())
    ids = raw.get("item_ids") if isinstance(raw, dict) else None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise BundleMismatch(f"bundle {bundle.version}: file {UNAVAILABLE_FILE} must be {{'item_ids': [str, ...]}}")
    return ids


class Retriever:
    """Holds one loaded bundle (an immutable snapshot) and answers searches against it."""

    def __init__(
        self,
        bundle: Bundle,
        threads: int = 1,
        max_k: int = 10_000,
        shard: Shard | None = None,
        filter_policy: FilterPolicy | None = None,
        max_exclude: int = 100_000,
        warm: bool = True,
    ) -> None:
        faiss.omp_set_num_threads(threads)
        shard = shard or Shard()
        self.version = bundle.version
        self.max_k = max_k
        self.max_exclude = max_exclude
        self.shard = shard
        self.catalog = Catalog.load(bundle)
        self.history_len = int(bundle.manifest["history_len"])
        self.dim = int(bundle.manifest["embedding"]["dim"])
        item_emb = np.load(bundle.file("item_emb.npy"), mmap_mode="r")
        if item_emb.shape != (len(self.catalog) + 1, self.dim) or item_emb.dtype != np.float32:
            raise BundleMismatch(
                f"bundle {bundle.version}: file item_emb.npy is {item_emb.dtype} {item_emb.shape}, expected float32 "
                f"({len(self.catalog) + 1}, {self.dim}) from items.json and the manifest"
            )
        self.ann = AnnIndex(
            bundle.file("items.faiss"),
            bundle.manifest.get("index", {}),
            item_emb,
            shard,
            filter_policy or FilterPolicy(),
            self.version,
        )
        self.bundle_unavailable = tuple(read_unavailable(bundle))
        self.runtime_unavailable: frozenset[str] = frozenset()
        self.filter = self._build_filter()
        self.id_rank = np.zeros(len(self.catalog) + 1, dtype=np.int64)
        self.id_rank[1:] = np.argsort(np.argsort(np.asarray(self.catalog.item_ids, dtype=object), kind="stable"))
        self.user_tower = _ort_session(str(bundle.file("user_tower.onnx")), threads)
        if warm:
            self._warm_up()

    def _build_filter(self) -> ItemFilter:
        ids = [*self.bundle_unavailable, *self.runtime_unavailable]
        return ItemFilter.build(len(self.catalog), self.ann.shard_items, self.catalog.known(ids))

    def with_unavailable(self, item_ids: Iterable[str]) -> Retriever:
        """A snapshot sharing this one's index and model, with a new runtime set of unavailable items."""
        other = copy.copy(self)
        other.runtime_unavailable = frozenset(item_ids)
        other.filter = other._build_filter()
        return other

    def _warm_up(self) -> None:
        # First calls allocate ORT and FAISS buffers; do it before the snapshot takes traffic.
        first = self.catalog.item_ids[:1]
        for _ in range(3):
            self.search([Query(k=10, recent_item_ids=first), Query(k=10)])
            self.search([Query(k=10, recent_item_ids=first, exclude_item_ids=first)])

    def user_vectors(self, histories: Sequence[Sequence[str]]) -> npt.NDArray[np.float32]:
        """(B, D) query vectors from the user tower; an empty history gives the tower's prior."""
        batch = np.concatenate([pad_history(self.catalog.known(h), self.history_len) for h in histories])
        (vecs,) = self.user_tower.run(["user_vec"], {"history": batch})
        return np.ascontiguousarray(vecs, dtype=np.float32)

    def search(self, queries: Sequence[Query]) -> list[SearchResult]:
        """Answer queries in one pass: user-tower queries are embedded as one batch, unfiltered ones searched as one."""
        for i, q in enumerate(queries):
            self._validate(q, f"requests[{i}]" if len(queries) > 1 else "")
        vectors = np.zeros((len(queries), self.dim), dtype=np.float32)
        by_context = [i for i, q in enumerate(queries) if q.vector is None]
        if by_context:
            vectors[by_context] = self.user_vectors([queries[i].recent_item_ids for i in by_context])
        for i, q in enumerate(queries):
            if q.vector is not None:
                vectors[i] = q.vector
        excluded = [self._excluded(q) for q in queries]
        hits: list[Hits | None] = [None] * len(queries)
        plain = [i for i, e in enumerate(excluded) if not e.size]
        for k in sorted({queries[i].k for i in plain}):
            group = [i for i in plain if queries[i].k == k]
            for i, h in zip(group, self.ann.search_many(vectors[group], k + TIE_EXTRA, self.filter), strict=True):
                hits[i] = h
        for i, e in enumerate(excluded):
            if hits[i] is None:
                hits[i] = self.ann.search(vectors[i : i + 1], queries[i].k + TIE_EXTRA, self.filter, e)
        return [self._result(h, q.k, v) for h, q, v in zip(hits, queries, vectors, strict=True) if h is not None]

    def _excluded(self, q: Query) -> npt.NDArray[np.int64]:
        excluded = self.catalog.known(q.exclude_item_ids)
        if q.exclude_context:
            excluded = np.concatenate([excluded, self.catalog.known(q.recent_item_ids)])
        return np.unique(excluded)

    def _result(self, hits: Hits, k: int, vector: npt.NDArray[np.float32]) -> SearchResult:
        order = np.lexsort((self.id_rank[hits.ids], -hits.scores))[:k]
        ids = self.catalog.item_ids
        return SearchResult(
            item_ids=[ids[int(i) - 1] for i in hits.ids[order]],
            scores=hits.scores[order],
            bundle_version=self.version,
            method=hits.method,
            query_vector=vector,
        )

    def _validate(self, q: Query, where: str) -> None:
        prefix = f"{where}." if where else ""
        if not 1 <= q.k <= self.max_k:
            raise InvalidRequest(f"{prefix}k", f"must be in 1..{self.max_k}, got {q.k}")
        if len(q.exclude_item_ids) > self.max_exclude:
            raise InvalidRequest(
                f"{prefix}exclude_item_ids", f"must hold at most {self.max_exclude} ids, got {len(q.exclude_item_ids)}"
            )
        if len(q.recent_item_ids) > self.max_exclude:
            raise InvalidRequest(
                f"{prefix}context.recent_item_ids",
                f"must hold at most {self.max_exclude} ids, got {len(q.recent_item_ids)}",
            )
        if q.vector is not None:
            if q.vector.shape != (self.dim,):
                raise InvalidRequest(f"{prefix}vector", f"must have {self.dim} values, got {q.vector.shape[0]}")
            if not np.all(np.isfinite(q.vector)):
                raise InvalidRequest(f"{prefix}vector", "must hold finite numbers only")
