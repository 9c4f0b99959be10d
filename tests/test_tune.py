"""`recsys tune`: validation split inside the training period, reproducible search, config and report files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from exporter.config import ExportConfig
from exporter.data import Dataset, load_dataset
from exporter.protocols import loo_split, replay_split
from exporter.synth import generate
from exporter.tune import SPACE, TuneSettings, apply, search_space, tune, validation_split
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
    assert first.best_value == max(values) and first.base_value == values[0]
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
        main([*argv, "--trials", "50", "--minutes", "0.001"])  # the time budget ends the search after one trial
    assert exc.value.code == 0
    assert len(json.loads((out / "trials.json").read_text())["trials"]) == 1
    printed = capsys.readouterr().out
    assert "| 0 (best) |" in printed and f"--config {out / 'config.json'}" in printed
    assert ExportConfig.from_json(out / "config.json") == TINY  # one trial: the base config is the best

    for extra, message in ((["--trials", "0"], "trials must be >= 1"), (["--minutes", "-1"], "minutes must be > 0")):
        with pytest.raises(SystemExit) as exc:
            main([*argv, *extra])
        assert exc.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["tune", "--data", str(tmp_path / "missing"), "--out", str(out)])
    assert exc.value.code == 2 and "no such directory" in capsys.readouterr().err
