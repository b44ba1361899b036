"""Loss-reweighting Group DRO (Sagawa et al., ICLR 2020) — the ``gdro_reweight`` ablation of
VAA (specs/vaa.md §6; reference code ``ChanLiang/VAA`` ``DROTrainer`` + ``loss.py``
``LossComputer``).

Unlike the EXP3 sampler (``vaa.methods.dro.sampler``), every batch is a mixed batch and all
groups are trained at once; q only reweights the per-group losses:

1. per-sample loss = token-mean CE of each sequence over its response (labelled) tokens
   (:func:`per_sample_token_mean_ce`);
2. group loss ℓ_g = mean per-sample loss of group g's rows in the batch; a group absent from
   the batch gets ℓ_g = 0 (as the reference);
3. q <- q · exp(η ℓ̃_g) / Z over all groups (absent ones with their 0 loss, as the
   reference), computed in log space on detached float64 values, where ℓ̃ is ℓ, or its EMA
   when ``ema`` is set, plus the optional size adjustment, divided by its sum when
   ``normalize_loss``;
4. with ``min_var_weight`` = w > 0: q <- (1 - w) q + w · fractions, fractions = group sizes / N.
   As in the reference ``loss.py``, the mixed q **is** the new state (it feeds the next
   update too), not only the weights of this step's loss;
5. the training loss is Σ_g q_g ℓ_g with q (after this step's update) detached and ℓ
   differentiable, so a row of group g receives gradient weight q_g / n_g.

EMA (``ema`` = γ, e.g. 0.1; the reference's ``use_ema_loss`` with ``gamma``): a group seen for
the first time takes its batch loss, a present group ê <- (1 - γ) ê + γ ℓ, an absent group
keeps its value; the EMA replaces ℓ only in the q update (step 3), never in the returned loss.

Size adjustment (``adj`` = C, Sagawa's "group adjustment"): C_g / sqrt(n_g) is added to the
losses of the q update only (the reference adds it in place, which also leaks it into the
returned loss; not replicated).

Under DDP each rank sees different rows: all-reduce the group sums and counts before calling
:meth:`GroupLossReweighter.step` (or feed it the gathered batch) or q drifts apart across ranks.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from vaa.methods.dro.validate import as_counts, is_real

__all__ = ["GroupLossReweighter", "per_sample_token_mean_ce"]

IGNORE_INDEX = -100


def per_sample_token_mean_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-mean causal-LM cross-entropy of each row: logits[B, T, V], labels[B, T] → [B].

    Shifted (position t predicts label t + 1); labels equal to -100 are ignored; each row is
    averaged over its own labelled tokens; a row without any labelled token gets 0. Computed
    in float32 (logits are upcast).
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(f"expected logits [B, T, V] and labels [B, T], got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    B, T, V = logits.shape
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    tok = F.cross_entropy(shift_logits.reshape(-1, V), shift_labels.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="none").view(B, T - 1)
    mask = (shift_labels != IGNORE_INDEX).to(tok.dtype)
    n = mask.sum(dim=1)
    return (tok * mask).sum(dim=1) / n.clamp_min(1.0)


class GroupLossReweighter:
    """Sagawa-style online Group DRO over K groups (see the module docstring).

    Args:
        num_groups: K >= 2 (VAA: 0 = invulnerable, 1 = vulnerable).
        eta: step size η >= 0 of the exponentiated-gradient update of q.
        init: ``"uniform"``, ``"empirical"`` (group sizes / N; needs ``group_sizes``) or K
            explicit positive weights.
        group_sizes: examples per group in the training set (needed by ``"empirical"``,
            ``min_var_weight`` > 0 and ``adj``).
        ema: γ of the EMA of the group losses used for the q update; ``None`` disables.
        normalize_loss: divide the loss vector by its sum before the q update.
        min_var_weight: w in [0, 1]; q <- (1 - w) q + w · group fractions after each update.
        adj: size adjustment C (a number or K numbers); C_g / sqrt(n_g) is added to the losses
            of the q update. ``None`` disables.
    """

    def __init__(self, num_groups: int = 2, eta: float = 0.007, init: str | Sequence[float] = "uniform",
                 group_sizes: Sequence[int] | None = None, ema: float | None = None,
                 normalize_loss: bool = False, min_var_weight: float = 0.0,
                 adj: float | Sequence[float] | None = None):
        if not isinstance(num_groups, numbers.Integral) or isinstance(num_groups, bool) or num_groups < 2:
            raise ValueError(f"num_groups must be an integer >= 2, got {num_groups!r}")
        self.num_groups = K = int(num_groups)
        if not is_real(eta) or not math.isfinite(eta) or eta < 0:
            raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
        self.eta = float(eta)
        if ema is not None and (not is_real(ema) or not 0.0 < ema <= 1.0):
            raise ValueError(f"ema must be null or a number in (0, 1], got {ema!r}")
        self.ema = None if ema is None else float(ema)
        if not isinstance(normalize_loss, bool):
            raise ValueError(f"normalize_loss must be a bool, got {normalize_loss!r}")
        self.normalize_loss = normalize_loss
        if not is_real(min_var_weight) or not 0.0 <= min_var_weight <= 1.0:
            raise ValueError(f"min_var_weight must be a number in [0, 1], got {min_var_weight!r}")
        self.min_var_weight = float(min_var_weight)

        self.group_sizes: torch.Tensor | None = None
        if group_sizes is not None:
            sizes = as_counts(group_sizes)
            if sizes is None or len(sizes) != K or sum(sizes) == 0:
                raise ValueError(f"group_sizes must be {K} non-negative integers with a positive sum, "
                                 f"got {group_sizes!r}")
            self.group_sizes = torch.tensor([float(n) for n in sizes], dtype=torch.float64)
        need = [name for name, on in (("init='empirical'", isinstance(init, str) and init == "empirical"),
                                      ("min_var_weight > 0", self.min_var_weight > 0),
                                      ("adj", adj is not None)) if on]
        if need and self.group_sizes is None:
            raise ValueError(f"group_sizes is required by {', '.join(need)}")
        self.fractions = None if self.group_sizes is None else self.group_sizes / self.group_sizes.sum()

        self.adj: torch.Tensor | None = None
        if adj is not None:
            a = [adj] * K if is_real(adj) else list(adj)
            if len(a) != K or not all(is_real(v) and math.isfinite(v) for v in a):
                raise ValueError(f"adj must be null, a number or {K} numbers, got {adj!r}")
            if bool((self.group_sizes <= 0).any()):
                raise ValueError(f"adj needs every group non-empty, got group_sizes={group_sizes!r}")
            self.adj = torch.tensor([float(v) for v in a], dtype=torch.float64)

        self.q = self._initial_q(init, K)
        self.ema_loss = torch.zeros(K, dtype=torch.float64)
        self.ema_seen = torch.zeros(K, dtype=torch.bool)
        self.num_updates = 0

    def _initial_q(self, init: str | Sequence[float], K: int) -> torch.Tensor:
        if isinstance(init, str):
            if init == "uniform":
                return torch.full((K,), 1.0 / K, dtype=torch.float64)
            if init == "empirical":
                if bool((self.group_sizes <= 0).any()):
                    raise ValueError("init='empirical' needs every group non-empty, got group_sizes="
                                     f"{self.group_sizes.long().tolist()}")
                return self.fractions.clone()
            raise ValueError(f"init must be 'uniform', 'empirical' or {K} weights, got {init!r}")
        try:
            w = [float(v) for v in init]
        except (TypeError, ValueError):
            raise ValueError(f"init must be 'uniform', 'empirical' or {K} weights, got {init!r}") from None
        if len(w) != K or not all(math.isfinite(v) and v > 0 for v in w):
            raise ValueError(f"init: explicit q must be {K} finite positive weights, got {init!r}")
        t = torch.tensor(w, dtype=torch.float64)
        return t / t.sum()

    @property
    def probs(self) -> list[float]:
        return self.q.tolist()

    # ------------------------------------------------------------------ losses
    def _group_stats(self, per_sample_loss: torch.Tensor, groups: torch.Tensor):
        if per_sample_loss.dim() != 1 or groups.dim() != 1 or per_sample_loss.shape != groups.shape:
            raise ValueError(f"per_sample_loss and groups must be 1-D of equal length, got "
                             f"{tuple(per_sample_loss.shape)} and {tuple(groups.shape)}")
        if groups.dtype.is_floating_point or groups.dtype == torch.bool:
            raise ValueError(f"groups must be an integer tensor, got {groups.dtype}")
        if groups.numel() and (int(groups.min()) < 0 or int(groups.max()) >= self.num_groups):
            raise ValueError(f"groups must lie in [0, {self.num_groups}), got {groups.unique().tolist()}")
        K = self.num_groups
        onehot = (groups.to(per_sample_loss.device).unsqueeze(0)
                  == torch.arange(K, device=per_sample_loss.device).unsqueeze(1)).to(per_sample_loss.dtype)
        count = onehot.sum(dim=1)  # [K]
        loss = (onehot @ per_sample_loss) / count.clamp_min(1.0)  # absent group: 0 / 1 = 0
        return loss, count

    def group_losses(self, per_sample_loss: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ℓ[K], present[K]): mean per-sample loss of each group (differentiable; 0 for a group
        absent from the batch) and the boolean mask of the groups present."""
        loss, count = self._group_stats(per_sample_loss, groups)
        return loss, count > 0

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def _update_q(self, loss: torch.Tensor, present: torch.Tensor) -> None:
        if not bool(torch.isfinite(loss).all()):
            raise ValueError(f"group losses must be finite, got {loss.tolist()}")
        signal = loss
        if self.ema is not None:
            g = self.ema
            prev = torch.where(self.ema_seen, 1.0 - g * present.double(), torch.zeros_like(loss))
            self.ema_loss = self.ema_loss * prev + loss * (1.0 - prev)
            self.ema_seen = self.ema_seen | present
            signal = self.ema_loss.clone()
        if self.adj is not None:
            signal = signal + self.adj / self.group_sizes.sqrt()
        if self.normalize_loss:
            total = signal.sum()
            signal = signal / total if total != 0 else signal
        logq = torch.log(self.q) + self.eta * signal  # log space: no overflow for large η·ℓ
        q = torch.softmax(logq, dim=0)
        if self.min_var_weight > 0:
            q = (1.0 - self.min_var_weight) * q + self.min_var_weight * self.fractions
        self.q = q
        self.num_updates += 1

    def step(self, per_sample_loss: torch.Tensor, groups: torch.Tensor, update: bool = True) -> torch.Tensor:
        """Group losses → (if ``update``) q update → Σ_g q_g ℓ_g (scalar; q detached, ℓ
        differentiable). ``update=False`` (evaluation) leaves q and the EMA untouched."""
        loss, count = self._group_stats(per_sample_loss, groups)
        if update:
            self._update_q(loss.detach().to("cpu", torch.float64), (count > 0).cpu())
        return (self.q.to(device=loss.device, dtype=loss.dtype) * loss).sum()

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {"num_groups": self.num_groups, "q": self.q.tolist(), "ema_loss": self.ema_loss.tolist(),
                "ema_seen": self.ema_seen.tolist(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        K = int(state["num_groups"])
        if K != self.num_groups:
            raise ValueError(f"state_dict is for num_groups={K}, this reweighter has {self.num_groups}")
        q = torch.tensor([float(v) for v in state["q"]], dtype=torch.float64)
        if q.numel() != K or not bool(torch.isfinite(q).all()) or bool((q < 0).any()) \
                or abs(float(q.sum()) - 1.0) > 1e-9:
            raise ValueError(f"state_dict: q must be {K} probabilities summing to 1, got {state['q']!r}")
        self.q = q
        self.ema_loss = torch.tensor([float(v) for v in state["ema_loss"]], dtype=torch.float64)
        self.ema_seen = torch.tensor([bool(v) for v in state["ema_seen"]], dtype=torch.bool)
        self.num_updates = int(state.get("num_updates", 0))

    def __repr__(self) -> str:
        q = ", ".join(f"{v:.4f}" for v in self.q.tolist())
        return f"GroupLossReweighter(K={self.num_groups}, eta={self.eta}, ema={self.ema}, q=[{q}])"
