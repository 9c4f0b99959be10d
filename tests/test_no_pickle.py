"""Nothing from a bundle is ever unpickled or read from outside it: a scan of the code for pickle and its
relatives, a bundle carrying a pickle payload, and ONNX external-data references."""

from __future__ import annotations

import ast
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from recsys_common.bundle import BundleWriter, open_bundle, set_current
from recsys_common.errors import BundleMismatch
from recsys_common.features import ItemTables
from recsys_common.onnx_external import external_references
from recsys_common.snapshot import SnapshotHolder
from tests.bundle_factory import make_bundle

ROOT = Path(__file__).resolve().parent.parent
SKIP_DIRS = {".venv", ".git", "node_modules", "build", "dist", ".hypothesis", "__pycache__", "var"}
# Modules that deserialize arbitrary objects (marshal: code objects; shelve, joblib, dill, cloudpickle: pickle).
UNPICKLERS = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


_FALSE = ast.Constant(False)


def _is_literal(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def unpickling_sites(source: str, filename: str = "<string>") -> list[str]:
    """Every place in source that imports an unpickler or loads data in a way that may unpickle."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names if a.name.split(".")[0] in UNPICKLERS]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in UNPICKLERS:
                found.append(f"{where} from {node.module} import ...")
            if node.module == "torch" and any(a.name == "load" for a in node.names):
                found.append(f"{where} from torch import load")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            kwargs = {k.arg: k.value for k in node.keywords}
            if name.endswith("read_pickle"):
                found.append(f"{where} {name}()")
            elif name == "torch.load" and not _is_literal(kwargs.get("weights_only"), True):
                found.append(f"{where} torch.load() without weights_only=True")
            elif name in ("np.load", "numpy.load") and not _is_literal(kwargs.get("allow_pickle", _FALSE), False):
                found.append(f"{where} {name}(allow_pickle=...)")
    return found


def python_files() -> list[Path]:
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith(".")]  # pruned, never walked
        found += [Path(folder) / f for f in files if f.endswith(".py")]
    return sorted(found)


def test_the_scanner_finds_each_pattern() -> None:
    bad = {
        "import pickle": "import pickle",
        "import cloudpickle as cp": "import cloudpickle",
        "from pickle import loads": "from pickle import",
        "from joblib import load": "from joblib import",
        "from torch import load": "from torch import load",
        "torch.load('m.pt')": "without weights_only=True",
        "torch.load('m.pt', weights_only=False)": "without weights_only=True",
        "np.load('a.npy', allow_pickle=True)": "np.load(allow_pickle=...)",
        "numpy.load('a.npy', allow_pickle=flag)": "numpy.load(allow_pickle=...)",
        "pd.read_pickle('x')": "pd.read_pickle()",
    }
    for source, finding in bad.items():
        sites = unpickling_sites(source)
        assert len(sites) == 1 and finding in sites[0], (source, sites)
    ok = "np.load('a.npy')\nnp.load('a.npz', allow_pickle=False)\ntorch.load('m.pt', weights_only=True)\nimport json"
    assert unpickling_sites(ok) == []


def test_no_code_in_the_repository_can_unpickle() -> None:
    files = python_files()
    assert len(files) > 50 and any(p.name == "bundle.py" for p in files)  # the scan saw the code
    found = [site for p in files for site in unpickling_sites(p.read_text(), str(p.relative_to(ROOT)))]
    assert found == []


class Payload:
    """Unpickling this creates a marker file: proof that something was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (Path.touch, (self.marker,))


def test_a_pickle_payload_in_a_bundle_is_refused_and_never_runs(tmp_path: Path) -> None:
    """A valid, checksummed bundle whose popularity.npy is an object array: the loader refuses it unread."""
    marker = tmp_path / "pwned"
    bundles = tmp_path / "bundles"
    good = make_bundle(bundles)
    evil = make_bundle(bundles, seed=1, make_current=False)
    folder = bundles / evil
    np.save(folder / "popularity.npy", np.array([Payload(marker)], dtype=object), allow_pickle=True)
    # Re-pin the checksum, as an attacker who can write the manifest would (signatures are what stop that).
    manifest = json.loads((folder / "manifest.json").read_text())
    data = (folder / "popularity.npy").read_bytes()
    manifest["files"]["popularity.npy"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    holder: SnapshotHolder[ItemTables] = SnapshotHolder(bundles, ItemTables.load, poll_interval_s=0)
    assert holder.load_current()
    set_current(bundles, evil)  # it verifies: the manifest matches every file
    assert not holder.load_current(raise_errors=False)
    assert "allow_pickle=False" in holder.refused[evil] and holder.version == good
    assert not marker.exists()


# -- ONNX external data -------------------------------------------------------------------------------------
def _model_with_external(location: str) -> onnx.ModelProto:
    """y = x + w, w (4,) float32 stored externally at location."""
    w = numpy_helper.from_array(np.zeros(4, np.float32), "w")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        initializer=[w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _publish_model(bundles: Path, location: str, with_weights: bool = True) -> str:
    writer = BundleWriter(bundles)
    onnx.save(_model_with_external(location), writer.staging / "model.onnx")
    if with_weights:
        (writer.staging / "weights.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    return writer.publish({}, make_current=False)


def test_onnx_external_data_must_be_a_file_the_manifest_pins(tmp_path: Path) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.full(4, 7, np.float32).tobytes())
    bundles = tmp_path / "bundles"
    inside = _publish_model(bundles, "weights.bin")
    bundle = open_bundle(bundles, inside)
    session = ort.InferenceSession(str(bundle.file("model.onnx")), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.ones(4, np.float32)})[0].tolist() == [1, 2, 3, 4]
    for location in ("../../secret.bin", str(secret), "model.onnx", "missing.bin", "sub/weights.bin"):
        version = _publish_model(bundles, location)
        with pytest.raises(BundleMismatch, match=f"keeps its data in '{location}', which is not a file listed"):
            open_bundle(bundles, version)


def test_external_references_are_found_in_subgraphs_too(tmp_path: Path) -> None:
    const = numpy_helper.from_array(np.zeros(2, np.float32), "c")
    const.data_location = TensorProto.EXTERNAL
    entry = const.external_data.add()
    entry.key, entry.value = "location", "/etc/passwd"
    branch = helper.make_graph(
        [helper.make_node("Constant", [], ["z"], value=const, name="hidden")],
        "branch",
        [],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])],
    )
    outer = helper.make_graph(
        [helper.make_node("If", ["cond"], ["z"], then_branch=branch, else_branch=branch, name="if")],
        "outer",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(outer, opset_imports=[helper.make_opsetid("", 18)])
    refs = external_references(model.SerializeToString())
    assert refs == [
        ("node 'if' attribute 'else_branch' subgraph: node 'hidden' attribute 'value'", "/etc/passwd"),
        ("node 'if' attribute 'then_branch' subgraph: node 'hidden' attribute 'value'", "/etc/passwd"),
    ]
    tiny = make_bundle(tmp_path)
    for name in ("user_tower.onnx", "ranker.onnx"):  # what the bundle factory (and the exporter) write: self-contained
        path = tmp_path / tiny / name
        assert external_references(path.read_bytes()) == []
        onnx.checker.check_model(str(path))
