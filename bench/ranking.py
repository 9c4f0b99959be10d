"""Ranker latency: ONNX Runtime (fp32 and int8) against torch eager for the same model, in the same run.

    python bench/ranking.py [--bundles BUNDLES_DIR] [--repeats 300] [--out bench/out/ranking.json]

Builds the exporter's Ranker with the default ExportConfig sizes (catalogue size and dense-input
width from the published bundle when --bundles is given, an ML-100K export's otherwise), exports it with the
exporter's own ONNX path, quantizes that graph with onnxruntime.quantization.quantize_dynamic, and
times one user's request of 100, 500 and 2,000 candidates on 1 and 2 threads. The three engines run
interleaved call by call, so the ORT/torch ratios compare like with like on a noisy shared machine.
Weights are the initial ones: latency does not depend on their values (quality of int8 is measured
by the exporter on real data; see the manifest's `models.ranker.quantization`).
Prints a table and writes JSON and a PNG next to it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exporter.config import ExportConfig  # noqa: E402
from exporter.models import Ranker  # noqa: E402
from exporter.onnx_export import export_ranker, quantize_ranker  # noqa: E402
from recsys_common.features import DENSE_FEATURES  # noqa: E402

BATCHES = (100, 500, 2000)
THREADS = (1, 2)
ENGINES = ("torch", "ort_fp32", "ort_int8")


def _shape_from_bundle(bundles: Path | None) -> tuple[int, int]:
    """(n_items, width of the ranker's dense input) of the published bundle, or of an ML-100K export's."""
    if bundles is None:
        return 1682, len(DENSE_FEATURES) + 21
    from recsys_common.bundle import open_bundle
    from recsys_common.features import ItemTables

    tables = ItemTables.load(open_bundle(bundles))  # the dense features its manifest declares
    return tables.n_items, tables.n_dense


def _session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _feed(rng: np.random.Generator, n_items: int, history_len: int, n: int, n_dense: int) -> dict[str, np.ndarray]:
    return {
        "history": rng.integers(1, n_items + 1, size=(1, history_len)).astype(np.int64),
        "candidates": rng.choice(np.arange(1, n_items + 1), size=n, replace=n > n_items)[None].astype(np.int64),
        "dense": rng.normal(size=(1, n, n_dense)).astype(np.float32),
    }


def _stats(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"p50_ms": round(float(np.percentile(a, 50)), 4), "p99_ms": round(float(np.percentile(a, 99)), 4)}


def run(bundles: Path | None, repeats: int, seed: int) -> dict[str, Any]:
    config = ExportConfig()
    n_items, n_dense = _shape_from_bundle(bundles)
    torch.manual_seed(seed)
    model = Ranker(
        n_items, config.ranker_dim, config.history_len, n_dense, config.ranker_cross_layers, config.ranker_hidden
    ).eval()
    rng = np.random.default_rng(seed)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp) / "ranker.onnx", Path(tmp) / "ranker.int8.onnx"
        export_ranker(model, fp32, config.history_len, n_dense, config.opset)
        quantize_ranker(fp32, int8)
        for threads in THREADS:
            torch.set_num_threads(threads)
            sessions = {"ort_fp32": _session(fp32, threads), "ort_int8": _session(int8, threads)}
            for n in BATCHES:
                feed = _feed(rng, n_items, config.history_len, n, n_dense)
                args = tuple(torch.from_numpy(feed[k]) for k in ("history", "candidates", "dense"))
                calls = {
                    "torch": lambda a=args: model(*a),
                    "ort_fp32": lambda s=sessions["ort_fp32"], f=feed: s.run(["score"], f),
                    "ort_int8": lambda s=sessions["ort_int8"], f=feed: s.run(["score"], f),
                }
                times: dict[str, list[float]] = {e: [] for e in ENGINES}
                with torch.inference_mode():
                    for _ in range(20):
                        for call in calls.values():
                            call()
                    for _ in range(repeats):
                        for engine, call in calls.items():
                            t = time.perf_counter()
                            call()
                            times[engine].append((time.perf_counter() - t) * 1000)
                row: dict[str, Any] = {"threads": threads, "candidates": n}
                row.update({e: _stats(times[e]) for e in ENGINES})
                for e in ("ort_fp32", "ort_int8"):
                    row[f"{e}/torch_p50"] = round(row[e]["p50_ms"] / row["torch"]["p50_ms"], 3)
                    row[f"{e}/torch_p99"] = round(row[e]["p99_ms"] / row["torch"]["p99_ms"], 3)
                results.append(row)
    return {
        "model": {
            "n_items": n_items,
            "n_dense": n_dense,
            "dim": config.ranker_dim,
            "cross_layers": config.ranker_cross_layers,
            "hidden": list(config.ranker_hidden),
            "history_len": config.history_len,
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "repeats": repeats,
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "results": results,
    }


def format_table(report: dict[str, Any]) -> str:
    head = (
        f"{'thr':>3} {'cands':>5} | {'torch p50/p99':>15} | {'ORT fp32 p50/p99':>16} | {'ORT int8 p50/p99':>16} | "
        f"{'fp32/torch p50 p99':>18} | {'int8/torch p50 p99':>18}"
    )
    lines = [head, "-" * len(head)]
    for r in report["results"]:

        def pair(e: str, r: dict[str, Any] = r) -> str:
            return f"{r[e]['p50_ms']:.3f}/{r[e]['p99_ms']:.3f}"

        lines.append(
            f"{r['threads']:>3} {r['candidates']:>5} | {pair('torch'):>15} | {pair('ort_fp32'):>16} | "
            f"{pair('ort_int8'):>16} | {r['ort_fp32/torch_p50']:>8.2f} {r['ort_fp32/torch_p99']:>9.2f} | "
            f"{r['ort_int8/torch_p50']:>8.2f} {r['ort_int8/torch_p99']:>9.2f}"
        )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(THREADS), figsize=(10, 4), sharey=True)
    for ax, threads in zip(np.atleast_1d(axes), THREADS, strict=True):
        rows = [r for r in report["results"] if r["threads"] == threads]
        x = [r["candidates"] for r in rows]
        for e in ENGINES:
            ax.plot(x, [r[e]["p50_ms"] for r in rows], marker="o", label=f"{e} p50")
            ax.plot(x, [r[e]["p99_ms"] for r in rows], linestyle="--", alpha=0.6, label=f"{e} p99")
        ax.set(xscale="log", yscale="log", xlabel="candidates", title=f"{threads} thread(s)")
    np.atleast_1d(axes)[0].set_ylabel("ms per request")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundles", type=Path, default=None, help="take catalogue and feature sizes from here")
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/out/ranking.json"))
    args = parser.parse_args()
    report = run(args.bundles, args.repeats, args.seed)
    print(format_table(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    plot(report, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
