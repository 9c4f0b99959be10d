"""Loading MovieLens 100K and the generic CSV layout, and the errors for malformed input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from exporter.config import ExportConfig
from exporter.data import DataError, load_dataset
from tests.conftest import ml100k_dir


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_generic_layout_loads_rows_in_file_order(tmp_path: Path) -> None:
    _write(tmp_path / "interactions.csv", "user_id,item_id,timestamp,rating\nu1,i2,20,5\nu2,i1,10,3\nu1,i1,30,4\n")
    _write(tmp_path / "items.csv", "item_id,title,genres,year\ni1,One,Comedy|Drama,1999\ni2,Two,,2001\n")
    ds = load_dataset(tmp_path)
    assert ds.user_ids.tolist() == ["u1", "u2", "u1"]
    assert ds.item_ids.tolist() == ["i2", "i1", "i1"]
    assert ds.timestamps.dtype == np.int64 and ds.timestamps.tolist() == [20, 10, 30]
    assert ds.titles == {"i1": "One", "i2": "Two"}
    assert ds.genres["i1"] == ("Comedy", "Drama") and ds.genres["i2"] == ()
    assert ds.genre_names == ("Comedy", "Drama")
    assert len(ds.fingerprint()) == 64
    assert ds.fingerprint() == load_dataset(tmp_path).fingerprint()


def test_missing_column_names_file_and_line(tmp_path: Path) -> None:
    _write(tmp_path / "interactions.csv", "user_id,item_id\nu1,i1\n")
    with pytest.raises(DataError, match=r"interactions\.csv, line 1: missing column\(s\) timestamp"):
        load_dataset(tmp_path)


def test_bad_timestamp_names_file_line_and_column(tmp_path: Path) -> None:
    _write(tmp_path / "interactions.csv", "user_id,item_id,timestamp\nu1,i1,5\nu1,i2,yesterday\n")
    with pytest.raises(DataError, match=r"interactions\.csv, line 3, column 'timestamp': 'yesterday'"):
        load_dataset(tmp_path)


def test_empty_files_are_errors(tmp_path: Path) -> None:
    _write(tmp_path / "interactions.csv", "")
    with pytest.raises(DataError, match="empty file"):
        load_dataset(tmp_path)
    _write(tmp_path / "interactions.csv", "user_id,item_id,timestamp\n")
    with pytest.raises(DataError, match="no interaction rows"):
        load_dataset(tmp_path)


def test_unknown_layout_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="neither u.data"):
        load_dataset(tmp_path)


def test_movielens_100k_loads_completely() -> None:
    ds = load_dataset(ml100k_dir())
    assert len(ds) == 100_000
    assert np.unique(ds.user_ids).size == 943 and np.unique(ds.item_ids).size == 1682
    assert ds.timestamps.min() == 874724710 and ds.timestamps.max() == 893286638
    assert len(ds.genre_names) == 19 and ds.genre_names[0] == "unknown"
    assert ds.genres["1"] == ("Animation", "Children's", "Comedy")
    assert "Mis" in ds.titles["1512"] or any("é" in t for t in ds.titles.values())


def test_config_rejects_unknown_keys(tmp_path: Path) -> None:
    path = _write(tmp_path / "cfg.json", json.dumps({"tt_epochs": 2, "tt_epoch": 3}))
    with pytest.raises(ValueError, match="unknown ExportConfig key.*tt_epoch"):
        ExportConfig.from_json(path)
    cfg = ExportConfig.from_dict({"tt_epochs": 2, "eval_protocols": ["loo"], "ranker_hidden": [8]})
    assert cfg.tt_epochs == 2 and cfg.eval_protocols == ("loo",) and cfg.ranker_hidden == (8,)
    assert ExportConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown protocol"):
        ExportConfig(eval_protocols=("kfold",))
