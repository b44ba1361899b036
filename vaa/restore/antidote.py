"""Antidote (Huang et al., arXiv 2408.09600, ICML 2025; git-disl/Antidote ``prune_wanda_outlier``).

One-shot pruning after HFT: the weights that matter most on *harmful* data are zeroed.
Wanda score S_ij = |W_ij|·‖X_j‖₂, with ‖X_j‖₂ the L2 norm of input feature j over every
calibration token (harmful prompt + harmful answer rows, ``beavertails/align_harmful``); in each
output row i the top ``dense_ratio`` fraction of S_i· is masked, W ← W ⊙ (1 − M).

``sequential`` (Wanda): block l's input norms are taken with blocks < l already pruned (one
forward pass over the calibration set per block); otherwise one pass for all blocks.
``score=delta`` is the spec's recommended variant: score |W_ft − W_aligned|·‖X‖ and reset the
masked entries to their aligned values. Departures: full-FT ``targets`` (q,k,v by default) as the
spec's ``full`` mode; no ``good_mask``; the calibration set is the world's 200 rows, not 2,000.
"""

from __future__ import annotations

import torch

from vaa.restore.base import Restorer
from vaa.restore.schema import AntidoteRestoreConfig


def input_sq_norms(model, modules: dict[str, torch.nn.Linear], batches) -> dict[str, torch.Tensor]:
    """Σ over calibration tokens (padding excluded) of x_j² at the input of each module."""
    acc = {n: torch.zeros(m.in_features, device=m.weight.device) for n, m in modules.items()}
    mask_now = {}

    def hook(name):
        def fn(mod, args):
            x = args[0].detach().float()
            keep = mask_now["m"].bool()
            acc[name] += (x[keep] ** 2).sum(0)
        return fn
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            for b in batches:
                mask_now["m"] = b["attention_mask"]
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    return acc


def row_topk_mask(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean mask with the top ``floor(ratio · in_features)`` scores of every row set."""
    k = int(ratio * score.shape[1] + 1e-9)
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        mask.scatter_(1, score.topk(k, dim=1).indices, True)
    return mask


class Antidote(Restorer):
    schema = AntidoteRestoreConfig

    reads = ("aligned",)  # loaded only by score=delta

    def groups(self, model) -> list[dict[str, torch.nn.Linear]]:
        """Target modules grouped by decoder block (in order), or one group for a flat model."""
        layers = getattr(getattr(model, "model", None), "layers", None)
        blocks = list(layers) if layers is not None and self.hp.sequential else [model]
        prefix = "model.layers." if layers is not None and self.hp.sequential else ""
        out = []
        for i, blk in enumerate(blocks):
            mods = {f"{prefix}{i}.{n}" if prefix else n: m for n, m in blk.named_modules()
                    if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in self.hp.targets}
            if mods:
                out.append(mods)
        if not out:
            raise ValueError(f"no Linear module named {list(self.hp.targets)}; set restore.targets")
        return out

    @torch.no_grad()
    def restore(self, model, inputs):
        hp = self.hp
        if not 0.0 <= hp.dense_ratio <= 1.0:
            raise ValueError(f"restore.dense_ratio must be in [0, 1], got {hp.dense_ratio}")
        if hp.score not in ("weight", "delta"):
            raise ValueError(f"restore.score={hp.score!r}; use weight or delta")
        batches = inputs.batches(inputs.harmful(hp), hp.batch_size)
        aligned = dict(inputs.load("aligned").named_parameters()) if hp.score == "delta" else {}
        pruned = {}
        for mods in self.groups(model):
            norms = input_sq_norms(model, mods, batches)
            self.count(batches)
            for name, m in mods.items():
                w = m.weight
                ref = aligned.get(f"{name}.weight") if aligned else None
                magnitude = (w - ref).abs() if ref is not None else w.abs()
                mask = row_topk_mask(magnitude.float() * norms[name].sqrt(), hp.dense_ratio)
                w.copy_(torch.where(mask, ref if ref is not None else torch.zeros_like(w), w))
                pruned[name] = float(mask.float().mean())
        self.info = {"pruned_fraction": pruned}
        return model
