"""Uneven forgetting (VAA paper, Fig. 2): which alignment examples each proxy run forgot,
and how the forgotten sets overlap across runs, as JSON and a bar chart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence


def overlap_summary(forgotten: dict[str, Sequence[bool]]) -> dict:
    """Per run: share forgotten. Across runs: forget (forgotten in any run), common forget
    (in every run), unforget (mean share not forgotten per run), common unforget (forgotten
    in no run), and what independence would give for the common
    core (product of the shares) — a common core far above it means the same examples are
    forgotten again and again. Shares in percent of the alignment set."""
    runs = list(forgotten)
    n = len(next(iter(forgotten.values())))
    share = {r: 100.0 * sum(forgotten[r]) / n for r in runs}
    any_ = [any(forgotten[r][i] for r in runs) for i in range(n)]
    all_ = [all(forgotten[r][i] for r in runs) for i in range(n)]
    indep = 100.0
    for r in runs:
        indep *= share[r] / 100.0
    pairwise = {}
    for a_i, a in enumerate(runs):
        for b in runs[a_i + 1:]:
            inter = sum(x and y for x, y in zip(forgotten[a], forgotten[b]))
            union = sum(x or y for x, y in zip(forgotten[a], forgotten[b]))
            expected = share[a] * share[b] / 100.0 / (share[a] + share[b] - share[a] * share[b] / 100.0 or 1)
            pairwise[f"{a}|{b}"] = {"jaccard": inter / union if union else 0.0,
                                    "jaccard_if_independent": expected}
    return {
        "n_examples": n,
        "share_forgotten": share,
        "forget": 100.0 * sum(any_) / n,
        "common_forget": 100.0 * sum(all_) / n,
        "common_forget_if_independent": indep if len(runs) > 1 else share[runs[0]],
        "unforget": sum(100.0 - share[r] for r in runs) / len(runs),  # mean per run
        "common_unforget": 100.0 * (n - sum(any_)) / n,  # forgotten in no run
        "pairwise": pairwise,
    }


def write_analysis(out_dir: str | Path, forgotten: dict[str, Sequence[bool]]) -> dict:
    out = Path(out_dir)
    summary = overlap_summary(forgotten)
    (out / "forgetting.json").write_text(json.dumps(summary, indent=1))
    plot(summary, out / "forgetting.png")
    return summary


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(summary["share_forgotten"])
    labels = runs + ["forget (any)", "common forget", "independent\nexpectation", "common unforget"]
    values = [summary["share_forgotten"][r] for r in runs] + [
        summary["forget"], summary["common_forget"], summary["common_forget_if_independent"],
        summary["common_unforget"]]
    colors = ["tab:blue"] * len(runs) + ["tab:red", "tab:purple", "tab:gray", "tab:green"]
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2, 3.5))
    ax.bar(range(len(labels)), values, color=colors)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("% of alignment examples")
    ax.set_title("Forgetting under proxy harmful fine-tuning")
    for i, v in enumerate(values):
        ax.text(i, v + 1, f"{v:.1f}", ha="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
