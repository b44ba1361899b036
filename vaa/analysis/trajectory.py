"""VAA's sampler over training: p(vulnerable) per step and the clean loss of each group,
as JSON and a plot (vaa.md §7, "at the end")."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence


def write_trajectory(out_dir: str | Path, steps: Sequence[tuple], stats: dict) -> None:
    """``steps``: (group, p after the update, clean loss, perturbed loss or None) per step."""
    out = Path(out_dir)
    rows = [{"step": i + 1, "group": g, "p_vulnerable": p, "loss_clean": l0, "loss_perturbed": l1}
            for i, (g, p, l0, l1) in enumerate(steps)]
    (out / "dro_trajectory.json").write_text(json.dumps({"stats": stats, "steps": rows}))
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_p, ax_l) = plt.subplots(1, 2, figsize=(10, 3.2))
    ax_p.plot([r["step"] for r in rows], [r["p_vulnerable"] for r in rows], color="tab:red")
    ax_p.set(xlabel="step", ylabel="p(vulnerable)", title="EXP3 sampler", ylim=(0, 1))
    for g, name, color in ((0, "invulnerable", "tab:green"), (1, "vulnerable", "tab:red")):
        pts = [(r["step"], r["loss_clean"]) for r in rows if r["group"] == g]
        if pts:
            ax_l.plot(*zip(*pts), ".", ms=3, color=color, label=name)
    ax_l.set(xlabel="step", ylabel="clean loss", title="loss of the sampled group", yscale="log")
    ax_l.legend()
    fig.tight_layout()
    fig.savefig(out / "dro_trajectory.png", dpi=110)
    plt.close(fig)
