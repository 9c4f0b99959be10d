"""AnnIndex: the bundle's FAISS index (Flat, HNSW or IVF; whole or one shard) searched with filters inside.

Filters never make an answer short. Excluded and unavailable items are removed inside the search with
an IDSelector (a bitmap over item indices), so an exact index always returns k eligible items when k
exist. An approximate index cannot promise that: a selector that rejects most items starves HNSW's
graph walk and IVF's probed lists. So, per query, with r the share of the shard's items that are
excluded:

- eligible items <= ``exact_max_eligible``, or r >= ``exact_min_ratio``: exact search over the eligible
  items only (a gather and a matrix-vector product; cheaper than the ANN search at that size);
- otherwise the ANN search with its search-time parameter scaled by 1 / (1 - r)^2: the eligible top-k
  lie as far out as the unfiltered top k / (1 - r), and they are 1 - r as dense, so IVF probes more
  lists and HNSW keeps a longer candidate list (measured: 1 / (1 - r) alone lost 5 points of recall at
  r = 0.5 on HNSW and IVF; the square kept it within a point of the unfiltered recall);
- and if that answer still holds fewer than min(k, eligible) items, the exact search over the eligible
  items answers instead. It is a guarantee, not a retry: the exact search cannot come back short.

bench/retrieval.py measures recall and shortness against the exclusion ratio (see bench/README.md).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from recsys_common.errors import BundleMismatch

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

DEFAULT_PARAMS = {"HNSW": {"efSearch": 128}, "IVF": {"nprobe": 32}}
MAX_EF_SEARCH = 4096


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``: the items whose index j satisfies (j - 1) % count == index."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not (self.count >= 1 and 0 <= self.index < self.count):
            raise ValueError(f"shard must be i/n with 0 <= i < n, got {self.index}/{self.count}")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """'i/n' (0-based i), e.g. '0/2' and '1/2' for two shards."""
        try:
            i, n = (int(part) for part in text.split("/"))
        except ValueError:
            raise ValueError(f"shard must look like i/n (e.g. 0/2), got {text!r}") from None
        return cls(i, n)

    def items(self, n_items: int) -> I64:
        """Item indices (1..n_items) of this shard, ascending."""
        return np.arange(1 + self.index, n_items + 1, self.count, dtype=np.int64)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass(frozen=True)
class FilterPolicy:
    """When an approximate index hands a query over to exact search over the eligible items."""

    # Gathering scattered rows costs ~40-130 ns each here (cache and TLB misses), so 8192 rows plus the
    # SIMD scan stay near 0.3-0.5 ms at dimension 64, the cost of one ANN search (65k rows took 4-9 ms).
    exact_max_eligible: int = 8192
    exact_min_ratio: float = 0.9


@dataclass(frozen=True)
class ItemFilter:
    """Items this snapshot may return: the shard's items minus the unavailable ones (index 0 never)."""

    allowed: npt.NDArray[np.bool_]  # (n + 1,)
    bits: npt.NDArray[np.uint8]  # allowed packed little-endian, for faiss.IDSelectorBitmap
    n_allowed: int
    n_unavailable: int

    @classmethod
    def build(cls, n_items: int, shard_items: I64, unavailable: I64) -> ItemFilter:
        allowed = np.zeros(n_items + 1, dtype=np.bool_)
        allowed[shard_items] = True
        before = int(allowed.sum())
        allowed[unavailable[(unavailable > 0) & (unavailable <= n_items)]] = False
        n_allowed = int(allowed.sum())
        return cls(allowed, np.packbits(allowed, bitorder="little"), n_allowed, before - n_allowed)

    def eligible(self, excluded: I64) -> int:
        """How many items stay allowed once ``excluded`` (unique, in 1..n) are taken out too."""
        return self.n_allowed - int(self.allowed[excluded].sum()) if excluded.size else self.n_allowed


@dataclass(frozen=True)
class Hits:
    """Top-k of one query: item indices best first, their scores, and how they were found."""

    ids: I64
    scores: F32
    method: str  # "ann" | "exact" (planned exact search over eligible items) | "fallback" (ANN came back short)


def _scale(ratio: float) -> float:
    """How much to widen the ANN search when a share ``ratio`` of the index is filtered out."""
    return 1.0 / max(1e-6, 1.0 - ratio) ** 2


def _unwrap(index: faiss.Index) -> faiss.Index:
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2):
        return faiss.downcast_index(index.index)
    return index


class AnnIndex:
    """One loaded index and the vectors needed for exact search over eligible items.

    item_emb is the bundle's (n + 1, D) array (memory-mapped: it is only read by exact searches and
    when a shard index is built). Search ids are item indices 1..n, as in the bundle.
    """

    def __init__(
        self,
        index_file: Path,
        entry: dict[str, Any],
        item_emb: F32,
        shard: Shard | None = None,
        policy: FilterPolicy | None = None,
        version: str = "",
    ) -> None:
        self.type = str(entry.get("type", "Flat"))
        if self.type not in ("Flat", "HNSW", "IVF"):
            raise BundleMismatch(
                f"bundle {version}: manifest index.type is {self.type!r}; this server reads Flat, HNSW and IVF"
            )
        self.params = {**DEFAULT_PARAMS.get(self.type, {}), **dict(entry.get("params", {}))}
        self.item_emb = item_emb
        self.n_items = item_emb.shape[0] - 1
        self.dim = item_emb.shape[1]
        shard = shard or Shard()
        self.shard = shard
        self.policy = policy or FilterPolicy()
        self.shard_items = shard.items(self.n_items)
        full = faiss.read_index(str(index_file))
        inner = _unwrap(full)
        kind = {"Flat": faiss.IndexFlat, "HNSW": faiss.IndexHNSW, "IVF": faiss.IndexIVF}[self.type]
        if not isinstance(inner, kind):
            raise BundleMismatch(
                f"bundle {version}: file items.faiss holds a {type(inner).__name__}, the manifest says {self.type}"
            )
        if full.metric_type != faiss.METRIC_INNER_PRODUCT or full.d != self.dim or full.ntotal != self.n_items:
            raise BundleMismatch(
                f"bundle {version}: file items.faiss holds {full.ntotal} vectors of dim {full.d} (metric "
                f"{full.metric_type}), item_emb.npy has {self.n_items} of dim {self.dim} (inner product)"
            )
        self.index = full if shard.count == 1 else self._shard_index(full, inner)
        self.ntotal = int(self.index.ntotal)
        if self.type == "IVF":
            self.nlist = int(faiss.extract_index_ivf(self.index).nlist)

    def _shard_index(self, full: faiss.Index, inner: faiss.Index) -> faiss.Index:
        """This shard's part of the index, with the same ids (item indices) and the same search parameters."""
        ids = self.shard_items
        if self.type == "IVF":
            # Same coarse quantizer, lists restricted to the shard: recall per shard matches the whole index.
            others = np.ones(self.n_items + 1, dtype=np.bool_)
            others[ids] = False
            bits = np.packbits(others, bitorder="little")
            full.remove_ids(faiss.IDSelectorBitmap(self.n_items + 1, faiss.swig_ptr(bits)))
            return full
        vecs = np.ascontiguousarray(self.item_emb[ids], dtype=np.float32)
        if self.type == "Flat":
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        else:  # HNSW cannot drop nodes: rebuild the graph over the shard's vectors with the bundle's M.
            m = int(self.params.get("M", inner.hnsw.nb_neighbors(1)))
            hnsw = faiss.IndexHNSWFlat(self.dim, m, faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efConstruction = int(self.params.get("efConstruction", 40))
            index = faiss.IndexIDMap(hnsw)
        index.add_with_ids(vecs, ids)
        return index

    # -- searching ------------------------------------------------------------------------------
    def _params(self, sel: faiss.IDSelector | None, scale: float = 1.0, k: int = 0) -> faiss.SearchParameters:
        if self.type == "HNSW":
            p = faiss.SearchParametersHNSW()
            # Widen from what the search really keeps (at least k), not from a tuned efSearch below k.
            base = self.params["efSearch"] if scale == 1.0 else max(self.params["efSearch"], k)
            p.efSearch = int(min(MAX_EF_SEARCH, math.ceil(base * scale)))
        elif self.type == "IVF":
            p = faiss.SearchParametersIVF()
            p.nprobe = int(min(self.nlist, math.ceil(self.params["nprobe"] * scale)))
        else:
            p = faiss.SearchParameters()
        if sel is not None:
            p.sel = sel
        return p

    def search_many(self, vectors: F32, k: int, filt: ItemFilter) -> list[Hits]:
        """Queries without exclusions of their own, answered in one FAISS call where possible."""
        if filt.n_unavailable and self.type != "Flat" and self._plan(filt, filt.n_allowed, k)[0] != "ann":
            return [self.search(v[None, :], k, filt, np.zeros(0, np.int64)) for v in vectors]
        bits = filt.bits
        sel = faiss.IDSelectorBitmap(len(filt.allowed), faiss.swig_ptr(bits)) if filt.n_unavailable else None
        ratio = 1 - filt.n_allowed / max(self.ntotal, 1)
        k_eff = min(k, filt.n_allowed)
        if k_eff == 0:
            return [Hits(np.zeros(0, np.int64), np.zeros(0, np.float32), "ann") for _ in vectors]
        scores, ids = self.index.search(vectors, k_eff, params=self._params(sel, _scale(ratio), k_eff))
        out = []
        for v, s, i in zip(vectors, scores, ids, strict=True):
            keep = i > 0
            if keep.sum() < k_eff and self.type != "Flat":
                out.append(self._exact(v, k_eff, filt, np.zeros(0, np.int64), "fallback"))
            else:
                out.append(Hits(i[keep], s[keep], "ann"))
        return out

    def _plan(self, filt: ItemFilter, eligible: int, k: int) -> tuple[str, float]:
        ratio = 1 - eligible / max(self.ntotal, 1)
        starved = eligible <= self.policy.exact_max_eligible or ratio >= self.policy.exact_min_ratio
        if self.type != "Flat" and starved:
            return "exact", ratio
        return "ann", ratio

    def search(self, vector: F32, k: int, filt: ItemFilter, excluded: I64) -> Hits:
        """Top-k of one (1, D) query among the filter's items minus ``excluded`` (unique item indices)."""
        eligible = filt.eligible(excluded)
        k_eff = min(k, eligible)
        if k_eff <= 0:
            return Hits(np.zeros(0, np.int64), np.zeros(0, np.float32), "exact")
        method, ratio = self._plan(filt, eligible, k)
        if method == "exact":
            return self._exact(vector[0], k_eff, filt, excluded, "exact")
        sel = None
        bits = filt.bits
        if excluded.size > len(filt.allowed) // 512:  # many ids: clearing bools and packing is 8x faster
            allowed = filt.allowed.copy()
            allowed[excluded] = False
            bits = np.packbits(allowed, bitorder="little")
        elif excluded.size:  # a few ids (the usual seen items): clear their bits in a copy of the bitmap
            bits = bits.copy()
            np.bitwise_and.at(bits, excluded >> 3, ~(np.left_shift(1, excluded & 7)).astype(np.uint8))
        if excluded.size or filt.n_unavailable:
            # The bitmap must outlive the search: SWIG keeps a raw pointer, `bits` stays referenced here.
            sel = faiss.IDSelectorBitmap(len(filt.allowed), faiss.swig_ptr(bits))
        scores, ids = self.index.search(vector, k_eff, params=self._params(sel, _scale(ratio), k_eff))
        keep = ids[0] > 0
        if keep.sum() < k_eff:  # starved by the selector: answer exactly instead of coming back short
            return self._exact(vector[0], k_eff, filt, excluded, "fallback")
        return Hits(ids[0][keep], scores[0][keep], "ann")

    def _exact(self, vector: F32, k: int, filt: ItemFilter, excluded: I64, method: str) -> Hits:
        allowed = filt.allowed
        if excluded.size:
            allowed = allowed.copy()
            allowed[excluded] = False
        ids = self.shard_items[allowed[self.shard_items]]
        vecs = np.take(self.item_emb, ids, axis=0)  # np.take: 2x faster than fancy indexing for this gather
        # faiss.knn, not numpy: numpy's BLAS gemv spawns threads and took 8 ms instead of 0.05 ms for
        # 10k x 64 on two busy cores; faiss scans with SIMD on the one OpenMP thread we allow.
        scores, local = faiss.knn(vector[None, :], vecs, min(k, len(ids)), metric=faiss.METRIC_INNER_PRODUCT)
        keep = local[0] >= 0
        return Hits(ids[local[0][keep]], scores[0][keep], method)
