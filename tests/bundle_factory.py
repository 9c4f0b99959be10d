"""A tiny, hand-built bundle for core and server tests: no torch, no training, known answers.

Items 1..n fall in two planted clusters along the first two axes; the user tower is the mean of the
history's item embeddings and the ranker scores the retrieval score plus a small co-visitation term (and,
with ease=True, an EASE term), both written as plain ONNX graphs with onnx.helper.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from exporter import ann_index
from recsys_common.bundle import BundleWriter
from recsys_common.features import SOURCES, dense_features_for

DIM = 8
HISTORY_LEN = 5
OPSET = 18
# The ranker graph's weights: score = retrieval_score + 0.01 * covisit_history (+ 0.1 * ease_history).
RANKER_WEIGHTS = {"retrieval_score": 1.0, "covisit_history": 0.01, "ease_history": 0.1}


def item_embeddings(n_items: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    """(n + 1, dim) float32; odd items lean to axis 0, even items to axis 1; row 0 is padding."""
    rng = np.random.default_rng(seed)
    emb = rng.normal(0, 0.1, size=(n_items + 1, dim)).astype(np.float32)
    emb[1::2, 0] += 1.0
    emb[2::2, 1] += 1.0
    emb[0] = 0
    return emb


def clustered_vectors(n: int, dim: int, n_clusters: int, noise: float = 1.0, seed: int = 0) -> np.ndarray:
    """(n, dim) float32 unit vectors around n_clusters random centres: not random, still a challenge for ANN.

    Items and users drawn from the same call share the clusters, as trained two-tower embeddings do.
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, n_clusters, size=n)]
    x += (noise / np.sqrt(dim)) * rng.normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _user_tower(emb: np.ndarray) -> onnx.ModelProto:
    dim = emb.shape[1]
    nodes = [
        helper.make_node("Gather", ["emb", "history"], ["gathered"], axis=0),  # (B, L, D)
        helper.make_node("ReduceSum", ["gathered", "axis1"], ["summed"], keepdims=0),  # (B, D)
        helper.make_node("Greater", ["history", "zero"], ["is_item"]),
        helper.make_node("Cast", ["is_item"], ["is_item_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["is_item_f", "axis1"], ["count"], keepdims=1),  # (B, 1)
        helper.make_node("Max", ["count", "one"], ["count1"]),
        helper.make_node("Div", ["summed", "count1"], ["user_vec"]),
    ]
    graph = helper.make_graph(
        nodes,
        "user_tower",
        [helper.make_tensor_value_info("history", TensorProto.INT64, ["batch", HISTORY_LEN])],
        [helper.make_tensor_value_info("user_vec", TensorProto.FLOAT, ["batch", dim])],
        initializer=[
            numpy_helper.from_array(emb, "emb"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
            numpy_helper.from_array(np.array(0, dtype=np.int64), "zero"),
            numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def _ranker(dense_features: Sequence[str], n_dense: int) -> onnx.ModelProto:
    weights = np.zeros((n_dense, 1), dtype=np.float32)
    for name, weight in RANKER_WEIGHTS.items():
        if name in dense_features:
            weights[list(dense_features).index(name), 0] = weight
    nodes = [
        helper.make_node("MatMul", ["dense", "w"], ["s3"]),  # (B, C, 1)
        helper.make_node("Squeeze", ["s3", "axis2"], ["score"]),
    ]
    graph = helper.make_graph(
        nodes,
        "ranker",
        [
            helper.make_tensor_value_info("history", TensorProto.INT64, ["batch", HISTORY_LEN]),
            helper.make_tensor_value_info("candidates", TensorProto.INT64, ["batch", "cands"]),
            helper.make_tensor_value_info("dense", TensorProto.FLOAT, ["batch", "cands", n_dense]),
        ],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", "cands"])],
        initializer=[
            numpy_helper.from_array(weights, "w"),
            numpy_helper.from_array(np.array([2], dtype=np.int64), "axis2"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def _save_neighbours(path: Path, n_items: int, steps: tuple[int, ...], weights: tuple[float, ...]) -> None:
    """An item-item CSR table (covisit.npz layout): item i's neighbours are i + steps[k], weighing weights[k]."""
    indptr, indices, scores = [0, 0], [], []
    for i in range(1, n_items + 1):
        row = [i + step for step in steps if i + step <= n_items]
        indices += row
        scores += list(weights[: len(row)])
        indptr.append(indptr[-1] + len(row))
    np.savez(
        path,
        indptr=np.array(indptr, dtype=np.int64),
        indices=np.array(indices, dtype=np.int32),
        scores=np.array(scores, dtype=np.float32),
    )


def make_bundle(
    bundles_dir: Path,
    n_items: int = 40,
    seed: int = 0,
    *,
    dim: int = DIM,
    emb: np.ndarray | None = None,
    index: str = "Flat",
    index_params: dict[str, Any] | None = None,
    unavailable: Sequence[str] | None = None,
    make_current: bool = True,
    prebuilt: tuple[faiss.Index, dict[str, Any]] | None = None,
    ease: bool = False,
    dense_features: Sequence[str] | None = None,
    ranker_dense: int | None = None,
) -> str:
    """Publish a tiny bundle into bundles_dir and return its version.

    emb: (n + 1, dim) embeddings to use instead of the planted two clusters (row 0 padding).
    index: "Flat", "HNSW" or "IVF" (built with exporter.ann_index; index_params override the build and
    search parameters, e.g. {"nlist": 16, "nprobe": 4} or {"M": 16, "efSearch": 32}).
    unavailable: item ids to write to unavailable.json (items that must never be returned).
    prebuilt: (index, manifest "index" entry) from exporter.ann_index.choose_and_build, used as is.
    ease: also write ease.npz (item i's EASE weights: 0.5 for i + 1, 0.25 for i + 3) and declare the ranker's
    dense features in the manifest (features.dense, default recsys_common.features.dense_features_for(ease)).
    dense_features: declare these instead (e.g. an older bundle's list); ranker_dense: the ranker graph's dense
    width instead of the declared features' (a mismatched bundle). Without any of the three the manifest has no
    features section, as the bundles made before it had none.
    """
    if emb is None:
        emb = item_embeddings(n_items, seed, dim)
    n_items, dim = emb.shape[0] - 1, emb.shape[1]
    item_ids = [f"i{i:03d}" for i in range(1, n_items + 1)]
    genres = [["Odd"] if i % 2 else ["Even"] for i in range(1, n_items + 1)]
    popularity = np.concatenate([[0.0], np.arange(n_items, 0, -1)]).astype(np.float32)  # item 1 most popular
    item_features = np.stack([np.log1p(popularity)], axis=1).astype(np.float32)
    declared = list(dense_features) if dense_features is not None else list(dense_features_for(ease))
    n_dense = ranker_dense if ranker_dense is not None else len(declared) + item_features.shape[1]

    writer = BundleWriter(bundles_dir)
    out = writer.staging
    (out / "items.json").write_text(
        json.dumps({"item_ids": item_ids, "titles": [f"Item {i}" for i in item_ids], "genres": genres})
    )
    np.save(out / "item_emb.npy", emb)
    spec = {
        "Flat": ann_index.flat_spec(),
        "HNSW": ann_index.IndexSpec("HNSW", "IDMap,HNSW16,Flat", {"M": 16, "efConstruction": 40, "efSearch": 32}),
        "IVF": ann_index.ivf_spec(n_items).with_params(nprobe=4),
    }[index].with_params(**(index_params or {}))
    if index == "HNSW":
        spec = replace(spec, factory=f"IDMap,HNSW{spec.params['M']},Flat")
    elif index == "IVF":
        spec = replace(spec, factory=f"IVF{spec.params['nlist']},{spec.params['encoding']}")
    built = prebuilt[0] if prebuilt else ann_index.build_index(emb[1:], spec)
    faiss.write_index(built, str(out / "items.faiss"))
    if unavailable is not None:
        (out / "unavailable.json").write_text(json.dumps({"item_ids": list(unavailable)}))
    onnx.save(_user_tower(emb), out / "user_tower.onnx")
    onnx.save(_ranker(declared, n_dense), out / "ranker.onnx")
    np.save(out / "popularity.npy", popularity)
    # Co-visitation: each item's neighbours are the next two items of the same parity.
    _save_neighbours(out / "covisit.npz", n_items, (2, 4), (2.0, 1.0))
    np.save(out / "item_features.npy", np.concatenate([np.zeros((1, 1), np.float32), item_features[1:]]))
    if ease:
        _save_neighbours(out / "ease.npz", n_items, (1, 3), (0.5, 0.25))
    features: dict[str, Any] = {}
    if ease or dense_features is not None or ranker_dense is not None:
        features = {"features": {"dense": declared, "ease_recency_decay": 0.5} if ease else {"dense": declared}}
    hist = [{"name": "history", "dtype": "int64", "shape": ["batch", HISTORY_LEN]}]
    return writer.publish(
        {
            "history_len": HISTORY_LEN,
            "embedding": {"dim": dim, "metric": "inner_product"},
            "index": prebuilt[1]
            if prebuilt
            else ann_index.manifest_entry(spec, n_items, recall=1.0 if index == "Flat" else 0.0, n_queries=0),
            "models": {
                "user_tower": {
                    "file": "user_tower.onnx",
                    "opset": OPSET,
                    "inputs": hist,
                    "outputs": [{"name": "user_vec", "dtype": "float32", "shape": ["batch", dim]}],
                },
                "ranker": {
                    "file": "ranker.onnx",
                    "opset": OPSET,
                    "inputs": [
                        *hist,
                        {"name": "candidates", "dtype": "int64", "shape": ["batch", "cands"]},
                        {"name": "dense", "dtype": "float", "shape": ["batch", "cands", n_dense]},
                    ],
                    "sources": list(SOURCES),
                },
            },
            "data": {"fingerprint": "test", "n_users": 0, "n_items": n_items, "n_interactions": 0},
            **features,
        },
        make_current=make_current,
    )
