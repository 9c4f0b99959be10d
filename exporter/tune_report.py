"""The report of a `recsys tune` run, from its trials.json summary: a text table, report.md and trials.png."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

REPORT_MD, TRIALS_PNG = "report.md", "trials.png"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 0.01 else f"{value:.3f}"
    return str(value)


def _last_report(row: dict[str, Any]) -> str:
    reports = row.get("retrieval") or {}
    return f"{reports[max(reports, key=int)]:.4f}" if reports else ""


def trials_table(summary: dict[str, Any], k: int = 10) -> str:
    """A markdown table, one row per trial: objective, NDCG@k per case set, the pruning signal's last report,
    seconds, the trial's settings. A pruned trial shows the epoch it stopped at in place of the objective."""
    names = list(summary["space"])
    best = summary["best"]["trial"]
    head = ["trial", f"NDCG@{k} mean", "loo", "replay", "vs base ± se", "retriever", "s", *names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in summary["trials"]:
        mark = " (best)" if row["trial"] == best else (" (base)" if row["trial"] == 0 else "")
        seconds = "" if row.get("seconds") is None else f"{row['seconds']:.0f}"
        if row["state"] == "PRUNED":
            cells = [f"{row['trial']}{mark}", f"pruned at epoch {row['pruned_at_epoch']}", "", ""]
        elif row["state"] != "COMPLETE":
            cells = [f"{row['trial']}{mark}", row["state"], "", ""]
        else:
            cells = [f"{row['trial']}{mark}", f"{row['value']:.4f}", f"{row['loo']:.4f}", f"{row['replay']:.4f}"]
        cells.append("" if row.get("gain") is None else f"{row['gain']:+.4f} ± {row['gain_se']:.4f}")
        cells += [_last_report(row), seconds]
        cells += [_fmt(row["params"].get(n, "")) for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def signal_agreement(summary: dict[str, Any]) -> float | None:
    """Spearman rank correlation, over completed trials, of the pruning signal's last report with the objective.

    How far pruning on the retriever alone can be trusted to stop the trials the objective would rank low;
    None with fewer than three completed trials holding reports.
    """
    done = [r for r in summary["trials"] if r["state"] == "COMPLETE" and r.get("retrieval")]
    if len(done) < 3:
        return None
    signal = [r["retrieval"][max(r["retrieval"], key=int)] for r in done]
    ranks = [np.argsort(np.argsort(v)) for v in (signal, [r["value"] for r in done])]
    return float(np.corrcoef(ranks[0], ranks[1])[0, 1])


def _trial_counts(summary: dict[str, Any]) -> str:
    rows = summary["trials"]
    states = [r["state"] for r in rows]
    text = f"{len(rows)} trials: {states.count('COMPLETE')} complete, {states.count('PRUNED')} pruned"
    if len(rows) > states.count("COMPLETE") + states.count("PRUNED"):
        text += f", {len(rows) - states.count('COMPLETE') - states.count('PRUNED')} failed"
    return text


def _plot(summary: dict[str, Any], k: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in summary["trials"] if r["state"] == "COMPLETE"]
    pruned = [r["trial"] for r in summary["trials"] if r["state"] == "PRUNED"]
    xs = [r["trial"] for r in done]
    values = [r["value"] for r in done]
    by_trial = {r["trial"]: r["value"] for r in done}
    # The rule's choice, not the running maximum: a gain within the noise moves neither the line nor the settings.
    chosen = [by_trial[r["chosen"]] for r in done]
    min_gain_se = summary["settings"]["min_gain_se"]
    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    ax.plot(xs, [r["loo"] for r in done], "^", color="tab:gray", alpha=0.5, label="loo validation")
    ax.plot(xs, [r["replay"] for r in done], "v", color="tab:green", alpha=0.5, label="replay validation")
    ax.plot(xs, values, "o", color="tab:blue", label="objective (mean)")
    ax.step(xs, chosen, where="post", color="tab:red", label="chosen so far")
    if done and done[0]["trial"] == 0:
        ax.axhline(values[0], color="black", linestyle=":", linewidth=1, label="base config (trial 0)")
        # What each trial had to beat: the base plus min_gain_se of the standard error of its own paired gain.
        bars = [(r["trial"], r["value"] - r["gain"], r["gain_se"]) for r in done[1:] if r["gain_se"] is not None]
        if bars and min_gain_se > 0:
            ax.errorbar(
                [b[0] for b in bars],
                [b[1] for b in bars],
                yerr=[min_gain_se * b[2] for b in bars],
                fmt="none",
                ecolor="tab:red",
                alpha=0.35,
                capsize=3,
                label=f"base ± {min_gain_se:g} se of the trial's paired gain",
            )
    if pruned:  # no objective: marked along the bottom edge
        ax.plot(pruned, [0.03] * len(pruned), "x", color="tab:gray", transform=ax.get_xaxis_transform(), label="pruned")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"two_tower+ranker NDCG@{k} on validation")
    best = summary["best"]
    ax.set_title(f"recsys tune: {_trial_counts(summary)}; best {best['value']:.4f} (trial {best['trial']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the axes: it hides no trial
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _search_line(summary: dict[str, Any], k: int) -> str:
    """How the search went: trial counts, time, threads and the pruning rule (with how far its signal agrees)."""
    text = f"Search: {_trial_counts(summary)}"
    if summary.get("seconds") is not None:
        text += f" in {summary['seconds']:.0f} s"
    text += f", {summary['settings'].get('threads', 1)} thread(s) per trial."
    pruning = summary.get("pruning") or {}
    if pruning.get("rule") == "median":
        epochs = ", ".join(map(str, pruning["epochs"]))
        text += (
            f" Pruning: after {pruning['startup_trials']} completed trials, a trial stops when the retriever's own"
            f" NDCG@{k} on the validation cases (column 'retriever') trails the median of the completed trials at"
            f" two-tower epoch {epochs} of {pruning['tt_epochs']}; the base config is never pruned."
        )
        agreement = signal_agreement(summary)
        if agreement is not None:
            text += f" Over completed trials its rank correlation with the objective is {agreement:+.2f}."
    return text


def write_tune_report(summary: dict[str, Any], k: int, out_dir: Path) -> list[Path]:
    """report.md (what was validated, the best settings, the trial table, the plot) and trials.png."""
    out_dir = Path(out_dir)
    _plot(summary, k, out_dir / TRIALS_PNG)
    v, best = summary["validation"], summary["best"]
    base = next((r for r in summary["trials"] if r["trial"] == 0 and r["state"] == "COMPLETE"), None)
    gain = f" (base config {base['value']:.4f}, {best['value'] - base['value']:+.4f})" if base else ""
    rule = f" Rule: {best['rule']}." if best.get("rule") else ""
    md = [
        "# recsys tune",
        "",
        f"Validation: fitted on {v['fit_interactions']} interactions (no event of either protocol's test part); "
        + ", ".join(f"{n} {c} cases" for n, c in v["cases"].items())
        + f". Objective: mean two_tower+ranker NDCG@{k} over the two case sets.",
        "",
        _search_line(summary, k),
        "",
        f"Best: trial {best['trial']}, {best['value']:.4f}{gain}.{rule}",
        "",
        "```",
        *(f"{name} = {_fmt(value)}" for name, value in best["params"].items()),
        "```",
        "",
        trials_table(summary, k),
        "",
        f"![trials]({TRIALS_PNG})",
        "",
    ]
    (out_dir / REPORT_MD).write_text("\n".join(md))
    return [out_dir / REPORT_MD, out_dir / TRIALS_PNG]
