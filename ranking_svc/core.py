"""Ranker: user context + candidates -> one score per candidate, from the bundle's ONNX models."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from recsys_common.bundle import Bundle
from recsys_common.catalog import Catalog
from recsys_common.errors import BundleMismatch, InvalidRequest
from recsys_common.features import SOURCES, ItemTables, pad_history, ranker_feed

_SOURCE_COLUMN = {name: i for i, name in enumerate(SOURCES)}
_ONNX_DTYPE = {"float32": "float", "float64": "double"}  # numpy names -> ONNX Runtime's type names


@dataclass(frozen=True)
class Candidate:
    item_id: str
    sources: Sequence[str] = ()


def source_mask(candidates: Sequence[Candidate]) -> npt.NDArray[np.float32]:
    """(C, len(SOURCES)): 1 where a known source proposed the candidate; unknown source names are ignored.

    One flat pass over all (candidate, source) pairs, no per-candidate loop.
    """
    mask = np.zeros((len(candidates), len(SOURCES)), dtype=np.float32)
    rows = np.repeat(np.arange(len(candidates)), [len(c.sources) for c in candidates])
    cols = np.fromiter((_SOURCE_COLUMN.get(s, -1) for c in candidates for s in c.sources), np.int64, rows.size)
    mask[rows[cols >= 0], cols[cols >= 0]] = 1.0
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
        self._warm_up()

    def _warm_up(self) -> None:
        ids = self.catalog.item_ids[:200]
        self.rank(ids[:1], [Candidate(i, ("ann",)) for i in ids])

    def rank(self, recent_item_ids: Sequence[str], candidates: Sequence[Candidate]) -> npt.NDArray[np.float32]:
        """Scores aligned with candidates; candidates the bundle does not know score -inf."""
        if not 1 <= len(candidates) <= self.max_candidates:
            raise InvalidRequest("candidates", f"must hold 1..{self.max_candidates} items, got {len(candidates)}")
        history = self.catalog.known(recent_item_ids)
        cand = self.catalog.indices([c.item_id for c in candidates])
        mask = source_mask(candidates)
        scores = np.full(len(candidates), -np.inf, dtype=np.float32)
        known = cand > 0
        if not known.any():
            return scores
        (user_vec,) = self.user_tower.run(["user_vec"], {"history": pad_history(history, self.history_len)})
        feed = ranker_feed(self.tables, history, cand[known], mask[known], user_vec[0])
        (out,) = self.ranker.run(["score"], feed)
        scores[known] = np.asarray(out, dtype=np.float32).reshape(-1)
        return scores
