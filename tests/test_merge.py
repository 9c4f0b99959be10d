"""gateway.core.Merged: the sources' candidates de-duplicated in priority order, every proposer kept."""

from __future__ import annotations

from gateway.core import Merged


def test_merge_keeps_the_first_place_and_every_proposing_source() -> None:
    merged = Merged.of(
        [
            ("ann", ["a", "b", "c"], [0.9, 0.8, 0.7]),
            ("covisit", ["c", "d", "a"], [3.0, 2.0, 1.0]),
            ("popular", ["e", "d"], [50.0, 40.0]),
        ]
    )
    assert merged.item_ids == ["a", "b", "c", "d", "e"]
    assert merged.names == ("ann", "covisit", "popular")
    assert merged.bits == [0b011, 0b001, 0b011, 0b110, 0b100]
    assert merged.stage_scores("a") == {"ann": 0.9, "covisit": 1.0}
    assert merged.stage_scores("d") == {"covisit": 2.0, "popular": 40.0}
    assert Merged.of([]).item_ids == [] and Merged.of([("ann", [], [])]).bits == []
