"""Loading interaction logs and item metadata: the generic CSV/Parquet layout and MovieLens 100K/1M.

Every layout is read into an Arrow table of raw columns and cleaned the same way (exporter/_columns.py):
ids are trimmed strings of at most MAX_ID_LEN characters, timestamps integer epoch seconds or ISO 8601,
rows with a missing id are dropped and exact duplicate rows removed, both counted in a LoadReport.
Errors name the file, the line (CSV, MovieLens) or data row (Parquet) and the column.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from exporter._columns import (
    MAX_ID_LEN,
    DataError,
    Rows,
    clean_interactions,
    genre_lists,
    id_column,
    string_column,
)

__all__ = ["MAX_ID_LEN", "DataError", "Dataset", "LoadReport", "load_dataset"]

ML100K_GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp")
ITEM_COLUMNS = ("item_id", "title", "genres")
ML_RATING_COLUMNS = ("user_id", "item_id", "rating", "timestamp")


@dataclass(frozen=True)
class LoadReport:
    """What loading read, dropped and removed: printed by the exporter and kept in the bundle manifest."""

    format: str  # csv | parquet | ml-100k | ml-1m
    rows_read: int
    dropped_missing_id: int = 0
    duplicates_removed: int = 0
    item_rows_read: int = 0
    item_rows_dropped_missing_id: int = 0

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Dataset:
    """Raw interaction rows in file order, plus item metadata keyed by external item id.

    File order matters: it breaks timestamp ties in every protocol and table.
    """

    user_ids: npt.NDArray[np.str_]  # (N,)
    item_ids: npt.NDArray[np.str_]  # (N,)
    timestamps: npt.NDArray[np.int64]  # (N,) epoch seconds
    titles: dict[str, str] = field(default_factory=dict, repr=False)
    genres: dict[str, tuple[str, ...]] = field(default_factory=dict, repr=False)
    genre_names: tuple[str, ...] = ()
    source: str = ""
    ratings: npt.NDArray[np.float64] | None = field(default=None, repr=False)  # (N,), NaN where absent
    event_types: npt.NDArray[np.str_] | None = field(default=None, repr=False)  # (N,), "" where absent
    report: LoadReport | None = None

    def __len__(self) -> int:
        return len(self.user_ids)

    def subset(self, mask: npt.NDArray[np.bool_]) -> Dataset:
        """The rows where mask is true, in file order, with the same metadata."""
        return dataclasses.replace(
            self,
            user_ids=self.user_ids[mask],
            item_ids=self.item_ids[mask],
            timestamps=self.timestamps[mask],
            ratings=None if self.ratings is None else self.ratings[mask],
            event_types=None if self.event_types is None else self.event_types[mask],
        )

    def fingerprint(self) -> str:
        """sha256 of the canonical rows `user\\titem\\ttimestamp\\n` in file order."""
        digest = hashlib.sha256()
        for start in range(0, len(self), 65536):
            stop = start + 65536
            rows = zip(self.user_ids[start:stop], self.item_ids[start:stop], self.timestamps[start:stop], strict=True)
            digest.update("".join(f"{u}\t{i}\t{t}\n" for u, i, t in rows).encode())
        return digest.hexdigest()

    def summary(self) -> dict[str, object]:
        """The manifest's "data" section: fingerprint, sizes, time range, and what loading dropped."""
        report = self.report or LoadReport(format="", rows_read=len(self))
        return {
            "fingerprint": self.fingerprint(),
            "n_users": int(np.unique(self.user_ids).size),
            "n_items": int(np.unique(self.item_ids).size),
            "n_interactions": len(self),
            "time_range": [int(self.timestamps.min()), int(self.timestamps.max())] if len(self) else [0, 0],
            "source": self.source,
            **report.as_dict(),
        }


def load_dataset(data_dir: Path) -> Dataset:
    """Load MovieLens 100K (`u.data`), MovieLens 1M (`ratings.dat`) or the generic layout.

    Generic: `interactions.csv` or `interactions.parquet` (user_id, item_id, timestamp; optional rating,
    event_type) and optionally `items.csv` or `items.parquet` (item_id, title, genres as `A|B` or a list).
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: no such directory")
    if (data_dir / "u.data").is_file():
        return _load_ml100k(data_dir)
    if (data_dir / "ratings.dat").is_file():
        return _load_ml1m(data_dir)
    interactions = _one_of(data_dir, "interactions")
    if interactions is None:
        raise DataError(
            f"{data_dir}: neither u.data (MovieLens 100K), ratings.dat (MovieLens 1M) "
            "nor interactions.csv / interactions.parquet (generic layout) found"
        )
    return _load_generic(data_dir, interactions)


def _one_of(data_dir: Path, stem: str) -> Path | None:
    found = [p for p in (data_dir / f"{stem}.csv", data_dir / f"{stem}.parquet") if p.is_file()]
    if len(found) > 1:
        raise DataError(f"{data_dir}: both {stem}.csv and {stem}.parquet found; keep one")
    return found[0] if found else None


def _check_columns(path: Path, where: str, names: list[str], required: tuple[str, ...]) -> None:
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"{path}{where}: duplicate column(s) {', '.join(dupes)}")
    missing = [c for c in required if c not in names]
    if missing:
        raise DataError(f"{path}{where}: missing column(s) {', '.join(missing)} (header: {', '.join(names)})")


def _check_not_empty(path: Path, required: tuple[str, ...]) -> None:
    with path.open("rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return
    raise DataError(f"{path}: empty file (expected a header with {', '.join(required)})")


def _csv_line_of(
    path: Path, encoding: str, skip_header: bool, delimiter: str = ",", quoting: int = csv.QUOTE_MINIMAL
) -> Callable[[int], int]:
    """Maps a data row index to the line its record starts on, reading the file again (errors only)."""

    def line_of(index: int) -> int:
        with path.open(newline="", encoding=encoding, errors="replace") as f:
            reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
            if skip_header:
                next(reader, None)
            previous, k = reader.line_num, 0
            for record in reader:
                start, previous = previous + 1, reader.line_num
                if record:  # blank lines are skipped, as the Arrow reader skips them
                    if k == index:
                        return start
                    k += 1
        raise IndexError(f"{path}: no data row {index}")

    return line_of


def _diagnose_csv(
    path: Path,
    data: bytes,
    names: list[str],
    encoding: str,
    skip_header: bool,
    delimiter: str = ",",
    quoting: int = csv.QUOTE_MINIMAL,
) -> None:
    """Finds why the Arrow reader refused path's data and raises a DataError naming the line (slow path)."""
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        name = "UTF-8" if encoding.startswith("utf-8") else encoding
        raise DataError(f"{path}, line {line}: not valid {name} (byte 0x{data[exc.start]:02x})") from None
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    previous = 0
    try:
        if skip_header:
            next(reader, None)
            previous = reader.line_num
        for record in reader:
            start, previous = previous + 1, reader.line_num
            if record and len(record) != len(names):
                raise DataError(
                    f"{path}, line {start}: expected {len(names)} fields ({', '.join(names)}), found {len(record)}"
                )
    except csv.Error as exc:
        raise DataError(f"{path}, line {reader.line_num}: {exc}") from None


def _read_csv(path: Path, required: tuple[str, ...]) -> tuple[pa.Table, Rows]:
    """A CSV file with a header, every column as strings (ids like `007` keep their zeros)."""
    _check_not_empty(path, required)
    with path.open("rb") as f:
        first_line = f.readline()
    try:
        header = next(csv.reader([first_line.decode("utf-8-sig")]), [])
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}, line 1: not valid UTF-8 (byte 0x{first_line[exc.start]:02x})") from None
    names = [h.strip() for h in header]
    _check_columns(path, ", line 1", names, required)
    try:
        table = pcsv.read_csv(
            path,
            read_options=pcsv.ReadOptions(column_names=names, skip_rows=1),
            parse_options=pcsv.ParseOptions(newlines_in_values=True),
            convert_options=pcsv.ConvertOptions(column_types=dict.fromkeys(names, pa.string())),
        )
    except pa.ArrowInvalid as exc:
        _diagnose_csv(path, path.read_bytes(), names, "utf-8-sig", skip_header=True)
        raise DataError(f"{path}: {exc}") from None
    return table, Rows(path, _csv_line_of(path, "utf-8-sig", skip_header=True))


def _read_parquet(path: Path, required: tuple[str, ...]) -> tuple[pa.Table, Rows]:
    """A Parquet file; its columns keep their types (checked by the column functions)."""
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (expected a Parquet table with {', '.join(required)})")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    _check_columns(path, "", table.column_names, required)
    return table, Rows(path, None)


def _read_table(path: Path, required: tuple[str, ...]) -> tuple[pa.Table, Rows]:
    return _read_parquet(path, required) if path.suffix == ".parquet" else _read_csv(path, required)


def _read_ml(path: Path, separator: str, names: tuple[str, ...]) -> tuple[pa.Table, Rows]:
    """A MovieLens ratings file: latin-1, no header, no quoting, `separator` between fields."""
    text = path.read_text(encoding="latin-1")
    if not text.strip():
        raise DataError(f"{path}: empty file (expected {separator.join(names)} lines)")
    text = text.replace(separator, "\t")  # the Arrow reader takes one-character delimiters
    try:
        table = pcsv.read_csv(
            io.BytesIO(text.encode()),  # utf-8 for Arrow
            read_options=pcsv.ReadOptions(column_names=list(names)),
            parse_options=pcsv.ParseOptions(delimiter="\t", quote_char=False),
            convert_options=pcsv.ConvertOptions(column_types=dict.fromkeys(names, pa.string())),
        )
    except pa.ArrowInvalid as exc:
        _diagnose_csv(path, text.encode("latin-1"), list(names), "latin-1", False, "\t", csv.QUOTE_NONE)
        raise DataError(f"{path}: {exc}") from None
    return table, Rows(path, _csv_line_of(path, "latin-1", False, "\t", csv.QUOTE_NONE))


def _dataset(
    table: pa.Table,
    rows: Rows,
    fmt: str,
    source: str,
    titles: dict[str, str],
    genres: dict[str, tuple[str, ...]],
    genre_names: tuple[str, ...],
    item_counts: dict[str, int] | None = None,
) -> Dataset:
    clean = clean_interactions(table, rows)
    report = LoadReport(fmt, table.num_rows, clean.dropped_missing_id, clean.duplicates_removed, **(item_counts or {}))
    return Dataset(
        clean.user_ids, clean.item_ids, clean.timestamps, titles, genres, genre_names, source,
        clean.ratings, clean.event_types, report,
    )  # fmt: skip


def _load_ml100k(data_dir: Path) -> Dataset:
    table, rows = _read_ml(data_dir / "u.data", "\t", ML_RATING_COLUMNS)
    genre_names = ML100K_GENRES
    genre_file = data_dir / "u.genre"
    if genre_file.is_file():
        records = [ln.split("|") for ln in genre_file.read_text(encoding="latin-1").splitlines() if ln.strip()]
        genre_names = tuple(name for name, _ in sorted(records, key=lambda r: int(r[1])))
    titles: dict[str, str] = {}
    genres: dict[str, tuple[str, ...]] = {}
    item_file = data_dir / "u.item"
    if item_file.is_file():
        with item_file.open(encoding="latin-1") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                parts = line.rstrip("\n").split("|")
                if len(parts) < 5 + len(genre_names):
                    raise DataError(f"{item_file}, line {line_no}: expected {5 + len(genre_names)} fields")
                flags = parts[5 : 5 + len(genre_names)]
                titles[parts[0]] = parts[1]
                genres[parts[0]] = tuple(g for g, flag in zip(genre_names, flags, strict=True) if flag.strip() == "1")
    return _dataset(table, rows, "ml-100k", "ml-100k", titles, genres, genre_names, {"item_rows_read": len(titles)})


def _load_ml1m(data_dir: Path) -> Dataset:
    table, rows = _read_ml(data_dir / "ratings.dat", "::", ML_RATING_COLUMNS)
    titles: dict[str, str] = {}
    genres: dict[str, tuple[str, ...]] = {}
    movie_file = data_dir / "movies.dat"
    if movie_file.is_file():
        with movie_file.open(encoding="latin-1") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                parts = line.rstrip("\r\n").split("::")
                if len(parts) < 3:
                    raise DataError(f"{movie_file}, line {line_no}: expected 3 fields (item_id::title::genres)")
                item_id = parts[0].strip()
                titles[item_id] = "::".join(parts[1:-1])
                genres[item_id] = tuple(g.strip() for g in parts[-1].split("|") if g.strip())
    names = sorted({g for gs in genres.values() for g in gs})
    return _dataset(table, rows, "ml-1m", "ml-1m", titles, genres, tuple(names), {"item_rows_read": len(titles)})


def _load_items(path: Path) -> tuple[dict[str, str], dict[str, tuple[str, ...]], dict[str, int]]:
    """titles and genres by item id from items.csv / items.parquet; rows without an id are dropped and counted."""
    table, rows = _read_table(path, ITEM_COLUMNS)
    item_ids = id_column(table["item_id"], rows, "item_id").to_pylist()
    titles_col = string_column(table["title"], rows, "title", trim=False).to_pylist()
    genres_col = genre_lists(table["genres"], rows)
    titles: dict[str, str] = {}
    genres: dict[str, tuple[str, ...]] = {}
    dropped = 0
    for item_id, title, item_genres in zip(item_ids, titles_col, genres_col, strict=True):
        if not item_id:
            dropped += 1
            continue
        titles[item_id] = title
        genres[item_id] = item_genres
    return titles, genres, {"item_rows_read": table.num_rows, "item_rows_dropped_missing_id": dropped}


def _load_generic(data_dir: Path, path: Path) -> Dataset:
    table, rows = _read_table(path, INTERACTION_COLUMNS)
    titles: dict[str, str] = {}
    genres: dict[str, tuple[str, ...]] = {}
    item_counts: dict[str, int] = {}
    item_path = _one_of(data_dir, "items")
    if item_path is not None:
        titles, genres, item_counts = _load_items(item_path)
    names = sorted({g for gs in genres.values() for g in gs})
    return _dataset(table, rows, path.suffix.lstrip("."), "generic", titles, genres, tuple(names), item_counts)
