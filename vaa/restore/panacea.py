"""Panacea (Wang et al., arXiv 2501.18100, NeurIPS 2025; w-yibo/Panacea ``trainer.py``).

Panacea is not a repair of a finished model: the provider runs the user's fine-tuning with
an adaptive perturbation and releases w + ε (specs/restoration.md §2, "stage: fine-tuning loop
+ post-hoc ε"). So the ``restore=panacea`` stage re-runs the attack's fine-tuning — same
aligned model, same HFT rows, same recipe (``attack.*``) — with Panacea's step, and releases
w + ε; the attacked model it replaces is evaluated beside it (``stages.finetuned``). Per step:

    g_f = ∇f(w)                     user batch
    g_h = ∇h(w)                     harmful guide batch (beavertails/align_harmful)
    ε   = ρ·g_h / (‖g_h‖ + 1e-7)    global L2
    g_h' = ∇ min(h(w + ε), clamp)   at the shifted point, θ restored exactly (perturb.py)
    G   = g_f − λ·(g_h' − g_h)      then the optimizer step
    release w + ε (the last ε, copied; never w alone: once h(w+ε) saturates the clamp,
    G = g_f + λ·g_h descends the harmful loss at w)

Departures: the published trainer's backward names an undefined variable; we backpropagate the
clamped h(w + ε) as intended. Full fine-tuning, the attack's recipe (not upstream's LoRA r=32).
"""

from __future__ import annotations

import torch

from vaa.methods.base import TrainingMethod
from vaa.methods.grads import trainable_params
from vaa.methods.perturb import perturb_weights
from vaa.methods.precision import check_realised
from vaa.restore.base import Restorer
from vaa.restore.schema import PanaceaRestoreConfig
from vaa.training.module import FinetuneModule


class PanaceaStep(TrainingMethod):
    """The fine-tuning step: three passes (user, harmful, harmful at w + ε). The harmful guide
    batches come from the datamodule's ``harmful`` stream (endless, seeded, per rank,
    checkpointed with the run), like Booster's: nothing tensor-valued lives in the method, so
    it pickles to ``ddp_spawn`` ranks."""

    name = "panacea"
    passes_per_step = 3
    requires = ("harmful",)

    def __init__(self, lam: float, rho: float, clamp: float, **hparams):
        super().__init__(lam=lam, rho=rho, clamp=clamp, **hparams)
        self.lam, self.rho, self.clamp = lam, rho, clamp
        self.eps: list[torch.Tensor] | None = None

    def setup(self, module, datamodule) -> None:
        self.params = trainable_params(module.model)  # with LoRA: the adapters
        self.guide = datamodule.streams["harmful"]
        self.restore_buffers = [None] * len(self.params)  # w's exact copy, allocated once per run

    def take_grads(self) -> list[torch.Tensor]:
        """The current ``.grad`` of every parameter, handed over (``.grad`` is None after)."""
        out = []
        for p in self.params:
            out.append(p.grad if p.grad is not None else torch.zeros_like(p))
            p.grad = None
        return out

    def training_step(self, module, batch):
        # Every pass goes through manual_backward (DDP's all-reduce, the precision plugin),
        # as in every other method; the guide batch on the module's device.
        hb = {k: v.to(module.device) for k, v in self.guide.next_batch(0).items()}
        f = module.lm_loss(batch)
        module.manual_backward(f)
        g_f = self.take_grads()
        h = module.lm_loss(hb)
        module.manual_backward(h)
        g_h = self.take_grads()
        with perturb_weights(self.params, direction=g_h, rho=self.rho, buffers=self.restore_buffers,
                             measure=self.measure_at(module)) as info:
            h_eps = torch.clamp(module.lm_loss(hb), max=self.clamp)
            module.manual_backward(h_eps)  # .grad = g_h' at w + ε
        with torch.no_grad():
            self.eps = [g * info.scale for g in g_h]  # a copy on the model's device
            for p, a, b in zip(self.params, g_f, g_h):  # G = g_f − λ·(g_h' − g_h)
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.sub_(b).mul_(-self.lam).add_(a)
        grad_norm = self.apply_gradients(module)
        logs = {"loss": f.detach(), "harmful_loss": h.detach(), "harmful_loss_eps": h_eps.detach(),
                "grad_norm": grad_norm}
        if info.measure is not None:
            logs.update(eps_realised_norm=torch.tensor(info.realised_norm),
                        eps_realised_cos=torch.tensor(info.realised_cos))
            check_realised("restore=panacea", info.realised_norm, info.realised_cos, info.eps_norm,
                           info.measure, "restore.rho")
        return logs


class Panacea(Restorer):
    schema = PanaceaRestoreConfig
    reads = ("aligned",)
    fsdp_safe = False  # replays the attack with PanaceaStep: its ε and norms would be per shard

    def restore(self, model, inputs):
        if inputs.train is None:
            raise RuntimeError("panacea owns a fine-tuning loop: RestoreInputs.train must be given")
        hp = self.hp
        model = inputs.load("aligned")  # Panacea replaces the attack's run, from the same start
        guide = inputs.harmful(hp)
        if not guide:
            raise ValueError("panacea: the harmful guide set is empty (restore.n_harmful, "
                             "restore.harmful_split)")
        step = PanaceaStep(hp.lam, hp.rho, hp.clamp)
        rows = inputs.hft()
        # train returns the model it trained: with LoRA the PeftModel (its adapters hold ε)
        model = inputs.train(FinetuneModule, model, inputs.tokenizer, rows, inputs.cfg.attack,
                             step, "restored", inputs.seed, extra={"harmful": guide})
        with torch.no_grad():  # release w + ε; Lightning may have moved the model back to the CPU
            for p, e in zip(trainable_params(model), step.eps or []):
                p.add_(e.to(device=p.device, dtype=p.dtype))
        a = inputs.cfg.attack
        steps = a.max_steps if a.max_steps > 0 else a.epochs * -(-len(rows) // a.batch_size)
        self.passes = 3 * steps * a.batch_size
        self.info = {"eps_norm": hp.rho, "steps": steps}
        return model.eval()
