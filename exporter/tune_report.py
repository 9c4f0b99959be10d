"""The report of a `recsys tune` run, from its trials.json summary: a text table, report.md and trials.png."""

from __future__ import annotations

from pathlib import Path
from typing import Any

REPORT_MD, TRIALS_PNG = "report.md", "trials.png"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 0.01 else f"{value:.3f}"
    return str(value)


def trials_table(summary: dict[str, Any], k: int = 10) -> str:
    """A markdown table, one row per trial: objective, NDCG@k per case set, seconds, the trial's settings."""
    names = list(summary["space"])
    best = summary["best"]["trial"]
    head = ["trial", f"NDCG@{k} mean", "loo", "replay", "s", *names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in summary["trials"]:
        mark = " (best)" if row["trial"] == best else (" (base)" if row["trial"] == 0 else "")
        if row["state"] != "COMPLETE":
            cells = [f"{row['trial']}{mark}", row["state"], "", "", ""]
        else:
            cells = [f"{row['trial']}{mark}", f"{row['value']:.4f}", f"{row['loo']:.4f}", f"{row['replay']:.4f}"]
            cells.append(f"{row['seconds']:.0f}")
        cells += [_fmt(row["params"].get(n, "")) for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot(summary: dict[str, Any], k: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in summary["trials"] if r["state"] == "COMPLETE"]
    xs = [r["trial"] for r in done]
    values = [r["value"] for r in done]
    best_so_far = [max(values[: i + 1]) for i in range(len(values))]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(xs, [r["loo"] for r in done], "^", color="tab:gray", alpha=0.5, label="loo validation")
    ax.plot(xs, [r["replay"] for r in done], "v", color="tab:green", alpha=0.5, label="replay validation")
    ax.plot(xs, values, "o", color="tab:blue", label="objective (mean)")
    ax.step(xs, best_so_far, where="post", color="tab:red", label="best so far")
    if done and done[0]["trial"] == 0:
        ax.axhline(values[0], color="black", linestyle=":", linewidth=1, label="base config (trial 0)")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"two_tower+ranker NDCG@{k} on validation")
    best = summary["best"]
    ax.set_title(f"recsys tune: {len(done)} trials, best {best['value']:.4f} (trial {best['trial']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_tune_report(summary: dict[str, Any], k: int, out_dir: Path) -> list[Path]:
    """report.md (what was validated, the best settings, the trial table, the plot) and trials.png."""
    out_dir = Path(out_dir)
    _plot(summary, k, out_dir / TRIALS_PNG)
    v, best = summary["validation"], summary["best"]
    base = next((r for r in summary["trials"] if r["trial"] == 0 and r["state"] == "COMPLETE"), None)
    gain = f" (base config {base['value']:.4f}, {best['value'] - base['value']:+.4f})" if base else ""
    md = [
        "# recsys tune",
        "",
        f"Validation: fitted on {v['fit_interactions']} interactions (no event of either protocol's test part); "
        + ", ".join(f"{n} {c} cases" for n, c in v["cases"].items())
        + f". Objective: mean two_tower+ranker NDCG@{k} over the two case sets.",
        "",
        f"Best: trial {best['trial']}, {best['value']:.4f}{gain}.",
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
