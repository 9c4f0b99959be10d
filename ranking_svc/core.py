"""Ranker: user context + candidates -> one score per candidate, from the bundle's ONNX models."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from recsys_common.bundle import Bundle
from recsys_common.catalog import Catalog
from recsys_common.errors import BundleMismatch, InvalidRequest
from recsys_common.features import SOURCES, ItemTables, pad_history, ranker_feed

_SOURCE_COLUMN = {name: i for i, name in enumerate(SOURCES)}
_ONNX_DTYPE = {"float32": "float", "float64": "double"}  # numpy names -> ONNX Runtime's type names


MAX_SOURCE_NAMES = 32


@dataclass(frozen=True)
class Candidates:
    """Candidates as columns, as they travel in RankRequest: bit j of source_bits[i] means source_names[j]
    proposed item_ids[i]. source_bits may be empty (no source known for any candidate)."""

    item_ids: Sequence[str]
    source_bits: npt.NDArray[np.uint32] = field(default_factory=lambda: np.zeros(0, np.uint32))
    source_names: Sequence[str] = ()

    @classmethod
    def of(cls, pairs: Sequence[tuple[str, Sequence[str]]]) -> Candidates:
        """From (item id, its sources) pairs, with the names in order of first use."""
        names = list(dict.fromkeys(s for _, sources in pairs for s in sources))
        bit = {name: 1 << j for j, name in enumerate(names)}
        bits = np.fromiter((sum(bit[s] for s in set(sources)) for _, sources in pairs), np.uint32, len(pairs))
        return cls([item_id for item_id, _ in pairs], bits, names)

    def __len__(self) -> int:
        return len(self.item_ids)

    def source_mask(self) -> npt.NDArray[np.float32]:
        """(C, len(SOURCES)): 1 where a source the ranker knows proposed the candidate; other names are ignored."""
        bits = np.asarray(self.source_bits, dtype=np.uint32).reshape(-1)
        if bits.size not in (0, len(self.item_ids)):
            raise InvalidRequest("source_bits", f"must be empty or hold one entry per item id, got {bits.size}")
        if len(self.source_names) > MAX_SOURCE_NAMES:
            raise InvalidRequest("source_names", f"must hold at most {MAX_SOURCE_NAMES} names")
        if bits.size and int(np.bitwise_or.reduce(bits)) >> len(self.source_names):
            raise InvalidRequest("source_bits", f"set a bit beyond the {len(self.source_names)} source_names")
        mask = np.zeros((len(self.item_ids), len(SOURCES)), dtype=np.float32)
        if bits.size:
            for j, name in enumerate(self.source_names):
                column = _SOURCE_COLUMN.get(name)
                if column is not None:
                    mask[:, column] = np.maximum(mask[:, column], (bits >> j) & 1)
        return mask


def _ort_session(path: str, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


def _check_inputs(session: ort.InferenceSession, declared: list[dict[str, object]], name: str, version: str) -> None:
    """Refuse a model whose graph inputs differ from the schema the manifest declares."""
    actual = {i.name: i.type for i in session.get_inputs()}
    wanted = {str(d["name"]): f"tensor({_ONNX_DTYPE.get(str(d['dtype']), d['dtype'])})" for d in declared}
    if actual != wanted:
        raise BundleMismatch(f"bundle {version}: {name} inputs are {actual}, the manifest declares {wanted}")


def _check_dense_width(session: ort.InferenceSession, tables: ItemTables, version: str) -> None:
    """Refuse a ranker whose "dense" width differs from the columns ranker_feed makes for this bundle."""
    width = next((i.shape[-1] for i in session.get_inputs() if i.name == "dense"), None)
    if isinstance(width, int) and width != tables.n_dense:
        raise BundleMismatch(
            f"bundle {version}: ranker dense input has {width} columns, but the manifest's features make "
            f"{tables.n_dense} ({len(tables.dense_features)} dense features {list(tables.dense_features)} + "
            f"{tables.item_features.shape[1]} item features)"
        )


class Ranker:
    """Holds one loaded bundle (an immutable snapshot) and scores candidates against it."""

    def __init__(self, bundle: Bundle, threads: int = 1, max_candidates: int = 5000) -> None:
        self.version = bundle.version
        self.max_candidates = max_candidates
        self.catalog = Catalog.load(bundle)
        self.history_len = int(bundle.manifest["history_len"])
        self.tables = ItemTables.load(bundle)
        models = bundle.manifest["models"]
        self.user_tower = _ort_session(str(bundle.file(models["user_tower"]["file"])), threads)
        self.ranker = _ort_session(str(bundle.file(models["ranker"]["file"])), threads)
        _check_inputs(self.user_tower, models["user_tower"]["inputs"], "user_tower", self.version)
        _check_inputs(self.ranker, models["ranker"]["inputs"], "ranker", self.version)
        _check_dense_width(self.ranker, self.tables, self.version)
        self._warm_up()

    def _warm_up(self) -> None:
        ids = self.catalog.item_ids[:200]
        self.rank(ids[:1], Candidates.of([(i, ("ann",)) for i in ids]))

    def rank(
        self,
        recent_item_ids: Sequence[str],
        candidates: Candidates,
        user_vector: npt.NDArray[np.float32] | None = None,
    ) -> npt.NDArray[np.float32]:
        """Scores aligned with candidates.item_ids; items the bundle does not know score -inf.

        user_vector: the user tower's output for recent_item_ids under this bundle version (retrieval's query
        vector); None runs the tower here.
        """
        if not 1 <= len(candidates) <= self.max_candidates:
            raise InvalidRequest("item_ids", f"must hold 1..{self.max_candidates} items, got {len(candidates)}")
        if user_vector is not None:
            dim = self.tables.item_emb.shape[1]
            if user_vector.shape != (dim,):
                raise InvalidRequest("user_vector", f"must hold {dim} values, got {user_vector.size}")
            if not np.all(np.isfinite(user_vector)):
                raise InvalidRequest("user_vector", "must hold finite numbers only")
        mask = candidates.source_mask()
        history = self.catalog.known(recent_item_ids)
        cand = self.catalog.indices(candidates.item_ids)
        scores = np.full(len(candidates), -np.inf, dtype=np.float32)
        known = cand > 0
        if not known.any():
            return scores
        if user_vector is None:
            (towered,) = self.user_tower.run(["user_vec"], {"history": pad_history(history, self.history_len)})
            user_vector = towered[0]
        feed = ranker_feed(self.tables, history, cand[known], mask[known], user_vector)
        (out,) = self.ranker.run(["score"], feed)
        scores[known] = np.asarray(out, dtype=np.float32).reshape(-1)
        return scores
