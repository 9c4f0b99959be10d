"""Fitting everything a bundle serves from one training part: retriever, item tables and ranker.

Why the ranker is trained on a holdout (the train/serve skew argument): two-tower scores on the
positions the retriever was trained on are optimistic (it has seen those exact next items), and so
are co-visitation counts that include the very pair being predicted; a ranker trained there learns
to trust those features more than they deserve at serving time, when every request is about a
future event. We therefore hold out the last `ranker_holdout_events` events of each user's training
sequence (at most `ranker_holdout_max_frac` of it), fit the retriever and the co-visitation and
popularity tables on the rest, and train the ranker on the held-out events with candidates drawn
exactly as the gateway draws them (ANN + co-visitation + popular, minus the history) plus random
negatives. The retriever that serves is that same retriever: its user tower reads the held-out
events as history at serving time (no retraining: that is what a sequence user tower is for), so the
ranker sees at serving the score distribution it was trained on. The count tables are then rebuilt
on the whole training part (about 10 % more counts: a small, uniform shift).

Measured on ML-100K `loo` (seed 0, default config): holdout scheme HR@10 0.216 / NDCG@10 0.112 for
retrieval + ranking (retrieval alone 0.137); `ranker_scheme="in_sample"` (retriever and tables fitted
on everything, ranker trained on the last events they already saw) HR@10 0.216 / NDCG@10 0.117
(retrieval alone 0.160), with an optimistic training-time candidate recall of 0.87 against 0.81 at
test time. The ranked result ties within noise (±0.013 at 943 cases); we keep the holdout scheme
because it is the one without leakage and its offline numbers are the ones to trust on other data.
Its cost: the served retriever has not trained on each user's last events (items seen only there get
a genre-only embedding), which is why retrieval alone is weaker than in-sample.

`retriever_refit` (default on) removes that cost: once the ranker is trained, the retriever is trained
again on the whole training part and that one serves (retrieval alone on ML-100K `replay` 0.148 ->
0.162 HR@10). The ranker then sees a retriever whose scores it was not trained on; it copes because
its retrieval inputs include scale-free views (z-score and rank within the request, cosine to recent
items): ranked `replay` HR@10 0.209 without refit, 0.212 with it (seed 0, same run; noise ±0.005).
Ranker examples also see item popularity as of their own timestamp (PopularityAsOf), not as of
the end of training, so "popular" never means "will become popular".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from exporter.candidates import CandidatePlan, serving_candidates
from exporter.config import ExportConfig
from exporter.models import Ranker, TwoTower
from exporter.sequences import Sequences, histories_before
from exporter.tables import covisitation, ease_table, item_feature_matrix, popularity, recent_counts
from exporter.train import RankerExamples, Stopwatch, item_table, train_ranker, train_two_tower, user_vectors
from recsys_common.features import Covisit, ItemTables, ranker_feed


def holdout_mask(seqs: Sequences, events: int, max_frac: float) -> npt.NDArray[np.bool_]:
    """(N,) True for each user's last min(events, floor(max_frac * length)) positions."""
    lengths = np.diff(seqs.indptr)
    k = np.minimum(events, np.floor(max_frac * lengths)).astype(np.int64)
    from_end = np.repeat(seqs.indptr[1:], lengths) - np.arange(len(seqs.items))  # 1 for the last event
    return from_end <= np.repeat(k, lengths)


def build_item_tables(
    seqs: Sequences,
    n_items: int,
    genres: npt.NDArray[np.float32],
    item_emb: npt.NDArray[np.float32],
    config: ExportConfig,
) -> tuple[ItemTables, list[str]]:
    """Popularity, co-visitation, EASE and item features counted on seqs, with the retriever's item_emb."""
    pop = popularity(seqs.items, n_items)
    csr = covisitation(seqs, n_items, config.covisit_window, config.covisit_top_m)
    ease = None
    if config.ease_top_m > 0 and n_items <= config.ease_max_items:
        e = ease_table(seqs, n_items, config.ease_lambda, config.ease_top_m)
        ease = Covisit(e.indptr, e.indices, e.scores)
    feats, names = item_feature_matrix(genres, pop, recent_counts(seqs, n_items, config.recent_popularity_fraction))
    tables = ItemTables(
        popularity=pop,
        covisit=Covisit(csr.indptr, csr.indices, csr.scores),
        item_features=feats,
        item_emb=item_emb,
        history_len=config.history_len,
        covisit_decay=config.covisit_recency_decay,
        ease=ease,
        ease_decay=config.ease_recency_decay,
    )
    return tables, names


class PopularityAsOf:
    """Item popularity as it stood at a past moment: all counts, and counts in the trailing window.

    The bundle's popularity columns describe the end of training, which is "now" for serving. A ranker
    example from months earlier must see popularity as it was then: with end-of-training counts it would
    read the future (items that became popular later look popular already) and could never learn what
    "trending now" is worth. Counted over every training event strictly before the example's timestamp.
    """

    def __init__(self, seqs: Sequences, n_items: int, fraction: float) -> None:
        order = np.argsort(seqs.timestamps, kind="stable")
        self.times, self.items, self.n_items = seqs.timestamps[order], seqs.items[order], n_items
        span = float(self.times[-1] - self.times[0]) if self.times.size else 0.0
        self.window = fraction * span  # the same trailing window as exporter.tables.recent_counts

    def columns(self, t: int, cands: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """(log popularity, log recent popularity) of cands at time t, scaled as item_feature_matrix scales them."""
        hi = int(np.searchsorted(self.times, t, side="left"))
        lo = int(np.searchsorted(self.times, t - self.window, side="left"))
        out = []
        for start in (0, lo):
            counts = np.log1p(np.bincount(self.items[start:hi], minlength=self.n_items + 1).astype(np.float32))
            out.append(counts[cands] / max(float(counts.max()), 1e-6))
        return out[0], out[1]


def ranker_examples(
    seqs: Sequences,
    positions: npt.NDArray[np.int64],
    model: TwoTower,
    tables: ItemTables,
    plan: CandidatePlan,
    config: ExportConfig,
    feature_names: list[str] | None = None,
) -> tuple[RankerExamples, float]:
    """One listwise example per position whose true item the candidate plan retrieves; also that recall.

    With feature_names, the popularity columns of each example are recomputed as of its timestamp.
    """
    rng = np.random.default_rng(config.seed + 2)
    as_of = PopularityAsOf(seqs, tables.n_items, config.recent_popularity_fraction) if feature_names else None
    if as_of is not None and feature_names is not None:
        pop_col = len(tables.dense_features) + feature_names.index("log_popularity")
        recent_col = len(tables.dense_features) + feature_names.index("log_recent_popularity")
    histories = histories_before(seqs, positions, config.history_len)
    vecs = user_vectors(model, histories)
    starts = seqs.indptr[:-1][seqs.user_of_position()[positions]]
    keep_h, cands_l, dense_l, tpos = [], [], [], []
    for row, (p, start) in enumerate(zip(positions.tolist(), starts.tolist(), strict=True)):
        seen = seqs.items[start:p]
        target = int(seqs.items[p])
        cands, mask = serving_candidates(tables, seen, vecs[row], plan)
        hit = np.flatnonzero(cands == target)
        if hit.size == 0:
            continue
        if config.ranker_random_negatives:
            draw = rng.integers(1, tables.n_items + 1, size=2 * config.ranker_random_negatives)
            draw = np.unique(draw[~np.isin(draw, seen) & ~np.isin(draw, cands)])[: config.ranker_random_negatives]
            cands = np.concatenate([cands, draw])
            mask = np.concatenate([mask, np.zeros((draw.size, mask.shape[1]), np.float32)])
        feed = ranker_feed(tables, seen, cands, mask, vecs[row])
        if as_of is not None:
            pop_t, recent_t = as_of.columns(int(seqs.timestamps[p]), cands)
            feed["dense"][0, :, pop_col], feed["dense"][0, :, recent_col] = pop_t, recent_t
        keep_h.append(row)
        cands_l.append(cands)
        dense_l.append(feed["dense"][0])
        tpos.append(int(hit[0]))
    recall = len(tpos) / max(len(positions), 1)
    examples = RankerExamples(histories[keep_h], cands_l, dense_l, np.asarray(tpos, dtype=np.int64))
    return examples, recall


@dataclass(frozen=True)
class Fitted:
    """Everything needed to recommend: the retriever, the serving item tables and the ranker."""

    retriever: TwoTower
    tables: ItemTables
    ranker: Ranker
    feature_names: list[str]
    report: dict[str, Any] = field(default_factory=dict)


def fit_models(
    seqs: Sequences,
    n_items: int,
    genres: npt.NDArray[np.float32],
    config: ExportConfig,
    progress: bool = True,
    label: str = "",
    on_epoch: Callable[[int, TwoTower], None] | None = None,
) -> Fitted:
    """Fit retriever, tables and ranker on one training part (see the module docstring for the scheme).

    on_epoch: train_two_tower's per-epoch hook, for the first retriever fit only (not the refit).
    """
    watch = Stopwatch()
    plan = CandidatePlan.from_config(config)
    held = holdout_mask(seqs, config.ranker_holdout_events, config.ranker_holdout_max_frac)
    # "in_sample" exists only to measure the skew the holdout avoids: retriever and tables see the ranker's events.
    prefix = seqs if config.ranker_scheme == "in_sample" else seqs.select(~held)
    retriever = train_two_tower(prefix, n_items, genres, config, progress, label=f"{label}two-tower", on_epoch=on_epoch)
    watch.lap("two_tower")
    emb = item_table(retriever)
    prefix_tables, prefix_names = build_item_tables(prefix, n_items, genres, emb, config)
    examples, recall = ranker_examples(
        seqs,
        np.flatnonzero(held),
        retriever,
        prefix_tables,
        plan,
        config,
        prefix_names if config.ranker_popularity_as_of else None,
    )
    if len(examples) == 0:
        raise RuntimeError("no ranker training example: the candidate plan retrieved none of the held-out items")
    watch.lap("ranker_examples")
    ranker = train_ranker(examples, n_items, config, progress, label=f"{label}ranker")
    watch.lap("ranker")
    if config.retriever_refit and config.ranker_scheme == "holdout":
        # The ranker has learned from the holdout; now let the retriever learn from it too, so the
        # newest events (what a replay's next events resemble most) shape the served embeddings.
        retriever = train_two_tower(seqs, n_items, genres, config, progress, label=f"{label}two-tower refit")
        emb = item_table(retriever)
        watch.lap("two_tower_refit")
    tables, names = build_item_tables(seqs, n_items, genres, emb, config)
    report = {
        "ranker_examples": len(examples),
        "ranker_holdout_events": int(held.sum()),
        "ranker_candidate_recall": round(recall, 4),
        "seconds": watch.seconds,
    }
    torch.set_num_threads(config.torch_threads)
    return Fitted(retriever, tables, ranker, names, report)
