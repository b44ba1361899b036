"""Figures of a report: HS and FA per column and method (``report.png``) and each
method's harmful score before / after the attack (``report_hs_before_after.png``)."""

from __future__ import annotations

from pathlib import Path

from vaa.report.render import display
from vaa.report.table import AVG, Table


def _bars(ax, t: Table, groups: list[str], series: list[tuple[str, dict]], ylabel: str) -> None:
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        means = [values[g].mean if values.get(g) else float("nan") for g in groups]
        errs = [(values[g].std or 0) if values.get(g) else 0 for g in groups]
        ax.bar(xs, means, width, yerr=errs, capsize=2, label=display(name))
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([display(g) if g != AVG else "avg" for g in groups], fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 105)
    ax.grid(axis="y", alpha=0.3)


def write_figures(t: Table, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = t.columns + [AVG]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(cols)), 3.8))
    for ax, d, label in ((axes[0], t.hs, "harmful score % (lower is safer)"),
                         (axes[1], t.fa, "fine-tune accuracy %")):
        _bars(ax, t, cols, [(r, {c: d[r, c] for c in cols}) for r in t.rows], label)
    axes[0].legend(fontsize=7)
    fig.suptitle("mean ± std over seeds; a missing bar is a missing (failed) cell", fontsize=9)
    fig.tight_layout()
    paths = [out_dir / "report.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    stages = ["aligned", "finetuned"] + (["restored"] if any(v["restored"] for v in t.before_after.values()) else [])
    names = {"aligned": "before HFT (aligned)", "finetuned": "after HFT", "restored": "after repair"}
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(t.rows)), 3.5))
    series = [(s, {r: t.before_after[r][s] for r in t.rows}) for s in stages]
    width = 0.8 / len(series)
    for i, (s, values) in enumerate(series):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(t.rows))]
        ax.bar(xs, [values[r].mean if values[r] else float("nan") for r in t.rows], width,
               yerr=[(values[r].std or 0) if values[r] else 0 for r in t.rows], capsize=2, label=names[s])
    ax.set_xticks(range(len(t.rows)))
    ax.set_xticklabels([display(r) for r in t.rows], fontsize=8)
    ax.set_ylabel("harmful score %")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7)
    ax.set_title("HS before / after the attack\n(mean over columns and seeds)", fontsize=9)
    fig.tight_layout()
    paths.append(out_dir / "report_hs_before_after.png")
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths
