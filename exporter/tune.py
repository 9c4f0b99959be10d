"""`recsys tune`: an Optuna search over the ExportConfig settings that matter, validated inside the training period.

The validation never touches a test event of either protocol. It starts from the rows that are in neither test
part (each user's last event is `loo`'s, everything after the `replay` quantile is `replay`'s) and carves the same
two parts out of those rows again; the trial models are fitted once, on what is left::

    rows in neither test part ──► fit rows      = again neither each user's last row nor after the quantile
                                 loo cases     = each user's last remaining row, history = all its earlier rows
                                 replay cases  = rows after the quantile of the remaining rows, replayed in time
                                                 order with the `replay` counting rule (histories grow)

One fit serves both case sets (two fits per trial would not fit the budget of a minute per trial on ML-100K).
The objective is the mean NDCG@k of two_tower+ranker, the model the stack serves, over the two case sets.
A trial runs fit_models and evaluate_cases only (no ONNX export, no index build) and, to halve its cost, without
`retriever_refit` (the refit retrains the retriever on the same settings; its effect is small and uniform).
The first trial is always the base config, and it stays the answer unless a trial beats it by more than noise:
the best settings are those of the highest-valued trial whose gain over the base exceeds `min_gain_se` (2) standard
errors of the paired per-case difference (both fits ranked the same cases, so the per-case NDCG differences carry
the noise of the comparison; the two case sets' errors add as the mean's do). Without that rule, a re-tune from
tuned defaults (ML-100K, 20 trials) picked a trial 0.0025 above the base on validation, within noise, that
exported worse on both protocols (loo HR@10 0.2216 against 0.2280, replay 0.2274 against 0.2344).

What a trial costs, and the two things that keep 20 of them within 20 minutes on 2 shared cores (ML-100K, one
trial profiled: two-tower fit ~29 s, ranker examples ~14 s, ranker ~7 s, evaluation ~7 s):

- Trials run torch and BLAS on `TuneSettings.threads` threads (default 1), whatever the config's torch_threads
  (config.json keeps the base's). With another process busy on one of the 2 cores, two threads spend their time
  waiting for each other: 2 epochs of the two-tower took 89-97 s on 2 threads against 6-17 s on 1 thread, and
  one whole trial 198 s against 61 s. The thread count changes float summation order, so a trial's value moves
  within noise (base config: 0.1162 on 2 threads, 0.1147 on 1); with a fixed count it is reproducible.
- Pruning (Optuna's MedianPruner). The retriever's own NDCG@k on the same validation cases (exact scores over
  every unseen item, the mean over the two case sets) is reported at PRUNE_FRACTIONS of its epochs; a trial whose
  best report so far is below the median of the completed trials' reports at that epoch stops there, before
  the ranker's part of the trial. The pruner starts once `prune_startup_trials` trials have completed, and trial
  0, the base config, is never pruned. Pruned trials count toward the trial budget and are recorded as PRUNED
  (trials.json, report). The reports do not change the fit: the hook draws no random numbers, so a trial that
  completes has the value it would have without pruning. The first report is at half the fit, not earlier: in
  a 20-trial run with reports from epoch 3 of 12, the base config's retriever trailed the median at epoch 3
  (0.028 against 0.031) and ended fourth best of the 11 completed ones (0.084); at epoch 6 the trials that went
  on to be good (0.054-0.063) were already apart from the poor ones (0.033-0.049).

Measured with both (`nice -n 19 recsys tune --trials 20` on ML-100K, load average 1.0-4.7 from another user's
benchmark): 917 s in all, 13 trials completed (62 s each on average), 7 pruned (16 s); before, 1,274 s.

    result = tune(load_dataset(data_dir), ExportConfig(), TuneSettings(trials=20, seed=0), out_dir)
    ExportConfig.from_json(out_dir / CONFIG_JSON)  # what `recsys export --config` takes
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import optuna
from threadpoolctl import threadpool_limits

from exporter.config import ExportConfig
from exporter.data import Dataset
from exporter.evaluate import Cases, evaluate_cases
from exporter.fit import fit_models
from exporter.models import TwoTower
from exporter.protocols import loo_split, replay_events, replay_split, time_order
from exporter.sequences import Sequences, encode_items, item_vocabulary
from exporter.tables import genre_multi_hot
from exporter.train import item_table, user_vectors
from exporter.tune_report import write_tune_report

I64 = npt.NDArray[np.int64]
PROJECT = "two_tower+ranker"
CONFIG_JSON, TRIALS_JSON = "config.json", "trials.json"
# When the pruning signal is reported, as fractions of tt_epochs (rounded up): epochs 6, 9 and 12 of 12 (why not
# earlier: the module docstring). Each report costs about 0.4 s on ML-100K; every epoch would add a few seconds.
PRUNE_FRACTIONS = (0.5, 0.75, 1.0)

# name -> (kind, choices or (low, high)); kind is "cat", "float" or "log". search_space() adds the base config's
# values, so the base config is always the first trial. FAISS index parameters are not searched: the exporter picks
# them against a recall floor (exact search below 50 000 items), so what the index adds to quality is how deep it
# is asked (cand_ann).
Space = dict[str, tuple[str, tuple[Any, ...]]]
SPACE: Space = {
    "tt_dim": ("cat", (32, 64, 96, 128)),  # embedding size
    "tt_lr": ("log", (1e-3, 2e-2)),
    "tt_dropout": ("float", (0.1, 0.5)),
    "history_len": ("cat", (20, 30, 50, 80)),
    "covisit_recency_decay": ("float", (0.5, 1.0)),  # recency weighting of co-visitation
    "ranker_random_negatives": ("cat", (0, 8, 16, 32)),
    "ranker_hidden": ("cat", ("64,32", "128,64", "256,128")),  # ranker width
    "ranker_dim": ("cat", (16, 32, 64)),
    "cand_ann": ("cat", (100, 200, 300)),  # ANN retrieval depth
}


@dataclass(frozen=True)
class TuneSettings:
    """The search budget (trials or minutes, whichever ends first) and the cost of one trial."""

    trials: int = 20
    minutes: float | None = None
    seed: int = 0  # the sampler's seed and the case sample's; training is seeded by ExportConfig.seed
    max_cases: int = 2000  # per case set, a seeded sample: evaluation cost stays bounded on large data
    startup_trials: int = 5  # random trials (after the base config) before TPE models the results
    threads: int = 1  # torch and BLAS threads of a trial (see the module docstring)
    prune: bool = True  # stop trials whose retriever trails the median (see the module docstring)
    prune_startup_trials: int = 3  # completed trials (the base config among them) before any trial is pruned
    min_gain_se: float = 2.0  # a trial replaces the base only above this many standard errors of gain (0: any gain)

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise ValueError(f"trials must be >= 1, got {self.trials!r}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads!r}")
        if self.prune_startup_trials < 1:
            raise ValueError(f"prune_startup_trials must be >= 1, got {self.prune_startup_trials!r}")
        if self.minutes is not None and not self.minutes > 0:
            raise ValueError(f"minutes must be > 0, got {self.minutes!r}")
        if self.max_cases < 1:
            raise ValueError(f"max_cases must be >= 1, got {self.max_cases!r}")
        if not self.min_gain_se >= 0:
            raise ValueError(f"min_gain_se must be >= 0, got {self.min_gain_se!r}")


@dataclass(frozen=True)
class ValidationSplit:
    """The fit part and the two validation case sets, with the dataset rows behind them (for checks and reports).

    fit_rows, case_rows and history rows index the original Dataset; none is in a test part of `loo` or `replay`.
    """

    fit_rows: I64
    vocab: tuple[str, ...]
    seqs: Sequences
    cut: int  # replay cases are the rows after this timestamp
    cases: dict[str, Cases]
    case_rows: dict[str, I64]  # the dataset row of each case's target, aligned with cases[...].targets


def _sample(n: int, limit: int, seed: int) -> I64:
    """Sorted indices of a seeded sample of at most limit of n."""
    if n <= limit:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False)).astype(np.int64)


def validation_split(ds: Dataset, config: ExportConfig, max_cases: int = 2000, seed: int = 0) -> ValidationSplit:
    """The validation split of the module docstring, from the rows in neither protocol's test part."""
    loo_train, _ = loo_split(ds.user_ids, ds.timestamps)
    rows = np.flatnonzero(loo_train & replay_split(ds.timestamps, config.replay_quantile))
    users, items, times = ds.user_ids[rows], ds.item_ids[rows], ds.timestamps[rows]
    before_cut = replay_split(times, config.replay_quantile)
    if not before_cut.any() or before_cut.all():
        raise ValueError(f"{len(ds)} interactions leave no validation events after the replay quantile")
    cut = int(times[before_cut].max())
    keep, loo_rows = loo_split(users, times)
    fit = keep & before_cut
    vocab = item_vocabulary(items[fit])
    idx = encode_items(items, vocab)
    seqs = Sequences.build(users[fit], idx[fit], times[fit])

    # loo: each user's last row; its history is every earlier row of the user that the model can know.
    order = time_order(users, times)
    first = np.r_[True, users[order][1:] != users[order][:-1]]
    starts = np.flatnonzero(first)
    pos_in_order = np.empty(len(order), dtype=np.int64)
    pos_in_order[order] = np.arange(len(order))
    loo_rows = loo_rows[idx[loo_rows] > 0]  # an item first seen after the fit part cannot be recommended
    loo_seen = []
    for r in loo_rows.tolist():
        p = pos_in_order[r]
        start = starts[np.searchsorted(starts, p, side="right") - 1]
        hist = idx[order[start:p]]
        loo_seen.append(hist[hist > 0])
    loo = Cases(loo_seen, idx[loo_rows])

    # replay: the `replay` rule over every row outside the fit part, counting only the rows after the cut (the
    # others are last rows of users with nothing after the cut, so they never enter a counted history).
    history = {u: seqs.user_seq(k).tolist() for k, u in enumerate(seqs.users.tolist())}
    seen, replay_rows = [], []
    for event in replay_events(users, items, times, fit):
        h = history.setdefault(users[event.row].item(), [])
        if event.counted and times[event.row] > cut:
            seen.append(np.asarray(h, dtype=np.int64))
            replay_rows.append(event.row)
        if idx[event.row] > 0:
            h.append(int(idx[event.row]))
    replay_r = np.asarray(replay_rows, dtype=np.int64)
    replay = Cases(seen, idx[replay_r])

    cases, case_rows = {}, {}
    for k, (name, c, r) in enumerate((("loo", loo, loo_rows), ("replay", replay, replay_r))):
        pick = _sample(len(c.targets), max_cases, seed + k)
        cases[name] = Cases([c.seen[i] for i in pick.tolist()], c.targets[pick])
        case_rows[name] = rows[r[pick]]
    return ValidationSplit(rows[fit], vocab, seqs, cut, cases, case_rows)


def _point(config: ExportConfig, name: str) -> Any:
    value = getattr(config, name)
    return ",".join(str(x) for x in value) if name == "ranker_hidden" else value


def search_space(base: ExportConfig) -> Space:
    """SPACE widened to hold the base config's values (a choice added, a range stretched), so it can be trial 0."""
    out: Space = {}
    for name, (kind, spec) in SPACE.items():
        value = _point(base, name)
        if kind == "cat":
            out[name] = (kind, spec if value in spec else (value, *spec))
        else:
            out[name] = (kind, (min(spec[0], value), max(spec[1], value)))
    return out


def base_params(base: ExportConfig, space: Space) -> dict[str, Any]:
    """The base config as a point of space (enqueued as the first trial)."""
    return {name: _point(base, name) for name in space}


def suggest(trial: optuna.Trial, space: Space) -> dict[str, Any]:
    """ExportConfig overrides for one trial, drawn from space."""
    out: dict[str, Any] = {}
    for name, (kind, spec) in space.items():
        if kind == "cat":
            out[name] = trial.suggest_categorical(name, list(spec))
        else:
            out[name] = trial.suggest_float(name, spec[0], spec[1], log=kind == "log")
    return out


def apply(config: ExportConfig, params: dict[str, Any]) -> ExportConfig:
    """config with trial params (ranker_hidden arrives as "128,64"); tt_heads follows tt_dim when it must."""
    values = dict(params)
    if isinstance(values.get("ranker_hidden"), str):
        values["ranker_hidden"] = tuple(int(x) for x in values["ranker_hidden"].split(","))
    dim = values.get("tt_dim", config.tt_dim)
    if dim % config.tt_heads:
        values["tt_heads"] = 1
    return dataclasses.replace(config, **values)


def prune_epochs(epochs: int) -> list[int]:
    """The epochs of a tt_epochs-long retriever fit at which the pruning signal is reported."""
    return sorted({max(1, math.ceil(f * epochs)) for f in PRUNE_FRACTIONS})


class RetrievalProbe:
    """The pruning signal: NDCG@k of the retriever alone on the validation case sets, their mean.

    Exact scores over every item, minus each case's seen items (so a target the user has already seen scores 0,
    as in evaluate_cases). The padded histories are built once per history_len.
    """

    def __init__(self, cases: dict[str, Cases], k: int) -> None:
        self.cases, self.k = cases, k
        self._histories: dict[int, dict[str, I64]] = {}

    def __call__(self, model: TwoTower, history_len: int) -> float:
        if history_len not in self._histories:
            self._histories[history_len] = {n: c.histories(history_len) for n, c in self.cases.items()}
        table = item_table(model)[1:]  # (n_items, D)
        scores = []
        for name, cases in self.cases.items():
            vecs = user_vectors(model, self._histories[history_len][name])
            scores.append(retrieval_ndcg(vecs @ table.T, cases, self.k))
        return float(np.mean(scores))


def retrieval_ndcg(scores: npt.NDArray[np.float32], cases: Cases, k: int) -> float:
    """Mean NDCG@k of full-catalogue scores (cases, n_items) for item indices 1..n, each case's seen items left out.

    A target's rank is the number of unseen items scored above it (ties count in its favour).
    """
    if not len(cases.targets):
        return 0.0
    scores = scores.copy()
    rows = np.repeat(np.arange(len(cases.seen)), [len(h) for h in cases.seen])
    cols = np.concatenate(cases.seen) - 1 if cases.seen else np.zeros(0, dtype=np.int64)
    scores[rows[cols >= 0], cols[cols >= 0]] = -np.inf
    target = scores[np.arange(len(scores)), cases.targets - 1]
    rank = (scores > target[:, None]).sum(axis=1)
    hit = np.isfinite(target) & (rank < k)
    return float(np.where(hit, 1.0 / np.log2(rank + 2.0), 0.0).mean())


def evaluate_trial(
    split: ValidationSplit,
    genres: npt.NDArray[np.float32],
    config: ExportConfig,
    on_epoch: Callable[[int, TwoTower], None] | None = None,
) -> dict[str, Any]:
    """Fit on the split (no refit) and score both case sets: NDCG@k per set, their mean ("value"), timings, and
    "per_case": each set's per-case NDCG (arrays, for paired_gain).

    on_epoch: fit_models' hook into the retriever fit (the pruning reports).
    """
    t = time.perf_counter()
    trial_config = dataclasses.replace(config, retriever_refit=False)
    fitted = fit_models(split.seqs, len(split.vocab), genres, trial_config, progress=False, on_epoch=on_epoch)
    t_eval = time.perf_counter()
    per_case = {
        name: evaluate_cases(fitted, cases, trial_config, per_case=True)[PROJECT]["ndcg_per_case"]
        for name, cases in split.cases.items()
    }
    scores = {name: float(v.mean()) if v.size else 0.0 for name, v in per_case.items()}
    return {
        "per_case": per_case,
        **{name: round(v, 5) for name, v in scores.items()},
        "value": float(np.mean(list(scores.values()))),
        "seconds": round(time.perf_counter() - t, 1),
        "step_seconds": {**fitted.report["seconds"], "evaluate": round(time.perf_counter() - t_eval, 2)},
    }


PerCase = dict[str, npt.NDArray[np.float64]]  # case set name -> per-case NDCG@k of one trial


def paired_gain(trial: PerCase, base: PerCase) -> tuple[float, float]:
    """The objective's gain of trial over base and its standard error, from per-case NDCG on the same case sets.

    The objective is the mean over case sets of each set's mean, so the gain is the mean of the sets' mean
    differences and its variance the sum of their variances (sample variance / cases) over the sets squared.
    """
    gains, variances = [], []
    for name, b in base.items():
        d = trial[name] - b
        gains.append(float(d.mean()) if d.size else 0.0)
        variances.append(float(d.var(ddof=1)) / d.size if d.size > 1 else 0.0)
    return float(np.mean(gains)), math.sqrt(sum(variances)) / len(base)


def select_best(rows: list[dict[str, Any]], min_gain_se: float) -> int:
    """The trial whose settings win: the highest-valued completed trial with gain > min_gain_se * its standard
    error over the base (trial 0), else the base. Without a completed base, the highest-valued completed trial."""
    done = [r for r in rows if r["state"] == "COMPLETE"]
    if not done:
        raise RuntimeError("no trial completed")
    if done[0]["trial"] != 0:
        return int(max(done, key=lambda r: r["value"])["trial"])
    better = [r for r in done[1:] if r["gain"] > min_gain_se * r["gain_se"]]
    return int(max(better, key=lambda r: r["value"])["trial"]) if better else 0


@dataclass(frozen=True)
class TuneResult:
    """The best trial's settings and value, and the files written."""

    best_params: dict[str, Any]
    best_value: float
    base_value: float | None  # None when the base trial did not complete
    summary: dict[str, Any]  # what trials.json holds
    files: list[Path]


def tune(
    ds: Dataset,
    base: ExportConfig,
    settings: TuneSettings,
    out_dir: Path,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TuneResult:
    """Search SPACE around base; write the best config (base with the best params), the report and the plot."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    split = validation_split(ds, base, settings.max_cases, settings.seed)
    genres = genre_multi_hot(split.vocab, ds.genres, ds.genre_names)
    log(
        f"validation: fit on {len(split.fit_rows)} interactions; "
        + ", ".join(f"{n} {len(c.targets)} cases" for n, c in split.cases.items())
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=settings.seed, n_startup_trials=settings.startup_trials)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=settings.prune_startup_trials) if settings.prune else None
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)
    space = search_space(base)
    study.enqueue_trial(base_params(base, space))
    probe = RetrievalProbe(split.cases, base.eval_k)
    checks = prune_epochs(base.tt_epochs) if settings.prune else []
    per_case: dict[int, PerCase] = {}  # trial number -> per-case NDCG by case set

    def objective(trial: optuna.Trial) -> float:
        config = dataclasses.replace(apply(base, suggest(trial, space)), torch_threads=settings.threads)
        start = time.perf_counter()

        def on_epoch(epoch: int, model: TwoTower) -> None:
            if epoch not in checks:
                return
            trial.report(probe(model, config.history_len), epoch)
            if trial.number > 0 and trial.should_prune():  # trial 0, the base config, always completes
                trial.set_user_attr("pruned_at_epoch", epoch)
                trial.set_user_attr("seconds", round(time.perf_counter() - start, 1))
                raise optuna.TrialPruned(f"retriever NDCG@{base.eval_k} below the median at epoch {epoch}")

        result = evaluate_trial(split, genres, config, on_epoch)
        per_case[trial.number] = result.pop("per_case")
        for key, value in result.items():
            trial.set_user_attr(key, value)
        return float(result["value"])

    def report_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        a = trial.user_attrs
        if trial.state == optuna.trial.TrialState.PRUNED:
            epoch = a["pruned_at_epoch"]
            log(
                f"trial {trial.number}: pruned at two-tower epoch {epoch} of {base.tt_epochs} (retriever "
                f"NDCG@{base.eval_k} {trial.intermediate_values[epoch]:.4f})  {a['seconds']:.0f} s"
            )
            return
        if trial.state != optuna.trial.TrialState.COMPLETE:
            log(f"trial {trial.number}: {trial.state.name}")
            return
        versus = ""
        if trial.number > 0 and 0 in per_case:
            gain, se = paired_gain(per_case[trial.number], per_case[0])
            versus = f"  vs base {gain:+.4f} ± {se:.4f}"
        log(
            f"trial {trial.number}: NDCG@{base.eval_k} {trial.value:.4f} (loo {a['loo']:.4f}, replay {a['replay']:.4f})"
            f"{versus}  {a['seconds']:.0f} s"
        )

    timeout = settings.minutes * 60 if settings.minutes is not None else None
    started = time.perf_counter()
    with threadpool_limits(settings.threads, "blas"):
        study.optimize(
            objective,
            n_trials=settings.trials,
            timeout=timeout,
            show_progress_bar=progress,
            callbacks=[report_trial],
            catch=(RuntimeError,),  # e.g. a plan that retrieves none of the ranker's held-out items: that trial fails
        )
    search_seconds = time.perf_counter() - started
    rows = trial_rows(study, per_case)
    for n, row in enumerate(rows):  # the trial the rule would have chosen had the search stopped here
        row["chosen"] = select_best(rows[: n + 1], settings.min_gain_se) if row["state"] == "COMPLETE" else None
    best = study.trials[select_best(rows, settings.min_gain_se)]
    best_config = apply(base, best.params)
    (out_dir / CONFIG_JSON).write_text(json.dumps(best_config.to_dict(), indent=2) + "\n")
    summary = {
        "settings": dataclasses.asdict(settings),
        "space": {k: [kind, list(spec)] for k, (kind, spec) in space.items()},
        "validation": {
            "fit_interactions": len(split.fit_rows),
            "cut": split.cut,
            "cases": {n: len(c.targets) for n, c in split.cases.items()},
        },
        "pruning": {
            "rule": "median" if settings.prune else "off",
            "signal": f"two_tower NDCG@{base.eval_k}",
            "epochs": checks,
            "tt_epochs": base.tt_epochs,
            "startup_trials": settings.prune_startup_trials,
        },
        "seconds": round(search_seconds, 1),
        "best": {
            "trial": best.number,
            "value": best.value,
            "params": best.params,
            "rule": f"highest value with a gain over the base above {settings.min_gain_se:g} standard errors, "
            "else the base",
        },
        "trials": rows,
    }
    (out_dir / TRIALS_JSON).write_text(json.dumps(summary, indent=2) + "\n")
    files = [out_dir / CONFIG_JSON, out_dir / TRIALS_JSON, *write_tune_report(summary, base.eval_k, out_dir)]
    return TuneResult(best.params, float(best.value), rows[0]["value"], summary, files)


def trial_rows(study: optuna.Study, per_case: dict[int, PerCase] | None = None) -> list[dict[str, Any]]:
    """One plain dict per trial: number, state, value, per-case-set NDCG, gain over the base, seconds, the pruning
    reports, params.

    gain, gain_se: paired_gain over trial 0 (None for trial 0 and for trials without per-case results);
    retrieval: the pruning signal by epoch; pruned_at_epoch: the epoch a PRUNED trial stopped at (else None).
    """
    per_case = per_case or {}
    rows = []
    for t in study.trials:
        a = t.user_attrs
        gain, se = (None, None)
        if t.number > 0 and t.number in per_case and 0 in per_case:
            gain, se = paired_gain(per_case[t.number], per_case[0])
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name,
                # Optuna gives a pruned trial its last report as value: that is the pruning signal, not the objective.
                "value": t.value if t.state == optuna.trial.TrialState.COMPLETE else None,
                "loo": a.get("loo"),
                "replay": a.get("replay"),
                "gain": None if gain is None else round(gain, 5),
                "gain_se": None if se is None else round(se, 5),
                "seconds": a.get("seconds"),
                "step_seconds": a.get("step_seconds"),
                "retrieval": {str(epoch): round(v, 5) for epoch, v in sorted(t.intermediate_values.items())},
                "pruned_at_epoch": a.get("pruned_at_epoch"),
                "params": t.params,
            }
        )
    return rows
