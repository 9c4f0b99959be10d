"""Checking raw interaction columns (Arrow arrays from CSV or Parquet) and cleaning them into Dataset arrays.

The fast path stays vectorized (Arrow casts, dictionary codes, one lexsort); per-value Python runs only
for ISO 8601 timestamps (once per distinct value) and to locate the first bad value for an error.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

# The serving stack's limit (gateway.core.MAX_ID_LEN): an id it rejects could never be requested or recommended.
MAX_ID_LEN = 256
KNOWN_COLUMNS = ("user_id", "item_id", "timestamp", "rating", "event_type")
_INTEGER = re.compile(r"[+-]?[0-9]+")


class DataError(ValueError):
    """Input data is malformed; the message names the file, line (or row) and column."""


@dataclass(frozen=True)
class Rows:
    """Where a table's rows came from, to name them in errors: file lines (CSV) or data rows (Parquet)."""

    path: Path
    line_of: Callable[[int], int] | None  # data row index -> line number; None: Parquet, named "row N" from 1
    index: npt.NDArray[np.int64] | None = None  # after dropping rows: their positions among the file's rows

    def at(self, i: int, column: str) -> str:
        """`path, line L, column 'c'` for the i-th row of the (possibly filtered) table."""
        j = i if self.index is None else int(self.index[i])
        where = f"row {j + 1}" if self.line_of is None else f"line {self.line_of(j)}"
        return f"{self.path}, {where}, column {column!r}"

    def keep(self, positions: npt.NDArray[np.int64]) -> Rows:
        return Rows(self.path, self.line_of, positions if self.index is None else self.index[positions])


def _plain(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_dictionary(arr.type):  # pandas categoricals
        arr = arr.dictionary_decode()
    if pa.types.is_large_string(arr.type):
        arr = arr.cast(pa.string())
    return arr


def _first(mask: pa.Array) -> int:
    return int(np.flatnonzero(pc.fill_null(mask, False).to_numpy(zero_copy_only=False))[0])


def _wrong_type(rows: Rows, column: str, kind: pa.DataType, expected: str) -> DataError:
    return DataError(f"{rows.path}, column {column!r}: type {kind}, expected {expected}")


def id_column(col: pa.ChunkedArray, rows: Rows, column: str) -> pa.Array:
    """Trimmed string ids, "" where missing; integer (and integral float) ids become their decimal text."""
    arr = _plain(col)
    kind = arr.type
    if pa.types.is_integer(kind):
        arr = arr.cast(pa.string())
    elif pa.types.is_floating(kind):  # pandas writes integer ids with gaps as float64
        values = arr.to_numpy(zero_copy_only=False)
        missing = np.isnan(values)
        bad = np.flatnonzero(~missing & ((values != np.floor(values)) | np.isinf(values)))
        if bad.size:
            raise DataError(f"{rows.at(int(bad[0]), column)}: {float(values[bad[0]])!r} is not an integer id")
        arr = pa.array(np.where(missing, 0, values).astype(np.int64), mask=missing).cast(pa.string())
    elif pa.types.is_string(kind):
        arr = pc.utf8_trim_whitespace(arr)
    else:
        raise _wrong_type(rows, column, kind, "string or integer ids")
    arr = pc.fill_null(arr, "")
    lengths = pc.utf8_length(arr)
    if (pc.max(lengths).as_py() or 0) > MAX_ID_LEN:
        i = _first(pc.greater(lengths, MAX_ID_LEN))
        value = arr[i].as_py()
        raise DataError(
            f"{rows.at(i, column)}: id of {len(value)} characters is longer than {MAX_ID_LEN} ({value[:40]!r}...)"
        )
    return arr


def string_column(col: pa.ChunkedArray, rows: Rows, column: str, trim: bool = True) -> pa.Array:
    """Strings ("" where missing), trimmed unless trim is false."""
    arr = _plain(col)
    if not pa.types.is_string(arr.type):
        raise _wrong_type(rows, column, arr.type, "strings")
    return pc.fill_null(pc.utf8_trim_whitespace(arr) if trim else arr, "")


def genre_lists(col: pa.ChunkedArray, rows: Rows) -> list[tuple[str, ...]]:
    """Genres per row from `A|B` strings or (Parquet) lists of strings."""
    arr = _plain(col)
    if pa.types.is_string(arr.type):
        return [tuple(g.strip() for g in v.split("|") if g.strip()) if v else () for v in arr.to_pylist()]
    if (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)) and pa.types.is_string(arr.type.value_type):
        return [tuple(g.strip() for g in v if g and g.strip()) if v else () for v in arr.to_pylist()]
    raise _wrong_type(rows, "genres", arr.type, "'A|B' strings or lists of strings")


def _epoch_seconds(text: str) -> int | None:
    """Integer epoch seconds, or an ISO 8601 time (naive ones are UTC) floored to seconds; None if neither."""
    if _INTEGER.fullmatch(text):
        value = int(text)
        return value if -(2**63) <= value < 2**63 else None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return math.floor(moment.timestamp())


def timestamp_column(col: pa.ChunkedArray, rows: Rows) -> npt.NDArray[np.int64]:
    """(N,) epoch seconds from integers, ISO 8601 strings, or Parquet timestamps/dates."""
    arr = _plain(col)
    kind = arr.type
    if arr.null_count:
        raise DataError(f"{rows.at(_first(pc.is_null(arr)), 'timestamp')}: missing timestamp")
    try:
        if pa.types.is_integer(kind):
            return np.asarray(arr.cast(pa.int64()).to_numpy(), dtype=np.int64)
        if pa.types.is_timestamp(kind) or pa.types.is_date(kind):
            seconds = pc.cast(arr, pa.timestamp("s"), safe=False).cast(pa.int64())
            return np.asarray(seconds.to_numpy(), dtype=np.int64)
    except pa.ArrowInvalid as exc:
        raise DataError(f"{rows.path}, column 'timestamp': {exc}") from None
    if not pa.types.is_string(kind):
        raise _wrong_type(rows, "timestamp", kind, "integer epoch seconds, ISO 8601 strings or timestamps")
    text = pc.utf8_trim_whitespace(arr)
    try:
        return np.asarray(pc.cast(text, pa.int64()).to_numpy(), dtype=np.int64)
    except pa.ArrowInvalid:
        pass  # ISO 8601 times, or an error to locate
    # Dictionary order is first-appearance order, so the first bad value found is the first bad row.
    encoded = text.dictionary_encode()
    values = encoded.dictionary.to_pylist()
    seconds = np.empty(len(values), dtype=np.int64)
    for k, value in enumerate(values):
        parsed = _epoch_seconds(value)
        if parsed is None:
            problem = f"{value!r} is neither integer epoch seconds nor an ISO 8601 time" if value else "missing"
            raise DataError(f"{rows.at(_first(pc.equal(encoded.indices, k)), 'timestamp')}: {problem}")
        seconds[k] = parsed
    return seconds[encoded.indices.to_numpy()]


def rating_column(col: pa.ChunkedArray, rows: Rows) -> npt.NDArray[np.float64]:
    """(N,) ratings as float64, NaN where missing."""
    arr = _plain(col)
    kind = arr.type
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        values = arr.cast(pa.float64()).to_numpy(zero_copy_only=False)
    elif pa.types.is_string(kind):
        text = pc.utf8_trim_whitespace(arr)
        text = pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)
        try:
            values = pc.cast(text, pa.float64()).to_numpy(zero_copy_only=False)
        except pa.ArrowInvalid:  # Python's float() decides, and names the first value it refuses
            values = np.full(len(text), np.nan)
            for i, value in enumerate(text.to_pylist()):
                try:
                    values[i] = float(value) if value else np.nan
                except ValueError:
                    raise DataError(f"{rows.at(i, 'rating')}: {value!r} is not a number") from None
    else:
        raise _wrong_type(rows, "rating", kind, "numbers")
    values = np.asarray(values, dtype=np.float64)
    if np.isinf(values).any():
        i = int(np.flatnonzero(np.isinf(values))[0])
        raise DataError(f"{rows.at(i, 'rating')}: {values[i]} is not a finite number")
    return values


def _codes(col: pa.ChunkedArray | pa.Array) -> npt.NDArray[np.int64]:
    """Equal values get equal integer codes (nulls -1): the sort keys for finding duplicate rows."""
    arr = _plain(col)
    try:
        return np.asarray(pc.fill_null(arr.dictionary_encode().indices, -1).to_numpy(), dtype=np.int64)
    except pa.ArrowNotImplementedError:  # e.g. list columns
        return np.unique(np.array([repr(v) for v in arr.to_pylist()]), return_inverse=True)[1].astype(np.int64)


def first_occurrences(keys: list[npt.NDArray[np.generic]]) -> npt.NDArray[np.bool_]:
    """(N,) True for the first row (file order) of every group of rows equal in all keys."""
    n = len(keys[0])
    order = np.lexsort(keys[::-1])  # stable: within a group of equal rows the earliest comes first
    same = np.ones(max(n - 1, 0), dtype=bool)
    for key in keys:
        ranked = key[order]
        same &= ranked[1:] == ranked[:-1]
    keep = np.ones(n, dtype=bool)
    keep[order[1:][same]] = False
    return keep


def _strings(encoded: pa.DictionaryArray) -> npt.NDArray[np.str_]:
    return np.asarray(encoded.dictionary.to_pylist(), dtype=np.str_)[encoded.indices.to_numpy()]


@dataclass(frozen=True)
class Interactions:
    """The clean rows of an interactions table, in file order, and what cleaning took out."""

    user_ids: npt.NDArray[np.str_]  # (N,)
    item_ids: npt.NDArray[np.str_]  # (N,)
    timestamps: npt.NDArray[np.int64]  # (N,) epoch seconds
    ratings: npt.NDArray[np.float64] | None  # (N,), NaN where missing; None without a rating column
    event_types: npt.NDArray[np.str_] | None  # (N,); None without an event_type column
    dropped_missing_id: int
    duplicates_removed: int


def clean_interactions(table: pa.Table, rows: Rows) -> Interactions:
    """The checked rows of a raw interactions table, with missing-id rows dropped and exact duplicates removed.

    Rows with an empty user_id or item_id are dropped (and not checked further); then rows equal in
    every column (after parsing: ids trimmed, timestamps in seconds) keep only their first occurrence.
    """
    n = table.num_rows
    if n == 0:
        raise DataError(f"{rows.path}: no interaction rows")
    users = id_column(table["user_id"], rows, "user_id")
    items = id_column(table["item_id"], rows, "item_id")
    present = pc.and_(pc.not_equal(users, ""), pc.not_equal(items, ""))
    n_present = int(pc.sum(present).as_py() or 0)
    if n_present == 0:
        raise DataError(f"{rows.path}: all {n} rows have an empty user_id or item_id")
    if n_present < n:
        rows = rows.keep(np.flatnonzero(present.to_numpy(zero_copy_only=False)))
        table, users, items = table.filter(present), users.filter(present), items.filter(present)
    stamps = timestamp_column(table["timestamp"], rows)
    ratings = rating_column(table["rating"], rows) if "rating" in table.column_names else None
    events = string_column(table["event_type"], rows, "event_type") if "event_type" in table.column_names else None

    user_enc, item_enc = users.dictionary_encode(), items.dictionary_encode()
    keys: list[npt.NDArray[np.generic]] = [user_enc.indices.to_numpy(), item_enc.indices.to_numpy(), stamps]
    if ratings is not None:
        keys.append(np.unique(ratings, return_inverse=True)[1])  # NaNs share one code
    if events is not None:
        keys.append(_codes(events))
    keys += [_codes(table[c]) for c in table.column_names if c not in KNOWN_COLUMNS]
    unique = first_occurrences(keys)
    return Interactions(
        _strings(user_enc)[unique],
        _strings(item_enc)[unique],
        stamps[unique],
        None if ratings is None else ratings[unique],
        None if events is None else _strings(events.dictionary_encode())[unique],
        dropped_missing_id=n - n_present,
        duplicates_removed=int(unique.size - unique.sum()),
    )
