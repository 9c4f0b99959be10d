"""Tests for the synthetic data generator: format, determinism and the planted structure."""

from __future__ import annotations

import csv
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from exporter.synth import EVENT_TYPES, GENRES, SynthInfo, generate

Rows = list[dict[str, str]]


def _read(path: Path) -> tuple[list[str], Rows]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _sequences(rows: Rows) -> dict[str, list[str]]:
    """Each user's items in file order (the file is in time order)."""
    seqs: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        seqs[r["user_id"]].append(r["item_id"])
    return seqs


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> tuple[SynthInfo, Rows, Rows]:
    # The defaults: what the demo runs on.
    info = generate(tmp_path_factory.mktemp("synth"))
    _, interactions = _read(info.interactions_path)
    _, items = _read(info.items_path)
    return info, interactions, items


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", n_users=50, n_items=60, n_clusters=4, seed=7)
    b = generate(tmp_path / "b", n_users=50, n_items=60, n_clusters=4, seed=7)
    c = generate(tmp_path / "c", n_users=50, n_items=60, n_clusters=4, seed=8)
    assert a.interactions_path.read_bytes() == b.interactions_path.read_bytes()
    assert a.items_path.read_bytes() == b.items_path.read_bytes()
    assert a.item_cluster == b.item_cluster
    assert a.user_clusters == b.user_clusters
    assert a.interactions_path.read_bytes() != c.interactions_path.read_bytes()
    assert a.items_path.read_bytes() != c.items_path.read_bytes()


def test_headers_ids_and_fields_parse(synth: tuple[SynthInfo, Rows, Rows]) -> None:
    info, interactions, items = synth
    header, _ = _read(info.interactions_path)
    assert header == ["user_id", "item_id", "timestamp", "event_type"]
    header, _ = _read(info.items_path)
    assert header == ["item_id", "title", "genres"]

    assert len(interactions) == info.n_events
    assert [r["item_id"] for r in items] == list(info.item_ids)
    assert info.user_ids[0] == "u0001" and info.item_ids[0] == "i0001"
    assert len(set(info.user_ids)) == info.n_users == 1000
    assert len(set(info.item_ids)) == info.n_items == 500
    for r in interactions:
        assert re.fullmatch(r"u\d{4}", r["user_id"]) and re.fullmatch(r"i\d{4}", r["item_id"])
        assert int(r["timestamp"]) > 0
        assert r["event_type"] in EVENT_TYPES
    assert {r["user_id"] for r in interactions} == set(info.user_ids)
    assert {r["item_id"] for r in interactions} <= set(info.item_ids)
    for r in items:
        assert re.fullmatch(r"[A-Z][\w']* [A-Z]\w* \d+ \([\w'-]+\)", r["title"]), r["title"]
        assert all(g in GENRES for g in r["genres"].split("|"))


def test_no_duplicate_rows_and_no_repeated_items(synth: tuple[SynthInfo, Rows, Rows]) -> None:
    _, interactions, _ = synth
    keys = [(r["user_id"], r["item_id"], r["timestamp"]) for r in interactions]
    assert len(set(keys)) == len(keys)
    pairs = [(r["user_id"], r["item_id"]) for r in interactions]
    assert len(set(pairs)) == len(pairs)


def test_timestamps_increase_per_user_and_file_is_time_ordered(synth: tuple[SynthInfo, Rows, Rows]) -> None:
    _, interactions, _ = synth
    ts = [int(r["timestamp"]) for r in interactions]
    assert ts == sorted(ts)
    last: dict[str, int] = {}
    for r in interactions:
        t = int(r["timestamp"])
        assert t > last.get(r["user_id"], -1)
        last[r["user_id"]] = t


def test_events_per_user_within_bounds(synth: tuple[SynthInfo, Rows, Rows]) -> None:
    _, interactions, _ = synth
    counts = Counter(r["user_id"] for r in interactions)
    assert min(counts.values()) >= 20 and max(counts.values()) <= 80


def test_items_carry_their_cluster_genres_and_title(synth: tuple[SynthInfo, Rows, Rows]) -> None:
    info, _, items = synth
    assert set(info.item_cluster) == set(info.item_ids)
    assert Counter(info.item_cluster.values()) == dict.fromkeys(range(info.n_clusters), 50)
    for r in items:
        cluster_genres = info.cluster_genres[info.item_cluster[r["item_id"]]]
        primary = cluster_genres[0]
        assert primary in r["genres"].split("|")
        assert r["title"].endswith(f"({primary})")


def test_next_item_is_in_the_users_clusters_far_above_chance(synth: tuple[SynthInfo, Rows, Rows]) -> None:
    info, interactions, _ = synth
    cluster_size = Counter(info.item_cluster.values())
    inside = total = 0
    chance = 0.0
    for user, seq in _sequences(interactions).items():
        clusters = set(info.user_clusters[user])
        share = sum(cluster_size[c] for c in clusters) / info.n_items
        for item in seq[1:]:
            inside += info.item_cluster[item] in clusters
            chance += share
            total += 1
    assert inside / total > 0.85
    assert inside / total > 2.5 * chance / total


def test_markov_successor_follows_and_order_matters(synth: tuple[SynthInfo, Rows, Rows]) -> None:
    info, interactions, _ = synth
    forward = backward = total = 0
    for seq in _sequences(interactions).values():
        for prev, nxt in zip(seq, seq[1:], strict=False):
            forward += info.successor[prev] == nxt
            backward += info.successor[nxt] == prev
            total += 1
    # Chance of hitting one given item is about 1 / n_items = 0.002.
    assert forward / total > 0.25
    # The reverse step is rare: a model that ignores order cannot tell the two apart.
    assert backward / total < 0.02
    assert set(info.successor) == set(info.item_ids)
    assert all(info.item_cluster[a] == info.item_cluster[b] for a, b in info.successor.items())
    assert sorted(info.successor.values()) == sorted(info.item_ids)  # a permutation: every item on a chain


def test_popularity_is_skewed(synth: tuple[SynthInfo, Rows, Rows]) -> None:
    info, interactions, _ = synth
    counts = sorted(Counter(r["item_id"] for r in interactions).values(), reverse=True)
    top_tenth = sum(counts[: info.n_items // 10]) / sum(counts)
    assert top_tenth > 0.2  # uniform would give 0.1
    assert counts[0] > 5 * counts[len(counts) // 2]


def test_preferences_drift_towards_the_end_mix(synth: tuple[SynthInfo, Rows, Rows]) -> None:
    info, interactions, _ = synth
    early = late = n = 0
    for user, seq in _sequences(interactions).items():
        new = set(info.user_clusters_end[user]) - set(info.user_clusters_start[user])
        assert set(info.user_clusters[user]) == set(info.user_clusters_start[user]) | set(info.user_clusters_end[user])
        if not new:
            continue
        q = len(seq) // 4
        early += sum(info.item_cluster[i] in new for i in seq[:q])
        late += sum(info.item_cluster[i] in new for i in seq[-q:])
        n += q
    assert late / n > 0.3
    assert late > 4 * early


def test_without_drift_start_and_end_mix_agree(tmp_path: Path) -> None:
    info = generate(tmp_path, n_users=30, n_items=40, n_clusters=4, drift=False)
    assert info.user_clusters_start == info.user_clusters_end


def test_small_catalogue_caps_events_per_user(tmp_path: Path) -> None:
    info = generate(tmp_path, n_users=20, n_items=12, n_clusters=3, events_per_user=(20, 80))
    _, interactions = _read(info.interactions_path)
    counts = Counter(r["user_id"] for r in interactions)
    assert set(counts.values()) == {12}  # every user has every item exactly once
    assert len({(r["user_id"], r["item_id"]) for r in interactions}) == len(interactions)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_users": 0}, "n_users"),
        ({"n_clusters": 0}, "n_clusters"),
        ({"n_items": 10, "n_clusters": 6}, "n_items"),
        ({"events_per_user": (5, 3)}, "events_per_user"),
    ],
)
def test_bad_arguments_are_named(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate(tmp_path, **kwargs)  # type: ignore[arg-type]
