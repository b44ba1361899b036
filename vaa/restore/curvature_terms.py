"""What the curvature repair (vaa/restore/curvature.py) differentiates: loss terms weighted by
their token share (gradients, exact Hessian-vector products), logits at labelled positions
(Gauss-Newton products, vaa/restore/curvature_ops.py ``ggn_vp``), batches cut into single
rows (the diagonal Fisher), and the decoder's linear layers it repairs (``restore.modules``).
specs/restoration.md §1.2-1.4.
"""

from __future__ import annotations

import torch

from vaa.errors import ConfigError
from vaa.restore.base import n_tokens
from vaa.training.module import response_loss


def loss_terms(model, batches):
    total = sum(n_tokens(b) for b in batches)
    return [(lambda b=b: response_loss(model, b), n_tokens(b) / total) for b in batches]


def logit_terms(model, batches):
    """(logits, targets) at labelled positions, for Gauss-Newton products."""
    total = sum(n_tokens(b) for b in batches)

    def fn(b):
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        labels = b["labels"][:, 1:]
        keep = labels != -100
        return logits[keep], labels[keep]
    # ggn_vp divides by the logits' row count, so each batch's weight is its token share × 1
    return [(lambda b=b: fn(b), n_tokens(b) / total * 1.0) for b in batches]


def single_rows(batches):
    for b in batches:
        for i in range(b["input_ids"].shape[0]):
            n = int(b["attention_mask"][i].sum())
            yield {k: v[i:i + 1, :n] for k, v in b.items()}


def target_linears(model, names) -> list[torch.nn.Linear]:
    layers = getattr(getattr(model, "model", model), "layers", None)
    scope = layers if layers is not None else model
    mods = [m for n, m in scope.named_modules()
            if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in names]
    if not mods:
        raise ConfigError(f"restore.modules={list(names)} matches no Linear module of the model "
                          "(names are the last part of a module's name, e.g. q_proj, down_proj)")
    return mods
