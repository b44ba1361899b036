"""The adversarial group sampler of VAA stage 2: EXP3 over K groups (specs/vaa.md §3.1-3.2).

L. Chen, X. Han, L. Shen, J. Bai, K.-F. Wong, *Vulnerability-Aware Alignment: Mitigating
Uneven Forgetting in Harmful Fine-Tuning*, ICML 2025 (arXiv 2506.03850), Eqs. 9-13; reference
code ``ChanLiang/VAA`` (``DROSamplingTrainer.update_p_with_loss``).

The sampler keeps a distribution q over K groups (group ids follow the reference code:
0 = invulnerable, 1 = vulnerable, so for K = 2 ``p = q[1]``). Each step it draws a group k,
the trainer computes that group's batch loss L, and the sampler ascends on it
(exponentiated gradient on the simplex):

- ``feedback="bandit"`` (Eq. 13, the reference code): only the drawn group's loss is seen,
  so it is importance-weighted: r_k = L / q_k; q_k <- q_k · exp(η r_k); q <- q / Σ_j q_j
  (the other q_j are unchanged before normalising). This is EXP3. For K = 2 it is the
  reference's closed form: drawn vulnerable p <- p e^{ηL/p} / (p e^{ηL/p} + 1 - p); drawn
  invulnerable p <- p / (p + (1 - p) e^{ηL/(1-p)}).
- ``feedback="full"`` (literal Eq. 12, the ``vaa_full_info`` ablation, not in the code):
  every group's loss f_i is seen: q_i <- q_i · exp(η f_i) / Z.

The update runs in log space with the maximum exponent subtracted, so a large η·L/q_k
cannot overflow (it saturates q at a vertex instead of producing inf / NaN).

Clip (``clip``, ``sampler.clip`` in the config): the reference code clips p = q[1] to
[0.1, 0.9] after every update and sets q[0] = 1 - p. **The clip exists only in the
reference code; the paper has none** — the ``paper`` preset sets ``sampler.clip: null``.
For K > 2 (our rec, spec §3.2) only the lower bound is used: every q_k is floored at
``clip[0]`` and the unfloored mass is renormalised, so that afterwards every q_k >= clip[0]
and Σ q = 1 hold exactly (the upper bound is ignored; K·clip[0] <= 1 is required). The clip
is also applied to the initial q.

Initial q (``init``): ``"uniform"`` = 1/K (p0 = 0.5, the value of the reference Llama
script ``vaa_pipeline_llama.sh``, the primary setting); ``"empirical"`` = group sizes / N
(p0 = 742/2000 = 0.371 with the released grouping); or an explicit sequence of K positive
weights (normalised).

Determinism: the sampler owns its generator (``random.Random(seed)``) and touches no global
RNG. Under DDP every rank builds the sampler with the same seed and feeds it the same
(all-reduced) loss, so every rank draws the same group sequence. ``state_dict()`` holds q,
the generator state and the counters as plain lists/ints/floats (JSON- and
``torch.load(weights_only=True)``-safe); a sampler restored from it continues exactly like
the original, draws and updates alike (spec §10 item 6).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

from vaa.methods.dro.validate import as_counts, check_clip, check_group, check_loss, is_int, is_real

__all__ = ["EXP3Sampler", "VUL", "INV"]

INV, VUL = 0, 1  # group ids of the reference code ("Unforget" / "Forget")

_FEEDBACK = ("bandit", "full")


def _normalise_log(logw: list[float]) -> list[float]:
    """softmax of log-weights (``-inf`` allowed for zero weights), max exponent subtracted."""
    m = max(logw)
    w = [math.exp(v - m) if v != -math.inf else 0.0 for v in logw]
    z = math.fsum(w)
    return [v / z for v in w]


def _log(x: float) -> float:
    return math.log(x) if x > 0.0 else -math.inf


class EXP3Sampler:
    """EXP3 adversarial sampler over ``num_groups`` groups (see the module docstring).

    Args:
        num_groups: K >= 2. VAA uses 2 (0 = invulnerable, 1 = vulnerable).
        eta: step size η >= 0 (0.007 in the reference Llama script; 0.04 Qwen script).
        init: ``"uniform"`` (p0 = 0.5 for K = 2, the Llama script), ``"empirical"`` (group
            sizes / N; needs ``group_sizes``) or K explicit positive weights.
        group_sizes: the number of examples in each group (needed by ``"empirical"``).
        clip: ``(lo, hi)`` — K = 2: p = q[1] is clipped to [lo, hi] and q[0] = 1 - p, as in
            the reference code; K > 2: every q_k is floored at lo. ``None`` disables (the
            paper has no clip).
        feedback: ``"bandit"`` (Eq. 13, ``update``) or ``"full"`` (Eq. 12, ``update_full``).
        seed: seed of the sampler's own ``random.Random``.
    """

    def __init__(self, num_groups: int = 2, eta: float = 0.007, init: str | Sequence[float] = "uniform",
                 group_sizes: Sequence[int] | None = None, clip: Sequence[float] | None = (0.1, 0.9),
                 feedback: str = "bandit", seed: int = 0):
        if not is_int(num_groups) or num_groups < 2:
            raise ValueError(f"num_groups must be an integer >= 2, got {num_groups!r}")
        self.num_groups = K = int(num_groups)
        if not is_real(eta) or not math.isfinite(eta) or eta < 0:
            raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
        self.eta = float(eta)
        if feedback not in _FEEDBACK:
            raise ValueError(f"feedback must be one of {_FEEDBACK}, got {feedback!r}")
        self.feedback = feedback
        if not is_int(seed):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.seed = int(seed)

        if group_sizes is not None:
            sizes = as_counts(group_sizes)
            if sizes is None or len(sizes) != K:
                raise ValueError(f"group_sizes must be {K} non-negative integers, got {group_sizes!r}")
            self.group_sizes: list[int] | None = sizes
        else:
            self.group_sizes = None

        self.clip = check_clip(clip, K)
        self._q = self._initial_q(init, K)
        self._apply_clip()
        self._rng = random.Random(self.seed)
        self.draw_counts = [0] * K  # times each group was drawn
        self.num_updates = 0

    # ------------------------------------------------------------------ construction
    def _initial_q(self, init: str | Sequence[float], K: int) -> list[float]:
        if isinstance(init, str):
            if init == "uniform":
                return [1.0 / K] * K
            if init == "empirical":
                if self.group_sizes is None:
                    raise ValueError("init='empirical' needs group_sizes (the number of examples per group)")
                if min(self.group_sizes) <= 0:
                    raise ValueError(f"init='empirical' needs every group non-empty, got group_sizes="
                                     f"{self.group_sizes}")
                n = sum(self.group_sizes)
                return [s / n for s in self.group_sizes]
            raise ValueError(f"init must be 'uniform', 'empirical' or {K} weights, got {init!r}")
        try:
            w = list(init)
        except TypeError:
            raise ValueError(f"init must be 'uniform', 'empirical' or {K} weights, got {init!r}") from None
        if len(w) != K or not all(is_real(v) and math.isfinite(v) and v > 0 for v in w):
            raise ValueError(f"init: explicit q must be {K} finite positive weights, got {init!r}")
        z = math.fsum(float(v) for v in w)
        return [float(v) / z for v in w]

    # ------------------------------------------------------------------ state
    @property
    def probs(self) -> list[float]:
        """A copy of q."""
        return list(self._q)

    @property
    def p_vulnerable(self) -> float:
        """q[1]: the probability of drawing the vulnerable group (p of the reference code)."""
        return self._q[VUL]

    def draw(self) -> int:
        """Draw a group id from q with the sampler's own generator. For K = 2 this is the
        reference's rule: vulnerable (1) iff U < p."""
        u = self._rng.random()
        if self.num_groups == 2:
            k = VUL if u < self._q[VUL] else INV
        else:
            k, acc = self.num_groups - 1, 0.0
            for i, qi in enumerate(self._q):
                acc += qi
                if u < acc:
                    k = i
                    break
            while self._q[k] == 0.0:  # float round-off at the top of the CDF
                k -= 1
        self.draw_counts[k] += 1
        return k

    # ------------------------------------------------------------------ updates
    def update(self, group: int, loss: float) -> None:
        """Bandit EXP3 step (Eq. 13): r_k = L/q_k; q_k <- q_k e^{η r_k}; q <- q/Σq; clip."""
        if self.feedback != "bandit":
            raise ValueError("update(group, loss) is the bandit update; this sampler has feedback='full': "
                             "call update_full(losses) with every group's loss")
        k = check_group(group, self.num_groups)
        L = check_loss(loss)
        qk = self._q[k]
        if qk <= 0.0:
            raise ValueError(f"group {k} has q = 0 and cannot have been drawn; its importance weight is undefined")
        reward = self.eta * L / qk
        if reward == math.inf:  # q_k subnormal (possible without a clip): η·L/q_k overflows; the
            self._q = [1.0 if i == k else 0.0 for i in range(self.num_groups)]  # limit is the vertex k
        else:
            logw = [_log(qi) for qi in self._q]
            logw[k] += reward
            self._q = _normalise_log(logw)
        self._apply_clip()
        self.num_updates += 1

    def update_full(self, losses: Sequence[float]) -> None:
        """Full-information step (literal Eq. 12): q_i <- q_i e^{η f_i} / Z for every i; clip."""
        if self.feedback != "full":
            raise ValueError("update_full(losses) is the full-information update; this sampler has "
                             "feedback='bandit': call update(group, loss)")
        fs = list(losses)
        if len(fs) != self.num_groups:
            raise ValueError(f"losses must hold {self.num_groups} values, got {len(fs)}")
        fs = [check_loss(f, f"losses[{i}]") for i, f in enumerate(fs)]
        self._q = _normalise_log([_log(qi) + self.eta * f for qi, f in zip(self._q, fs)])
        self._apply_clip()
        self.num_updates += 1

    def _apply_clip(self) -> None:
        if self.clip is None:
            return
        lo, hi = self.clip
        if self.num_groups == 2:  # the reference: p = clip(p, lo, hi); q = [1 - p, p]
            p = min(max(self._q[VUL], lo), hi)
            self._q = [1.0 - p, p]
            return
        q = list(self._q)
        floored = [False] * len(q)
        while True:  # floor at lo, rescale the free mass; repeat while rescaling breaks the floor
            new = [i for i, v in enumerate(q) if not floored[i] and v < lo]
            if not new:
                break
            for i in new:
                floored[i] = True
            free = [i for i in range(len(q)) if not floored[i]]
            budget = 1.0 - lo * (len(q) - len(free))
            mass = math.fsum(self._q[i] for i in free)
            for i in range(len(q)):
                q[i] = lo if floored[i] else (self._q[i] * budget / mass if mass > 0 else budget / len(free))
        self._q = q

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self._rng.getstate()
        return {"num_groups": self.num_groups, "q": list(self._q),
                "rng": [version, list(internal), gauss],
                "draw_counts": list(self.draw_counts), "num_updates": self.num_updates,
                # informational: the config that produced this state (not restored)
                "eta": self.eta, "clip": list(self.clip) if self.clip else None,
                "feedback": self.feedback, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        K = int(state["num_groups"])
        if K != self.num_groups:
            raise ValueError(f"state_dict is for num_groups={K}, this sampler has {self.num_groups}")
        q = [float(v) for v in state["q"]]
        if len(q) != K or not all(math.isfinite(v) and v >= 0 for v in q) or abs(math.fsum(q) - 1) > 1e-9:
            raise ValueError(f"state_dict: q must be {K} probabilities summing to 1, got {state['q']!r}")
        version, internal, gauss = state["rng"]
        self._rng.setstate((int(version), tuple(int(v) for v in internal), gauss))
        self._q = q
        self.draw_counts = [int(v) for v in state.get("draw_counts", [0] * K)]
        self.num_updates = int(state.get("num_updates", 0))

    def __repr__(self) -> str:
        q = ", ".join(f"{v:.4f}" for v in self._q)
        return (f"EXP3Sampler(K={self.num_groups}, eta={self.eta}, clip={self.clip}, "
                f"feedback={self.feedback!r}, q=[{q}])")
