"""A tiny, hand-built bundle for core and server tests: no torch, no training, known answers.

Items 1..n fall in two planted clusters along the first two axes; the user tower is the mean of the
history's item embeddings and the ranker scores dense[..., 0] (the retrieval score) plus a small
co-visitation term, both written as plain ONNX graphs with onnx.helper.
"""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from recsys_common.bundle import BundleWriter
from recsys_common.features import DENSE_FEATURES, SOURCES

DIM = 8
HISTORY_LEN = 5
OPSET = 18


def item_embeddings(n_items: int, seed: int = 0) -> np.ndarray:
    """(n + 1, DIM) float32; odd items lean to axis 0, even items to axis 1; row 0 is padding."""
    rng = np.random.default_rng(seed)
    emb = rng.normal(0, 0.1, size=(n_items + 1, DIM)).astype(np.float32)
    emb[1::2, 0] += 1.0
    emb[2::2, 1] += 1.0
    emb[0] = 0
    return emb


def _user_tower(emb: np.ndarray) -> onnx.ModelProto:
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
        [helper.make_tensor_value_info("user_vec", TensorProto.FLOAT, ["batch", DIM])],
        initializer=[
            numpy_helper.from_array(emb, "emb"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
            numpy_helper.from_array(np.array(0, dtype=np.int64), "zero"),
            numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def _ranker(n_dense: int) -> onnx.ModelProto:
    weights = np.zeros((n_dense, 1), dtype=np.float32)
    weights[DENSE_FEATURES.index("retrieval_score"), 0] = 1.0
    weights[DENSE_FEATURES.index("covisit_history"), 0] = 0.01
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


def make_bundle(bundles_dir: Path, n_items: int = 40, seed: int = 0) -> str:
    """Publish a tiny bundle into bundles_dir and return its version."""
    emb = item_embeddings(n_items, seed)
    item_ids = [f"i{i:03d}" for i in range(1, n_items + 1)]
    genres = [["Odd"] if i % 2 else ["Even"] for i in range(1, n_items + 1)]
    popularity = np.concatenate([[0.0], np.arange(n_items, 0, -1)]).astype(np.float32)  # item 1 most popular
    # Co-visitation: each item's neighbours are the next two items of the same parity.
    indptr, indices, scores = [0, 0], [], []
    for i in range(1, n_items + 1):
        row = [j for j in (i + 2, i + 4) if j <= n_items]
        indices += row
        scores += [2.0, 1.0][: len(row)]
        indptr.append(indptr[-1] + len(row))
    item_features = np.stack([np.log1p(popularity)], axis=1).astype(np.float32)
    n_dense = len(DENSE_FEATURES) + item_features.shape[1]

    writer = BundleWriter(bundles_dir)
    out = writer.staging
    (out / "items.json").write_text(
        json.dumps({"item_ids": item_ids, "titles": [f"Item {i}" for i in item_ids], "genres": genres})
    )
    np.save(out / "item_emb.npy", emb)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(DIM))
    index.add_with_ids(emb[1:], np.arange(1, n_items + 1, dtype=np.int64))
    faiss.write_index(index, str(out / "items.faiss"))
    onnx.save(_user_tower(emb), out / "user_tower.onnx")
    onnx.save(_ranker(n_dense), out / "ranker.onnx")
    np.save(out / "popularity.npy", popularity)
    np.savez(
        out / "covisit.npz",
        indptr=np.array(indptr, dtype=np.int64),
        indices=np.array(indices, dtype=np.int32),
        scores=np.array(scores, dtype=np.float32),
    )
    np.save(out / "item_features.npy", np.concatenate([np.zeros((1, 1), np.float32), item_features[1:]]))
    hist = [{"name": "history", "dtype": "int64", "shape": ["batch", HISTORY_LEN]}]
    return writer.publish(
        {
            "history_len": HISTORY_LEN,
            "embedding": {"dim": DIM, "metric": "inner_product"},
            "index": {"type": "Flat", "factory": "IDMap2,Flat", "params": {}, "ntotal": n_items},
            "models": {
                "user_tower": {"file": "user_tower.onnx", "opset": OPSET, "inputs": hist},
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
        }
    )
