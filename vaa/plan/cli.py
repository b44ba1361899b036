"""``vaa-plan [OVERRIDES…] [--shape 7b] [--compare sft,vaa,…]``: predicted peak memory of a
run before it is submitted. Takes the same overrides as ``vaa`` (composed from conf/ with
Hydra's compose API), prints per training stage each term as a formula of the parameter
count and its size, and as the last line one JSON object ``{"plan": …, "peak_gb": X}``.

    vaa-plan model=llama2_7b trainer=gpu method=vaa experiment=paper_llama2
    vaa-plan model=hf model.path=/models/qwen --compare sft,vaa,booster,vaccine,repnoise

The composed config first goes through the pre-flight validation ``vaa`` runs
(vaa.config.validate): a bad value or an override Hydra cannot apply prints the same one-line
errors as ``vaa`` and exits 1, nothing is planned. One check is about the machine, not the
config: a GPU trainer on a machine without CUDA (planning on a login node) is a note, not an
error. Exit codes: 0 planned, 1 invalid config, 2 a config the planner cannot plan.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException

from vaa.plan.memory import GB
from vaa.plan.run import plan_run
from vaa.plan.shapes import PRESETS, preset

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def compose_config(overrides: list[str]):
    """The config ``vaa <overrides>`` runs with (no stage is built)."""
    from vaa.config.schema import register

    register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("config", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


NO_CUDA_HERE = "no CUDA device is visible on this machine"  # vaa.config.validate.check_accelerator


def validation_errors(overrides: list[str]) -> tuple[object, list[str], list[str]]:
    """``(cfg, errors, notes)``: ``cfg`` composed as ``vaa`` composes it (None when Hydra cannot
    apply an override), the one-line problems ``vaa`` would refuse the job with, and the
    machine-dependent ones that only matter where the job runs."""
    from vaa.config.validate import find_problems

    try:
        cfg = compose_config(overrides)
    except HydraException as e:  # an unknown key, group option or malformed override
        cause = f": {str(e.__cause__).splitlines()[0]}" if e.__cause__ is not None else ""
        text = str(e).split("\nConfig search path")[0]
        return None, [" ".join(text.split()) + cause], []
    problems = [msg for _, msg in find_problems(cfg)]
    notes = [m for m in problems if NO_CUDA_HERE in m]
    return cfg, [m for m in problems if m not in notes], notes


def print_stage(name: str, p: dict) -> None:
    lora = "LoRA" if p["lora"] else "full"
    print(f"\n[{name}] method={p['method']} {lora} {p['precision']} {p['optimizer']} batch={p['batch']} length={p['length']}"
          f"{' grad-ckpt' if p['gradient_checkpointing'] else ''}  P={p['P'] / 1e9:.3f} B, "
          f"P_t={p['P_t'] / 1e9:.4f} B ({p['note']})")
    print(f"  {'term':<20} {'formula':<34} {'GB':>9}")
    for t in p["terms"]:
        print(f"  {t.name:<20} {t.formula:<34} {t.bytes / GB:>9.2f}")
    print(f"  {'runtime':<20} {'(process / CUDA context)':<34} {p['terms_gb']['runtime']:>9.2f}")
    print(f"  {'peak':<20} {p.get('peak_formula', 'static + max(forward, gradients)'):<34} {p['peak_gb']:>9.2f}")
    if p.get("pageable_gb"):
        print(f"  {'GPU-resident min.':<20} {'peak − paged optimizer state':<34} {p['peak_gb'] - p['pageable_gb']:>9.2f}")


def print_compare(overrides: list[str], methods: list[str], shapes: list, runtime_gb) -> list[dict]:
    """One row per (shape, method, full|LoRA) of the alignment stage, the other overrides the
    same (one composition per method)."""
    base = [o for o in overrides if not o.startswith("method=")]
    rows = []
    print(f"\n{'shape':<14} {'method':<10} {'tuning':<6} {'weights':>8} {'optim':>8} {'copies':>8} "
          f"{'activ.':>8} {'grads':>8} {'peak GB':>9}")
    cfgs = {m: compose_config([*base, f"method={m}"]) for m in methods}
    for shape in shapes:
        for m in methods:
            for lora in (False, True):
                plan = plan_run(cfgs[m], shape, runtime_gb, only=("aligned",), lora=lora)
                p = plan["stages"]["aligned"]
                g = p["terms_gb"]
                print(f"{plan['model']:<14} {m:<10} {'LoRA' if lora else 'full':<6} "
                      f"{g['weights'] + g.get('autocast casts', 0):>8.2f} {g['optimizer']:>8.2f} "
                      f"{g['method copies']:>8.2f} {g['activations'] + g['logits'] + g['method activations']:>8.2f} "
                      f"{g['gradients']:>8.2f} {p['peak_gb']:>9.2f}")
                rows.append({"shape": plan["model"], "method": m, "lora": lora, "peak_gb": round(p["peak_gb"], 3),
                             "P_t": p["P_t"], "terms_gb": {t: round(x, 4) for t, x in g.items()}})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vaa-plan", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for vaa")
    ap.add_argument("--shape", default=None, help=f"plan this architecture instead of the model's: {', '.join(PRESETS)} "
                                                  "(--compare takes a comma list)")
    ap.add_argument("--compare", default=None, help="methods to compare at the alignment stage, full and LoRA "
                                                    "(e.g. sft,vaa,booster,vaccine,repnoise)")
    ap.add_argument("--runtime-gb", type=float, default=None, help="process overhead (default by accelerator)")
    args = ap.parse_args(argv)
    cfg, errors, notes = validation_errors(args.overrides)
    if errors:  # what `vaa` prints for the same overrides (vaa.errors.ConfigError)
        n = len(errors)
        print("\n".join([f"vaa-plan: invalid config: {n} problem{'s' if n != 1 else ''} (nothing was planned):",
                         *(f"  {m}" for m in errors)]), file=sys.stderr)
        return 1
    if notes:
        print(f"vaa-plan: note: {NO_CUDA_HERE}; planned for the GPU machine the job will run on",
              file=sys.stderr)
    try:
        shapes = [preset(s) for s in args.shape.split(",")] if args.shape else [None]
        plan = plan_run(cfg, shapes[0], args.runtime_gb)
    except (ValueError, FileNotFoundError) as e:
        print(f"vaa-plan: {e}", file=sys.stderr)
        return 2
    print(f"vaa-plan: {plan['model']} ({plan['P'] / 1e9:.3f} B parameters), trainer {cfg.trainer.accelerator} "
          f"x{cfg.trainer.devices} {cfg.trainer.strategy}")
    for name, p in plan["stages"].items():
        print_stage(name, p)
    compare = print_compare(args.overrides, args.compare.split(","), shapes, args.runtime_gb) if args.compare else None
    summary = {"model": plan["model"], "P": plan["P"], "peak_stage": plan["peak_stage"],
               "stages": {k: {"method": v["method"], "lora": v["lora"], "peak_gb": round(v["peak_gb"], 3),
                              "precision": v["precision"], "optimizer": v["optimizer"],
                              "pageable_gb": round(v["pageable_gb"], 3),
                              "terms_gb": {t: round(x, 3) for t, x in v["terms_gb"].items()}}
                          for k, v in plan["stages"].items()}}
    if compare:
        summary["compare"] = compare
    print(json.dumps({"plan": summary, "peak_gb": round(plan["peak_gb"], 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
