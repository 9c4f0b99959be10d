"""run_export end to end on a small synthetic generic-layout dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from exporter.config import ExportConfig
from exporter.pipeline import run_export
from exporter.synth import generate
from recsys_common.bundle import open_bundle, sha256_file
from recsys_common.features import BASE_FEATURES, DENSE_FEATURES, ItemTables

FILES = {
    "items.json",
    "item_emb.npy",
    "items.faiss",
    "user_tower.onnx",
    "ranker.onnx",
    "popularity.npy",
    "covisit.npz",
    "item_features.npy",
    "ease.npz",
}


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("synth")
    generate(data, n_users=80, n_items=60, n_clusters=4, events_per_user=(8, 25), seed=3)
    return data


@pytest.fixture(scope="module")
def exported(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, ExportConfig]:
    data = synth_data
    bundles = tmp_path_factory.mktemp("bundles")
    config = ExportConfig.tiny(eval_protocols=("loo", "replay"))
    version = run_export(config, data, bundles, progress=False)
    return bundles, version, config


def test_bundle_opens_and_files_match_manifest(exported) -> None:  # type: ignore[no-untyped-def]
    bundles, version, _ = exported
    bundle = open_bundle(bundles)
    assert bundle.version == version
    assert set(bundle.manifest["files"]) == FILES
    for name, meta in bundle.manifest["files"].items():
        assert sha256_file(bundle.path / name) == meta["sha256"]
        assert (bundle.path / name).stat().st_size == meta["bytes"]


def test_manifest_dims_and_schemas(exported) -> None:  # type: ignore[no-untyped-def]
    bundles, _, config = exported
    bundle = open_bundle(bundles)
    m = bundle.manifest
    items = json.loads(bundle.file("items.json").read_text())
    n = len(items["item_ids"])
    assert m["data"]["n_items"] == n and m["index"]["ntotal"] == n
    assert m["history_len"] == config.history_len
    assert m["embedding"] == {"dim": config.tt_dim, "metric": "inner_product"}
    emb = np.load(bundle.file("item_emb.npy"))
    assert emb.shape == (n + 1, config.tt_dim) and emb.dtype == np.float32 and not emb[0].any()
    ut = m["models"]["user_tower"]
    assert ut["inputs"] == [{"name": "history", "dtype": "int64", "shape": ["batch", config.history_len]}]
    assert ut["outputs"] == [{"name": "user_vec", "dtype": "float32", "shape": ["batch", config.tt_dim]}]
    assert ut["parity"]["ok"] and m["models"]["ranker"]["parity"]["ok"]
    assert [i["name"] for i in m["models"]["ranker"]["inputs"]] == ["history", "candidates", "dense"]
    tables = ItemTables.load(bundle)
    assert tables.covisit.indptr.shape == (n + 2,)
    assert tables.item_features.shape[0] == n + 1
    assert m["features"]["dense"] == list(DENSE_FEATURES) == list(tables.dense_features)
    assert tables.ease is not None and tables.ease.indptr.shape == (n + 2,) and (tables.ease.scores > 0).all()
    assert m["features"]["ease"] == {"lambda": config.ease_lambda, "top_m": config.ease_top_m}
    assert tables.ease_decay == m["features"]["ease_recency_decay"] == config.ease_recency_decay
    assert next(i for i in m["models"]["ranker"]["inputs"] if i["name"] == "dense")["shape"][-1] == tables.n_dense
    for protocol in ("loo", "replay"):
        for model in ("most_pop", "two_tower", "two_tower+ranker"):
            assert 0.0 <= m["evaluation"][protocol][model]["hr"] <= 1.0


def test_bundle_models_run_in_onnxruntime(exported) -> None:  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    from recsys_common.features import covisit_candidates, merge_sources, pad_history, popular_candidates, ranker_feed

    bundles, _, config = exported
    bundle = open_bundle(bundles)
    tables = ItemTables.load(bundle)
    history = np.array([1, 2, 3], dtype=np.int64)
    ut = ort.InferenceSession(str(bundle.file("user_tower.onnx")))
    user_vec = ut.run(["user_vec"], {"history": pad_history(history, config.history_len)})[0]
    cov, _ = covisit_candidates(tables, history, 10, history)
    pop, _ = popular_candidates(tables, 5, history)
    cands, mask = merge_sources([np.array([4, 5]), cov, pop])
    ranker = ort.InferenceSession(str(bundle.file("ranker.onnx")))
    score = ranker.run(["score"], ranker_feed(tables, history, cands, mask, user_vec))[0]
    assert score.shape == (1, cands.size) and np.isfinite(score).all()


def test_export_is_deterministic(exported, synth_data: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bundles, _, config = exported
    first = open_bundle(bundles).manifest
    second = open_bundle(tmp_path, run_export(config, synth_data, tmp_path, progress=False)).manifest
    assert {k: v["sha256"] for k, v in first["files"].items()} == {k: v["sha256"] for k, v in second["files"].items()}
    assert first["evaluation"]["loo"]["two_tower+ranker"] == second["evaluation"]["loo"]["two_tower+ranker"]


def test_export_without_an_ease_table_serves_the_base_features(synth_data: Path, tmp_path: Path) -> None:
    from ranking_svc.core import Candidates, Ranker

    run_export(ExportConfig.tiny(ease_top_m=0), synth_data, tmp_path, progress=False)
    bundle = open_bundle(tmp_path)
    assert "ease.npz" not in bundle.manifest["files"] and "ease" not in bundle.manifest["features"]
    assert bundle.manifest["features"]["dense"] == list(BASE_FEATURES)
    ranker = Ranker(bundle)
    assert ranker.tables.ease is None and ranker.tables.dense_features == BASE_FEATURES
    ids = ranker.catalog.item_ids
    assert np.isfinite(ranker.rank(ids[:3], Candidates.of([(i, ("ann",)) for i in ids[3:20]]))).all()
