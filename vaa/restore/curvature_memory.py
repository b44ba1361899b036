"""What the curvature repair allocates, stated and checked before it starts (issue 13):
the backend's fp32 vectors over ``restore.modules`` and one Gauss-Newton product per batch of
``restore.batch_size`` rows (:func:`memory_plan`, :func:`hvp_batch_bytes`), the device's free
memory (:func:`host_available_gb`, CUDA's ``mem_get_info``) and the refusal that names the batch
size that fits (:func:`check_fits`). ``vaa-plan`` and the pre-flight validation use the same
functions through ``CurvatureRestore.plan_terms``. Units: GB = 2**30 bytes here."""

from __future__ import annotations

import torch

from vaa.errors import ConfigError

# fp32 vectors of the parameter space each backend holds at once (besides the model): the
# gradient g, the solution x and the step copy of θ, plus the solver's own (CG: r, p, Ap;
# L-BFGS: 2·history pairs + its direction; diagonal Fisher: one).
_VECTORS = {"identity": 3, "diag_fisher": 4, "kfac": 3, "cg": 6, "lbfgs_ihvp": 4}


def hvp_batch_bytes(config, batch) -> float:
    """Peak bytes of one Gauss-Newton product over ``batch`` (fp32): the double-vjp keeps the
    forward's activations and its backward's, 2·a(h, I) per token and layer with
    a = (11h + 4I)·4 B (``vaa.plan.memory``), and about 8 vocabulary-sized fp32 rows per
    labelled token (logits, u, Jv, softmax, H·Jv and their temporaries). Checked on
    SmolLM2-135M at 160 tokens (128 labelled): 0.68 GB (1e9 B) per row predicted, 0.695
    measured (peak RSS over one product at 2 and 4 rows: +2.26 and +3.65 GB)."""
    h, i = config.hidden_size, config.intermediate_size
    per_token = config.num_hidden_layers * 2 * (11 * h + 4 * i) * 4
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    return batch["input_ids"].numel() * per_token + labelled * 8 * config.vocab_size * 4


def memory_plan(params, modules, hp, config=None, batches=()) -> dict:
    """What the repair allocates beyond the model, stated before it starts: ``numel``
    parameters in its space (``restore.modules``; a subset such as ``[q_proj, v_proj]``
    shrinks it), × 4 bytes × the vectors its backend holds (``_VECTORS``; L-BFGS adds
    2·``curvature.history``), plus K-FAC's per-module factors (``gb``); with the model's
    ``config`` and its curvature ``batches``, also the largest batch's Gauss-Newton product
    (``hvp_batch_gb``, :func:`hvp_batch_bytes`; ``restore.batch_size`` sets it) and the sum
    (``total_gb``). Units: GB = 2**30 bytes."""
    numel = sum(p.numel() for p in params)
    cv = hp.curvature
    vectors = _VECTORS.get(cv.backend, 6) + (2 * cv.history if cv.backend == "lbfgs_ihvp" else 0)
    extra = 0
    if cv.backend == "kfac":
        extra = sum(m.in_features ** 2 + m.out_features ** 2 for m in modules)
    gb = 4 * (numel * vectors + extra) / 2**30
    plan = {"numel": numel, "vectors": vectors, "gb": round(gb, 3),
            "what": f"{vectors} fp32 vectors of {numel:,} entries" + (" + K-FAC factors" if extra else "")}
    if config is not None and batches and all(hasattr(config, k) for k in
                                              ("hidden_size", "intermediate_size", "vocab_size")):
        hvp = max(hvp_batch_bytes(config, b) for b in batches) / 2**30
        plan.update(hvp_batch_gb=round(hvp, 3), total_gb=round(gb + hvp, 3))
    return plan


def host_available_gb() -> float | None:
    """MemAvailable of /proc/meminfo in GB (2**30 bytes); None where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / 2**30
    except OSError:
        return None
    return None


def check_fits(plan: dict, device: torch.device, batch_size: int) -> None:
    """Refuse, before the first product, a repair whose planned memory exceeds what the device
    has free (a CPU run that does not fit is killed by the kernel with no record): one line
    with the estimate and the ``restore.batch_size`` that fits."""
    if "total_gb" not in plan:
        return
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0] / 2**30
    else:
        free = host_available_gb()
    if free is None or plan["total_gb"] <= free:
        return
    per_row = plan["hvp_batch_gb"] / max(batch_size, 1)
    fits = int(max(free - plan["gb"], 0) // per_row) if per_row > 0 else 0
    hint = (f"set restore.batch_size={fits} (rows per curvature product; the maths does not "
            f"depend on it)" if fits >= 1 else "shrink restore.modules (e.g. [q_proj,v_proj]) or "
            "restore.curvature.backend")
    raise ConfigError(f"restore=curvature needs about {plan['total_gb']:.1f} GB ({plan['gb']:.1f} GB of "
                      f"vectors + {plan['hvp_batch_gb']:.1f} GB per curvature product at "
                      f"restore.batch_size={batch_size}) and {device.type} has {free:.1f} GB free: {hint}")
