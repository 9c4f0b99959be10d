"""The evaluation report of a bundle, from its manifest: a text table, report.md and PNG plots.

Reads only the manifest (no torch, no models), so `recsys report` works on any published bundle::

    bundle = open_bundle(bundles_dir)
    print(report_text(bundle.manifest))
    write_report(bundle.manifest, out_dir)  # report.md, models.png, index_recall_latency.png
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PROJECT_MODELS = ("most_pop", "two_tower", "two_tower+ranker")
INT8 = "two_tower+ranker_int8"
USERCF = "two_tower+ranker+usercf"  # the same ranker with the gateway's user-based CF candidates added
BASELINE_ORDER = ("most_pop", "itemknn", "ease", "als")
MODELS_PNG = "models.png"
INDEX_PNG = "index_recall_latency.png"


def _row(protocol: str, label: str, m: dict[str, Any], note: str = "") -> str:
    return f"{protocol:<8} {label:<18} {m['hr']:>7.4f} {m['ndcg']:>8.4f} {m['coverage']:>9.3f} {m['cases']:>6}" + (
        f"  {note}" if note else ""
    )


def _settings(settings: dict[str, Any]) -> str:
    rest = ", ".join(f"{k}={v}" for k, v in sorted(settings.items()) if k != "model")  # as in manifest.json
    return f"{settings.get('model', '')}: {rest}" if rest else str(settings.get("model", ""))


def _baselines(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The report's baselines in BASELINE_ORDER (manifest.json is written with sorted keys)."""
    found = report.get("baselines", {})
    return sorted(found.items(), key=lambda kv: BASELINE_ORDER.index(kv[0]) if kv[0] in BASELINE_ORDER else 99)


def evaluation_table(evaluation: dict[str, dict[str, Any]]) -> str:
    """Models x protocols: HR@k, NDCG@k, catalogue coverage and cases; baselines with their fit seconds."""
    lines = [f"{'protocol':<8} {'model':<18} {'HR@10':>7} {'NDCG@10':>8} {'coverage':>9} {'cases':>6}"]
    described: dict[str, str] = {}
    for protocol, report in evaluation.items():
        for model in PROJECT_MODELS:
            lines.append(_row(protocol, model, report[model]))
        if USERCF in report:
            with_, without = report[USERCF], report["two_tower+ranker"]
            delta = f"(HR {with_['hr'] - without['hr']:+.4f}, NDCG {with_['ndcg'] - without['ndcg']:+.4f})"
            lines.append(_row(protocol, "  +usercf", with_, delta))
        if INT8 in report:
            drop = f"(NDCG drop {report['ranker_int8_ndcg_drop']:+.4f})"
            lines.append(_row(protocol, "  ranker int8", report[INT8], drop))
        seconds = report.get("fit", {}).get("baseline_seconds", {})
        for name, m in _baselines(report):
            if "skipped" in m:
                lines.append(f"{protocol:<8} {name:<18} skipped: {m['skipped']}")
            else:
                fit_s = seconds.get(name, {}).get("fit", m.get("fit_seconds"))
                lines.append(_row(protocol, name, m, f"fit {fit_s:.2f} s" if fit_s is not None else ""))
            described[name] = _settings(m["settings"])
        recall = f"{protocol:<8} {'(candidate recall)':<18} {report['candidate_recall']:>7.4f}"
        if "candidate_recall_usercf" in report:
            recall += f"  with usercf {report['candidate_recall_usercf']:.4f}"
        lines.append(recall)
    lines += [f"  {name}: {text}" for name, text in described.items()]
    return "\n".join(lines)


def usercf_verdict(evaluation: dict[str, dict[str, Any]]) -> bool | None:
    """Whether user-based CF candidates raise both HR@k and NDCG@k of two_tower+ranker under every protocol
    (None when no protocol simulated them): the rule for switching the gateway's source on by default."""
    with_usercf = [r for r in evaluation.values() if USERCF in r]
    if not with_usercf:
        return None
    return len(with_usercf) == len(evaluation) and all(
        r[USERCF][m] > r["two_tower+ranker"][m] for r in with_usercf for m in ("hr", "ndcg")
    )


def _usercf(evaluation: dict[str, dict[str, Any]]) -> list[str]:
    """What the simulated user-based CF source did under each protocol, and the verdict."""
    verdict = usercf_verdict(evaluation)
    if verdict is None:
        return []
    plan = next(r["usercf"]["plan"] for r in evaluation.values() if "usercf" in r)
    lines = [
        "user-based CF (gateway/usercf.py replayed offline: "
        + ", ".join(f"{k} {v}" for k, v in plan.items())
        + "; its candidates carry no source bit the ranker knows)"
    ]
    for protocol, report in evaluation.items():
        u = report.get("usercf")
        if u:
            lines.append(
                f"  {protocol}: proposals for {u['cases_with_proposals']:.1%} of cases ({u['proposals_per_case']:.1f} "
                f"each), target among them {u['target_proposed']:.1%}, only there {u['target_only_from_usercf']:.1%}; "
                f"{report.get('fit', {}).get('usercf_seconds', 0):.1f} s"
            )
    lines.append(
        "  verdict: "
        + ("helps on every protocol (HR and NDCG): keep it on" if verdict else "does not help on every protocol: off")
    )
    return lines


def _gates(manifest: dict[str, Any]) -> list[str]:
    lines = []
    index = manifest.get("index", {})
    recall = index.get("recall", {})
    gates = manifest.get("gates", {})
    floor = gates.get("index_recall", {}).get("floor")
    if recall:
        lines.append(
            f"index {index.get('type')} ({index.get('factory')}, {index.get('params')}): recall@{recall['k']} "
            f"{recall['value']:.4f} against {recall['against']} search on {recall['queries']} user vectors"
            + (f", floor {floor}" if floor is not None else "")
        )
    for name, model in manifest.get("models", {}).items():
        p = model.get("parity", {})
        if p:
            lines.append(
                f"ONNX parity {name}: max|diff| {p['max_abs_diff']:.2e} on {p['rows']} rows "
                f"(tolerance {p['tolerance']:g}) {'ok' if p['ok'] else 'FAILED'}"
            )
    pop = gates.get("beat_most_pop")
    if isinstance(pop, dict):
        verdict = "passed" if pop["passed"] else f"FAILED: {pop['reason']}"
        lines.append(f"beats most_pop on HR@10 and NDCG@10 (margin {pop['margin']}): {verdict}")
    elif pop is not None:
        lines.append(f"beats most_pop: not checked ({pop})")
    return lines


def _index_candidates(manifest: dict[str, Any]) -> list[str]:
    points = manifest.get("index_candidates", {}).get("sweep", [])
    if not points:
        return []
    lines = [f"{'index':<22} {'search param':<16} {'recall@100':>10} {'p50 ms':>8}"]
    for p in points:
        param = ", ".join(f"{k}={v}" for k, v in (p["param"] or {}).items()) or "-"
        lines.append(f"{p['factory']:<22} {param:<16} {p['recall']:>10.4f} {p['latency_ms_p50']:>8.4f}")
    return lines


def _training(manifest: dict[str, Any]) -> list[str]:
    training = manifest.get("training", {})
    lines = []
    if "seconds" in training:
        steps = ", ".join(f"{k} {v:.1f}" for k, v in training.get("steps_seconds", {}).items())
        lines.append(f"training {training['seconds']:.1f} s ({steps})")
    for protocol, report in manifest.get("evaluation", {}).items():
        fit = report.get("fit", {})
        if fit.get("seconds"):
            steps = ", ".join(f"{k} {v:.1f}" for k, v in fit["seconds"].items())
            lines.append(f"  {protocol} fit: {steps}; evaluation {fit.get('eval_seconds', 0):.1f} s")
    rss = training.get("peak_rss_mb")
    if rss:
        lines.append(f"peak memory (max RSS): {rss['self']:.0f} MB export process, {rss['children']:.0f} MB children")
    return lines


def report_text(manifest: dict[str, Any]) -> str:
    """The whole report as plain text: evaluation table, gates, index candidates, times and memory."""
    data = manifest.get("data", {})
    head = f"bundle {manifest.get('version')} (created {manifest.get('created_at')})"
    if data:
        head += f": {data.get('n_interactions')} interactions, {data.get('n_users')} users, {data.get('n_items')} items"
    parts = [head]
    evaluation = manifest.get("evaluation", {})
    parts.append(evaluation_table(evaluation) if evaluation else "no evaluation (config eval_protocols is empty)")
    for section in (_usercf(evaluation), _gates(manifest), _index_candidates(manifest), _training(manifest)):
        if section:
            parts.append("\n".join(section))
    return "\n\n".join(parts)


def _models_plot(evaluation: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(evaluation), figsize=(6.5 * len(evaluation), 4.5), squeeze=False)
    for ax, (protocol, report) in zip(axes[0], evaluation.items(), strict=True):
        rows = [(m, report[m]) for m in (*PROJECT_MODELS, USERCF, INT8) if m in report]
        rows += [(n, m) for n, m in _baselines(report) if "hr" in m]
        xs = range(len(rows))
        width = 0.4
        ax.bar([x - width / 2 for x in xs], [m["hr"] for _, m in rows], width, label="HR@10")
        ax.bar([x + width / 2 for x in xs], [m["ndcg"] for _, m in rows], width, label="NDCG@10")
        ax.set_xticks(list(xs), [n.replace("+", "+\n") for n, _ in rows], fontsize=8)
        ax.set_title(f"{protocol} ({rows[0][1]['cases']} cases)" if rows else protocol)
        ax.grid(axis="y", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _index_plot(candidates: dict[str, Any], floor: float | None, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    by_type: dict[str, list[dict[str, Any]]] = {}
    for p in candidates.get("sweep", []):
        by_type.setdefault(p["factory"], []).append(p)
    for factory, points in by_type.items():
        ax.plot([p["latency_ms_p50"] for p in points], [p["recall"] for p in points], "o-", label=factory)
    if floor is not None:
        ax.axhline(floor, color="red", linestyle="--", linewidth=1, label=f"floor {floor}")
    ax.set_xscale("log")
    ax.set_xlabel("latency per query, p50 (ms, 1 thread)")
    ax.set_ylabel("recall@100 against exact search")
    ax.set_title(f"index candidates (published: {candidates.get('chosen')})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(manifest: dict[str, Any], out_dir: Path) -> list[Path]:
    """The PNGs the manifest has data for: models side by side per protocol; index recall against latency."""
    import matplotlib

    matplotlib.use("Agg")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if manifest.get("evaluation"):
        _models_plot(manifest["evaluation"], out_dir / MODELS_PNG)
        written.append(out_dir / MODELS_PNG)
    candidates = manifest.get("index_candidates", {})
    if candidates.get("sweep"):
        floor = manifest.get("gates", {}).get("index_recall", {}).get("floor")
        _index_plot(candidates, floor, out_dir / INDEX_PNG)
        written.append(out_dir / INDEX_PNG)
    return written


def write_report(manifest: dict[str, Any], out_dir: Path) -> list[Path]:
    """report.md (the text report and the plots) and the PNGs in out_dir; returns the files written."""
    out_dir = Path(out_dir)
    pngs = write_plots(manifest, out_dir)
    images = "\n".join(f"![{p.stem}]({p.name})" for p in pngs)
    md = f"# Evaluation report, bundle {manifest.get('version')}\n\n```\n{report_text(manifest)}\n```\n\n{images}\n"
    (out_dir / "report.md").write_text(md)
    return [out_dir / "report.md", *pngs]
