"""Pre-flight check of a repair's memory (issue 13): a repair whose class states its
allocations (``plan_terms``, e.g. ``restore=curvature``) is planned with ``vaa-plan``'s
shapes before any stage runs, and refused when the plan exceeds the memory of the device it
will run on — the total memory of GPU 0 for a GPU trainer, the host's available memory for a
CPU one. Otherwise it fails at the end of the job, after alignment and the attack have run
(a CPU run is killed by the kernel with no record; the default curvature repair plans 565 GB
on Llama-2-7B). Skipped when the device is not visible here (a login node planning a GPU job:
``vaa-plan`` prints the plan) or the model's shape cannot be read without loading it."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from vaa.config.checker import Checker


def device_capacity_gb(cfg: DictConfig) -> tuple[float, str] | None:
    """(GB = 1e9 bytes, what) of the device the repair runs on, or None when unknown here."""
    acc = str(OmegaConf.select(cfg, "trainer.accelerator", default="cpu")).lower()
    if acc in ("gpu", "cuda", "auto"):
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory / 1e9, "GPU 0's memory"
        if acc != "auto":
            return None
    from vaa.restore.curvature_memory import host_available_gb

    free = host_available_gb()
    return (free * 2**30 / 1e9, "this host's available memory") if free is not None else None


def check_restore_memory(c: Checker, cfg: DictConfig, cls) -> None:
    if cls is None or not hasattr(cls, "plan_terms"):
        return
    cap = device_capacity_gb(cfg)
    if cap is None:
        return
    from vaa.plan.run import plan_restore
    from vaa.plan.shapes import shape_for

    try:
        shape = shape_for(OmegaConf.to_container(cfg.model, resolve=True))
    except (ValueError, FileNotFoundError, KeyError, OSError):
        return  # an unknown shape: vaa-plan says why; the repair's own check still runs
    restore = OmegaConf.to_container(cfg.restore, resolve=True)
    plan = plan_restore(shape, restore, int(cfg.model.max_length), None, "cpu")
    limit, what = cap
    if plan["peak_gb"] <= limit:
        return
    product = plan["terms_gb"].get("curvature product", 0.0)
    rows = int(restore.get("batch_size") or 1)
    fits = int((limit - (plan["peak_gb"] - product)) // (product / rows)) if product > 0 else 0
    hint = (f"set restore.batch_size={fits} (rows per curvature product; the maths does not depend "
            "on it)" if fits >= 1 else "shrink restore.modules (e.g. [q_proj,v_proj]) and "
            "restore.batch_size")
    c.fail("batch_size", f"the repair plans {plan['peak_gb']:.1f} GB on {shape.name} "
                         f"({', '.join(f'{k} {v:.1f}' for k, v in plan['terms_gb'].items())}) and "
                         f"{what} is {limit:.1f} GB: {hint} (vaa-plan shows the terms)")
