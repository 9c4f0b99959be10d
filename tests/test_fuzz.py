"""Schemathesis against the gateway's own OpenAPI document: no 5xx, answers match the schema,
invalid input is refused with a 4xx. Runs the real CLI against the three real processes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from recsys_cli.stack import Stack

MIN_CASES = 1000


def test_schemathesis_finds_no_server_errors(tiny_bundles: Path, tmp_path: Path) -> None:
    with Stack(tiny_bundles, tmp_path / "state", http_port=0, grpc_port=0) as stack:
        cmd = [
            str(Path(sys.executable).with_name("schemathesis")),
            "--config-file", str(Path(__file__).with_name("schemathesis.toml")),
            "run", f"{stack.http_url}/openapi.json",
            "--checks", "all",
            "--max-examples", "1000",
            "--seed", "20261127",
            "--request-timeout", "10",
        ]  # fmt: skip
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-2000:]
    generated = re.search(r"(\d+) generated", run.stdout)
    assert generated and int(generated.group(1)) >= MIN_CASES, run.stdout[-3000:]
