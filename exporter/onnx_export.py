"""ONNX export of the user tower and the ranker, with parity gates against torch and a latency probe."""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import torch

from exporter.models import Ranker, TwoTower, UserTowerExport


class ParityError(RuntimeError):
    """An exported graph disagrees with torch beyond tolerance: the bundle must not be published."""


@dataclass(frozen=True)
class ParityReport:
    max_abs_diff: float
    rows: int
    tolerance: float

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.max_abs_diff) and self.max_abs_diff <= self.tolerance)

    def as_dict(self) -> dict[str, Any]:
        return {"max_abs_diff": self.max_abs_diff, "rows": self.rows, "tolerance": self.tolerance, "ok": self.ok}


def _export(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_shapes: tuple[dict[int, Any], ...],
    opset: int,
) -> None:
    module.eval()
    # The exporter logs one warning per missing torchvision op; they are irrelevant here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    program.save(str(path))
    onnx.checker.check_model(str(path))


def export_user_tower(model: TwoTower, path: Path, history_len: int, opset: int) -> None:
    """user_tower.onnx: "history" int64 (batch, L) -> "user_vec" float32 (batch, D)."""
    wrapper = UserTowerExport(model).eval()
    example = torch.zeros((2, history_len), dtype=torch.int64)
    example[:, -1] = 1
    batch = torch.export.Dim("batch", min=1, max=65536)
    _export(wrapper, (example,), path, ["history"], ["user_vec"], ({0: batch},), opset)


def export_ranker(model: Ranker, path: Path, history_len: int, n_dense: int, opset: int) -> None:
    """ranker.onnx: history (batch, L), candidates (batch, C), dense (batch, C, F) -> "score" (batch, C)."""
    model.eval()
    example = (
        torch.ones((1, history_len), dtype=torch.int64),
        torch.ones((1, 3), dtype=torch.int64),
        torch.zeros((1, 3, n_dense), dtype=torch.float32),
    )
    batch = torch.export.Dim("batch", min=1, max=65536)
    cands = torch.export.Dim("candidates", min=1, max=1 << 20)
    shapes = ({0: batch}, {0: batch, 1: cands}, {0: batch, 1: cands})
    _export(model, example, path, ["history", "candidates", "dense"], ["score"], shapes, opset)


def session(path: Path, threads: int = 1) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@torch.no_grad()
def user_tower_parity(model: TwoTower, path: Path, histories: npt.NDArray[np.int64], tol: float) -> ParityReport:
    """Max |torch - ORT| over the given histories (include length-1 ones: padded attention is the risk)."""
    wrapper = UserTowerExport(model).eval()
    expected = wrapper(torch.from_numpy(histories)).numpy()
    got = session(path, threads=2).run(["user_vec"], {"history": histories})[0]
    return ParityReport(float(np.max(np.abs(expected - got))) if len(histories) else 0.0, len(histories), tol)


@torch.no_grad()
def ranker_parity(model: Ranker, path: Path, feeds: list[dict[str, npt.NDArray[Any]]], tol: float) -> ParityReport:
    """Max |torch - ORT| over per-user feeds as the ranking service sends them (batch of one)."""
    sess = session(path, threads=2)
    worst, rows = 0.0, 0
    for feed in feeds:
        expected = model(*(torch.from_numpy(feed[k]) for k in ("history", "candidates", "dense"))).numpy()
        got = sess.run(["score"], feed)[0]
        worst = max(worst, float(np.max(np.abs(expected - got))))
        rows += expected.size
    return ParityReport(worst, rows, tol)


def latency_ms(path: Path, feed: dict[str, npt.NDArray[Any]], repeats: int = 200) -> dict[str, float]:
    """p50/p99 wall ms of one ORT call on one thread (the services' setting)."""
    sess = session(path, threads=1)
    for _ in range(10):
        sess.run(None, feed)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t) * 1000)
    return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99))}


def io_schema(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Input/output names, dtypes and shapes (symbolic dims by name) for the manifest."""
    model = onnx.load(str(path), load_external_data=False)

    def describe(values: Any) -> list[dict[str, Any]]:
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims})
        return out

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


def quantize_ranker(src: Path, dst: Path) -> None:
    """Dynamic int8 quantization of ranker.onnx (weights int8, activations quantized per call).

    Only MatMul/Gemm are quantized: the embedding Gathers stay fp32 (quantizing them saves memory, not time).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger("root").setLevel(logging.ERROR)  # the quantizer suggests pre-processing on every call
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])


def ort_ranker_scores(
    sess: ort.InferenceSession,
    histories: npt.NDArray[np.int64],
    candidates: list[npt.NDArray[np.int64]],
    dense: list[npt.NDArray[np.float32]],
) -> list[npt.NDArray[np.float32]]:
    """Per-case ONNX Runtime scores (C_e,), one request per case as the ranking service sends them."""
    out = []
    for i, (c, d) in enumerate(zip(candidates, dense, strict=True)):
        feed = {"history": histories[i : i + 1], "candidates": c[None], "dense": d[None]}
        out.append(np.asarray(sess.run(["score"], feed)[0], dtype=np.float32)[0])
    return out


def ship_int8_if_harmless(
    path: Path, feed: dict[str, npt.NDArray[Any]], ndcg_drops: dict[str, float], max_drop: float
) -> dict[str, Any]:
    """Replace ranker.onnx at path by its int8 form when every measured NDCG@k drop is <= max_drop.

    ndcg_drops come from the evaluation protocols (fp32 minus int8 ranker on the same cases); with none
    measured the fp32 graph stays. Returns the manifest's `quantization` record either way.
    """
    int8 = path.with_name(path.stem + ".int8.tmp.onnx")
    quantize_ranker(path, int8)
    fp32_ms, int8_ms = latency_ms(path, feed), latency_ms(int8, feed)
    got_fp32 = session(path).run(["score"], feed)[0]
    got_int8 = session(int8).run(["score"], feed)[0]
    kept = bool(ndcg_drops) and all(d <= max_drop for d in ndcg_drops.values())
    if kept:
        int8.replace(path)
    else:
        int8.unlink()
    return {
        "method": "onnxruntime.quantization.quantize_dynamic (QInt8 weights, MatMul/Gemm)",
        "int8": kept,
        "ndcg_drop": ndcg_drops,
        "max_ndcg_drop": max_drop,
        "latency_fp32": fp32_ms,
        "latency_int8": int8_ms,
        "candidates": int(feed["candidates"].shape[1]),
        "max_abs_score_diff_int8_vs_fp32": float(np.max(np.abs(got_fp32 - got_int8))),
    }
