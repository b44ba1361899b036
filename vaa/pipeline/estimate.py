"""VAA stage 1: estimate which alignment examples are vulnerable to harmful fine-tuning.

From the SFT-aligned model, run each configured proxy HFT (a task's rows mixed with the
proxy harmful pool, disjoint from the attack's harmful rows and the test prompts),
greedy-decode every alignment prompt at t = 0 and at T evenly spaced checkpoints, judge
the answers, count ForgotNum per example (``definition``), aggregate over runs
(``aggregate``) and write ``groups.jsonl`` plus the forgetting analysis (JSON + PNG).
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import OmegaConf

from vaa.analysis.forgetting import write_analysis
from vaa.data.datamodule import hft_mix
from vaa.data.groups import assign_groups, forgot_num
from vaa.data.groups_file import write_groups
from vaa.data.hub import is_real_data
from vaa.data.io import read_rows
from vaa.data.proxy_check import assert_proxies_disjoint
from vaa.models.build import load_model
from vaa.models.hub import MissingResource
from vaa.pipeline.keys import ESTIMATE_TRAINER
from vaa.training.module import FinetuneModule
from vaa.training.probe import JudgeProbe


def judge_flags(judge, prompts, answers) -> list[bool]:
    return judge.score(prompts, answers)[0]


def table_rows(source, dataset: str, split: str) -> int | None:
    """Rows of one table of the data folder (None: the folder has no such table)."""
    try:
        return len(read_rows(source.path(dataset, split)))
    except (FileNotFoundError, MissingResource):
        return None


def build_estimate(ctx, out: Path) -> None:
    from vaa.pipeline.stages import train  # the one training routine every stage uses

    cfg, est = ctx.cfg, ctx.cfg.dro.estimate
    # never the attack's own rows: by position, and on real data by text
    assert_proxies_disjoint(cfg, partial(table_rows, ctx.source),
                            ctx.source if is_real_data(cfg.data) else None)
    align = ctx.source.examples("beavertails", "align", 0, cfg.align.n)
    judge = instantiate(cfg.judge.build, world_dir=str(ctx.dirs["world"]))
    harmful = ctx.source.examples("beavertails", "proxy_harmful")
    flags_per_run, names = [], []
    # Proxy runs are small and their probe must see every checkpoint in this process: one
    # device, whatever the alignment uses (a ddp_spawn child's callback state never returns).
    single_device = OmegaConf.merge(cfg.trainer, ESTIMATE_TRAINER)  # the stage key hashes this
    for proxy in est.proxies:
        model, tokenizer = load_model(ctx.dirs["sft_aligned"])
        rows = ctx.source.examples(proxy.dataset, proxy.split, proxy.start, proxy.stop, proxy.format)
        mix = hft_mix(rows, harmful, est.n, proxy.harmful_ratio, keys="dro.estimate")
        steps = est.epochs * math.ceil(len(mix) / est.batch_size)
        at = [round(steps * (t + 1) / est.checkpoints) for t in range(est.checkpoints)]
        probe = JudgeProbe(align, tokenizer, partial(judge_flags, judge), at,
                           template=cfg.template.decode, max_new_tokens=cfg.eval.hs_max_new_tokens,
                           batch_size=cfg.eval.batch_size, max_prompt_length=cfg.model.max_prompt_length)
        recipe = OmegaConf.create({"lr": est.lr, "epochs": est.epochs, "max_steps": -1,
                                   "batch_size": est.batch_size, "weight_decay": est.weight_decay,
                                   "betas": [0.9, 0.999], "grad_clip": 1.0, "schedule": "constant",
                                   "warmup_ratio": 0.0})
        train(ctx, FinetuneModule, model, tokenizer, mix, recipe, instantiate({"_target_": "vaa.methods.sft.SFT"}),
              f"estimate_{proxy.name}", cfg.seed, callbacks=[probe], trainer_cfg=single_device)
        flags_per_run.append([[int(probe.flags[t][i]) for t in range(len(probe.flags))]
                              for i in range(len(align))])
        names.append(proxy.name)
    groups, forgot = assign_groups(flags_per_run, est.definition, est.aggregate)
    meta = {"proxies": OmegaConf.to_container(est.proxies), "n": est.n, "lr": est.lr,
            "epochs": est.epochs, "checkpoints": est.checkpoints, "judge": cfg.judge.name,
            "definition": est.definition, "aggregate": est.aggregate, "model": cfg.model.name,
            "seed": cfg.seed}
    write_groups(out / "groups.jsonl", [(e.input, e.output) for e in align], groups, forgot,
                 flags_per_run, meta)
    forgotten = {name: [forgot_num(run[i], est.definition) > 0 for i in range(len(align))]
                 for name, run in zip(names, flags_per_run)}
    summary = write_analysis(out, forgotten)
    summary["vulnerable_share"] = 100.0 * sum(groups) / len(groups)
    (out / "forgetting.json").write_text(json.dumps(summary, indent=1))
