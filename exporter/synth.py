"""A seeded synthetic interaction log with planted structure, for the demo and for tests.

The generator writes the generic layout (``interactions.csv`` and ``items.csv``) so that the
whole stack can run on a machine with no data of its own, and so that tests can check that a
model finds structure we know is there. It plants five things, each measurable from the output
and the returned :class:`SynthInfo`:

- **item clusters**: every item belongs to one cluster; a cluster has a dominant genre set and
  a theme word, so titles read like "Nebula Drift 17 (Sci-Fi)".
- **user tastes**: every user prefers a few clusters (a Dirichlet mix over them).
- **order**: within a cluster the items form a cycle (a Markov chain); a user who stays in a
  cluster often moves to the chain successor of their previous item. A sequence-aware model
  can learn "after A comes B", a bag of items cannot tell direction or recency.
- **popularity skew**: inside a cluster, items are drawn by a Zipf law over a random rank.
- **drift**: each user's mix slides, over their own history, from a start mix to an end mix in
  which one preferred cluster is swapped for a new one.

Users never interact twice with the same item, and each user's timestamps strictly increase,
so no (user, item, timestamp) row repeats. Rows are written in global time order, as a log.

Example::

    info = generate(Path("demo-data"), n_users=200, n_items=100, seed=1)
    info.item_cluster["i0001"], info.user_clusters["u0001"]
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from exporter.data import ML100K_GENRES

# The MovieLens genre names without its 'unknown' placeholder, so synthetic data reads like real data.
GENRES: tuple[str, ...] = ML100K_GENRES[1:]

# Theme words per genre: a cluster takes one from its primary genre, so its titles read alike.
_THEMES: Mapping[str, tuple[str, ...]] = {
    "Action": ("Iron", "Steel", "Blast", "Rogue"),
    "Adventure": ("Lost", "Jungle", "Summit", "Voyage"),
    "Animation": ("Paper", "Pixel", "Bubble", "Doodle"),
    "Children's": ("Little", "Puppy", "Rainbow", "Treehouse"),
    "Comedy": ("Silly", "Awkward", "Lucky", "Wacky"),
    "Crime": ("Heist", "Alibi", "Bullet", "Syndicate"),
    "Documentary": ("True", "Inside", "Planet", "Archive"),
    "Drama": ("Quiet", "Broken", "Autumn", "Distant"),
    "Fantasy": ("Dragon", "Elven", "Crystal", "Rune"),
    "Film-Noir": ("Shadow", "Smoke", "Midnight", "Velvet"),
    "Horror": ("Crimson", "Hollow", "Grave", "Wicked"),
    "Musical": ("Melody", "Rhythm", "Encore", "Chorus"),
    "Mystery": ("Cipher", "Riddle", "Veiled", "Enigma"),
    "Romance": ("Sweet", "Moonlit", "Paris", "Tender"),
    "Sci-Fi": ("Nebula", "Quantum", "Orbit", "Android"),
    "Thriller": ("Deadline", "Pursuit", "Fracture", "Silent"),
    "War": ("Trench", "Frontline", "Valor", "Siege"),
    "Western": ("Dusty", "Outlaw", "Canyon", "Saddle"),
}
_NOUNS: tuple[str, ...] = (
    "Drift",
    "Empire",
    "Signal",
    "Harbor",
    "Garden",
    "Protocol",
    "Echo",
    "Horizon",
    "Legacy",
    "Circuit",
    "Frontier",
    "Requiem",
    "Station",
    "Tide",
    "Crown",
    "Paradox",
)
EVENT_TYPES: tuple[str, ...] = ("view", "click", "purchase")
_EVENT_TYPE_P = np.array([0.75, 0.2, 0.05])


@dataclass(frozen=True)
class SynthInfo:
    """What was planted, for tests and for the demo's explanations.

    ``user_clusters`` is every cluster a user prefers at some point (start mix and end mix);
    ``user_clusters_start`` / ``user_clusters_end`` split it by the drift. ``successor`` maps each
    item to the next item on its cluster's chain.
    """

    interactions_path: Path
    items_path: Path
    n_users: int
    n_items: int
    n_clusters: int
    n_events: int
    user_ids: tuple[str, ...]
    item_ids: tuple[str, ...]
    item_cluster: Mapping[str, int]
    user_clusters: Mapping[str, tuple[int, ...]]
    user_clusters_start: Mapping[str, tuple[int, ...]]
    user_clusters_end: Mapping[str, tuple[int, ...]]
    successor: Mapping[str, str]
    cluster_genres: tuple[tuple[str, ...], ...]


def _ids(prefix: str, n: int) -> list[str]:
    width = max(4, len(str(n)))
    return [f"{prefix}{i:0{width}d}" for i in range(1, n + 1)]


def _check(n_users: int, n_items: int, n_clusters: int, events_per_user: tuple[int, int]) -> None:
    if n_users < 1:
        raise ValueError(f"n_users must be >= 1 (got {n_users})")
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be >= 1 (got {n_clusters})")
    if n_items < 2 * n_clusters:
        raise ValueError(f"n_items must be >= 2 * n_clusters (got n_items={n_items}, n_clusters={n_clusters})")
    lo, hi = events_per_user
    if not 2 <= lo <= hi:
        raise ValueError(f"events_per_user must be (lo, hi) with 2 <= lo <= hi (got {events_per_user})")


class _Catalogue:
    """Items, clusters, chains and popularity: the item side of the planted structure."""

    def __init__(self, rng: np.random.Generator, n_items: int, n_clusters: int, zipf_exponent: float) -> None:
        # Shuffle so that item ids say nothing about clusters.
        self.cluster_of: npt.NDArray[np.int64] = rng.permutation(np.arange(n_items) % n_clusters)
        self.members: list[npt.NDArray[np.int64]] = []
        self.cum_weights: list[npt.NDArray[np.float64]] = []
        self.successor = np.empty(n_items, dtype=np.int64)
        for c in range(n_clusters):
            members = rng.permutation(np.flatnonzero(self.cluster_of == c))
            # members[0] is the most popular item of the cluster.
            weights = 1.0 / np.arange(1, len(members) + 1) ** zipf_exponent
            self.members.append(members)
            self.cum_weights.append(np.cumsum(weights / weights.sum()))
            # The chain order is independent of popularity: a fresh permutation, closed into a cycle.
            chain = rng.permutation(members)
            self.successor[chain] = np.roll(chain, -1)
        # Clusters differ in popularity too (a milder Zipf over a random cluster rank).
        cluster_w = 1.0 / rng.permutation(np.arange(1, n_clusters + 1)) ** (0.5 * zipf_exponent)
        self.cluster_p: npt.NDArray[np.float64] = cluster_w / cluster_w.sum()
        global_weights = np.empty(n_items)
        for c, (members, cum) in enumerate(zip(self.members, self.cum_weights, strict=True)):
            global_weights[members] = np.diff(cum, prepend=0.0) * self.cluster_p[c]
        self.global_cum = np.cumsum(global_weights / global_weights.sum())

        primaries = rng.permutation(len(GENRES))
        self.genres: list[tuple[str, ...]] = []
        self.themes: list[str] = []
        for c in range(n_clusters):
            primary = GENRES[primaries[c % len(GENRES)]]
            genres = [primary]
            if rng.random() < 0.6:
                genres.append(GENRES[(primaries[c % len(GENRES)] + 1 + rng.integers(len(GENRES) - 1)) % len(GENRES)])
            self.genres.append(tuple(genres))
            words = _THEMES[primary]
            self.themes.append(words[(c // len(GENRES) + int(rng.integers(len(words)))) % len(words)])

    def item_rows(self, rng: np.random.Generator, item_ids: list[str]) -> list[tuple[str, str, str]]:
        rows = []
        for i, item_id in enumerate(item_ids):
            c = int(self.cluster_of[i])
            genres = list(self.genres[c])
            # Most items carry the cluster's genres exactly; a few drop or add one, as real catalogues do.
            if len(genres) > 1 and rng.random() < 0.15:
                genres.pop()
            if rng.random() < 0.1:
                extra = GENRES[int(rng.integers(len(GENRES)))]
                if extra not in genres:
                    genres.append(extra)
            noun = _NOUNS[int(rng.integers(len(_NOUNS)))]
            title = f"{self.themes[c]} {noun} {i + 1} ({self.genres[c][0]})"
            rows.append((item_id, title, "|".join(genres)))
        return rows


def generate(
    out_dir: Path,
    n_users: int = 1000,
    n_items: int = 500,
    n_clusters: int = 10,
    events_per_user: tuple[int, int] = (20, 80),
    seed: int = 0,
    *,
    clusters_per_user: tuple[int, int] = (1, 3),
    stay_prob: float = 0.8,
    markov_prob: float = 0.6,
    noise_prob: float = 0.05,
    zipf_exponent: float = 1.2,
    drift: bool = True,
    start_ts: int = 1_700_000_000,
    span_days: float = 180.0,
) -> SynthInfo:
    """Write ``interactions.csv`` and ``items.csv`` into ``out_dir`` and return what was planted.

    Each next event: with ``noise_prob`` a catalogue-wide popular item; otherwise the user stays
    in the cluster of the previous event with ``stay_prob`` (else draws a cluster from the current
    mix), and inside a kept cluster follows the chain successor with ``markov_prob`` (else a Zipf
    draw inside the cluster). Items the user already has are never drawn again, so both bounds of
    ``events_per_user`` are capped at ``n_items``.
    """
    _check(n_users, n_items, n_clusters, events_per_user)
    # Users never repeat an item, so nobody can have more events than there are items.
    events_per_user = (min(events_per_user[0], n_items), min(events_per_user[1], n_items))
    lo_c, hi_c = clusters_per_user
    hi_c = min(hi_c, n_clusters)
    lo_c = min(lo_c, hi_c)
    rng = np.random.default_rng(seed)
    user_ids = _ids("u", n_users)
    item_ids = _ids("i", n_items)
    cat = _Catalogue(rng, n_items, n_clusters, zipf_exponent)
    item_rows = cat.item_rows(rng, item_ids)

    span_s = span_days * 86_400.0
    ev_user: list[int] = []
    ev_item: list[int] = []
    ev_ts: list[int] = []
    start_sets: dict[str, tuple[int, ...]] = {}
    end_sets: dict[str, tuple[int, ...]] = {}
    lengths = rng.integers(events_per_user[0], events_per_user[1] + 1, size=n_users)
    for u in range(n_users):
        n_ev = int(lengths[u])
        k = int(rng.integers(lo_c, hi_c + 1))
        start = rng.choice(n_clusters, size=k, replace=False, p=cat.cluster_p)
        end = start.copy()
        if drift and n_clusters > k:
            # Swap one preferred cluster for one the user did not like before.
            outside = np.setdiff1d(np.arange(n_clusters), start)
            p_out = cat.cluster_p[outside] / cat.cluster_p[outside].sum()
            end[int(rng.integers(k))] = rng.choice(outside, p=p_out)
        mix_start = np.zeros(n_clusters)
        mix_start[start] = rng.dirichlet(np.ones(k))
        mix_end = np.zeros(n_clusters)
        mix_end[end] = rng.dirichlet(np.ones(k))
        start_sets[user_ids[u]] = tuple(sorted(int(c) for c in start))
        end_sets[user_ids[u]] = tuple(sorted(int(c) for c in end))

        # Draw all the randomness a user needs at once: per-event Python calls into numpy are slow.
        draws = rng.random((n_ev, 4))
        seen: set[int] = set()
        prev = -1
        prev_cluster = -1
        items = np.empty(n_ev, dtype=np.int64)
        for t in range(n_ev):
            r_noise, r_stay, r_chain, r_pick = draws[t]
            item = -1
            stray = r_noise < noise_prob
            if stray:
                item = int(np.searchsorted(cat.global_cum, r_pick * cat.global_cum[-1]))
                item = min(item, n_items - 1)
            else:
                if prev_cluster >= 0 and r_stay < stay_prob:
                    c = prev_cluster
                    if r_chain < markov_prob:
                        succ = int(cat.successor[prev])
                        if succ not in seen:
                            item = succ
                else:
                    w = t / max(n_ev - 1, 1)
                    mix = (1.0 - w) * mix_start + w * mix_end
                    c = int(min(np.searchsorted(np.cumsum(mix), r_pick * mix.sum()), n_clusters - 1))
                if item < 0:
                    item = _draw_in_cluster(rng, cat, c, seen)
            if item < 0 or item in seen:
                item = _draw_unseen(rng, cat, seen)
            seen.add(item)
            items[t] = item
            if not stray:
                # A stray click does not move the user: the next event continues from the last real one.
                prev = item
                prev_cluster = int(cat.cluster_of[item])
        # Sessions of a few events minutes apart, separated by gaps of days; strictly increasing.
        gaps = np.where(rng.random(n_ev) < 0.15, rng.exponential(3 * 86_400.0, n_ev), rng.exponential(600.0, n_ev))
        offsets_s = rng.uniform(0, 0.6 * span_s) + np.cumsum(np.maximum(gaps, 1.0))
        # Gaps of at least one second keep the floored timestamps strictly increasing.
        ts = start_ts + np.floor(offsets_s).astype(np.int64)
        ev_user.extend([u] * n_ev)
        ev_item.extend(items.tolist())
        ev_ts.extend(ts.tolist())

    users = np.asarray(ev_user, dtype=np.int64)
    items_arr = np.asarray(ev_item, dtype=np.int64)
    ts_arr = np.asarray(ev_ts, dtype=np.int64)
    etypes = rng.choice(len(EVENT_TYPES), size=len(users), p=_EVENT_TYPE_P)
    order = np.lexsort((users, ts_arr))  # a log: global time order, ties by user

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    interactions_path = out_dir / "interactions.csv"
    items_path = out_dir / "items.csv"
    with interactions_path.open("w", newline="", encoding="utf-8") as f:
        f.write("user_id,item_id,timestamp,event_type\n")
        f.writelines(
            f"{user_ids[u]},{item_ids[i]},{t},{EVENT_TYPES[e]}\n"
            for u, i, t, e in zip(
                users[order].tolist(),
                items_arr[order].tolist(),
                ts_arr[order].tolist(),
                etypes[order].tolist(),
                strict=True,
            )
        )
    with items_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(("item_id", "title", "genres"))
        writer.writerows(item_rows)

    return SynthInfo(
        interactions_path=interactions_path,
        items_path=items_path,
        n_users=n_users,
        n_items=n_items,
        n_clusters=n_clusters,
        n_events=len(users),
        user_ids=tuple(user_ids),
        item_ids=tuple(item_ids),
        item_cluster={item_ids[i]: int(c) for i, c in enumerate(cat.cluster_of)},
        user_clusters={u: tuple(sorted(set(start_sets[u]) | set(end_sets[u]))) for u in user_ids},
        user_clusters_start=start_sets,
        user_clusters_end=end_sets,
        successor={item_ids[i]: item_ids[int(s)] for i, s in enumerate(cat.successor)},
        cluster_genres=tuple(cat.genres),
    )


def _draw_in_cluster(rng: np.random.Generator, cat: _Catalogue, c: int, seen: set[int]) -> int:
    """A Zipf draw inside cluster ``c`` among items not in ``seen``; -1 if the cluster is used up."""
    members = cat.members[c]
    cum = cat.cum_weights[c]
    for _ in range(8):
        item = int(members[min(int(np.searchsorted(cum, rng.random() * cum[-1])), len(members) - 1)])
        if item not in seen:
            return item
    # Rejection keeps failing once the head of the cluster is used: take the most popular unseen.
    for item in members.tolist():
        if item not in seen:
            return int(item)
    return -1


def _draw_unseen(rng: np.random.Generator, cat: _Catalogue, seen: set[int]) -> int:
    """A popularity-weighted draw over the whole catalogue among items not in ``seen``."""
    n_items = len(cat.cluster_of)
    for _ in range(16):
        item = min(int(np.searchsorted(cat.global_cum, rng.random() * cat.global_cum[-1])), n_items - 1)
        if item not in seen:
            return item
    return int(rng.choice(np.setdiff1d(np.arange(n_items), np.fromiter(seen, dtype=np.int64))))
