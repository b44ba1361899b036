"""VAA under data parallelism: 2 CPU processes (ddp_spawn, gloo), a few steps, per-rank traces.

Run as ``python tests/ddp_vaa_worker.py OUT_DIR`` (``tests/test_ddp.py`` does). It writes a
tiny synthetic world into OUT_DIR, trains a tiny Llama with ``method=vaa`` for ``STEPS``
steps under ``Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn")`` and each rank
writes ``OUT_DIR/rank{r}.json``:

- ``p0``: the sampler's q[1] before the first step, and the sampler / stream settings;
- per step: the group the sampler drew, the loss this rank computed (``local_loss``, the
  value handed to ``all_reduce_mean``), what ``all_reduce_mean`` returned
  (``reduced_loss``), the (group, loss) the sampler's ``update`` actually received and
  q[1] after the update;
- ``param_sum`` / ``param_absmax``: a checksum of the weights after training (DDP averages
  the gradients, so both ranks must end with the same weights).

The recording wraps the sampler's ``draw`` / ``update`` and the module's
``all_reduce_mean`` on the instances inside each child process; the code under test is
unchanged. Everything the children unpickle (the callback) lives at module top level, and
the training runs only under ``if __name__ == "__main__"`` (spawned children re-import
this file as ``__mp_main__``).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf

from vaa.config.schema import AlignConfig, ArchConfig, DROConfig
from vaa.data.sources import FolderSource
from vaa.data.templates import TEMPLATES
from vaa.methods.vaa import VAA
from vaa.models.build import build_tiny_llama
from vaa.models.tokenizer import build_word_tokenizer
from vaa.training.module import AlignModule, fit_and_recover
from vaa.world.generator import WorldSizes, write_world

STEPS = 8
BATCH = 4
SEED = 0
VULNERABLE_FRAC = 0.4
ETA = 0.01  # with losses ~5.6 and seed 0: both groups are drawn and p visibly moves


class RecordVAA(L.Callback):
    """Records, per step, what the VAA method drew, reduced and fed its sampler."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.steps: list[dict] = []
        self.current: dict = {}

    def on_train_start(self, trainer, pl_module) -> None:
        method = pl_module.method
        sampler = method.sampler
        self.p0 = sampler.p_vulnerable
        self.sampler_cfg = {"eta": sampler.eta, "clip": list(sampler.clip) if sampler.clip else None,
                            "feedback": sampler.feedback, "seed": sampler.seed,
                            "probs": sampler.probs, "group_sizes": sampler.group_sizes}
        draw, update, reduce = sampler.draw, sampler.update, pl_module.all_reduce_mean

        def recording_draw():
            group = draw()
            self.current["group"] = group
            return group

        def recording_update(group, loss):
            self.current["update_group"] = int(group)
            self.current["update_loss"] = float(loss)
            update(group, loss)
            self.current["p"] = sampler.p_vulnerable
            self.current["probs"] = sampler.probs

        def recording_reduce(value):
            local = float(value)  # before the all-reduce (which works in place on its input)
            out = reduce(value)
            self.current.setdefault("local_losses", []).append(local)
            self.current.setdefault("reduced_losses", []).append(float(out))
            self.current["local_after_call"] = float(value)
            return out

        sampler.draw, sampler.update = recording_draw, recording_update
        pl_module.all_reduce_mean = recording_reduce

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.current = {"global_step": int(trainer.global_step)}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        c = self.current
        locals_, reduced = c.get("local_losses", []), c.get("reduced_losses", [])
        self.steps.append({
            "global_step": c["global_step"], "group": c.get("group"),
            "local_loss": locals_[-1] if locals_ else None,
            "reduced_loss": reduced[-1] if reduced else None,
            "n_reduce_calls": len(locals_),
            "local_after_call": c.get("local_after_call"),
            "update_group": c.get("update_group"), "update_loss": c.get("update_loss"),
            "p": c.get("p"), "probs": c.get("probs"),
            "perturbed_so_far": pl_module.method.stats["perturbed"]})

    def on_train_end(self, trainer, pl_module) -> None:
        params = [p.detach().double() for p in pl_module.model.parameters()]
        record = {"rank": int(trainer.global_rank), "world_size": int(trainer.world_size),
                  "out_dir": self.out_dir,
                  "strategy": type(trainer.strategy).__name__,
                  "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
                  "stream_rank": pl_module.method.stream.rank,
                  "p0": self.p0, "sampler": self.sampler_cfg, "steps": self.steps,
                  "stats": dict(pl_module.method.stats),
                  "param_sum": float(sum(p.sum() for p in params)),
                  "param_absmax": float(max(p.abs().max() for p in params))}
        path = Path(self.out_dir) / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps(record, indent=1))


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes = WorldSizes(seed=SEED, base_harmful=16, base_benign=16, base_task=8, align=64,
                       harmful_pool=8, proxy_pool=8, hs_test=8, task_train=16, task_test=8)
    world = write_world(sizes, out / "world")
    examples = FolderSource(world).examples("beavertails", "align")
    texts = [t.format(instruction="x", input="y") for t in TEMPLATES.values()]
    texts += [t for ex in examples for t in (ex.instruction, ex.input, ex.output)]
    tokenizer = build_word_tokenizer(texts)

    arch = OmegaConf.structured(ArchConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                           num_key_value_heads=2, intermediate_size=64,
                                           max_position_embeddings=256))
    model = build_tiny_llama(arch, tokenizer, seed=SEED)

    rng = random.Random(SEED)
    groups = [int(rng.random() < VULNERABLE_FRAC) for _ in examples]

    dro = OmegaConf.structured(DROConfig)
    dro.sampler.eta = ETA
    dro.sampler.clip = None
    dro.lambda_max = 1.0
    dro.lambda_schedule = "linear"
    method = VAA(dro=dro, seed=SEED)
    dm = method.make_datamodule(examples, tokenizer, groups=groups, batch_size=BATCH, seed=SEED,
                                max_length=96)

    recipe = OmegaConf.structured(AlignConfig)
    recipe.lr, recipe.batch_size, recipe.max_steps = 1e-3, BATCH, STEPS
    module = AlignModule(model, method, recipe, total_steps=STEPS)

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=STEPS,
                        max_epochs=-1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[RecordVAA(str(out))])
    fit_and_recover(trainer, module, dm)  # the main process gets the method's state back
    (out / "main.json").write_text(json.dumps({"trajectory": [list(t) for t in method.trajectory],
                                               "stats": method.stats}))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/ddp_vaa_worker.py OUT_DIR")
    main(sys.argv[1])
