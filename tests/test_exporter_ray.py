"""The exporter on a local Ray cluster equals the exporter in one process: embeddings, shard indexes, evaluation."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest
import ray

from exporter.ann_index import IndexPolicy, IndexSpec, ShardBuild, build_index, hnsw_spec, search_params
from exporter.config import ExportConfig
from exporter.data import load_dataset
from exporter.distributed import (
    LocalExecutor,
    RayExecutor,
    activate,
    current_executor,
    item_embeddings,
    shard_builds,
    user_embeddings,
)
from exporter.evaluate import INT8, MODELS, Cases, _int8_scorer, evaluate_cases
from exporter.fit import Fitted, fit_models
from exporter.pipeline import run_export
from exporter.sequences import Sequences, encode_items, item_vocabulary, last_histories
from exporter.synth import generate
from exporter.tables import genre_multi_hot
from exporter.train import item_table, user_vectors
from recsys_cli.main import main
from recsys_common.bundle import open_bundle
from retrieval_svc.ann import AnnIndex, Shard

TOL = 1e-5


@pytest.fixture(scope="module")
def ray_executor() -> Iterator[RayExecutor]:
    """One local Ray instance (2 CPUs) for the module; RayExecutor joins it and leaves it running."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        executor = RayExecutor("local")
        assert not executor.owns_session
        yield executor
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("synth")
    generate(data, n_users=80, n_items=60, n_clusters=4, events_per_user=(8, 25), seed=3)
    return data


@pytest.fixture(scope="module")
def fitted(synth_data: Path) -> tuple[Fitted, Sequences, ExportConfig]:
    config = ExportConfig.tiny()
    ds = load_dataset(synth_data)
    vocab = item_vocabulary(ds.item_ids)
    seqs = Sequences.build(ds.user_ids, encode_items(ds.item_ids, vocab), ds.timestamps)
    genres = genre_multi_hot(vocab, ds.genres, ds.genre_names)
    return fit_models(seqs, len(vocab), genres, config, progress=False), seqs, config


def test_embedding_inference_on_ray_equals_local(ray_executor: RayExecutor, fitted) -> None:  # type: ignore[no-untyped-def]
    model, seqs, config = fitted[0].retriever, fitted[1], fitted[2]
    histories = last_histories(seqs, config.history_len)
    # Small chunks: several tasks per step, merged in order.
    local_items = item_embeddings(LocalExecutor(), model, chunk_rows=16)
    ray_items = item_embeddings(ray_executor, model, chunk_rows=16)
    assert ray_items.shape == local_items.shape == (61, config.tt_dim) and ray_items.dtype == np.float32
    np.testing.assert_allclose(ray_items, local_items, rtol=0, atol=TOL)
    np.testing.assert_allclose(local_items, item_table(model), rtol=0, atol=TOL)
    assert not ray_items[0].any()
    local_users = user_embeddings(LocalExecutor(), model, local_items, histories, chunk_rows=24)
    ray_users = user_embeddings(ray_executor, model, ray_items, histories, chunk_rows=24)
    assert ray_users.shape == (seqs.n_users, config.tt_dim)
    np.testing.assert_allclose(ray_users, local_users, rtol=0, atol=TOL)
    np.testing.assert_allclose(local_users, user_vectors(model, histories), rtol=0, atol=TOL)


def _search(index: faiss.Index, spec: IndexSpec, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    return index.search(queries, k, params=search_params(spec.type, spec.params))


@pytest.mark.parametrize(
    ("spec", "count"),
    [
        (IndexSpec("Flat", "IDMap2,Flat", {}), 2),
        (hnsw_spec(IndexPolicy(hnsw_m=8)).with_params(efSearch=16), 3),
        (IndexSpec("IVF", "IVF4,Flat", {"nlist": 4, "encoding": "Flat", "nprobe": 2}), 2),
    ],
    ids=["Flat", "HNSW", "IVF"],
)
def test_shard_builds_on_ray_equal_local_and_what_retrieval_serves(  # type: ignore[no-untyped-def]
    ray_executor: RayExecutor, fitted, spec: IndexSpec, count: int, tmp_path: Path
) -> None:
    fit, seqs, config = fitted
    item_emb = fit.tables.item_emb
    queries = user_vectors(fit.retriever, last_histories(seqs, config.history_len))
    full = build_index(item_emb[1:], spec, seed=config.seed)
    entry = {"type": spec.type, "factory": spec.factory, "params": spec.params}
    policy = IndexPolicy(k=10)
    local = shard_builds(LocalExecutor(), full, entry, item_emb, queries, count, policy)
    on_ray = shard_builds(ray_executor, full, entry, item_emb, queries, count, policy)
    index_file = tmp_path / "items.faiss"
    faiss.write_index(full, str(index_file))
    items = set()
    for i, (a, b) in enumerate(zip(local, on_ray, strict=True)):
        assert isinstance(b, ShardBuild) and (b.shard, b.count, b.k) == (i, count, 10)
        assert b.ntotal == a.ntotal == len(Shard(i, count).items(60)) and b.recall == a.recall
        if spec.type == "Flat":
            assert b.recall == 1.0
        scores_a, ids_a = _search(a.load(), spec, queries, 10)
        scores_b, ids_b = _search(b.load(), spec, queries, 10)
        assert np.array_equal(ids_a, ids_b)
        np.testing.assert_allclose(scores_a, scores_b, rtol=0, atol=TOL)
        assert set(np.unique(ids_b)) <= set(Shard(i, count).items(60).tolist())
        items |= set(np.unique(ids_b).tolist())
        # The same shard as the retrieval service cuts it from the bundle's one items.faiss.
        served = AnnIndex(index_file, entry, item_emb, shard=Shard(i, count))
        scores_s, ids_s = _search(served.index, spec, queries, 10)
        assert served.ntotal == b.ntotal
        assert np.array_equal(ids_s, ids_b)
        np.testing.assert_allclose(scores_s, scores_b, rtol=0, atol=TOL)
    assert items <= set(range(1, 61))


def test_shard_count_is_checked(fitted) -> None:  # type: ignore[no-untyped-def]
    fit, seqs, config = fitted
    full = build_index(fit.tables.item_emb[1:], IndexSpec("Flat", "IDMap2,Flat", {}))
    entry = {"type": "Flat", "factory": "IDMap2,Flat", "params": {}}
    queries = fit.tables.item_emb[1:4]
    with pytest.raises(ValueError, match=r"index_shards must be between 1 and the number of items \(60\), got 61"):
        shard_builds(LocalExecutor(), full, entry, fit.tables.item_emb, queries, 61, IndexPolicy())


def test_evaluation_on_ray_equals_local(ray_executor: RayExecutor, fitted, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fit, seqs, config = fitted
    seen = [seqs.user_seq(u)[:-1] for u in range(seqs.n_users)]
    cases = Cases(seen, np.array([seqs.user_seq(u)[-1] for u in range(seqs.n_users)], dtype=np.int64))
    # The int8 ONNX scorer is evaluated too: it has to travel to the workers as its graph's bytes.
    extra = _int8_scorer(fit, tmp_path, config)
    with activate(LocalExecutor()):
        local = evaluate_cases(fit, cases, config, chunk=16, extra=extra)
    with activate(ray_executor):
        assert current_executor() is ray_executor
        on_ray = evaluate_cases(fit, cases, config, chunk=16, extra=extra)
    assert isinstance(current_executor(), LocalExecutor)
    assert on_ray == local
    assert set(on_ray) == {*MODELS, INT8, "candidate_recall"}
    assert on_ray["two_tower+ranker"]["cases"] == seqs.n_users
    # Not a degenerate comparison: the models rank differently and some targets are hit.
    assert on_ray["two_tower"]["hr"] > 0 and on_ray["two_tower"] != on_ray["most_pop"]


def _without_timings(evaluation: dict[str, Any]) -> dict[str, Any]:
    return {p: {m: v for m, v in r.items() if m != "fit"} for p, r in evaluation.items()}


def test_export_with_ray_equals_local_export(ray_executor: RayExecutor, synth_data: Path, tmp_path: Path) -> None:
    config = ExportConfig.tiny(eval_protocols=("loo", "replay"))
    local_dir, ray_dir = tmp_path / "local", tmp_path / "ray"
    local = open_bundle(local_dir, run_export(config, synth_data, local_dir, progress=False, index_shards=2))
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(config.to_dict()))
    argv = ["export", "--data", str(synth_data), "--out", str(ray_dir), "--config", str(config_file)]
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--quiet", "--ray", "local", "--index-shards", "2"])
    assert exited.value.code == 0
    assert ray.is_initialized()  # the CLI joined the module's Ray instance and left it running
    on_ray = open_bundle(ray_dir)

    assert local.file("items.json").read_bytes() == on_ray.file("items.json").read_bytes()
    emb_local, emb_ray = np.load(local.file("item_emb.npy")), np.load(on_ray.file("item_emb.npy"))
    np.testing.assert_allclose(emb_ray, emb_local, rtol=0, atol=TOL)
    assert _without_timings(on_ray.manifest["evaluation"]) == _without_timings(local.manifest["evaluation"])
    assert on_ray.manifest["index"] == local.manifest["index"]
    assert [s["shard"] for s in on_ray.manifest["index"]["shards"]] == ["0/2", "1/2"]
    queries = np.ascontiguousarray(emb_local[1:] + 0.1, dtype=np.float32)
    scores_l, ids_l = faiss.read_index(str(local.file("items.faiss"))).search(queries, 10)
    scores_r, ids_r = faiss.read_index(str(on_ray.file("items.faiss"))).search(queries, 10)
    assert np.array_equal(ids_r, ids_l) and (ids_r > 0).all()
    np.testing.assert_allclose(scores_r, scores_l, rtol=0, atol=TOL)
