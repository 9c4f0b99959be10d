"""run_export: load data, evaluate under the protocols, fit on everything, export, gate and publish a bundle."""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt
import onnx
import torch

from exporter.ann_index import IndexPolicy, choose_and_build, sweep
from exporter.candidates import CandidatePlan, serving_candidates
from exporter.config import ExportConfig
from exporter.data import Dataset, load_dataset
from exporter.distributed import Executor, LocalExecutor, activate, item_embeddings, shard_builds, user_embeddings
from exporter.evaluate import evaluate_protocol, format_report
from exporter.fit import Fitted, fit_models
from exporter.onnx_export import (
    ParityError,
    export_ranker,
    export_user_tower,
    io_schema,
    latency_ms,
    ranker_parity,
    ship_int8_if_harmless,
    user_tower_parity,
)
from exporter.sequences import Sequences, encode_items, histories_before, item_vocabulary, last_histories
from exporter.tables import genre_multi_hot
from exporter.train import Stopwatch, seed_everything, user_vectors
from recsys_common.bundle import BundleWriter
from recsys_common.features import SOURCES, ranker_feed
from recsys_common.signing import load_private_key

LATENCY_CANDIDATES = 350


class GateError(RuntimeError):
    """A quality gate refused the bundle: nothing was published and CURRENT is unchanged (`recsys export` exits 3)."""


class IndexGateError(GateError):
    """The chosen FAISS index does not reach the recall floor against exact search."""


class ParityGateError(GateError, ParityError):
    """An ONNX graph disagrees with torch beyond tolerance."""


class MostPopGateError(GateError):
    """The project (two_tower+ranker) does not beat most_pop under an evaluated protocol."""


PROJECT = "two_tower+ranker"  # what the stack serves: retrieval + ranking
SWEEP_MAX_ITEMS = 100_000  # the report's index sweep builds HNSW and IVF too: cheap up to here


def most_pop_gate(evaluation: dict[str, Any], margin: float = 0.0) -> dict[str, Any]:
    """Whether the project beats most_pop by more than margin on HR@k and NDCG@k under every evaluated protocol.

    Returns {"passed", "margin", "protocols": {protocol: {metric: [project, most_pop]}}, "reason"}.
    """
    failures, figures = [], {}
    for protocol, report in evaluation.items():
        project, pop = report[PROJECT], report["most_pop"]
        figures[protocol] = {m: [round(project[m], 5), round(pop[m], 5)] for m in ("hr", "ndcg")}
        for metric, label in (("hr", "HR"), ("ndcg", "NDCG")):
            if not project[metric] > pop[metric] + margin:
                k = project.get("k", 10)
                failures.append(
                    f"{protocol}: {PROJECT} {label}@{k} {project[metric]:.4f} does not beat most_pop "
                    f"{pop[metric]:.4f}" + (f" by more than {margin}" if margin else "")
                )
    return {"passed": not failures, "margin": margin, "protocols": figures, "reason": "; ".join(failures)}


def peak_rss_mb() -> dict[str, float]:
    """Peak resident memory of this process and of its finished children (ru_maxrss is in KiB on Linux)."""
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 1024 / 1024
    return {
        "self": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, 1),
        "children": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale, 1),
    }


def _log(progress: bool, message: str) -> None:
    if progress:
        print(message, flush=True)


def parity_histories(seqs: Sequences, rows: int, history_len: int, seed: int) -> npt.NDArray[np.int64]:
    """Real histories for the parity gate: a quarter are length-1 (padded attention is the risk), the rest random."""
    rng = np.random.default_rng(seed)
    lengths = np.diff(seqs.indptr)
    firsts = seqs.indptr[:-1][lengths >= 2] + 1  # history = the user's first item only
    firsts = np.sort(rng.permutation(firsts)[: max(1, rows // 4)])
    pool = np.setdiff1d(np.flatnonzero(seqs.position_in_user() >= 1), firsts)
    extra = rng.choice(pool, size=min(max(rows - len(firsts), 0), len(pool)), replace=False)
    positions = np.concatenate([firsts, np.sort(extra)]).astype(np.int64)
    return histories_before(seqs, positions, history_len)


def _ranker_feeds(
    fitted: Fitted, seqs: Sequences, histories_all: npt.NDArray[np.int64], min_rows: int, config: ExportConfig
) -> list[dict[str, Any]]:
    """Per-user ranker feeds built as the serving stack builds them, until min_rows candidates are covered."""
    plan = CandidatePlan.from_config(config)
    feeds: list[dict[str, Any]] = []
    rows = 0
    vecs = user_vectors(fitted.retriever, histories_all)
    for u in range(seqs.n_users):
        seen = seqs.user_seq(u)
        cands, mask = serving_candidates(fitted.tables, seen, vecs[u], plan)
        if cands.size == 0:
            continue
        feeds.append(ranker_feed(fitted.tables, seen, cands, mask, vecs[u]))
        rows += cands.size
        if rows >= min_rows:
            break
    return feeds


def _check_shards(
    executor: Executor,
    index: faiss.Index,
    entry: dict[str, Any],
    item_emb: npt.NDArray[np.float32],
    user_vecs: npt.NDArray[np.float32],
    count: int,
    policy: IndexPolicy,
    progress: bool,
) -> list[dict[str, Any]]:
    """Build every retrieval shard of the index as a task and refuse to publish if one misses the recall floor.

    The bundle keeps its one items.faiss: retrieval_svc cuts its shard from it at load time (an HNSW shard is a
    new graph over the shard's items), so a shard's recall is not the whole index's; this is the check of it.
    """
    shards = shard_builds(executor, index, entry, item_emb, user_vecs, count, policy)
    worst = min(shards, key=lambda s: s.recall)
    if worst.recall < policy.recall_floor:
        raise IndexGateError(
            f"items.faiss served as {count} shards: shard {worst.shard}/{count} recall@{worst.k} "
            f"{worst.recall:.4f} is below the floor {policy.recall_floor}: not publishing"
        )
    _log(progress, f"index as {count} shards: lowest recall@{worst.k} {worst.recall:.3f} (shard {worst.shard})")
    return [s.as_dict() for s in shards]


def _items_json(vocab: tuple[str, ...], ds: Dataset) -> dict[str, Any]:
    return {
        "item_ids": list(vocab),
        "titles": [ds.titles.get(i, "") for i in vocab],
        "genres": [list(ds.genres.get(i, ())) for i in vocab],
        "genre_names": list(ds.genre_names),
    }


def run_export(
    config: ExportConfig,
    data_dir: Path,
    bundles_dir: Path,
    progress: bool = True,
    executor: Executor | None = None,
    index_shards: int = 1,
    signing_key: Path | None = None,
) -> str:
    """Train, evaluate, export and publish a bundle from data_dir into bundles_dir; returns the version.

    signing_key: an Ed25519 private key (PEM); the bundle is published with manifest.sig, its signature over
    the manifest (recsys_common/signing.py). It is loaded first, so a bad key fails before any training.

    executor runs the embedding inference, the per-shard index builds and the evaluation's case chunks
    (default: this process; exporter.distributed.RayExecutor for Ray), with equal results either way.
    index_shards > 1 also checks the index as retrieval serves it in that many shards (`--shards`).

    Refuses to publish, raising a GateError with the reason and leaving CURRENT as it was, when the project does
    not beat most_pop (MostPopGateError, checked before the final fit), the index misses its recall floor
    (IndexGateError) or an ONNX graph disagrees with torch beyond tolerance (ParityGateError). After a publish the
    newest config.keep_versions versions are kept (recsys_common.bundle.prune_versions).
    """
    if index_shards < 1:
        raise ValueError(f"index_shards must be >= 1, got {index_shards}")
    key = load_private_key(signing_key, "--signing-key") if signing_key is not None else None
    executor = executor or LocalExecutor()
    started = time.perf_counter()
    watch = Stopwatch()
    seed_everything(config.seed, config.torch_threads)
    ds = load_dataset(Path(data_dir))
    data_summary = ds.summary()
    watch.lap("load")
    _log(
        progress,
        f"loaded {len(ds)} interactions from {data_dir} ({data_summary['n_users']} users, "
        f"{data_summary['n_items']} items; {data_summary['format']}: {data_summary['rows_read']} rows read, "
        f"{data_summary['dropped_missing_id']} dropped for a missing id, "
        f"{data_summary['duplicates_removed']} exact duplicates removed)",
    )

    evaluation: dict[str, Any] = {}
    for protocol in config.eval_protocols:
        with activate(executor):
            evaluation[protocol] = evaluate_protocol(ds, protocol, config, progress)
        watch.lap(f"eval_{protocol}")
    if evaluation:
        _log(progress, format_report(evaluation))
    gates: dict[str, Any] = {"beat_most_pop": "off"}
    if config.gate_beat_most_pop:
        gates["beat_most_pop"] = most_pop_gate(evaluation, config.gate_most_pop_margin) if evaluation else "no protocol"
        if evaluation and not gates["beat_most_pop"]["passed"]:  # before the final fit: fail early
            raise MostPopGateError(f"quality gate: {gates['beat_most_pop']['reason']}: not publishing")

    vocab = item_vocabulary(ds.item_ids)
    idx = encode_items(ds.item_ids, vocab)
    seqs = Sequences.build(ds.user_ids, idx, ds.timestamps)
    genres = genre_multi_hot(vocab, ds.genres, ds.genre_names)
    fitted = fit_models(seqs, len(vocab), genres, config, progress, label="final: ")
    watch.lap("fit_final")

    writer = BundleWriter(Path(bundles_dir))
    try:
        drops = {p: float(r["ranker_int8_ndcg_drop"]) for p, r in evaluation.items() if "ranker_int8_ndcg_drop" in r}
        manifest = _stage(writer.staging, config, ds, vocab, seqs, fitted, progress, drops, executor, index_shards)
        watch.lap("export")
        manifest.update(
            data=data_summary,
            training={
                "config": config.to_dict(),
                "seconds": round(time.perf_counter() - started, 2),
                "steps_seconds": watch.seconds,
                "final_fit": fitted.report,
                "torch": torch.__version__,
                "peak_rss_mb": peak_rss_mb(),
            },
            evaluation=evaluation,
            gates={
                **gates,
                "onnx_parity": {n: manifest["models"][n]["parity"]["ok"] for n in ("user_tower", "ranker")},
                "index_recall": {**manifest["index"]["recall"], "floor": config.index_recall_floor},
            },
        )
        for model in sorted(writer.staging.glob("*.onnx")):  # every shipped graph, the int8 ranker included
            onnx.checker.check_model(str(model))
        version = writer.publish(manifest, keep=config.keep_versions, signing_key=key)
    except BaseException:
        writer.abort()
        raise
    _log(progress, f"published bundle {version} in {time.perf_counter() - started:.1f} s")
    return version


def _stage(
    staging: Path,
    config: ExportConfig,
    ds: Dataset,
    vocab: tuple[str, ...],
    seqs: Sequences,
    fitted: Fitted,
    progress: bool,
    int8_ndcg_drops: dict[str, float] | None = None,
    executor: Executor | None = None,
    index_shards: int = 1,
) -> dict[str, Any]:
    """Write every bundle file into staging, run the gates, and return the manifest (without files/version)."""
    executor = executor or LocalExecutor()
    # Embedding inference on the executor: the bundle's item table here, every user's vector below.
    tables = replace(fitted.tables, item_emb=item_embeddings(executor, fitted.retriever))
    (staging / "items.json").write_text(json.dumps(_items_json(vocab, ds), ensure_ascii=False))
    np.save(staging / "item_emb.npy", tables.item_emb)
    np.save(staging / "popularity.npy", tables.popularity)
    np.save(staging / "item_features.npy", tables.item_features)
    np.savez(
        staging / "covisit.npz",
        indptr=tables.covisit.indptr,
        indices=tables.covisit.indices,
        scores=tables.covisit.scores,
    )
    if tables.ease is not None:
        np.savez(
            staging / "ease.npz", indptr=tables.ease.indptr, indices=tables.ease.indices, scores=tables.ease.scores
        )

    last_all = last_histories(seqs, config.history_len)
    user_vecs = user_embeddings(executor, fitted.retriever, tables.item_emb, last_all)
    # Index type by catalogue size (exact for small catalogues), tuned and checked on real user vectors.
    policy = IndexPolicy(
        recall_floor=config.index_recall_floor,
        seed=config.seed,
        exact_max_items=config.index_exact_max_items,
        hnsw_max_items=max(IndexPolicy.hnsw_max_items, config.index_exact_max_items),
        memory_budget_bytes=config.index_memory_budget_bytes,
    )
    index, index_section, index_report = choose_and_build(tables.item_emb, user_vecs, policy)
    if not index_report.passed:
        raise IndexGateError(f"items.faiss: {index_report.reason}: not publishing")
    if index_shards > 1:
        index_section["shards"] = _check_shards(
            executor, index, index_section, tables.item_emb, user_vecs, index_shards, policy, progress
        )
    faiss.write_index(index, str(staging / "items.faiss"))
    _log(progress, f"index {index_report.factory}: recall@{index_report.k} {index_report.recall:.3f} vs exact")
    # Recall against latency of every index type, for the report; the published index is the one chosen above.
    n_indexed = tables.item_emb.shape[0] - 1
    index_candidates = {
        "chosen": index_report.factory,
        "build_s": index_report.build_s,
        "tuning": index_report.tried,
        "sweep": sweep(tables.item_emb, user_vecs, policy) if n_indexed <= SWEEP_MAX_ITEMS else [],
    }

    ut_path = staging / "user_tower.onnx"
    export_user_tower(fitted.retriever, ut_path, config.history_len, config.opset)
    histories = parity_histories(seqs, config.parity_rows, config.history_len, config.seed)
    ut_parity = user_tower_parity(fitted.retriever, ut_path, histories, config.parity_tol)
    rk_path = staging / "ranker.onnx"
    export_ranker(fitted.ranker, rk_path, config.history_len, tables.n_dense, config.opset)
    feeds = _ranker_feeds(fitted, seqs, last_all, config.parity_rows, config)
    rk_parity = ranker_parity(fitted.ranker, rk_path, feeds, config.parity_tol)
    _log(
        progress,
        f"ONNX parity: user_tower max|diff| {ut_parity.max_abs_diff:.2e} on {ut_parity.rows} histories, "
        f"ranker {rk_parity.max_abs_diff:.2e} on {rk_parity.rows} candidates",
    )
    for name, report in (("user_tower", ut_parity), ("ranker", rk_parity)):
        if not report.ok:
            raise ParityGateError(
                f"{name}.onnx differs from torch by {report.max_abs_diff:.3g} "
                f"(> {report.tolerance:g}) on {report.rows} rows: not publishing"
            )

    lat_feed = dict(max(feeds, key=lambda f: f["candidates"].shape[1]))
    reps = -(-LATENCY_CANDIDATES // lat_feed["candidates"].shape[1])
    lat_feed["candidates"] = np.tile(lat_feed["candidates"], (1, reps))[:, :LATENCY_CANDIDATES]
    lat_feed["dense"] = np.tile(lat_feed["dense"], (1, reps, 1))[:, :LATENCY_CANDIDATES]
    # After the fp32 parity gate: int8 ships only when the evaluation measured its NDCG cost as negligible.
    quantization = (
        ship_int8_if_harmless(rk_path, lat_feed, int8_ndcg_drops or {}, config.ranker_int8_max_ndcg_drop)
        if config.ranker_int8
        else {"int8": False}
    )
    models = {
        "user_tower": {
            "file": ut_path.name,
            "opset": config.opset,
            **io_schema(ut_path),
            "parity": ut_parity.as_dict(),
            "latency_batch1": latency_ms(ut_path, {"history": histories[:1]}),
        },
        "ranker": {
            "file": rk_path.name,
            "opset": config.opset,
            **io_schema(rk_path),
            "parity": rk_parity.as_dict(),
            f"latency_{LATENCY_CANDIDATES}_candidates": latency_ms(rk_path, lat_feed),
            "quantization": quantization,
        },
    }
    return {
        "history_len": config.history_len,
        "embedding": {"dim": int(tables.item_emb.shape[1]), "metric": "inner_product"},
        "index": index_section,
        "index_candidates": index_candidates,
        "models": models,
        "features": {
            "covisit_recency_decay": tables.covisit_decay,
            **(
                {
                    "ease_recency_decay": tables.ease_decay,
                    "ease": {"lambda": config.ease_lambda, "top_m": config.ease_top_m},
                }
                if tables.ease is not None
                else {}
            ),
            "sources": list(SOURCES),
            "candidate_plan": CandidatePlan.from_config(config).as_dict(),
            "dense": list(tables.dense_features),
            "item_features": fitted.feature_names,
        },
    }
