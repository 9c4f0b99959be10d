"""Quality gates (a bundle that fails one is not published: `recsys export` exits 3 with the reason, CURRENT
stays) and `recsys report` on the bundle that passed them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from exporter.ann_index import estimate_memory_bytes, ivf_spec, nlist_for
from exporter.config import ExportConfig
from exporter.pipeline import MostPopGateError, most_pop_gate
from exporter.synth import generate
from recsys_cli.main import main
from recsys_common.bundle import CURRENT, open_bundle

N_ITEMS = 150  # above the recall@100 k, so an approximate index can miss
FAST = dict(tt_epochs=2, ranker_epochs=1, parity_rows=32)


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """Synthetic data and a bundles directory holding one good bundle (evaluated under loo, gates on)."""
    data = tmp_path_factory.mktemp("gate-data")
    generate(data, n_users=80, n_items=N_ITEMS, n_clusters=4, events_per_user=(10, 30), seed=5)
    bundles = tmp_path_factory.mktemp("gate-bundles")
    config = tmp_path_factory.mktemp("cfg") / "good.json"
    config.write_text(json.dumps(ExportConfig.tiny(eval_protocols=("loo",), **FAST).to_dict()))
    assert _export(data, bundles, config) == 0
    return data, bundles, open_bundle(bundles).version


def _export(data: Path, bundles: Path, config: Path) -> int:
    with pytest.raises(SystemExit) as exc:
        main(["export", "--data", str(data), "--out", str(bundles), "--config", str(config), "--quiet"])
    return int(exc.value.code)


def _refused(published: tuple[Path, Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str], **cfg: Any) -> str:
    """Export with the overrides; assert it was refused and left the bundles directory as it was."""
    data, bundles, version = published
    before = sorted(p.name for p in bundles.iterdir())
    pointer = (bundles / CURRENT).read_bytes()
    config = tmp_path / "config.json"
    config.write_text(json.dumps(ExportConfig.tiny(baselines=(), **{**FAST, **cfg}).to_dict()))
    capsys.readouterr()
    assert _export(data, bundles, config) == 3
    out = capsys.readouterr()
    assert "published bundle" not in out.out
    assert sorted(p.name for p in bundles.iterdir()) == before  # no new version, no staging left behind
    assert (bundles / CURRENT).read_bytes() == pointer
    assert open_bundle(bundles).version == version
    return out.err


def test_good_bundle_records_its_gates(published: tuple[Path, Path, str]) -> None:
    _, bundles, _ = published
    gates = open_bundle(bundles).manifest["gates"]
    assert gates["onnx_parity"] == {"user_tower": True, "ranker": True}
    assert gates["index_recall"]["k"] == 100 and gates["index_recall"]["against"] == "exact"
    assert gates["index_recall"]["value"] >= gates["index_recall"]["floor"] == 0.95
    pop = gates["beat_most_pop"]
    assert pop["passed"] and pop["protocols"]["loo"]["hr"][0] > pop["protocols"]["loo"]["hr"][1]


def test_parity_gate(published: tuple[Path, Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _refused(published, tmp_path, capsys, parity_tol=0.0)
    assert "recsys export: " in err and ".onnx differs from torch by" in err and "(> 0)" in err
    assert "not publishing" in err


def test_index_recall_gate(
    published: tuple[Path, Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Only IVF-SQ8 fits the memory budget (exact search is off for this size); it probes 4 of its lists.
    budget = estimate_memory_bytes(ivf_spec(N_ITEMS, "SQ8"), N_ITEMS, 16)
    assert nlist_for(N_ITEMS) > 1
    err = _refused(
        published,
        tmp_path,
        capsys,
        index_exact_max_items=0,
        index_memory_budget_bytes=budget,
        index_recall_floor=0.999,
    )
    assert "items.faiss: recall@100 " in err and "is below the floor 0.999: not publishing" in err


def test_most_pop_gate(published: tuple[Path, Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _refused(published, tmp_path, capsys, eval_protocols=["loo"], gate_most_pop_margin=1.0)
    assert "quality gate: loo: two_tower+ranker HR@10 " in err
    assert "does not beat most_pop" in err and "by more than 1.0" in err


def test_most_pop_gate_names_each_failing_protocol_and_figure() -> None:
    def protocol(project: tuple[float, float], pop: tuple[float, float]) -> dict[str, Any]:
        return {
            "two_tower+ranker": {"hr": project[0], "ndcg": project[1], "k": 10},
            "most_pop": {"hr": pop[0], "ndcg": pop[1], "k": 10},
        }

    evaluation = {"loo": protocol((0.2, 0.1), (0.1, 0.05)), "replay": protocol((0.2, 0.03), (0.1, 0.05))}
    result = most_pop_gate(evaluation)
    assert not result["passed"]
    assert result["reason"] == "replay: two_tower+ranker NDCG@10 0.0300 does not beat most_pop 0.0500"
    assert result["protocols"]["loo"] == {"hr": [0.2, 0.1], "ndcg": [0.1, 0.05]}
    assert most_pop_gate({"loo": evaluation["loo"]})["passed"]
    tie = most_pop_gate({"loo": protocol((0.1, 0.05), (0.1, 0.04))})
    assert not tie["passed"] and "HR@10 0.1000 does not beat most_pop 0.1000" in tie["reason"]
    assert issubclass(MostPopGateError, RuntimeError)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"keep_versions": 0}, "keep_versions must be >= 1, got 0"),
        ({"gate_most_pop_margin": -0.1}, "gate_most_pop_margin must be >= 0, got -0.1"),
        ({"baselines": ("itemknn", "svd")}, "baselines: unknown baseline(s) ['svd']"),
        ({"knn_neighbours": 0}, "ExportConfig.knn_neighbours must be an integer >= 1, got 0"),
        ({"ease_lambda": -1.0}, "ExportConfig.ease_lambda must be > 0, got -1.0"),
        ({"als_iterations": 2.5}, "ExportConfig.als_iterations must be an integer >= 1, got 2.5"),
    ],
)
def test_bad_gate_and_baseline_settings_are_named(override: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as exc:
        ExportConfig(**override)
    assert message in str(exc.value)


def test_report_prints_the_table_and_writes_plots(
    published: tuple[Path, Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import matplotlib.image

    _, bundles, version = published
    manifest = open_bundle(bundles).manifest
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["report", str(bundles / version), "--out", str(tmp_path / "r")])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    loo = manifest["evaluation"]["loo"]
    for model in ("most_pop", "two_tower", "two_tower+ranker"):
        m = loo[model]
        assert f"loo      {model:<18} {m['hr']:>7.4f} {m['ndcg']:>8.4f} {m['coverage']:>9.3f}" in out
    for name in ("itemknn", "ease", "als"):
        fit_s = loo["fit"]["baseline_seconds"][name]["fit"]
        assert f"loo      {name:<18} {loo['baselines'][name]['hr']:>7.4f}" in out and f"fit {fit_s:.2f} s" in out
    assert "als: implicit: als_alpha=10.0, als_factors=64, als_iterations=20, als_regularization=0.05, seed=0" in out
    assert f"recall@100 {manifest['index']['recall']['value']:.4f} against exact search" in out
    assert "peak memory (max RSS): " in out and "training " in out
    sweep = manifest["index_candidates"]["sweep"]
    assert {p["type"] for p in sweep} == {"Flat", "HNSW", "IVF"}
    assert all(0 <= p["recall"] <= 1 and p["latency_ms_p50"] > 0 for p in sweep)
    assert [p["recall"] for p in sweep if p["type"] == "Flat"] == [1.0]
    for png in ("models.png", "index_recall_latency.png"):
        image = matplotlib.image.imread(tmp_path / "r" / png)
        assert image.shape[0] > 200 and image.shape[1] > 400 and image.std() > 0  # a real, non-blank picture
    md = (tmp_path / "r" / "report.md").read_text()
    assert "![models](models.png)" in md and f"bundle {version}" in md


def test_report_of_a_missing_bundle_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["report", str(tmp_path)])
    assert exc.value.code == 2
    assert f"{tmp_path / CURRENT} does not exist" in capsys.readouterr().err
