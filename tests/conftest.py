"""Shared fixtures: a tiny hand-built bundle, free ports, and the real-data location."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.bundle_factory import make_bundle

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_bundles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundles directory with one published tiny bundle (see bundle_factory)."""
    path = tmp_path_factory.mktemp("tiny-bundles")
    make_bundle(path)
    return path


def ml100k_dir() -> Path:
    """MovieLens 100K from ../shared/data (or RECSYS_ML100K). Under CI a missing copy fails, never skips."""
    path = Path(os.environ.get("RECSYS_ML100K", ROOT.parent / "shared" / "data" / "ml-100k"))
    if not (path / "u.data").exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"MovieLens 100K is required under CI and was not found at {path}")
        pytest.skip(f"MovieLens 100K not found at {path} (set RECSYS_ML100K)")
    return path
