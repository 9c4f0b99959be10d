"""Design invariants: no serving module imports torch, and the import floors flow one way."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVING = ["retrieval_svc", "ranking_svc", "gateway", "recsys_common", "protos"]


@pytest.mark.parametrize(
    "module",
    [
        "retrieval_svc.server",
        "ranking_svc.server",
        "gateway.server",
        "recsys_common.features",
        "recsys_cli.main",
        "recsys_cli.stack",
    ],
)
def test_serving_modules_do_not_import_torch(module: str) -> None:
    code = f"import sys, {module}; bad = [m for m in ('torch', 'onnx', 'exporter') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def _imports(package: str) -> set[str]:
    found = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("recsys_common", {"torch", "onnx", "faiss", "onnxruntime", "fastapi", "exporter", "gateway", "recsys_cli"}),
        ("retrieval_svc", {"torch", "onnx", "exporter", "gateway", "ranking_svc", "recsys_cli"}),
        ("ranking_svc", {"torch", "onnx", "exporter", "gateway", "retrieval_svc", "recsys_cli"}),
        ("gateway", {"torch", "onnx", "exporter", "retrieval_svc", "ranking_svc", "recsys_cli"}),
        ("exporter", {"gateway", "retrieval_svc", "ranking_svc", "recsys_cli"}),
    ],
)
def test_imports_flow_one_way(package: str, forbidden: set[str]) -> None:
    assert not _imports(package) & forbidden
