"""Offline evaluation under the `loo` and `replay` protocols: retrieval alone, retrieval + ranking, MostPop."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from exporter.candidates import CandidatePlan, serving_candidates
from exporter.config import ExportConfig
from exporter.data import Dataset
from exporter.fit import Fitted, fit_models
from exporter.metrics import summarize
from exporter.onnx_export import export_ranker, ort_ranker_scores, quantize_ranker, session
from exporter.protocols import loo_split, replay_events, replay_split
from exporter.sequences import Sequences, encode_items, item_vocabulary
from exporter.tables import genre_multi_hot
from exporter.train import ranker_scores, user_vectors
from recsys_common.features import DENSE_FEATURES, pad_history, popular_candidates, ranker_feed

MODELS = ("most_pop", "two_tower", "two_tower+ranker")
INT8 = "two_tower+ranker_int8"  # the same ranker as int8 ONNX, evaluated when config.ranker_int8
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Cases:
    """Recommendation moments: the user's known items so far (oldest first) and the true next item (0 = unknown)."""

    seen: list[I64]
    targets: I64

    def histories(self, history_len: int) -> I64:
        if not self.seen:
            return np.zeros((0, history_len), dtype=np.int64)
        return np.concatenate([pad_history(s, history_len) for s in self.seen])


def _user_seqs(seqs: Sequences) -> dict[str, I64]:
    return {u: seqs.user_seq(k) for k, u in enumerate(seqs.users.tolist())}


def loo_cases(
    ds: Dataset, train_mask: npt.NDArray[np.bool_], test_rows: I64, vocab: tuple[str, ...], seqs: Sequences
) -> Cases:
    """One case per user with a held-out last item; the history is the user's whole training sequence."""
    by_user = _user_seqs(seqs)
    empty = np.zeros(0, dtype=np.int64)
    targets = encode_items(ds.item_ids[test_rows], vocab)
    return Cases([by_user.get(u, empty) for u in ds.user_ids[test_rows].tolist()], targets)


def replay_cases(ds: Dataset, train_mask: npt.NDArray[np.bool_], vocab: tuple[str, ...], seqs: Sequences) -> Cases:
    """Counted replay events in time order; histories grow with every test event, counted or not."""
    history = {u: list(s.tolist()) for u, s in _user_seqs(seqs).items()}
    idx = encode_items(ds.item_ids, vocab)
    seen, targets = [], []
    for event in replay_events(ds.user_ids, ds.item_ids, ds.timestamps, train_mask):
        items = history.setdefault(ds.user_ids[event.row].item(), [])
        if event.counted:
            seen.append(np.asarray(items, dtype=np.int64))
            targets.append(idx[event.row])
        if idx[event.row] > 0:
            items.append(int(idx[event.row]))
    return Cases(seen, np.asarray(targets, dtype=np.int64))


def _top_k_full(scores: npt.NDArray[np.float32], seen: list[I64], k: int) -> I64:
    """Top-k item indices per row of scores (rows, n_items) over items 1..n, excluding each row's seen items."""
    rows = np.repeat(np.arange(len(seen)), [len(s) for s in seen])
    cols = np.concatenate(seen) - 1 if seen else np.zeros(0, dtype=np.int64)
    scores[rows[cols >= 0], cols[cols >= 0]] = -np.inf
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1) + 1


def _pad_k(items: I64, k: int) -> I64:
    out = np.zeros(k, dtype=np.int64)
    out[: min(k, items.size)] = items[:k]
    return out


Scorer = Callable[[I64, list[I64], list[npt.NDArray[np.float32]]], list[npt.NDArray[np.float32]]]


def evaluate_cases(
    fitted: Fitted, cases: Cases, config: ExportConfig, chunk: int = 512, extra: dict[str, Scorer] | None = None
) -> dict[str, Any]:
    """HR@k, NDCG@k and coverage of each model on the same cases, plus the candidate plan's recall.

    extra: more rankers of the same candidates (e.g. the int8 ONNX graph), reported under their names.
    """
    k, tables = config.eval_k, fitted.tables
    plan = CandidatePlan.from_config(config)
    histories = cases.histories(config.history_len)
    vecs = user_vectors(fitted.retriever, histories)
    extra = extra or {}
    tops: dict[str, list[I64]] = {m: [] for m in (*MODELS, *extra)}
    in_candidates = 0
    for s in range(0, len(cases.seen), chunk):
        seen = cases.seen[s : s + chunk]
        scores = vecs[s : s + chunk] @ tables.item_emb[1:].T
        tops["two_tower"].append(_top_k_full(scores, seen, k))
        cand_l, dense_l = [], []
        for j, items in enumerate(seen):
            exclude = np.unique(items)
            tops["most_pop"].append(_pad_k(popular_candidates(tables, k, exclude)[0], k)[None])
            cands, mask = serving_candidates(tables, items, vecs[s + j], plan)
            in_candidates += int(np.isin(cases.targets[s + j], cands))
            cand_l.append(cands)
            dense_l.append(ranker_feed(tables, items, cands, mask, vecs[s + j])["dense"][0])
        for cands, score in zip(
            cand_l, ranker_scores(fitted.ranker, histories[s : s + chunk], cand_l, dense_l), strict=True
        ):
            tops["two_tower+ranker"].append(_pad_k(cands[np.argsort(-score, kind="stable")], k)[None])
        for name, scorer in extra.items():
            for cands, score in zip(cand_l, scorer(histories[s : s + chunk], cand_l, dense_l), strict=True):
                tops[name].append(_pad_k(cands[np.argsort(-score, kind="stable")], k)[None])
    n_items = tables.n_items
    report: dict[str, Any] = {
        m: summarize(np.concatenate(t) if t else np.zeros((0, k), np.int64), cases.targets, n_items)
        for m, t in tops.items()
    }
    report["candidate_recall"] = round(in_candidates / max(len(cases.targets), 1), 4)
    return report


def evaluate_protocol(ds: Dataset, protocol: str, config: ExportConfig, progress: bool = True) -> dict[str, Any]:
    """Fit on the protocol's training part and evaluate every model on its test cases."""
    if protocol == "loo":
        train_mask, test_rows = loo_split(ds.user_ids, ds.timestamps)
    elif protocol == "replay":
        train_mask, test_rows = replay_split(ds.timestamps, config.replay_quantile), np.zeros(0, np.int64)
    else:
        raise ValueError(f"unknown protocol {protocol!r}")
    vocab = item_vocabulary(ds.item_ids[train_mask])
    idx = encode_items(ds.item_ids, vocab)
    seqs = Sequences.build(ds.user_ids[train_mask], idx[train_mask], ds.timestamps[train_mask])
    genres = genre_multi_hot(vocab, ds.genres, ds.genre_names)
    fitted = fit_models(seqs, len(vocab), genres, config, progress, label=f"{protocol}: ")
    if protocol == "loo":
        cases = loo_cases(ds, train_mask, test_rows, vocab, seqs)
    else:
        cases = replay_cases(ds, train_mask, vocab, seqs)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        extra = _int8_scorer(fitted, Path(tmp), config) if config.ranker_int8 else {}
        report = evaluate_cases(fitted, cases, config, extra=extra)
    if INT8 in report:
        report["ranker_int8_ndcg_drop"] = round(report["two_tower+ranker"]["ndcg"] - report[INT8]["ndcg"], 5)
    report["fit"] = {**fitted.report, "eval_seconds": round(time.perf_counter() - t, 2)}
    report["train_interactions"] = int(train_mask.sum())
    return report


def _int8_scorer(fitted: Fitted, workdir: Path, config: ExportConfig) -> dict[str, Scorer]:
    """The fitted ranker exported and int8-quantized as the pipeline would ship it, scoring in ONNX Runtime."""
    fp32, int8 = workdir / "ranker.onnx", workdir / "ranker.int8.onnx"
    n_dense = len(DENSE_FEATURES) + fitted.tables.item_features.shape[1]
    export_ranker(fitted.ranker, fp32, config.history_len, n_dense, config.opset)
    quantize_ranker(fp32, int8)
    sess = session(int8, threads=config.torch_threads)
    return {INT8: lambda h, c, d: ort_ranker_scores(sess, h, c, d)}


def format_report(evaluation: dict[str, dict[str, Any]]) -> str:
    """A plain-text table: protocol, model, HR@k, NDCG@k, coverage, cases."""
    lines = [f"{'protocol':<8} {'model':<18} {'HR@10':>7} {'NDCG@10':>8} {'coverage':>9} {'cases':>6}"]
    for protocol, report in evaluation.items():
        for model in MODELS:
            m = report[model]
            lines.append(
                f"{protocol:<8} {model:<18} {m['hr']:>7.4f} {m['ndcg']:>8.4f} {m['coverage']:>9.3f} {m['cases']:>6}"
            )
        if INT8 in report:
            m = report[INT8]
            lines.append(
                f"{protocol:<8} {'  ranker int8':<18} {m['hr']:>7.4f} {m['ndcg']:>8.4f} {m['coverage']:>9.3f} "
                f"{m['cases']:>6}  (NDCG drop {report['ranker_int8_ndcg_drop']:+.4f})"
            )
        lines.append(f"{protocol:<8} {'(candidate recall)':<18} {report['candidate_recall']:>7.4f}")
    return "\n".join(lines)
