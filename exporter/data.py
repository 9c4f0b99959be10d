"""Loading interaction logs and item metadata: MovieLens 100K or the generic CSV layout."""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

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


class DataError(ValueError):
    """Input data is malformed; the message names the file, line and column."""


@dataclass(frozen=True)
class Dataset:
    """Raw interaction rows in file order, plus item metadata keyed by external item id.

    File order matters: it breaks timestamp ties in every protocol and table.
    """

    user_ids: npt.NDArray[np.str_]  # (N,)
    item_ids: npt.NDArray[np.str_]  # (N,)
    timestamps: npt.NDArray[np.int64]  # (N,)
    titles: dict[str, str] = field(default_factory=dict, repr=False)
    genres: dict[str, tuple[str, ...]] = field(default_factory=dict, repr=False)
    genre_names: tuple[str, ...] = ()
    source: str = ""

    def __len__(self) -> int:
        return len(self.user_ids)

    def subset(self, mask: npt.NDArray[np.bool_]) -> Dataset:
        """The rows where mask is true, in file order, with the same metadata."""
        return Dataset(
            self.user_ids[mask],
            self.item_ids[mask],
            self.timestamps[mask],
            self.titles,
            self.genres,
            self.genre_names,
            self.source,
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
        return {
            "fingerprint": self.fingerprint(),
            "n_users": int(np.unique(self.user_ids).size),
            "n_items": int(np.unique(self.item_ids).size),
            "n_interactions": len(self),
            "time_range": [int(self.timestamps.min()), int(self.timestamps.max())] if len(self) else [0, 0],
            "source": self.source,
        }


def load_dataset(data_dir: Path) -> Dataset:
    """Load MovieLens 100K (`u.data`) or the generic layout (`interactions.csv` [+ `items.csv`])."""
    data_dir = Path(data_dir)
    if (data_dir / "u.data").is_file():
        return _load_ml100k(data_dir)
    if (data_dir / "interactions.csv").is_file():
        return _load_generic(data_dir)
    raise DataError(f"{data_dir}: neither u.data (MovieLens 100K) nor interactions.csv (generic layout) found")


def _int(value: str, path: Path, line: int, column: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise DataError(f"{path}, line {line}, column {column!r}: {value!r} is not an integer timestamp") from None


def _check_nonempty(n: int, path: Path) -> None:
    if n == 0:
        raise DataError(f"{path}: no interaction rows")


def _load_ml100k(data_dir: Path) -> Dataset:
    path = data_dir / "u.data"
    users, items, stamps = [], [], []
    with path.open(encoding="latin-1") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 4:
                raise DataError(f"{path}, line {line_no}: expected 4 tab-separated fields, found {len(parts)}")
            users.append(parts[0].strip())
            items.append(parts[1].strip())
            stamps.append(_int(parts[3], path, line_no, "timestamp"))
    _check_nonempty(len(users), path)
    genre_names = ML100K_GENRES
    genre_file = data_dir / "u.genre"
    if genre_file.is_file():
        rows = [ln.split("|") for ln in genre_file.read_text(encoding="latin-1").splitlines() if ln.strip()]
        genre_names = tuple(name for name, _ in sorted(rows, key=lambda r: int(r[1])))
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
    return Dataset(
        np.array(users, dtype=np.str_),
        np.array(items, dtype=np.str_),
        np.array(stamps, dtype=np.int64),
        titles,
        genres,
        genre_names,
        source="ml-100k",
    )


def _csv_rows(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: empty file (expected a header with {', '.join(required)})")
        header = [h.strip() for h in header]
        missing = [c for c in required if c not in header]
        if missing:
            raise DataError(f"{path}, line 1: missing column(s) {', '.join(missing)} (header: {', '.join(header)})")
        for row in reader:
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) < len(header):
                raise DataError(f"{path}, line {reader.line_num}: expected {len(header)} fields, found {len(row)}")
            yield reader.line_num, dict(zip(header, row, strict=False))


def _load_generic(data_dir: Path) -> Dataset:
    path = data_dir / "interactions.csv"
    users, items, stamps = [], [], []
    for line_no, row in _csv_rows(path, ("user_id", "item_id", "timestamp")):
        for col in ("user_id", "item_id"):
            if not row[col].strip():
                raise DataError(f"{path}, line {line_no}, column {col!r}: empty id")
        users.append(row["user_id"].strip())
        items.append(row["item_id"].strip())
        stamps.append(_int(row["timestamp"], path, line_no, "timestamp"))
    _check_nonempty(len(users), path)
    titles: dict[str, str] = {}
    genres: dict[str, tuple[str, ...]] = {}
    names: dict[str, None] = {}
    item_path = data_dir / "items.csv"
    if item_path.is_file():
        for _, row in _csv_rows(item_path, ("item_id", "title", "genres")):
            item_id = row["item_id"].strip()
            titles[item_id] = row["title"]
            item_genres = tuple(g.strip() for g in row["genres"].split("|") if g.strip())
            genres[item_id] = item_genres
            names.update(dict.fromkeys(item_genres))
    return Dataset(
        np.array(users, dtype=np.str_),
        np.array(items, dtype=np.str_),
        np.array(stamps, dtype=np.int64),
        titles,
        genres,
        tuple(sorted(names)),
        source="generic",
    )
