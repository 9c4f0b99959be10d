"""User-based CF: the nearest recently active users and their recent items, on the tiny bundle's planted clusters
(odd items lean to one axis, even items to another), plus the source live in a stack's explanations."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import pytest

from gateway.config import GatewayConfig
from gateway.core import BundleView
from gateway.sources import SourceQuery
from gateway.usercf import ActiveUsers, UserCFSource, recency_weights
from recsys_cli.stack import Stack
from recsys_common.bundle import open_bundle
from tests.bundle_factory import make_bundle

USERCF_ON = {"RECSYS_GATEWAY_USERCF_USERS": "1000"}  # off by default (see GatewayConfig.usercf_users)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def views(tmp_path_factory: pytest.TempPathFactory) -> tuple[BundleView, BundleView]:
    bundles = tmp_path_factory.mktemp("usercf-bundles")
    first = make_bundle(bundles, seed=0, make_current=False)
    second = make_bundle(bundles, seed=1, make_current=False)
    config = GatewayConfig()
    return BundleView.load(open_bundle(bundles, first), config), BundleView.load(open_bundle(bundles, second), config)


def ids(numbers: list[int]) -> list[str]:
    return [f"i{n:03d}" for n in numbers]


def query(view: BundleView, user_key: str, history: list[str], excluded: list[str] | None = None) -> SourceQuery:
    excluded = history if excluded is None else excluded
    return SourceQuery(
        recent_ids=history,
        history_idx=view.catalog.known(history),
        excluded_ids=excluded,
        excluded_idx=view.catalog.known(excluded),
        k=10,
        bundle_version=view.version,
        catalog=view.catalog,
        user_key=user_key,
    )


def source(users: ActiveUsers, view: BundleView, n: int = 10, neighbours: int = 5) -> UserCFSource:
    return UserCFSource(users, lambda version: view, n, neighbours)


def test_recency_weights_favour_the_newest_item() -> None:
    assert np.allclose(recency_weights(3), [0.81, 0.9, 1.0])


def test_neighbours_come_from_the_users_cluster_and_propose_what_they_did_not_see(
    views: tuple[BundleView, BundleView],
) -> None:
    view = views[0]
    users = ActiveUsers(max_users=100, items_per_user=20, max_idle_s=3600)
    users.observe("odd-1", ids([1, 3, 5, 7]), view)
    users.observe("odd-2", ids([1, 3, 9, 11]), view)
    users.observe("even-1", ids([2, 4, 6, 8]), view)
    users.observe("even-2", ids([2, 4, 10, 12]), view)
    users.observe("me", ids([1, 3]), view)

    near = users.neighbours("me", view.catalog.known(ids([1, 3])), view, n=2)
    assert len(near) == 2 and all(sim > 0.5 for sim, _ in near)
    assert {int(i) for _, items in near for i in items} <= {1, 3, 5, 7, 9, 11}

    result = asyncio.run(source(users, view).fetch(query(view, "me", ids([1, 3])), timeout_s=1.0))
    assert result.name == "usercf"
    assert set(result.item_ids) == set(ids([5, 7, 9, 11])), "only odd neighbours, only unseen items, never self"
    assert result.scores == sorted(result.scores, reverse=True)
    # Both odd neighbours hold items 1 and 3 (excluded); among the rest, the newest items weigh most.
    assert result.item_ids[0] in ids([7, 11])


def test_excluded_items_and_the_users_own_row_are_never_used(views: tuple[BundleView, BundleView]) -> None:
    view = views[0]
    users = ActiveUsers(max_users=10, items_per_user=20, max_idle_s=3600)
    users.observe("me", ids([1, 3, 5, 7]), view)
    users.observe("other", ids([1, 3, 9]), view)
    # exclude_seen off: the user's own items may come back, but not from their own row.
    result = asyncio.run(
        source(users, view).fetch(query(view, "me", ids([1, 3, 5, 7]), excluded=ids([9])), timeout_s=1.0)
    )
    assert set(result.item_ids) == set(ids([1, 3]))
    alone = ActiveUsers(max_users=10, items_per_user=20, max_idle_s=3600)
    alone.observe("me", ids([1, 3]), view)
    assert asyncio.run(source(alone, view).fetch(query(view, "me", ids([1, 3])), timeout_s=1.0)).item_ids == []


def test_the_index_is_bounded_and_evicts_the_least_recently_active(views: tuple[BundleView, BundleView]) -> None:
    view = views[0]
    users = ActiveUsers(max_users=3, items_per_user=2, max_idle_s=3600)
    for n in range(1, 6):
        users.observe(f"u{n}", ids([2 * n - 1]), view)
    assert len(users) == 3
    found = users.neighbours("nobody", view.catalog.known(ids([1, 3, 5, 7, 9])), view, n=10)
    assert sorted(int(items[0]) for _, items in found) == [5, 7, 9], "u1 and u2 were evicted"
    # items_per_user keeps the newest items only; re-observing the oldest user makes it the newest.
    users.append("u3", ids([11, 13]), view)
    users.observe("u6", ids([15]), view)
    found = users.neighbours("nobody", view.catalog.known(ids([11])), view, n=10)
    assert sorted(tuple(items.tolist()) for _, items in found) == [(9,), (11, 13), (15,)], "u4 was evicted, not u3"


def test_idle_users_are_nobodys_neighbours(views: tuple[BundleView, BundleView]) -> None:
    view, clock = views[0], Clock()
    users = ActiveUsers(max_users=10, items_per_user=5, max_idle_s=60, clock=clock)
    users.observe("old", ids([1, 3]), view)
    clock.now = 50
    users.observe("new", ids([1, 5]), view)
    assert len(users.neighbours("me", view.catalog.known(ids([1])), view, n=5)) == 2
    clock.now = 100
    found = users.neighbours("me", view.catalog.known(ids([1])), view, n=5)
    assert [items.tolist() for _, items in found] == [[1, 5]] and len(users) == 1


def test_forget_removes_the_user(views: tuple[BundleView, BundleView]) -> None:
    view = views[0]
    users = ActiveUsers(max_users=10, items_per_user=5, max_idle_s=3600)
    users.observe("gone", ids([1, 3, 5]), view)
    users.forget("gone")
    assert len(users) == 0 and users.neighbours("me", view.catalog.known(ids([1])), view, n=5) == []


def test_rows_serve_only_the_bundle_version_they_were_computed_with(views: tuple[BundleView, BundleView]) -> None:
    first, second = views
    users = ActiveUsers(max_users=10, items_per_user=5, max_idle_s=3600)
    users.observe("a", ids([1, 3, 5]), first)
    assert users.neighbours("me", first.catalog.known(ids([1])), first, n=5)
    assert users.neighbours("me", second.catalog.known(ids([1])), second, n=5) == []
    users.observe("b", ids([1, 7]), second)
    found = users.neighbours("me", second.catalog.known(ids([1])), second, n=5)
    assert [items.tolist() for _, items in found] == [[1, 7]]


def test_usercf_shows_in_explanations_of_a_live_stack(tiny_bundles: Path, tmp_path: Path) -> None:
    with (
        Stack(tiny_bundles, tmp_path / "state", http_port=0, grpc_port=0, env=USERCF_ON) as stack,
        httpx.Client(base_url=stack.http_url, timeout=10) as http,
    ):
        rows = [
            {"user_id": f"fan{u}", "item_id": item, "timestamp": 1000 + n, "event_id": f"fan{u}-{n}"}
            for u in range(5)
            for n, item in enumerate(ids([1, 3, 5 + 2 * u, 31 + 2 * (u % 4)]))
        ]
        assert http.post("/v1/events", json={"events": rows}).json() == {"accepted": len(rows)}
        http.post("/v1/events", json={"events": [{"user_id": "me", "item_id": "i001", "timestamp": 2000}]})
        answer = http.post("/v1/recommendations", json={"user_id": "me", "k": 40}).json()
    assert not answer["partial"] and not answer["degraded"], answer
    by_usercf = {i["item_id"] for i in answer["items"] if "usercf" in i["sources"]}
    # What the fans did: items 3, 5..13 and 31..37 (item 1 is seen); the odd cluster only.
    assert by_usercf == set(ids([3, 5, 7, 9, 11, 13, 31, 33, 35, 37]))
