"""The exporter's offline user-based CF: the gateway's algorithm replayed over `loo` and `replay`, without leakage.

Planted worlds: odd items lean to one axis and even items to another (tests/bundle_factory.item_embeddings), so a
user of odd items has the odd users as neighbours. Each leakage test has a control in which the same item does
reach the case by a legitimate path, so it fails if the simulation leaks and also if it proposes nothing.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from exporter.candidates import Activity, CandidatePlan, UserCFPlan, serving_candidates, usercf_proposals
from exporter.config import ExportConfig
from exporter.data import Dataset, load_dataset
from exporter.evaluate import USERCF, evaluate_protocol, protocol_split
from exporter.protocols import replay_events
from exporter.report import report_text, usercf_verdict, write_report
from exporter.sequences import encode_items
from exporter.synth import generate
from gateway.config import GatewayConfig
from gateway.sources import SourceQuery
from gateway.usercf import ActiveUsers, UserCFSource
from recsys_common.catalog import Catalog
from recsys_common.features import Covisit, ItemTables
from recsys_common.usercf import nearest, propose, recent_items, unit_rows, user_vector
from tests.conftest import ml100k_dir

PLAN = UserCFPlan()
HISTORY_LEN = 20


def dataset(rows: list[tuple[str, int, int]]) -> Dataset:
    """(user, item number, timestamp) rows in file order."""
    users, items, stamps = zip(*rows, strict=True)
    return Dataset(np.array(users), np.array([str(i) for i in items]), np.array(stamps, dtype=np.int64))


def two_clusters(n_items: int) -> np.ndarray:
    """(n + 1, 4): odd items along +axis 0, even items along -axis 0 (plus noise): an odd user's vector has a
    negative cosine with an even user's, so they are never neighbours."""
    rng = np.random.default_rng(0)
    emb = 0.1 * rng.normal(size=(n_items + 1, 4)).astype(np.float32)
    emb[1:, 0] = np.where(np.arange(1, n_items + 1) % 2 == 1, 1.0, -1.0)
    emb[0] = 0
    return emb


def proposals_of(ds: Dataset, protocol: str, quantile: float = 0.9) -> list[list[int]]:
    """Each case's proposals as item numbers (the items are 1..n, so indices are their numbers)."""
    split = protocol_split(ds, protocol, ExportConfig(replay_quantile=quantile))
    assert split.vocab == tuple(str(i) for i in range(1, len(split.vocab) + 1)), "items 1..n keep their numbers"
    assert split.cases.activity is not None
    found = usercf_proposals(two_clusters(len(split.vocab)), split.cases.seen, split.cases.activity, PLAN, HISTORY_LEN)
    return [f.tolist() for f in found]


def test_the_simulated_plan_is_the_gateways_default() -> None:
    gateway = GatewayConfig()
    assert PLAN.as_dict() == {
        "candidates": gateway.usercf_candidates,
        "neighbours": gateway.usercf_neighbours,
        "items_per_user": gateway.usercf_items_per_user,
    }


# "me", "odd" and "pad" are odd-item users (neighbours); "even" is not, and is the only one with item 9.
TRAINING = [
    ("me", 1, 10),
    ("me", 3, 11),
    ("odd", 1, 12),
    ("odd", 3, 13),
    ("odd", 5, 14),
    *[("even", item, 15 + n) for n, item in enumerate([2, 4, 6, 8, 9, 10, 12])],
    ("pad", 7, 22),
    ("pad", 11, 23),
    ("pad", 1, 24),
]


@pytest.mark.parametrize("neighbour_at", [99, 100, 101])
def test_replay_cases_see_only_events_older_than_their_own(neighbour_at: int) -> None:
    # "odd" takes item 9 at neighbour_at, "me" takes it at 100: only an older event may reach me's case.
    # File order puts "odd" first on a tie, so a same-second event is replayed (and indexed) before the case.
    late = neighbour_at > 100
    test = [("me", 9, 100), ("odd", 9, neighbour_at)] if late else [("odd", 9, neighbour_at), ("me", 9, 100)]
    quantile = len(TRAINING) / (len(TRAINING) + len(test))  # the cut falls on the last training second
    found = proposals_of(dataset([*TRAINING, *test]), "replay", quantile)
    mine = found[0 if late else 1]  # replay cases in time order; "odd"'s event is a case too
    assert {5, 7, 11} <= set(mine), "neighbours' training items reach the case: the index is not empty"
    assert not {1, 3} & set(mine), "seen items are never proposed"
    assert not {2, 4, 6, 8, 10, 12} & set(mine), "an even user is not an odd user's neighbour"
    assert (9 in mine) == (neighbour_at < 100), f"item 9 at {neighbour_at}, the case at 100: {mine}"


@pytest.mark.parametrize("held_out_9", [True, False])
def test_loo_cases_never_see_a_held_out_event(held_out_9: bool) -> None:
    # "odd" takes item 9 last (held out, in nobody's index) or before its last event (training: proposed).
    tail = [("odd", 9, 30)] if held_out_9 else [("odd", 9, 29), ("odd", 7, 30)]
    found = proposals_of(dataset([*TRAINING, *tail, ("me", 11, 40)]), "loo")
    mine = found[-1]  # loo cases in file order of their held-out rows: "me"'s is the last row
    assert 11 in mine, "the held-out target may come from a neighbour who had it in training (pad)"
    assert 5 in mine and not {1, 3} & set(mine)
    assert (9 in mine) == (not held_out_9), mine


@dataclass(frozen=True)
class Space:
    """A bundle view as gateway.usercf.ActiveUsers reads it."""

    version: str
    catalog: Catalog
    tables: ItemTables


def _space(emb: np.ndarray) -> Space:
    n = emb.shape[0] - 1
    ids = tuple(f"i{i}" for i in range(1, n + 1))
    catalog = Catalog(ids, ("",) * n, ((),) * n, {item_id: k + 1 for k, item_id in enumerate(ids)})
    empty = Covisit(np.zeros(n + 2, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32))
    tables = ItemTables(np.zeros(n + 1, np.float32), empty, np.zeros((n + 1, 0), np.float32), emb)
    return Space("v1", catalog, tables)


@pytest.mark.parametrize("protocol", ["loo", "replay"])
def test_offline_proposals_are_the_gateways(protocol: str, tmp_path: Path) -> None:
    generate(tmp_path, n_users=60, n_items=80, n_clusters=4, events_per_user=(5, 30), seed=5)
    ds = load_dataset(tmp_path)
    split = protocol_split(ds, protocol, ExportConfig())
    cases, activity = split.cases, split.cases.activity
    assert activity is not None and len(cases.targets) > 40
    emb = np.random.default_rng(1).normal(size=(len(split.vocab) + 1, 8)).astype(np.float32)
    emb[0] = 0
    offline = usercf_proposals(emb, cases.seen, activity, PLAN, HISTORY_LEN)

    # The gateway's own index and source, fed the same events in the same order, asked at the same moments.
    space = _space(emb)
    users = ActiveUsers(max_users=10_000, items_per_user=PLAN.items_per_user, max_idle_s=1e9)
    source = UserCFSource(users, lambda version: space, PLAN.candidates, PLAN.neighbours)
    fed = 0
    for c in np.argsort(activity.arrived, kind="stable").tolist():
        for e in range(fed, int(activity.arrived[c])):
            users.append(f"u{activity.users[e]}", [space.catalog.id_of(int(activity.items[e]))], space)
        fed = max(fed, int(activity.arrived[c]))
        history = cases.seen[c][-HISTORY_LEN:]
        excluded = np.unique(cases.seen[c])
        query = SourceQuery(
            recent_ids=[space.catalog.id_of(int(i)) for i in history],
            history_idx=history,
            excluded_ids=[space.catalog.id_of(int(i)) for i in excluded],
            excluded_idx=excluded,
            k=10,
            bundle_version=space.version,
            catalog=space.catalog,
            user_key=f"u{activity.case_users[c]}",
        )
        served = asyncio.run(source.fetch(query, timeout_s=1.0))
        assert [space.catalog.index_of(i) for i in served.item_ids] == offline[c].tolist(), f"case {c}"
    assert sum(p.size > 0 for p in offline) > 0.8 * len(offline)


def test_usercf_candidates_join_the_merge_without_a_source_bit() -> None:
    emb = two_clusters(12)
    empty = Covisit(np.zeros(14, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32))
    popularity = np.arange(13, dtype=np.float32)  # the higher the index, the more popular
    tables = ItemTables(popularity, empty, np.zeros((13, 0), np.float32), emb)
    plan = CandidatePlan(ann=2, covisit=2, popular=2)
    seen = np.array([1, 3], dtype=np.int64)
    base, base_mask = serving_candidates(tables, seen, emb[1], plan)
    ann, pop = base[base_mask[:, 0] > 0].tolist(), [12, 11]  # popular: the two most popular unseen items
    assert set(base[base_mask[:, 2] > 0].tolist()) == set(pop) and not {2, 12} & set(ann)
    cands, mask = serving_candidates(tables, seen, emb[1], plan, np.array([2, 12], dtype=np.int64))
    # The gateway's merge order: ann, covisit (none here), usercf, popular; each item once, where it came first.
    assert cands.tolist() == list(dict.fromkeys([*ann, 2, 12, *pop]))
    by_item = dict(zip(cands.tolist(), mask.tolist(), strict=True))
    assert by_item[2] == [0.0, 0.0, 0.0], "a usercf-only item: no bit the ranker knows"
    assert by_item[12] == [0.0, 0.0, 1.0], "a popular item user-CF also proposed keeps its popular bit"
    assert all(by_item[i] == m for i, m in zip(base.tolist(), base_mask.tolist(), strict=True))


def test_the_export_evaluation_reports_quality_with_and_without_usercf(tmp_path: Path) -> None:
    generate(tmp_path, n_users=80, n_items=60, n_clusters=4, events_per_user=(8, 25), seed=3)
    ds = load_dataset(tmp_path)
    config = ExportConfig.tiny(eval_protocols=("loo", "replay"), baselines=(), ranker_int8=False)
    evaluation = {p: evaluate_protocol(ds, p, config, progress=False) for p in ("loo", "replay")}
    for protocol, report in evaluation.items():
        assert report[USERCF]["cases"] == report["two_tower+ranker"]["cases"] > 0
        # Planted clusters: user-CF adds targets the three sources miss, and has work to do in most cases.
        assert report["candidate_recall_usercf"] > report["candidate_recall"], protocol
        assert report["usercf"]["target_only_from_usercf"] > 0
        assert report["usercf"]["cases_reranked"] > 0.5
        assert report["usercf"]["plan"] == PLAN.as_dict()
        assert report["fit"]["usercf_seconds"] >= 0
    text = report_text({"version": "v", "evaluation": evaluation})
    assert text.count("  +usercf") == 2 and text.count("with usercf") == 2
    assert "verdict: " in text and usercf_verdict(evaluation) in (True, False)
    assert {p.name for p in write_report({"version": "v", "evaluation": evaluation}, tmp_path / "r")} == {
        "report.md",
        "models.png",
    }


def test_activity_checks_its_shape() -> None:
    one = np.zeros(1, np.int64)
    with pytest.raises(ValueError, match="arrived must lie in 0..1"):
        Activity(one, one + 1, np.array([2]), one)
    assert Activity(one, one + 1, one, one).n_users == 1


def test_ml100k_replay_simulation_is_cheap_and_equals_a_reference_that_sees_only_the_past() -> None:
    ds = load_dataset(ml100k_dir())
    split = protocol_split(ds, "replay", ExportConfig())
    activity = split.cases.activity
    assert activity is not None
    emb = np.random.default_rng(0).normal(size=(len(split.vocab) + 1, 32)).astype(np.float32)
    emb[0] = 0
    started = time.perf_counter()
    found = usercf_proposals(emb, split.cases.seen, activity, PLAN, HISTORY_LEN)
    assert time.perf_counter() - started < 30
    assert np.mean([f.size > 0 for f in found]) > 0.9
    # A reference built from scratch for each sampled case, from the raw rows it may see: every training row and
    # the replayed rows strictly older than its own, of the other users, each user's in time order.
    counted = [e.row for e in replay_events(ds.user_ids, ds.item_ids, ds.timestamps, split.train_mask) if e.counted]
    assert len(counted) == len(found)
    order = np.lexsort((np.arange(len(ds)), ds.timestamps))
    user_no = np.unique(ds.user_ids, return_inverse=True)[1][order]
    items, stamps, train = encode_items(ds.item_ids, split.vocab)[order], ds.timestamps[order], split.train_mask[order]
    unit = unit_rows(emb)
    for c in np.random.default_rng(0).choice(len(found), size=100, replace=False).tolist():
        row = counted[c]
        own = user_no[np.flatnonzero(order == row)[0]]
        visible = (train | (stamps < ds.timestamps[row])) & (user_no != own) & (items > 0)
        by_user = np.argsort(user_no[visible], kind="stable")
        users, their_items = user_no[visible][by_user], items[visible][by_user]
        starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
        recent = [recent_items(h, PLAN.items_per_user) for h in np.split(their_items, starts[1:])]
        vectors = np.stack([user_vector(unit, r) for r in recent])
        query = user_vector(unit, split.cases.seen[c][-HISTORY_LEN:][-PLAN.items_per_user :])
        if query is None:  # a user new in the replay, asked before their first event: no vector, no proposal
            assert found[c].size == 0
            continue
        sims = vectors @ query
        near = [(float(sims[t]), recent[t]) for t in nearest(sims, PLAN.neighbours)]
        expected, _ = propose(near, len(split.vocab), np.unique(split.cases.seen[c]), PLAN.candidates)
        assert found[c].tolist() == expected.tolist(), f"case {c}"
