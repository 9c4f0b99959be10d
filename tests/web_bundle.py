"""The tiny hand-built bundle with film-like titles and genres, for the web page and items API tests.

It is tests.bundle_factory's bundle (two planted clusters: odd items lean one way, even items the
other) re-published with readable metadata: odd items are Sci-Fi, even items are Comedy, and every
third item of each adds a second genre. Same models and tables, so the same known answers.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from recsys_common.bundle import BundleWriter, open_bundle
from tests.bundle_factory import make_bundle

SCI_FI_WORDS = ("Nebula", "Quantum", "Orbit", "Android", "Photon", "Stellar")
COMEDY_WORDS = ("Silly", "Awkward", "Lucky", "Wacky", "Goofy", "Clumsy")
NOUNS = ("Drift", "Weekend", "Signal", "Wedding", "Harbor", "Road Trip", "Protocol")


def film_metadata(n_items: int) -> tuple[list[str], list[list[str]]]:
    """Titles and genres for items 1..n: odd items Sci-Fi (some also Thriller), even items Comedy (some Romance)."""
    titles, genres = [], []
    for i in range(1, n_items + 1):
        odd = i % 2 == 1
        words = SCI_FI_WORDS if odd else COMEDY_WORDS
        primary, extra = ("Sci-Fi", "Thriller") if odd else ("Comedy", "Romance")
        titles.append(f"{words[(i // 2) % len(words)]} {NOUNS[i % len(NOUNS)]} {i}")
        genres.append([primary, extra] if i % 3 == 0 else [primary])
    return titles, genres


def make_film_bundle(bundles_dir: Path, n_items: int = 40, seed: int = 0) -> str:
    """Publish the tiny bundle, with film-like titles and genres, into bundles_dir; returns its version."""
    with tempfile.TemporaryDirectory(prefix="film-bundle-") as scratch:
        source = open_bundle(Path(scratch), make_bundle(Path(scratch), n_items=n_items, seed=seed))
        writer = BundleWriter(bundles_dir)
        for name in source.manifest["files"]:
            if name != "items.json":
                shutil.copyfile(source.file(name), writer.staging / name)
        item_ids = json.loads(source.file("items.json").read_text())["item_ids"]
        titles, genres = film_metadata(len(item_ids))
        (writer.staging / "items.json").write_text(
            json.dumps({"item_ids": item_ids, "titles": titles, "genres": genres})
        )
        manifest = {k: v for k, v in source.manifest.items() if k not in ("files", "created_at")}
        return writer.publish(manifest)
