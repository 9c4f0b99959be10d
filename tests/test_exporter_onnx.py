"""ONNX parity of the user tower and the ranker on real ML-100K histories, including length-1 ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from exporter.candidates import CandidatePlan, serving_candidates
from exporter.config import ExportConfig
from exporter.data import load_dataset
from exporter.fit import build_item_tables
from exporter.models import Ranker, TwoTower
from exporter.onnx_export import (
    export_ranker,
    export_user_tower,
    ranker_parity,
    session,
    ship_int8_if_harmless,
    user_tower_parity,
)
from exporter.pipeline import parity_histories
from exporter.sequences import Sequences, encode_items, item_vocabulary, last_histories
from exporter.tables import genre_multi_hot
from exporter.train import item_table, user_vectors
from recsys_common.features import DENSE_FEATURES, ranker_feed
from tests.conftest import ml100k_dir


@pytest.fixture(scope="module")
def ml100k() -> tuple[Sequences, int, np.ndarray]:
    ds = load_dataset(ml100k_dir())
    vocab = item_vocabulary(ds.item_ids)
    seqs = Sequences.build(ds.user_ids, encode_items(ds.item_ids, vocab), ds.timestamps)
    return seqs, len(vocab), genre_multi_hot(vocab, ds.genres, ds.genre_names)


def _two_tower(n_items: int, genres: np.ndarray, cfg: ExportConfig) -> TwoTower:
    torch.manual_seed(0)
    model = TwoTower(n_items, cfg.tt_dim, cfg.history_len, cfg.tt_layers, cfg.tt_heads, 0.0, torch.from_numpy(genres))
    return model.eval()


def test_user_tower_parity_on_real_histories(ml100k, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    seqs, n_items, genres = ml100k
    cfg = ExportConfig()
    model = _two_tower(n_items, genres, cfg)
    path = tmp_path / "user_tower.onnx"
    export_user_tower(model, path, cfg.history_len, cfg.opset)
    histories = parity_histories(seqs, 1200, cfg.history_len, seed=0)
    assert len(histories) >= 1000
    lengths = (histories > 0).sum(1)
    assert (lengths == 1).sum() >= 250 and (lengths == cfg.history_len).sum() >= 100
    report = user_tower_parity(model, path, histories, tol=1e-4)
    assert report.ok, report
    # Dynamic batch axis: one row and many rows both run.
    sess = session(path)
    assert sess.run(["user_vec"], {"history": histories[:1]})[0].shape == (1, cfg.tt_dim)
    assert sess.run(["user_vec"], {"history": histories[:7]})[0].shape == (7, cfg.tt_dim)


def test_ranker_parity_on_real_candidates(ml100k, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    seqs, n_items, genres = ml100k
    cfg = ExportConfig()
    retriever = _two_tower(n_items, genres, cfg)
    tables, names = build_item_tables(seqs, n_items, genres, item_table(retriever), cfg)
    n_dense = tables.n_dense  # the ease_* columns included: build_item_tables makes an EASE table
    assert n_dense == len(DENSE_FEATURES) + len(names)
    torch.manual_seed(1)
    ranker = Ranker(n_items, cfg.ranker_dim, cfg.history_len, n_dense, cfg.ranker_cross_layers, cfg.ranker_hidden)
    ranker.eval()
    path = tmp_path / "ranker.onnx"
    export_ranker(ranker, path, cfg.history_len, n_dense, cfg.opset)
    vecs = user_vectors(retriever, last_histories(seqs, cfg.history_len))
    feeds = []
    for u in range(4):
        cands, mask = serving_candidates(tables, seqs.user_seq(u), vecs[u], CandidatePlan())
        feeds.append(ranker_feed(tables, seqs.user_seq(u), cands, mask, vecs[u]))
    report = ranker_parity(ranker, path, feeds, tol=1e-4)
    assert report.rows >= 1000
    assert report.ok, report


def test_int8_ships_only_when_its_measured_ndcg_drop_is_small(tmp_path: Path) -> None:
    cfg = ExportConfig()
    n_items, n_dense = 50, len(DENSE_FEATURES) + 3
    torch.manual_seed(2)
    ranker = Ranker(n_items, cfg.ranker_dim, cfg.history_len, n_dense, cfg.ranker_cross_layers, cfg.ranker_hidden)
    rng = np.random.default_rng(0)
    feed = {
        "history": rng.integers(0, n_items + 1, size=(1, cfg.history_len)).astype(np.int64),
        "candidates": rng.integers(1, n_items + 1, size=(1, 40)).astype(np.int64),
        "dense": rng.normal(size=(1, 40, n_dense)).astype(np.float32),
    }
    path = tmp_path / "ranker.onnx"
    export_ranker(ranker.eval(), path, cfg.history_len, n_dense, cfg.opset)
    fp32_bytes = path.read_bytes()
    for drops, kept in (({}, False), ({"loo": 0.001, "replay": 0.02}, False), ({"loo": 0.001, "replay": -0.002}, True)):
        path.write_bytes(fp32_bytes)
        report = ship_int8_if_harmless(path, feed, drops, max_drop=0.005)
        assert report["int8"] is kept and report["ndcg_drop"] == drops
        assert (path.read_bytes() == fp32_bytes) is not kept
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ranker.onnx"]
    # The shipped int8 graph keeps the input schema and stays close to fp32 on these scores.
    sess = session(path)
    assert [i.name for i in sess.get_inputs()] == ["history", "candidates", "dense"]
    assert report["max_abs_score_diff_int8_vs_fp32"] < 0.1
