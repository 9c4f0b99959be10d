"""The offline exporter: trains the two-tower retriever and the ranker, evaluates them and publishes a bundle.

This is the only package that imports torch; services import nothing from it.
"""

import os
from pathlib import Path

# Threads that sleep instead of spinning between parallel regions: on a shared 2-core machine spinning
# OpenMP workers of torch made a training epoch 4-5x slower (measured 103 s vs 22 s under load). libgomp
# reads this once, when torch is first imported, so it is set here, before any exporter module imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from exporter.config import ExportConfig  # noqa: E402
from exporter.data import DataError, Dataset, load_dataset  # noqa: E402

__all__ = ["DataError", "Dataset", "ExportConfig", "load_dataset", "run_export"]


def run_export(config: ExportConfig, data_dir: Path, bundles_dir: Path, progress: bool = True) -> str:
    """Train, evaluate, export and publish a bundle; returns its version (see exporter.pipeline.run_export).

    Imported lazily so that `import exporter` (config, data loading) does not load torch.
    """
    from exporter.pipeline import run_export as _run_export

    return _run_export(config, data_dir, bundles_dir, progress)
