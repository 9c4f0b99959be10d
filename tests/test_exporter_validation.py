"""Malformed input: every case is refused with a message naming the file, the line (or row) and the column."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from exporter.data import DataError, load_dataset

HEADER = "user_id,item_id,timestamp"
LONG = "x" * 257


def _text(name: str, text: str, encoding: str = "utf-8") -> Callable[[Path], None]:
    return lambda d: (d / name).write_bytes(text.encode(encoding))


def _bytes(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda d: (d / name).write_bytes(data)


def _parquet(name: str, columns: dict[str, pa.Array]) -> Callable[[Path], None]:
    return lambda d: pq.write_table(pa.table(columns), d / name)


def _both(*writers: Callable[[Path], None]) -> Callable[[Path], None]:
    def write(d: Path) -> None:
        for w in writers:
            w(d)

    return write


GOOD_CSV = _text("interactions.csv", f"{HEADER}\nu1,i1,1\n")

# (case id, files to write, the DataError message expected: a regex, searched)
CASES: list[tuple[str, Callable[[Path], None], str]] = [
    ("csv-missing-column", _text("interactions.csv", "user_id,item_id\nu1,i1\n"),
     r"interactions\.csv, line 1: missing column\(s\) timestamp \(header: user_id, item_id\)"),
    ("csv-duplicate-column", _text("interactions.csv", f"{HEADER},item_id\nu1,i1,1,i2\n"),
     r"interactions\.csv, line 1: duplicate column\(s\) item_id"),
    ("csv-extra-field", _text("interactions.csv", f"{HEADER}\nu1,i1,1\nu1,i2,2,oops\n"),
     r"interactions\.csv, line 3: expected 3 fields \(user_id, item_id, timestamp\), found 4"),
    ("csv-missing-field-after-blank-lines", _text("interactions.csv", f"{HEADER}\nu1,i1,1\n\n\nu2,i2\n"),
     r"interactions\.csv, line 5: expected 3 fields \(user_id, item_id, timestamp\), found 2"),
    ("csv-unparsable-timestamp", _text("interactions.csv", f"{HEADER}\nu1,i1,1\nu1,i2,5\nu2,i1,2024-13-45T00:00\n"),
     r"interactions\.csv, line 4, column 'timestamp': '2024-13-45T00:00' is neither integer epoch seconds "
     r"nor an ISO 8601 time"),
    ("csv-fractional-timestamp", _text("interactions.csv", f"{HEADER}\nu1,i1,1.5\n"),
     r"interactions\.csv, line 2, column 'timestamp': '1\.5' is neither integer"),
    ("csv-empty-timestamp", _text("interactions.csv", f"{HEADER}\nu1,i1,1\nu1,i2, \n"),
     r"interactions\.csv, line 3, column 'timestamp': missing"),
    # the record on lines 2-3 has a quoted newline, so the bad value is on line 4, not data row 2 + 1
    ("csv-line-after-multiline-record", _text("interactions.csv", f'{HEADER}\n"u\n1",i1,1\nu2,i2,later\n'),
     r"interactions\.csv, line 4, column 'timestamp': 'later'"),
    # rows dropped for a missing id must not shift the line numbers of later errors
    ("csv-line-after-dropped-rows", _text("interactions.csv", f"{HEADER}\n,i1,1\nu1,,2\nu2,i2,oops\n"),
     r"interactions\.csv, line 4, column 'timestamp': 'oops'"),
    ("csv-crlf-line-endings", _bytes("interactions.csv", b"user_id,item_id,timestamp\r\nu1,i1,1\r\n\r\nu2,i2,x\r\n"),
     r"interactions\.csv, line 4, column 'timestamp': 'x' is neither"),
    ("csv-rating-not-a-number", _text("interactions.csv", f"{HEADER},rating\nu1,i1,1,4\nu1,i2,2,five\n"),
     r"interactions\.csv, line 3, column 'rating': 'five' is not a number"),
    ("csv-rating-infinite", _text("interactions.csv", f"{HEADER},rating\nu1,i1,1,inf\n"),
     r"interactions\.csv, line 2, column 'rating': inf is not a finite number"),
    ("csv-user-id-too-long", _text("interactions.csv", f"{HEADER}\nu1,i1,1\n{LONG},i1,2\n"),
     r"interactions\.csv, line 3, column 'user_id': id of 257 characters is longer than 256 \('xxxx"),
    ("csv-not-utf8", _bytes("interactions.csv", f"{HEADER}\nu1,i1,1\nu\xe9,i1,2\n".encode("latin-1")),
     r"interactions\.csv, line 3: not valid UTF-8 \(byte 0xe9\)"),
    ("csv-empty-file", _text("interactions.csv", ""),
     r"interactions\.csv: empty file \(expected a header with user_id, item_id, timestamp\)"),
    ("csv-blank-file", _text("interactions.csv", "\n \n"), r"interactions\.csv: empty file"),
    ("csv-header-only", _text("interactions.csv", f"{HEADER}\n"), r"interactions\.csv: no interaction rows"),
    ("csv-every-row-dropped", _text("interactions.csv", f"{HEADER}\n,i1,1\nu1, ,2\n"),
     r"interactions\.csv: all 2 rows have an empty user_id or item_id"),
    ("parquet-missing-column", _parquet("interactions.parquet", {"user_id": pa.array(["u1"]),
                                                                 "item_id": pa.array(["i1"])}),
     r"interactions\.parquet: missing column\(s\) timestamp"),
    ("parquet-timestamp-wrong-type", _parquet("interactions.parquet", {
        "user_id": pa.array(["u1"]), "item_id": pa.array(["i1"]), "timestamp": pa.array([1.5])}),
     r"interactions\.parquet, column 'timestamp': type double, expected integer epoch seconds, ISO 8601 strings"),
    ("parquet-null-timestamp", _parquet("interactions.parquet", {
        "user_id": pa.array(["u1", "u2"]), "item_id": pa.array(["i1", "i2"]), "timestamp": pa.array([1, None])}),
     r"interactions\.parquet, row 2, column 'timestamp': missing timestamp"),
    ("parquet-iso-timestamp-unparsable", _parquet("interactions.parquet", {
        "user_id": pa.array(["u1", "u2", "u3"]), "item_id": pa.array(["i1", "i2", "i3"]),
        "timestamp": pa.array(["2024-01-01T00:00:00Z", "2024-01-02", "02/01/2024"])}),
     r"interactions\.parquet, row 3, column 'timestamp': '02/01/2024' is neither"),
    ("parquet-rating-not-a-number", _parquet("interactions.parquet", {
        "user_id": pa.array(["u1", "u2", "u3"]), "item_id": pa.array(["i1", "i2", "i3"]),
        "timestamp": pa.array([1, 2, 3]), "rating": pa.array(["4", "", "bad"])}),
     r"interactions\.parquet, row 3, column 'rating': 'bad' is not a number"),
    ("parquet-rating-wrong-type", _parquet("interactions.parquet", {
        "user_id": pa.array(["u1"]), "item_id": pa.array(["i1"]), "timestamp": pa.array([1]),
        "rating": pa.array([True])}),
     r"interactions\.parquet, column 'rating': type bool, expected numbers"),
    ("parquet-item-id-too-long", _parquet("interactions.parquet", {
        "user_id": pa.array(["u1", "u2"]), "item_id": pa.array(["i1", "y" * 300]), "timestamp": pa.array([1, 2])}),
     r"interactions\.parquet, row 2, column 'item_id': id of 300 characters is longer than 256"),
    ("parquet-fractional-float-id", _parquet("interactions.parquet", {
        "user_id": pa.array([1.0, 2.5]), "item_id": pa.array(["i1", "i2"]), "timestamp": pa.array([1, 2])}),
     r"interactions\.parquet, row 2, column 'user_id': 2\.5 is not an integer id"),
    ("parquet-id-wrong-type", _parquet("interactions.parquet", {
        "user_id": pa.array([b"u1"]), "item_id": pa.array(["i1"]), "timestamp": pa.array([1])}),
     r"interactions\.parquet, column 'user_id': type binary, expected string or integer ids"),
    ("parquet-event-type-wrong-type", _parquet("interactions.parquet", {
        "user_id": pa.array(["u1"]), "item_id": pa.array(["i1"]), "timestamp": pa.array([1]),
        "event_type": pa.array([3])}),
     r"interactions\.parquet, column 'event_type': type int64, expected strings"),
    ("parquet-no-rows", _parquet("interactions.parquet", {
        "user_id": pa.array([], pa.string()), "item_id": pa.array([], pa.string()),
        "timestamp": pa.array([], pa.int64())}),
     r"interactions\.parquet: no interaction rows"),
    ("parquet-empty-file", _bytes("interactions.parquet", b""), r"interactions\.parquet: empty file"),
    ("parquet-not-parquet", _bytes("interactions.parquet", b"user_id,item_id,timestamp\nu1,i1,1\n"),
     r"interactions\.parquet: not a readable Parquet file"),
    ("csv-and-parquet", _both(GOOD_CSV, _bytes("interactions.parquet", b"x")),
     r"both interactions\.csv and interactions\.parquet found; keep one"),
    ("items-missing-column", _both(GOOD_CSV, _text("items.csv", "item_id,title\ni1,One\n")),
     r"items\.csv, line 1: missing column\(s\) genres"),
    ("items-id-too-long", _both(GOOD_CSV, _text("items.csv", f"item_id,title,genres\ni1,One,A\n{LONG},Two,B\n")),
     r"items\.csv, line 3, column 'item_id': id of 257 characters"),
    ("items-genres-wrong-type", _both(GOOD_CSV, _parquet("items.parquet", {
        "item_id": pa.array(["i1"]), "title": pa.array(["One"]), "genres": pa.array([7])})),
     r"items\.parquet, column 'genres': type int64, expected 'A\|B' strings or lists of strings"),
    ("ml100k-bad-timestamp-after-blank-line", _text("u.data", "1\t2\t3\t881250949\n\n1\t3\t4\tabc\n"),
     r"u\.data, line 3, column 'timestamp': 'abc' is neither"),
    ("ml100k-short-line", _text("u.data", "1\t2\t3\t881250949\n1\t3\n"),
     r"u\.data, line 2: expected 4 fields \(user_id, item_id, rating, timestamp\), found 2"),
    ("ml1m-short-line", _text("ratings.dat", "1::1193::5::978300760\n1::661::3\n"),
     r"ratings\.dat, line 2: expected 4 fields \(user_id, item_id, rating, timestamp\), found 3"),
    ("ml1m-bad-rating", _text("ratings.dat", "1::1193::5::978300760\n1::661::x::978302109\n"),
     r"ratings\.dat, line 2, column 'rating': 'x' is not a number"),
    ("ml1m-movies-short-line", _both(_text("ratings.dat", "1::1193::5::978300760\n"),
                                     _text("movies.dat", "1193::One Flew (1975)::Drama\n1194::Broken\n")),
     r"movies\.dat, line 2: expected 3 fields \(item_id::title::genres\)"),
    ("ml1m-empty", _text("ratings.dat", "\n"), r"ratings\.dat: empty file"),
]  # fmt: skip


@pytest.mark.parametrize(("write", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_input_is_refused_with_file_line_and_column(
    tmp_path: Path, write: Callable[[Path], None], expected: str
) -> None:
    write(tmp_path)
    with pytest.raises(DataError, match=expected) as info:
        load_dataset(tmp_path)
    assert str(tmp_path) in str(info.value)  # the full path of the file, not only its name


def test_there_are_at_least_ten_malformed_cases() -> None:
    assert len(CASES) >= 10 and len({c[0] for c in CASES}) == len(CASES)


def test_missing_directory_and_unknown_layout(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope: no such directory"):
        load_dataset(tmp_path / "nope")
    (tmp_path / "ratings.csv").write_text(f"{HEADER}\nu1,i1,1\n")
    with pytest.raises(DataError, match=r"neither u\.data .* ratings\.dat .* nor interactions\.csv"):
        load_dataset(tmp_path)
