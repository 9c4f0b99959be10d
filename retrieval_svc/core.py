"""Retriever: turns a user context or a vector into the nearest items, with exclusions inside the search."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from recsys_common.features import pad_history

from recsys_common.bundle import Bundle
from recsys_common.catalog import Catalog
from recsys_common.errors import BundleMismatch, InvalidRequest


@dataclass(frozen=True)
class SearchResult:
    item_ids: list[str]
    scores: npt.NDArray[np.float32]
    bundle_version: str


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
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


class Retriever:
    """Holds one loaded bundle (an immutable snapshot) and answers searches against it."""

    def __init__(self, bundle: Bundle, threads: int = 1, max_k: int = 10_000) -> None:
        faiss.omp_set_num_threads(threads)
        self.version = bundle.version
        self.max_k = max_k
        self.catalog = Catalog.load(bundle)
        self.history_len = int(bundle.manifest["history_len"])
        self.dim = int(bundle.manifest["embedding"]["dim"])
        self.index = faiss.read_index(str(bundle.file("items.faiss")))
        if self.index.d != self.dim or self.index.ntotal != len(self.catalog):
            raise BundleMismatch(
                f"bundle {bundle.version}: items.faiss holds {self.index.ntotal} vectors of dim {self.index.d}, "
                f"the manifest says {len(self.catalog)} items of dim {self.dim}"
            )
        self.user_tower = _ort_session(str(bundle.file("user_tower.onnx")), threads)
        self._warm_up()

    def _warm_up(self) -> None:
        first = self.catalog.item_ids[:1]
        self.search([Query(k=10, recent_item_ids=first), Query(k=10)])

    def check_version(self, wanted: str) -> None:
        if wanted and wanted != self.version:
            raise BundleMismatch(f"bundle_version {wanted!r} was asked for, this server has {self.version!r}")

    def user_vectors(self, histories: Sequence[Sequence[str]]) -> npt.NDArray[np.float32]:
        """(B, D) query vectors from the user tower; an empty history gives the tower's prior."""
        batch = np.concatenate([pad_history(self.catalog.known(h), self.history_len) for h in histories])
        (vecs,) = self.user_tower.run(["user_vec"], {"history": batch})
        return np.ascontiguousarray(vecs, dtype=np.float32)

    def search(self, queries: Sequence[Query]) -> list[SearchResult]:
        """Answer queries in one pass: user-tower queries are embedded as one batch."""
        for i, q in enumerate(queries):
            self._validate(q, f"requests[{i}]" if len(queries) > 1 else "")
        vectors = np.zeros((len(queries), self.dim), dtype=np.float32)
        by_context = [i for i, q in enumerate(queries) if q.vector is None]
        if by_context:
            vectors[by_context] = self.user_vectors([queries[i].recent_item_ids for i in by_context])
        for i, q in enumerate(queries):
            if q.vector is not None:
                vectors[i] = q.vector
        return [self._search_one(vectors[i : i + 1], q) for i, q in enumerate(queries)]

    def _validate(self, q: Query, where: str) -> None:
        prefix = f"{where}." if where else ""
        if not 1 <= q.k <= self.max_k:
            raise InvalidRequest(f"{prefix}k", f"must be in 1..{self.max_k}, got {q.k}")
        if q.vector is not None:
            if q.vector.shape != (self.dim,):
                raise InvalidRequest(f"{prefix}vector", f"must have {self.dim} values, got {q.vector.shape[0]}")
            if not np.all(np.isfinite(q.vector)):
                raise InvalidRequest(f"{prefix}vector", "must hold finite numbers only")

    def _search_one(self, vector: npt.NDArray[np.float32], q: Query) -> SearchResult:
        excluded = self.catalog.known(q.exclude_item_ids)
        if q.exclude_context:
            excluded = np.concatenate([excluded, self.catalog.known(q.recent_item_ids)])
        params = None
        if excluded.size:
            # Excluded ids are filtered inside the scan, so k eligible items come back whenever k exist.
            # Both selectors stay referenced here until the search returns (SWIG does not own them).
            batch = faiss.IDSelectorBatch(np.unique(excluded))
            selector = faiss.IDSelectorNot(batch)
            params = faiss.SearchParameters(sel=selector)
        k = min(q.k, self.index.ntotal)
        scores, ids = self.index.search(vector, k, params=params)
        keep = ids[0] > 0
        return SearchResult(
            item_ids=[self.catalog.id_of(int(i)) for i in ids[0][keep]],
            scores=scores[0][keep],
            bundle_version=self.version,
        )
