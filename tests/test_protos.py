"""The committed stubs must equal what protos/gen.py makes from the .proto files today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENERATED = sorted((ROOT / "protos/recsys/v1").glob("*_pb2*.py*"))


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "protos/gen.py"), str(tmp_path)], check=True)
    fresh = sorted((tmp_path / "protos/recsys/v1").glob("*_pb2*.py*"))
    assert [p.name for p in fresh] == [p.name for p in GENERATED]
    for committed in GENERATED:
        regenerated = tmp_path / "protos/recsys/v1" / committed.name
        assert regenerated.read_bytes() == committed.read_bytes(), f"{committed.name} drifted: run protos/gen.py"


def test_every_proto_has_its_stubs() -> None:
    protos = sorted(p.stem for p in (ROOT / "protos/recsys/v1").glob("*.proto"))
    assert protos == ["common", "gateway", "ranking", "retrieval"]
    for stem in protos:
        assert (ROOT / f"protos/recsys/v1/{stem}_pb2.py").exists()
