"""Worked examples for the single-target top-k metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from exporter.metrics import hit_rate_at_k, ndcg_at_k, summarize


def test_perfect_ranking_scores_one() -> None:
    assert hit_rate_at_k([7, 3, 5], 7, 10) == 1.0
    assert ndcg_at_k([7, 3, 5], 7, 10) == 1.0


def test_miss_scores_zero() -> None:
    assert hit_rate_at_k([1, 2, 3], 9, 10) == 0.0
    assert ndcg_at_k([1, 2, 3], 9, 10) == 0.0


def test_target_beyond_k_is_a_miss() -> None:
    ranked = list(range(1, 21))
    assert hit_rate_at_k(ranked, 11, 10) == 0.0
    assert ndcg_at_k(ranked, 11, 10) == 0.0
    assert hit_rate_at_k(ranked, 10, 10) == 1.0


def test_worked_example_rank_three() -> None:
    # Target at 0-based rank 2: NDCG = 1 / log2(2 + 2) = 0.5.
    assert ndcg_at_k([4, 8, 15, 16, 23], 15, 10) == pytest.approx(0.5)
    assert ndcg_at_k([4, 8, 15], 8, 10) == pytest.approx(1 / math.log2(3))


def test_summarize_matches_per_case_metrics() -> None:
    topk = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    targets = np.array([1, 6, 42])
    report = summarize(topk, targets, n_items=20)
    assert report["hr"] == pytest.approx(2 / 3)
    expected = np.mean([ndcg_at_k(r, t, 3) for r, t in zip(topk, targets, strict=True)])
    assert report["ndcg"] == pytest.approx(expected)
    assert report["coverage"] == pytest.approx(9 / 20)
    assert report["cases"] == 3
