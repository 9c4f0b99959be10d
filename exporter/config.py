"""ExportConfig: every knob of an export, with defaults that fit a 2-core laptop and ML-100K."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROTOCOLS = ("loo", "replay")


@dataclass(frozen=True)
class ExportConfig:
    """All training, table, evaluation and export settings of one `recsys export` run.

    Recorded verbatim in the manifest (`training.config`) so a bundle says how it was made.
    """

    seed: int = 0
    torch_threads: int = 2
    # Defaults from `recsys tune` on ML-100K (trial 11 of 20, validation carved from the training period):
    # history_len, tt_dim, tt_dropout, tt_lr, covisit_recency_decay, cand_ann, ranker_hidden and
    # ranker_random_negatives. Exporter report, tuned vs the previous defaults: loo HR@10 0.2344 vs 0.2163,
    # replay 0.2314 vs 0.2261; live replay (bench/quality.py) 0.2231 vs 0.2146.
    history_len: int = 20

    # Two-tower retriever: item tower = id embedding (+ genres); user tower = causal self-attention.
    tt_dim: int = 96
    tt_layers: int = 2
    tt_heads: int = 2
    tt_dropout: float = 0.217
    tt_epochs: int = 12
    tt_batch_size: int = 128
    tt_lr: float = 0.0101
    tt_weight_decay: float = 0.01
    tt_use_genres: bool = True
    tt_bf16: bool = True  # bf16 autocast for training matmuls; export and evaluation always run fp32

    # Item-to-item and popularity tables.
    covisit_window: int = 20
    covisit_top_m: int = 200
    covisit_recency_decay: float = 0.608
    recent_popularity_fraction: float = 0.1
    # EASE item-item table (ease.npz) behind the ranker's ease_* features: EASE with ease_lambda (the baseline's
    # lambda) fitted on the training part, each item's ease_top_m largest positive weights; 0 = no table and no
    # ease_* features. Catalogues above ease_max_items get none (EASE inverts a dense n_items^2 matrix).
    # ML-100K, mean of 3 ranker seeds: replay HR@10 0.213 -> 0.220 with the features, 0.225 with top_m 400 and
    # ranker_holdout_events 20; the recency decay 0.7 (session) sits beside an unweighted sum (taste).
    ease_top_m: int = 400
    ease_recency_decay: float = 0.7
    ease_max_items: int = 20_000

    # Serving candidate plan, mirrored when the ranker is trained and evaluated.
    cand_ann: int = 100  # mirrors the gateway's ann_candidates
    cand_covisit: int = 100
    cand_popular: int = 50

    # Ranker (DCN-v2 style) trained listwise on held-out events of each training sequence.
    ranker_dim: int = 32
    ranker_cross_layers: int = 2
    ranker_hidden: tuple[int, ...] = (256, 128)
    ranker_dropout: float = 0.0
    ranker_epochs: int = 2  # 3+ overfits the id embeddings (replay 0.210 at 2, 0.193 at 8)
    ranker_train_candidates: int = 64
    ranker_batch_size: int = 128
    ranker_lr: float = 2e-3
    ranker_weight_decay: float = 1e-4
    ranker_holdout_events: int = 20  # 10 gave replay HR@10 0.220 against 0.225 (more examples, see ease_top_m)
    ranker_holdout_max_frac: float = 0.3
    ranker_random_negatives: int = 32
    ranker_scheme: str = "holdout"  # or "in_sample" (for measuring train/serve skew only; see exporter/fit.py)
    # Refit the served retriever on the whole training part once the ranker is trained (see exporter/fit.py).
    retriever_refit: bool = True
    # Ranker examples see item popularity as of their own timestamp (see exporter.fit.PopularityAsOf).
    ranker_popularity_as_of: bool = True
    # int8 dynamic quantization of ranker.onnx: evaluated under each protocol, shipped only when the NDCG@k
    # drop is at most ranker_int8_max_ndcg_drop on every evaluated protocol.
    ranker_int8: bool = True
    ranker_int8_max_ndcg_drop: float = 0.005

    # Evaluation and export gates.
    eval_protocols: tuple[str, ...] = PROTOCOLS
    eval_k: int = 10
    replay_quantile: float = 0.9
    parity_rows: int = 1000
    parity_tol: float = 1e-4
    # Refuse to publish when the chosen FAISS index's recall@100 against exact search is below this.
    index_recall_floor: float = 0.95
    # Index candidates: exact search up to this many items (IndexPolicy.exact_max_items); None = no size limit
    # on the index's memory (IndexPolicy.memory_budget_bytes).
    index_exact_max_items: int = 50_000
    index_memory_budget_bytes: int | None = None
    opset: int = 18

    # Reference models evaluated beside the project's under each protocol (exporter/baselines.py); most_pop is
    # always evaluated. ALS is the `implicit` library's, seeded with `seed`.
    baselines: tuple[str, ...] = ("itemknn", "ease", "als")
    knn_neighbours: int = 100
    ease_lambda: float = 500.0
    als_factors: int = 64
    als_regularization: float = 0.05
    als_alpha: float = 10.0
    als_iterations: int = 20

    # Publish only if the project (two_tower+ranker) beats most_pop by more than the margin on HR@k and NDCG@k
    # under every evaluated protocol.
    gate_beat_most_pop: bool = True
    gate_most_pop_margin: float = 0.0
    # Bundle versions kept in the bundles directory after a publish (CURRENT and the one before are never removed).
    keep_versions: int = 5

    def __post_init__(self) -> None:
        bad = [b for b in self.baselines if b not in ("itemknn", "ease", "als")]
        if bad:
            raise ValueError(f"baselines: unknown baseline(s) {bad}; choose from ['itemknn', 'ease', 'als']")
        if self.keep_versions < 1:
            raise ValueError(f"keep_versions must be >= 1, got {self.keep_versions!r}")
        if self.gate_most_pop_margin < 0:
            raise ValueError(f"gate_most_pop_margin must be >= 0, got {self.gate_most_pop_margin!r}")
        from exporter.baselines import BaselineSettings

        BaselineSettings.from_config(self)  # names the bad knn_/ease_/als_ field
        unknown = [p for p in self.eval_protocols if p not in PROTOCOLS]
        if unknown:
            raise ValueError(f"eval_protocols: unknown protocol(s) {unknown}; choose from {list(PROTOCOLS)}")
        if self.ranker_scheme not in ("holdout", "in_sample"):
            raise ValueError(f"ranker_scheme must be 'holdout' or 'in_sample', not {self.ranker_scheme!r}")
        if self.tt_dim % self.tt_heads:
            raise ValueError(f"tt_dim ({self.tt_dim}) must be divisible by tt_heads ({self.tt_heads})")
        if self.history_len < 1:
            raise ValueError("history_len must be >= 1")
        if self.ease_top_m < 0:
            raise ValueError(f"ease_top_m must be >= 0, got {self.ease_top_m!r}")
        if not 0 < self.ease_recency_decay <= 1:
            raise ValueError(f"ease_recency_decay must be in (0, 1], got {self.ease_recency_decay!r}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ExportConfig:
        """Build from a plain dict (JSON); unknown keys are an error, not silently ignored."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(fields))
        if unknown:
            raise ValueError(f"unknown ExportConfig key(s): {', '.join(unknown)}; known keys: {', '.join(fields)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
        return cls(**values)

    @classmethod
    def from_json(cls, path: Path) -> ExportConfig:
        try:
            raw = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a JSON object of ExportConfig keys")
        try:
            return cls.from_dict(raw)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from None

    @classmethod
    def tiny(cls, **overrides: Any) -> ExportConfig:
        """Seconds-long settings for tests and demos on small synthetic data.

        Every training setting is fixed here, so tests keep their models when the defaults are retuned.
        """
        base: dict[str, Any] = dict(
            history_len=10,
            tt_dim=16,
            tt_lr=5e-3,
            tt_dropout=0.3,
            covisit_recency_decay=0.8,
            tt_layers=1,
            tt_heads=1,
            tt_epochs=3,
            tt_batch_size=64,
            ranker_dim=8,
            ranker_hidden=(16,),
            ranker_epochs=2,
            cand_ann=20,
            cand_covisit=10,
            cand_popular=5,
            ranker_random_negatives=4,
            ranker_holdout_events=3,
            eval_protocols=(),
            parity_rows=64,
        )
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
