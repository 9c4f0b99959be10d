"""`recsys tune`: validation split inside the training period, reproducible search, config and report files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from exporter.config import ExportConfig
from exporter.data import Dataset, load_dataset
from exporter.evaluate import Cases
from exporter.models import TwoTower
from exporter.protocols import loo_split, replay_split
from exporter.synth import generate
from exporter.tables import genre_multi_hot
from exporter.train import train_two_tower
from exporter.tune import (
    SPACE,
    RetrievalProbe,
    TuneSettings,
    apply,
    paired_gain,
    prune_epochs,
    retrieval_ndcg,
    search_space,
    select_best,
    tune,
    validation_split,
)
from recsys_cli.main import main

TINY = ExportConfig.tiny()


@pytest.fixture(scope="module")
def synth_ds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Dataset]:
    data = tmp_path_factory.mktemp("synth")
    generate(data, n_users=80, n_items=60, n_clusters=4, events_per_user=(8, 25), seed=3)
    return data, load_dataset(data)


def test_validation_split_holds_no_test_event(synth_ds: tuple[Path, Dataset]) -> None:
    _, ds = synth_ds
    split = validation_split(ds, TINY)
    _, loo_test = loo_split(ds.user_ids, ds.timestamps)
    replay_cut = ds.timestamps[replay_split(ds.timestamps, TINY.replay_quantile)].max()
    used = np.concatenate([split.fit_rows, *split.case_rows.values()])
    assert not np.isin(used, loo_test).any()
    assert ds.timestamps[used].max() <= replay_cut
    # The fit part ends at the validation cut; replay cases come after it, in time order.
    assert ds.timestamps[split.fit_rows].max() <= split.cut < replay_cut
    replay_times = ds.timestamps[split.case_rows["replay"]]
    assert (replay_times > split.cut).all() and (np.diff(replay_times) >= 0).all()
    # loo cases: one per user, each its user's last row among the validation rows, never a fitted row.
    loo_rows = split.case_rows["loo"]
    assert len(set(ds.user_ids[loo_rows].tolist())) == len(loo_rows) > 0
    assert not np.isin(loo_rows, split.fit_rows).any()
    for row in loo_rows.tolist():
        mine = split.fit_rows[ds.user_ids[split.fit_rows] == ds.user_ids[row]]
        assert (ds.timestamps[mine] <= ds.timestamps[row]).all()
    assert len(split.seqs.items) == len(split.fit_rows)
    for name, cases in split.cases.items():
        assert len(cases.seen) == len(cases.targets) == len(split.case_rows[name]) > 0
        assert (cases.targets > 0).all()


def test_case_sample_is_seeded_and_bounded(synth_ds: tuple[Path, Dataset]) -> None:
    _, ds = synth_ds
    a, b = validation_split(ds, TINY, max_cases=25, seed=4), validation_split(ds, TINY, max_cases=25, seed=4)
    assert all(len(a.case_rows[n]) == 25 for n in ("loo", "replay"))
    assert all(np.array_equal(a.case_rows[n], b.case_rows[n]) for n in ("loo", "replay"))
    c = validation_split(ds, TINY, max_cases=25, seed=5)
    assert not np.array_equal(a.case_rows["replay"], c.case_rows["replay"])


def test_space_holds_the_base_config() -> None:
    space = search_space(TINY)
    for name, (_kind, spec) in space.items():
        for value in (spec[0], spec[-1]):  # each end of every dimension makes a valid config holding that value
            got = getattr(apply(TINY, {name: value}), name)
            assert (",".join(map(str, got)) if name == "ranker_hidden" else got) == value
    assert 16 in space["tt_dim"][1] and "16" in space["ranker_hidden"][1] and space["cand_ann"][1][0] == 20
    assert search_space(ExportConfig()) == SPACE  # the defaults lie inside the space as written
    assert apply(TINY, {"ranker_hidden": "256,128"}).ranker_hidden == (256, 128)


def test_tune_writes_config_and_report_and_repeats_with_a_seed(synth_ds: tuple[Path, Dataset], tmp_path: Path) -> None:
    _, ds = synth_ds
    settings = TuneSettings(trials=3, seed=7)
    first = tune(ds, TINY, settings, tmp_path / "a", progress=False, log=lambda _: None)
    second = tune(ds, TINY, settings, tmp_path / "b", progress=False, log=lambda _: None)
    assert first.best_params == second.best_params and first.best_value == second.best_value
    values = [t["value"] for t in first.summary["trials"]]
    assert values == [t["value"] for t in second.summary["trials"]]
    assert first.base_value == values[0]
    # The chosen trial is the best one that beats the base beyond noise, or the base itself.
    rows = first.summary["trials"]
    better = [r for r in rows[1:] if r["gain"] > 2 * r["gain_se"]]
    chosen = max(better, key=lambda r: r["value"]) if better else rows[0]
    assert first.summary["best"]["trial"] == chosen["trial"] and first.best_value == chosen["value"]
    # Each completed row records the rule's choice up to it (the report's line); the last one is the final choice.
    done = [r for r in rows if r["state"] == "COMPLETE"]
    assert done[-1]["chosen"] == chosen["trial"] and done[0]["chosen"] == 0
    assert all(r["chosen"] is None for r in rows if r["state"] != "COMPLETE")
    for r in rows[1:]:  # gains are paired differences of the same cases: they add up to the difference in value
        assert r["gain"] == pytest.approx(r["value"] - rows[0]["value"], abs=2e-5) and r["gain_se"] >= 0
    assert rows[0]["gain"] is None
    assert first.summary["trials"][0]["params"]["tt_dim"] == TINY.tt_dim  # trial 0 is the base config
    assert first.summary["trials"][1]["params"] != first.summary["trials"][0]["params"]

    config = ExportConfig.from_json(tmp_path / "a" / "config.json")
    assert config == apply(TINY, first.best_params)
    assert {p.name for p in first.files} == {"config.json", "trials.json", "report.md", "trials.png"}
    assert (tmp_path / "a" / "trials.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (tmp_path / "a" / "report.md").read_text()
    assert f"Best: trial {first.summary['best']['trial']}, {first.best_value:.4f}" in report
    assert report.count("\n| ") == 1 + 3  # header and one row per trial
    trials = json.loads((tmp_path / "a" / "trials.json").read_text())
    assert [t["trial"] for t in trials["trials"]] == [0, 1, 2]
    for t in trials["trials"]:
        assert 0.0 <= t["loo"] <= 1.0 and 0.0 <= t["replay"] <= 1.0
        assert t["value"] == pytest.approx((t["loo"] + t["replay"]) / 2, abs=1e-5)

    other = tune(ds, TINY, TuneSettings(trials=2, seed=8), tmp_path / "c", progress=False, log=lambda _: None)
    assert other.summary["trials"][1]["params"] != first.summary["trials"][1]["params"]


def test_cli_minutes_budget_and_bad_input(synth_ds: tuple[Path, Dataset], tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    data, _ = synth_ds
    base = tmp_path / "tiny.json"
    base.write_text(json.dumps(TINY.to_dict()))
    out = tmp_path / "out"
    argv = ["tune", "--data", str(data), "--out", str(out), "--config", str(base), "--quiet"]
    with pytest.raises(SystemExit) as exc:
        # The time budget ends the search after one trial.
        main([*argv, "--trials", "50", "--minutes", "0.001", "--threads", "2", "--no-prune"])
    assert exc.value.code == 0
    saved = json.loads((out / "trials.json").read_text())
    assert len(saved["trials"]) == 1 and saved["trials"][0]["retrieval"] == {}  # no pruning, so no reports
    assert saved["settings"]["threads"] == 2 and saved["pruning"]["rule"] == "off"
    printed = capsys.readouterr().out
    assert "| 0 (best) |" in printed and f"--config {out / 'config.json'}" in printed
    assert ExportConfig.from_json(out / "config.json") == TINY  # one trial: the base config is the best

    bad = (
        (["--trials", "0"], "trials must be >= 1"),
        (["--minutes", "-1"], "minutes must be > 0"),
        (["--threads", "0"], "threads must be >= 1"),
        (["--min-gain-se", "-1"], "min_gain_se must be >= 0"),
    )
    for extra, message in bad:
        with pytest.raises(SystemExit) as exc:
            main([*argv, *extra])
        assert exc.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["tune", "--data", str(tmp_path / "missing"), "--out", str(out)])
    assert exc.value.code == 2 and "no such directory" in capsys.readouterr().err


def test_retrieval_ndcg_ranks_the_target_among_unseen_items() -> None:
    scores = np.array(
        [
            [0.9, 0.1, 0.5, 0.2],  # target 1 scores highest: rank 0
            [0.9, 0.8, 0.5, 0.2],  # target 3 behind item 1 only, item 2 is seen: rank 1
            [0.1, 0.8, 0.5, 0.2],  # target 2 was seen: it cannot be recommended
            [0.9, 0.8, 0.7, 0.2],  # target 4 behind three items: rank 3, outside k = 2
        ],
        dtype=np.float32,
    )
    seen = [np.array([], np.int64), np.array([2], np.int64), np.array([2, 3], np.int64), np.array([], np.int64)]
    cases = Cases(seen, np.array([1, 3, 2, 4], dtype=np.int64))
    assert retrieval_ndcg(scores, cases, k=2) == pytest.approx((1.0 + 1 / np.log2(3)) / 4)
    assert retrieval_ndcg(scores, cases, k=4) == pytest.approx((1.0 + 1 / np.log2(3) + 1 / np.log2(5)) / 4)
    assert scores[1, 1] == np.float32(0.8)  # the caller's scores are left as they were
    assert prune_epochs(12) == [6, 9, 12] and prune_epochs(3) == [2, 3] and prune_epochs(1) == [1]


def test_epoch_hook_sees_every_epoch_and_leaves_the_fit_unchanged(synth_ds: tuple[Path, Dataset]) -> None:
    _, ds = synth_ds
    split = validation_split(ds, TINY)
    genres = genre_multi_hot(split.vocab, ds.genres, ds.genre_names)
    config = apply(TINY, {"tt_dropout": 0.5})  # dropout draws from torch's generator: a hook that did would show
    probe = RetrievalProbe(split.cases, TINY.eval_k)
    reports: list[tuple[int, float, bool]] = []

    def on_epoch(epoch: int, model: TwoTower) -> None:
        reports.append((epoch, probe(model, config.history_len), model.training))

    hooked = train_two_tower(split.seqs, len(split.vocab), genres, config, progress=False, on_epoch=on_epoch)
    plain = train_two_tower(split.seqs, len(split.vocab), genres, config, progress=False)
    assert [e for e, _, _ in reports] == list(range(1, config.tt_epochs + 1))
    assert not any(training for _, _, training in reports)  # probed in eval mode, trained in train mode after
    assert all(0.0 <= v <= 1.0 for _, v, _ in reports) and reports[-1][1] > 0
    assert reports[-1][1] == probe(hooked, config.history_len)
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, hooked.state_dict()[name]), name

    def stop(epoch: int, model: TwoTower) -> None:
        if epoch == 2:
            raise KeyboardInterrupt
        reports.append((epoch, 0.0, False))

    reports.clear()
    with pytest.raises(KeyboardInterrupt):
        train_two_tower(split.seqs, len(split.vocab), genres, config, progress=False, on_epoch=stop)
    assert [e for e, _, _ in reports] == [1]


def test_pruning_stops_trials_below_the_median_and_records_them(synth_ds: tuple[Path, Dataset], tmp_path: Path) -> None:
    _, ds = synth_ds
    settings = TuneSettings(trials=8, seed=1, startup_trials=2, prune_startup_trials=2)
    pruned = tune(ds, TINY, settings, tmp_path / "p", progress=False, log=lambda _: None)
    again = tune(ds, TINY, settings, tmp_path / "q", progress=False, log=lambda _: None)
    rows = pruned.summary["trials"]
    assert [(r["state"], r["value"]) for r in rows] == [(r["state"], r["value"]) for r in again.summary["trials"]]
    checks = prune_epochs(TINY.tt_epochs)
    assert pruned.summary["pruning"]["epochs"] == checks == [2, 3]
    states = [r["state"] for r in rows]
    assert states[0] == "COMPLETE" and pruned.base_value == rows[0]["value"]  # the base config always completes
    assert states[:2] == ["COMPLETE", "COMPLETE"] and "PRUNED" in states  # none before startup_trials completed
    for n, row in enumerate(rows):
        reports = {int(e): v for e, v in row["retrieval"].items()}
        done_before = [r for r in rows[:n] if r["state"] == "COMPLETE"]
        # The median rule, replayed: pruned trials trailed the median of the trials completed before them at the
        # epoch they stopped; the others never did once startup_trials had completed.
        for epoch in sorted(reports):
            median = np.median([float(r["retrieval"][str(epoch)]) for r in done_before]) if done_before else None
            trails = (
                median is not None
                and len(done_before) >= settings.prune_startup_trials
                and max(v for e, v in reports.items() if e <= epoch) < median
            )
            if row["state"] == "PRUNED" and epoch == row["pruned_at_epoch"]:
                assert trails, (n, epoch)
                break
            assert not trails, (n, epoch)
        if row["state"] == "PRUNED":
            assert row["value"] is None and row["loo"] is None and row["seconds"] is not None
            assert max(reports) == row["pruned_at_epoch"] in checks
        else:
            assert sorted(reports) == checks and row["pruned_at_epoch"] is None

    n_pruned = states.count("PRUNED")
    report = (tmp_path / "p" / "report.md").read_text()
    assert report.count("pruned at epoch") == n_pruned and report.count("\n| ") == 1 + len(rows)
    assert f"Search: 8 trials: {8 - n_pruned} complete, {n_pruned} pruned" in report
    saved = json.loads((tmp_path / "p" / "trials.json").read_text())
    assert [r["state"] for r in saved["trials"]] == states

    # Reports do not change a fit: without pruning, every trial up to the first pruned one has the same settings
    # and value, and the first pruned one completes.
    first = states.index("PRUNED")
    full = tune(ds, TINY, dataclasses.replace(settings, prune=False, trials=first + 1), tmp_path / "f", False, print)
    full_rows = full.summary["trials"]
    assert [r["state"] for r in full_rows] == ["COMPLETE"] * (first + 1)
    assert [r["params"] for r in full_rows] == [r["params"] for r in rows[: first + 1]]
    assert [r["value"] for r in full_rows[:first]] == [r["value"] for r in rows[:first]]
    assert full_rows[first]["retrieval"] == {}  # no reports without pruning


def test_paired_gain_and_the_choice_keep_the_base_unless_a_trial_beats_it_beyond_noise() -> None:
    base = {"loo": np.array([1.0, 0.0, 0.5, 0.0]), "replay": np.array([0.0, 0.0, 1.0])}
    trial = {"loo": np.array([1.0, 1.0, 0.5, 0.0]), "replay": np.array([0.0, 0.0, 1.0])}
    gain, se = paired_gain(trial, base)
    # loo gains 0.25 (one case of four), replay 0: the objective (mean of the two) gains 0.125.
    assert gain == pytest.approx(0.125)
    assert se == pytest.approx(np.sqrt(np.var([0, 1, 0, 0], ddof=1) / 4) / 2)
    assert paired_gain(base, base) == (0.0, 0.0)

    def row(n: int, value: float | None, gain: float | None, se: float | None, state: str = "COMPLETE") -> dict:
        return {"trial": n, "state": state, "value": value, "gain": gain, "gain_se": se}

    rows = [row(0, 0.10, None, None), row(1, 0.13, 0.03, 0.01), row(2, 0.14, 0.04, 0.03)]
    rows.append(row(3, None, None, None, "PRUNED"))
    assert select_best(rows, 2.0) == 1  # trial 2 is higher but within two standard errors of the base
    assert select_best(rows, 0.0) == 2  # any gain: the highest value
    assert select_best(rows, 5.0) == 0  # nothing beats the base by five standard errors
    assert select_best([row(0, None, None, None, "FAIL"), *rows[1:]], 2.0) == 2  # no base to compare with
    with pytest.raises(RuntimeError, match="no trial completed"):
        select_best([row(0, None, None, None, "FAIL")], 2.0)
