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
import onnxruntime as ort

from exporter.baselines import BaselineSettings, evaluate_baselines, train_matrix
from exporter.candidates import Activity, CandidatePlan, UserCFPlan, serving_candidates, usercf_proposals
from exporter.config import ExportConfig
from exporter.data import Dataset
from exporter.distributed import ModelWeights, current_executor, user_vectors_of
from exporter.fit import Fitted, fit_models
from exporter.metrics import ndcg_per_case, summarize
from exporter.models import Ranker, UserTower
from exporter.onnx_export import export_ranker, ort_ranker_scores, quantize_ranker
from exporter.protocols import loo_split, replay_events, replay_split
from exporter.sequences import Sequences, encode_items, item_vocabulary
from exporter.tables import genre_multi_hot
from exporter.train import ranker_scores
from recsys_common.features import ItemTables, pad_history, popular_candidates, ranker_feed

MODELS = ("most_pop", "two_tower", "two_tower+ranker")
INT8 = "two_tower+ranker_int8"  # the same ranker as int8 ONNX, evaluated when config.ranker_int8
# The same ranker over the candidates with the gateway's user-based CF source added, when the cases carry activity.
USERCF = "two_tower+ranker+usercf"
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Cases:
    """Recommendation moments: the user's known items so far (oldest first) and the true next item (0 = unknown).

    activity: what the gateway's active-users index had been fed when each case was asked (user-based CF); with
    it, evaluate_cases also reports USERCF. usercf: each case's user-CF proposals, which evaluate_cases makes
    from activity before splitting the cases into chunks.
    """

    seen: list[I64]
    targets: I64
    activity: Activity | None = None
    usercf: list[I64] | None = None

    def chunk(self, start: int, stop: int) -> Cases:
        """Cases start..stop-1 with their proposals (the activity stays with the whole set)."""
        usercf = None if self.usercf is None else self.usercf[start:stop]
        return Cases(self.seen[start:stop], self.targets[start:stop], usercf=usercf)

    def histories(self, history_len: int) -> I64:
        if not self.seen:
            return np.zeros((0, history_len), dtype=np.int64)
        return np.concatenate([pad_history(s, history_len) for s in self.seen])


def _user_seqs(seqs: Sequences) -> dict[str, I64]:
    return {u: seqs.user_seq(k) for k, u in enumerate(seqs.users.tolist())}


def loo_cases(
    ds: Dataset, train_mask: npt.NDArray[np.bool_], test_rows: I64, vocab: tuple[str, ...], seqs: Sequences
) -> Cases:
    """One case per user with a held-out last item; the history is the user's whole training sequence.

    The active-users index holds every user's training sequence (each user as of just before their own held-out
    event): no held-out event is ever in it.
    """
    by_user = _user_seqs(seqs)
    empty = np.zeros(0, dtype=np.int64)
    targets = encode_items(ds.item_ids[test_rows], vocab)
    number = {u: n for n, u in enumerate(seqs.users.tolist())}
    case_users = np.asarray([number[u] for u in ds.user_ids[test_rows].tolist()], dtype=np.int64)
    activity = Activity(
        seqs.user_of_position(), seqs.items.copy(), np.full(len(targets), len(seqs.items), np.int64), case_users
    )
    return Cases([by_user.get(u, empty) for u in ds.user_ids[test_rows].tolist()], targets, activity)


def replay_cases(ds: Dataset, train_mask: npt.NDArray[np.bool_], vocab: tuple[str, ...], seqs: Sequences) -> Cases:
    """Counted replay events in time order; histories grow with every test event, counted or not.

    The active-users index is fed the training sequences (as they stood at the cut), then every replayed event
    of a known item in replay order; a case sees only the replayed events strictly older than its own timestamp.
    """
    history = {u: list(s.tolist()) for u, s in _user_seqs(seqs).items()}
    number = {u: n for n, u in enumerate(seqs.users.tolist())}
    idx = encode_items(ds.item_ids, vocab)
    seen, targets, case_users, case_times = [], [], [], []
    fed_users, fed_items, fed_times = [], [], []
    for event in replay_events(ds.user_ids, ds.item_ids, ds.timestamps, train_mask):
        user = ds.user_ids[event.row].item()
        items = history.setdefault(user, [])
        user_number = number.setdefault(user, len(number))
        if event.counted:
            seen.append(np.asarray(items, dtype=np.int64))
            targets.append(idx[event.row])
            case_users.append(user_number)
            case_times.append(int(ds.timestamps[event.row]))
        if idx[event.row] > 0:
            items.append(int(idx[event.row]))
            fed_users.append(user_number)
            fed_items.append(int(idx[event.row]))
            fed_times.append(int(ds.timestamps[event.row]))
    # Events come in time order, so those older than a case are a prefix; events of its own second are not in it.
    arrived = len(seqs.items) + np.searchsorted(np.asarray(fed_times, np.int64), case_times, side="left")
    activity = Activity(
        np.concatenate([seqs.user_of_position(), np.asarray(fed_users, np.int64)]),
        np.concatenate([seqs.items, np.asarray(fed_items, np.int64)]),
        np.asarray(arrived, dtype=np.int64).reshape(-1),
        np.asarray(case_users, dtype=np.int64),
    )
    return Cases(seen, np.asarray(targets, dtype=np.int64), activity)


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
    fitted: Fitted,
    cases: Cases,
    config: ExportConfig,
    chunk: int = 512,
    extra: dict[str, Scorer] | None = None,
    usercf: UserCFPlan | None = None,
    per_case: bool = False,
) -> dict[str, Any]:
    """HR@k, NDCG@k and coverage of each model on the same cases, plus the candidate plan's recall.

    per_case: each model's entry also holds "ndcg_per_case", an array aligned with cases.targets (for paired
    comparisons of two fits on the same cases, as `recsys tune` makes; not JSON).

    extra: more rankers of the same candidates (e.g. the int8 ONNX graph), reported under their names; they must
    pickle when the current executor is Ray. Chunks of cases run on exporter.distributed.current_executor().

    When the cases carry activity, USERCF is the fp32 ranker over the candidates with the gateway's user-based CF
    source added (usercf, default UserCFPlan()); "usercf" says how often it proposed the target, and the seconds
    it cost are in "fit" ("usercf_seconds": proposals plus the extra ranking).
    """
    k = config.eval_k
    t = time.perf_counter()
    usercf_plan = usercf or UserCFPlan()
    if cases.activity is not None and cases.usercf is None:
        proposals = usercf_proposals(
            fitted.tables.item_emb, cases.seen, cases.activity, usercf_plan, config.history_len
        )
        cases = Cases(cases.seen, cases.targets, cases.activity, proposals)
    proposal_seconds = time.perf_counter() - t
    models = EvalModels(
        user_tower=ModelWeights.of(fitted.retriever.user),
        ranker=ModelWeights.of(fitted.ranker),
        tables=fitted.tables,
        plan=CandidatePlan.from_config(config),
        k=k,
        history_len=config.history_len,
        extra=extra or {},
    )
    chunks = [cases.chunk(s, s + chunk) for s in range(0, len(cases.seen), chunk)]
    results = current_executor().map(evaluate_chunk, chunks, models=models)
    n_items = fitted.tables.n_items
    names = [*MODELS, *models.extra, *([USERCF] if cases.usercf is not None else [])]
    report: dict[str, Any] = {}
    for m in names:
        topk = np.concatenate([tops[m] for tops, _ in results]) if results else np.zeros((0, k), np.int64)
        report[m] = summarize(topk, cases.targets, n_items)
        if per_case:
            report[m]["ndcg_per_case"] = ndcg_per_case(topk, cases.targets)
    counts = {key: sum(c[key] for _, c in results) for key in (results[0][1] if results else {})}
    n_cases = max(len(cases.targets), 1)
    report["candidate_recall"] = round(counts.get("in_candidates", 0) / n_cases, 4)
    if cases.usercf is not None:
        report["candidate_recall_usercf"] = round(counts["in_candidates_usercf"] / n_cases, 4)
        proposed = [p.size for p in cases.usercf]
        report["usercf"] = {
            "plan": usercf_plan.as_dict(),
            "cases_with_proposals": round(sum(n > 0 for n in proposed) / n_cases, 4),
            "proposals_per_case": round(float(np.mean(proposed)) if proposed else 0.0, 2),
            "target_proposed": round(
                sum(int(t in p) for t, p in zip(cases.targets, cases.usercf, strict=True)) / n_cases, 4
            ),
            "target_only_from_usercf": round(counts["only_from_usercf"] / n_cases, 4),
            "cases_reranked": round(counts["reranked_usercf"] / n_cases, 4),
        }
        # Timings live under "fit" (with the protocol's), so the rest compares across executors and runs.
        report["fit"] = {"usercf_seconds": round(proposal_seconds + counts["usercf_seconds"], 2)}
    return report


@dataclass(frozen=True)
class EvalModels:
    """What every evaluation chunk reads (shipped once per evaluation): model weights, item tables, plan, k."""

    user_tower: ModelWeights
    ranker: ModelWeights
    tables: ItemTables
    plan: CandidatePlan
    k: int
    history_len: int
    extra: dict[str, Scorer]


def evaluate_chunk(cases: Cases, models: EvalModels) -> tuple[dict[str, I64], dict[str, float]]:
    """Top-k item indices (cases, k) of every model on one chunk of cases, and counts: how many targets were
    candidates ("in_candidates"), and with user-CF proposals, the USERCF counts and the seconds they cost."""
    k, tables, plan = models.k, models.tables, models.plan
    user_tower, ranker = models.user_tower.module(), models.ranker.module()
    assert isinstance(user_tower, UserTower) and isinstance(ranker, Ranker)
    histories = cases.histories(models.history_len)
    vecs = user_vectors_of(user_tower, tables.item_emb, histories)
    tops: dict[str, list[I64]] = {m: [] for m in (*MODELS, *models.extra)}
    tops["two_tower"].append(_top_k_full(vecs @ tables.item_emb[1:].T, cases.seen, k))
    counts: dict[str, float] = {"in_candidates": 0}
    cand_l, dense_l = [], []
    for j, items in enumerate(cases.seen):
        exclude = np.unique(items)
        tops["most_pop"].append(_pad_k(popular_candidates(tables, k, exclude)[0], k)[None])
        cands, mask = serving_candidates(tables, items, vecs[j], plan)
        counts["in_candidates"] += int(np.isin(cases.targets[j], cands))
        cand_l.append(cands)
        dense_l.append(ranker_feed(tables, items, cands, mask, vecs[j])["dense"][0])
    rankers: dict[str, Scorer] = {"two_tower+ranker": lambda h, c, d: ranker_scores(ranker, h, c, d), **models.extra}
    for name, scorer in rankers.items():
        for cands, score in zip(cand_l, scorer(histories, cand_l, dense_l), strict=True):
            tops[name].append(_pad_k(cands[np.argsort(-score, kind="stable")], k)[None])
    empty = np.zeros((0, k), np.int64)
    out = {m: np.concatenate(t) if t else empty for m, t in tops.items()}
    if cases.usercf is not None:
        t = time.perf_counter()
        base = out["two_tower+ranker"]
        out[USERCF], usercf_counts = _with_usercf(cases, models, ranker, vecs, histories, cand_l, base)
        counts.update(usercf_counts, usercf_seconds=time.perf_counter() - t)
    return out, counts


def _with_usercf(
    cases: Cases,
    models: EvalModels,
    ranker: Ranker,
    vecs: npt.NDArray[np.float32],
    histories: I64,
    base_cands: list[I64],
    base_top: I64,
) -> tuple[I64, dict[str, float]]:
    """USERCF's top-k (cases, k): the fp32 ranker over each case's candidates with its user-CF proposals merged in.

    A case whose candidate list the proposals leave unchanged keeps its two_tower+ranker answer; the others are
    ranked again, every ranker feature recomputed over the new list (retrieval_rank, ease_rank, ... are relative
    to the request's candidates), as ranking_svc does with what the gateway sends.
    """
    assert cases.usercf is not None
    top = base_top.copy()
    counts = {"in_candidates_usercf": 0, "only_from_usercf": 0, "reranked_usercf": 0}
    rows, cand_l, dense_l = [], [], []
    for j, (items, proposals) in enumerate(zip(cases.seen, cases.usercf, strict=True)):
        cands, mask = serving_candidates(models.tables, items, vecs[j], models.plan, proposals)
        hit = bool(np.isin(cases.targets[j], cands))
        counts["in_candidates_usercf"] += int(hit)
        counts["only_from_usercf"] += int(hit and not np.isin(cases.targets[j], base_cands[j]))
        if not np.array_equal(cands, base_cands[j]):
            rows.append(j)
            cand_l.append(cands)
            dense_l.append(ranker_feed(models.tables, items, cands, mask, vecs[j])["dense"][0])
    if rows:
        for j, cands, score in zip(rows, cand_l, ranker_scores(ranker, histories[rows], cand_l, dense_l), strict=True):
            top[j] = _pad_k(cands[np.argsort(-score, kind="stable")], models.k)
    counts["reranked_usercf"] = len(rows)
    return top, counts


@dataclass(frozen=True)
class ProtocolSplit:
    """A protocol's training part (vocabulary 1..n and sequences) and its test cases."""

    train_mask: npt.NDArray[np.bool_]
    vocab: tuple[str, ...]
    seqs: Sequences
    cases: Cases


def protocol_split(ds: Dataset, protocol: str, config: ExportConfig) -> ProtocolSplit:
    """The training part and test cases of `loo` or `replay` (ARCHITECTURE.md) on a dataset."""
    if protocol == "loo":
        train_mask, test_rows = loo_split(ds.user_ids, ds.timestamps)
    elif protocol == "replay":
        train_mask, test_rows = replay_split(ds.timestamps, config.replay_quantile), np.zeros(0, np.int64)
    else:
        raise ValueError(f"unknown protocol {protocol!r}")
    vocab = item_vocabulary(ds.item_ids[train_mask])
    idx = encode_items(ds.item_ids, vocab)
    seqs = Sequences.build(ds.user_ids[train_mask], idx[train_mask], ds.timestamps[train_mask])
    if protocol == "loo":
        cases = loo_cases(ds, train_mask, test_rows, vocab, seqs)
    else:
        cases = replay_cases(ds, train_mask, vocab, seqs)
    return ProtocolSplit(train_mask, vocab, seqs, cases)


def evaluate_reference_models(split: ProtocolSplit, config: ExportConfig, names: tuple[str, ...]) -> dict[str, Any]:
    """The baselines of exporter/baselines.py fitted on the split's training part and scored on its cases."""
    seqs = split.seqs
    train = train_matrix(seqs.user_of_position(), seqs.items, seqs.n_users, len(split.vocab))
    return evaluate_baselines(train, split.cases, config.eval_k, BaselineSettings.from_config(config), names)


def evaluate_protocol(ds: Dataset, protocol: str, config: ExportConfig, progress: bool = True) -> dict[str, Any]:
    """Fit on the protocol's training part and evaluate every model and every baseline on its test cases."""
    split = protocol_split(ds, protocol, config)
    train_mask, vocab, seqs, cases = split.train_mask, split.vocab, split.seqs, split.cases
    genres = genre_multi_hot(vocab, ds.genres, ds.genre_names)
    fitted = fit_models(seqs, len(vocab), genres, config, progress, label=f"{protocol}: ")
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        extra = _int8_scorer(fitted, Path(tmp), config) if config.ranker_int8 else {}
        report = evaluate_cases(fitted, cases, config, extra=extra)
    if INT8 in report:
        report["ranker_int8_ndcg_drop"] = round(report["two_tower+ranker"]["ndcg"] - report[INT8]["ndcg"], 5)
    report["fit"] = {**fitted.report, **report.get("fit", {}), "eval_seconds": round(time.perf_counter() - t, 2)}
    report["train_interactions"] = int(train_mask.sum())
    if config.baselines:
        baselines = evaluate_reference_models(split, config, config.baselines)
        # Timings live under "fit" with the project's, so the figures compare across runs.
        report["fit"]["baseline_seconds"] = {
            name: {"fit": b.pop("fit_seconds"), "score": b.pop("score_seconds")}
            for name, b in baselines.items()
            if "fit_seconds" in b
        }
        report["baselines"] = baselines
    return report


class OnnxScorer:
    """A Scorer running a ranker ONNX graph held in memory; it pickles as the graph (Ray ships it to workers)."""

    def __init__(self, model: bytes, threads: int = 1) -> None:
        self.model, self.threads = model, threads
        self._session: ort.InferenceSession | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"model": self.model, "threads": self.threads}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def __call__(
        self, histories: I64, candidates: list[I64], dense: list[npt.NDArray[np.float32]]
    ) -> list[npt.NDArray[np.float32]]:
        if self._session is None:  # the options of exporter.onnx_export.session, from bytes instead of a path
            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.inter_op_num_threads = self.threads, 1
            self._session = ort.InferenceSession(self.model, opts, providers=["CPUExecutionProvider"])
        return ort_ranker_scores(self._session, histories, candidates, dense)


def _int8_scorer(fitted: Fitted, workdir: Path, config: ExportConfig) -> dict[str, Scorer]:
    """The fitted ranker exported and int8-quantized as the pipeline would ship it, scoring in ONNX Runtime."""
    fp32, int8 = workdir / "ranker.onnx", workdir / "ranker.int8.onnx"
    export_ranker(fitted.ranker, fp32, config.history_len, fitted.tables.n_dense, config.opset)
    quantize_ranker(fp32, int8)
    return {INT8: OnnxScorer(int8.read_bytes(), threads=config.torch_threads)}


def format_report(evaluation: dict[str, dict[str, Any]]) -> str:
    """A plain-text table: protocol, model, HR@k, NDCG@k, coverage, cases (the baselines with their settings)."""
    from exporter.report import evaluation_table

    return evaluation_table(evaluation)
