"""SafeLoRA (Hsu et al., arXiv 2405.16833, NeurIPS 2024; IBM/SafeLoRA ``model.py``).

Per target module, with V = W_aligned − W_base (the alignment direction) and
C = V·Vᵀ / ‖V‖_F (d_out × d_out; not an idempotent projector, kept as the reference has it),
compare the fine-tuning update ΔW with its projection C·ΔW:

    cos = ⟨C·ΔW, ΔW⟩ / (‖C·ΔW‖ ‖ΔW‖)

and project the modules that fit the alignment subspace least: ΔW ← C·ΔW. Selection:
``number`` = the ``num_proj_layers`` lowest cosines (the reference's k-th-smallest threshold,
so ties may add more), ``threshold`` = cos ≤ ``threshold``. Modules above stay bit-identical.

A module where alignment changed nothing (V = 0) has no alignment direction: C = 0/0 and its
cosine is NaN, which would make the k-th-smallest cut arbitrary. Such modules (and those the
fine-tuning left unchanged, ΔW = 0, cos = 0/0) are skipped with a logged reason
(``info["skipped"]``) and the selection runs over the rest. ``num_proj_layers`` defaults to
the spec's (and the reference's) 10; on a model with ≤ 10 target modules that projects them all.

Departure from the reference: our attack is full fine-tuning, so ΔW = W_ft − W_aligned and
the projected weight is W_aligned + C·ΔW (the spec's full-FT variant); the LoRA form
(B ← C·B) is the same map applied to ΔW = B·A. Parameters are paired by name, never by order.
"""

from __future__ import annotations

import logging
import math

import torch

from vaa.restore.base import Restorer
from vaa.restore.schema import SafeLoRARestoreConfig

log = logging.getLogger(__name__)


def target_weights(model, targets) -> dict[str, torch.nn.Parameter]:
    out = {f"{n}.weight": m.weight for n, m in model.named_modules()
           if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets}
    if not out:
        raise ValueError(f"no Linear module named {list(targets)} in the model; set restore.targets")
    return out


class SafeLoRA(Restorer):
    schema = SafeLoRARestoreConfig
    reads = ("aligned", "base")

    @torch.no_grad()
    def restore(self, model, inputs):
        hp = self.hp
        aligned = dict(inputs.load("aligned").named_parameters())
        base = dict(inputs.load("base").named_parameters())
        stats, skipped = {}, {}
        for name, w in target_weights(model, hp.targets).items():
            if aligned[name].shape != w.shape or base[name].shape != w.shape:
                raise ValueError(f"safelora: {name} has different shapes in base/aligned/fine-tuned")
            v = (aligned[name] - base[name]).float()
            delta = (w - aligned[name]).float()
            if not bool(v.any()):
                skipped[name] = "alignment left it unchanged (V = W_aligned - W_base = 0): no direction"
                continue
            if not bool(delta.any()):
                skipped[name] = "fine-tuning left it unchanged (ΔW = 0): nothing to project"
                continue
            c = v @ v.T / v.norm()
            proj = c @ delta
            cos = float((proj * delta).sum() / (proj.norm() * delta.norm()).clamp_min(1e-12))
            if not math.isfinite(cos):
                skipped[name] = f"non-finite cosine {cos}"
                continue
            stats[name] = (cos, proj)
        for name, why in skipped.items():
            log.warning("safelora: skipping %s: %s", name, why)
        cosines = {n: s[0] for n, s in stats.items()}
        if hp.select == "number":
            k = min(hp.num_proj_layers, len(cosines))
            cut = sorted(cosines.values())[k - 1] if k > 0 else float("-inf")
        elif hp.select == "threshold":
            cut = hp.threshold
        else:
            raise ValueError(f"restore.select={hp.select!r}; use number or threshold")
        weights = target_weights(model, hp.targets)
        projected = []
        for name, (cos, proj) in stats.items():
            if cos <= cut:
                weights[name].copy_(aligned[name] + proj.to(weights[name].dtype))
                projected.append(name)
        self.info = {"cosines": cosines, "projected": projected, "skipped": skipped,
                     "projected_fraction": len(projected) / max(1, len(stats) + len(skipped))}
        return model
