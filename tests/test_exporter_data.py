"""Loading MovieLens 100K and the generic CSV layout, and the errors for malformed input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

import gateway.core as gateway_core
from exporter.config import ExportConfig
from exporter.data import MAX_ID_LEN, DataError, LoadReport, load_dataset
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


def test_iso_8601_and_epoch_timestamps_agree(tmp_path: Path) -> None:
    _write(
        tmp_path / "interactions.csv",
        "user_id,item_id,timestamp\n"
        "u1,i1,1704067200\nu1,i2,2024-01-01T00:00:00Z\nu1,i3,2024-01-01T01:00:00+01:00\n"
        "u1,i4,2024-01-01 00:00:00\nu1,i5,2024-01-01T00:00:00.900\nu1,i6, 2023-12-31T23:59:59-00:00 \n",
    )
    assert load_dataset(tmp_path).timestamps.tolist() == [1704067200] * 5 + [1704067199]


def test_missing_ids_are_dropped_and_exact_duplicates_removed_and_counted(tmp_path: Path) -> None:
    _write(
        tmp_path / "interactions.csv",
        "\ufeffuser_id, item_id ,timestamp,rating,event_type,session\n"
        "007,i1,10,4,click,s1\n"
        ",i1,11,4,click,s1\n"  # missing user: dropped
        "u2,  ,12,4,click,s1\n"  # blank item: dropped
        " 007 ,i1,10,4.0,click,s1\n"  # the first row again once parsed: removed
        "007,i1,10,5,click,s1\n"  # another rating: kept
        "007,i1,10,4,view,s1\n"  # another event type: kept
        "007,i1,10,4,click,s2\n"  # another value in an extra column: kept
        "u2,i2,1970-01-01T00:00:20Z,,view,s1\n"
        "u2,i2,20,,view,s1\n",  # the row above again (same time, both ratings missing): removed
    )
    ds = load_dataset(tmp_path)
    assert ds.user_ids.tolist() == ["007"] * 4 + ["u2"]  # leading zeros kept, whitespace trimmed
    assert ds.item_ids.tolist() == ["i1"] * 4 + ["i2"]
    assert ds.timestamps.tolist() == [10, 10, 10, 10, 20]
    assert ds.ratings is not None and ds.ratings[:4].tolist() == [4.0, 5.0, 4.0, 4.0] and np.isnan(ds.ratings[4])
    assert ds.event_types is not None and ds.event_types.tolist() == ["click", "click", "view", "click", "view"]
    summary = ds.summary()
    assert {k: summary[k] for k in ("format", "rows_read", "dropped_missing_id", "duplicates_removed")} == {
        "format": "csv",
        "rows_read": 9,
        "dropped_missing_id": 2,
        "duplicates_removed": 2,
    }
    assert summary["n_interactions"] == 5 and summary["source"] == "generic"
    kept = ds.subset(ds.event_types == "view")
    assert kept.ratings is not None and len(kept.ratings) == 2 and kept.report == ds.report


def test_parquet_layout_with_typed_columns(tmp_path: Path) -> None:
    when = pa.array([1_000_500, 2_000_000, 3_000_000, 3_000_000, 4_000_000], pa.timestamp("ms", tz="Europe/Paris"))
    table = pa.table(
        {
            "user_id": pa.array([1, 2, 1, 1, None], pa.int64()),
            "item_id": pa.array(["a", "b", "c", "c", "d"]),
            "timestamp": when,
            "rating": pa.array([4.5, None, 3.0, 3.0, 1.0]),
            "event_type": pa.array(["rate", "view", "rate", "rate", "rate"]).dictionary_encode(),
        }
    )
    pq.write_table(table, tmp_path / "interactions.parquet", row_group_size=2)  # several chunks
    items = pa.table(
        {
            "item_id": ["a", None, "c"],
            "title": ["A", "Nobody", None],
            "genres": pa.array([["Drama", " Comedy "], ["X"], None], pa.list_(pa.string())),
            "year": [1999, 2000, 2001],
        }
    )
    pq.write_table(items, tmp_path / "items.parquet")
    ds = load_dataset(tmp_path)
    assert ds.user_ids.tolist() == ["1", "2", "1"] and ds.item_ids.tolist() == ["a", "b", "c"]
    assert ds.timestamps.tolist() == [1000, 2000, 3000]  # UTC epoch seconds, milliseconds floored
    assert ds.ratings is not None and ds.ratings[[0, 2]].tolist() == [4.5, 3.0] and np.isnan(ds.ratings[1])
    assert ds.event_types is not None and ds.event_types.tolist() == ["rate", "view", "rate"]
    assert ds.titles == {"a": "A", "c": ""} and ds.genres == {"a": ("Drama", "Comedy"), "c": ()}
    assert ds.genre_names == ("Comedy", "Drama")
    assert ds.report == LoadReport("parquet", 5, 1, 1, item_rows_read=3, item_rows_dropped_missing_id=1)


def test_movielens_1m_layout(tmp_path: Path) -> None:
    (tmp_path / "ratings.dat").write_bytes(
        b"1::1193::5::978300760\r\n1::661::3::978302109\r\n2::1193::4::978298413\r\n1::661::3::978302109\r\n"
    )
    (tmp_path / "movies.dat").write_bytes(
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n661::James and the Giant Peach (1996)::"
        "Animation|Children's|Musical\n2::Les Misérables (1995)::Drama\n".encode("latin-1")
    )
    ds = load_dataset(tmp_path)
    assert ds.source == "ml-1m" and ds.user_ids.tolist() == ["1", "1", "2"]
    assert ds.item_ids.tolist() == ["1193", "661", "1193"]
    assert ds.timestamps.tolist() == [978300760, 978302109, 978298413]
    assert ds.ratings is not None and ds.ratings.tolist() == [5.0, 3.0, 4.0]
    assert ds.titles["2"] == "Les Misérables (1995)" and ds.genres["661"] == ("Animation", "Children's", "Musical")
    assert ds.genre_names == ("Animation", "Children's", "Drama", "Musical")
    assert ds.report == LoadReport("ml-1m", 4, 0, 1, item_rows_read=3)


def test_ids_up_to_the_serving_limit_are_accepted(tmp_path: Path) -> None:
    assert MAX_ID_LEN == gateway_core.MAX_ID_LEN  # the exporter must not accept ids the gateway refuses
    longest = "é" * MAX_ID_LEN  # characters, not bytes
    _write(tmp_path / "interactions.csv", f"user_id,item_id,timestamp\n{longest},i1,1\n")
    assert load_dataset(tmp_path).user_ids.tolist() == [longest]


def test_movielens_100k_reads_the_same_in_every_layout(tmp_path: Path) -> None:
    """The real data through u.data, the generic CSV and Parquet layouts: same rows, same fingerprint."""
    ml = load_dataset(ml100k_dir())
    assert ml.report == LoadReport("ml-100k", 100_000, 0, 0, item_rows_read=1682)
    assert ml.ratings is not None and set(np.unique(ml.ratings).tolist()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    columns = {"user_id": ml.user_ids, "item_id": ml.item_ids, "timestamp": ml.timestamps, "rating": ml.ratings}
    table = pa.table({k: pa.array(v.tolist()) for k, v in columns.items()})
    (tmp_path / "csv").mkdir()
    (tmp_path / "parquet").mkdir()
    pacsv.write_csv(table, tmp_path / "csv" / "interactions.csv")
    pq.write_table(table, tmp_path / "parquet" / "interactions.parquet")
    for layout in ("csv", "parquet"):
        ds = load_dataset(tmp_path / layout)
        assert ds.fingerprint() == ml.fingerprint()
        assert ds.ratings is not None and np.array_equal(ds.ratings, ml.ratings)
        assert ds.report == LoadReport(layout, 100_000, 0, 0)
