"""Q-realign, reduced weight-only variant (arXiv 2601.08089; Skilteee/Q-Realign; spec §6.2).

Safety-aware post-training quantisation: the fine-tuned weights stay fixed and only the
quantiser's clipping is learned, so that quantisation restores what per-layer probes say
fine-tuning eroded — the separability of benign and malicious prompts.

1. Probes: on the *aligned* model, the last-prompt-token hidden state after every decoder
   block for the calibration prompts (``n_harmful`` malicious from
   ``beavertails/align_harmful``, ``n_task`` benign task prompts); one L1-regularised logistic
   regression per block (w_l, b_l), malicious = 1 (full-batch Adam; no scikit-learn needed).
2. Block by block, in order, on the fine-tuned model: fake-quantise the block's linear
   weights to ``bits`` bits per output channel with learnable clipping σ(γ)·max, σ(β)·min
   (OmniQuant LWC; activations unquantised, no LET), blocks < l already quantised.
   Loss: benign rows MSE(fine-tuned fp block output, quantised block output) over their tokens;
   malicious rows softplus(−(w_l·h_last + b_l)). AdamW on γ, β only, ``epochs`` passes.
3. Export the dequantised weights (fp32), which the pipeline evaluates.

Departures (spec §6.2 "rec"): no activation quantisation, no LET, probes regenerated here on
the aligned model (the upstream probe files are not used), the whole model is run per block
(tiny models; block-local forwards are the upstream shortcut).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from vaa.restore.base import Restorer
from vaa.restore.schema import QRealignRestoreConfig


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return (x.round() - x).detach() + x


def fake_quant(w: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric per-output-channel fake quantisation with learnable clipping (LWC)."""
    qmax = 2 ** bits - 1
    wmax = w.amax(1, keepdim=True) * torch.sigmoid(gamma)
    wmin = w.amin(1, keepdim=True) * torch.sigmoid(beta)
    scale = ((wmax - wmin) / qmax).clamp_min(1e-8)
    zero = round_ste(-wmin / scale)
    q = torch.clamp(round_ste(w / scale) + zero, 0, qmax)
    return (q - zero) * scale


def fit_probe(x: torch.Tensor, y: torch.Tensor, l1: float, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """L1-regularised logistic regression on standardised features; returns (w, b) in the
    original feature space."""
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    w = torch.zeros(x.shape[1], device=x.device, requires_grad=True)
    b = torch.zeros((), device=x.device, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z @ w + b, y) + l1 * w.abs().sum()
        loss.backward()
        opt.step()
    w_orig = (w / sd).detach()
    return w_orig, (b - (mu * w_orig).sum()).detach()


class QRealign(Restorer):
    schema = QRealignRestoreConfig
    reads = ("aligned",)  # the probes are fitted on the aligned model

    def calibration(self, inputs):
        hp = self.hp
        bad = list(inputs.harmful(hp))
        good = list(inputs.task(hp.n_task))
        batches = inputs.prompt_batches(bad + good, hp.batch_size)  # on the model's device
        y = torch.tensor([1.0] * len(bad) + [0.0] * len(good), device=inputs.device)
        for i, b in enumerate(batches):
            b["y"] = y[i * hp.batch_size:(i + 1) * hp.batch_size]
        return batches

    @staticmethod
    def hidden(model, b, params=None):
        kw = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
        out = functional_call(model, params, (), kw) if params else model(**kw)
        return out.hidden_states[1:]  # one per block (the last one after the final norm)

    def restore(self, model, inputs):
        hp = self.hp
        batches = self.calibration(inputs)
        aligned = inputs.load("aligned")
        with torch.no_grad():
            feats = [self.hidden(aligned, b) for b in batches]
            targets = [[h.detach() for h in self.hidden(model, b)] for b in batches]
        self.count(batches, 2)
        y = torch.cat([b["y"] for b in batches])
        n_layers = len(targets[0])
        probes = []
        for l in range(n_layers):
            x = torch.cat([f[l][:, -1] for f in feats]).float()
            probes.append(fit_probe(x, y, hp.probe_l1, hp.probe_steps))
        for p in model.parameters():
            p.requires_grad_(False)
        layers = model.model.layers
        acc_before, acc_after = [], []
        for l in range(n_layers):
            mods = {f"model.layers.{l}.{n}": m for n, m in layers[l].named_modules()
                    if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in hp.targets}
            clip = {n: (torch.full((m.out_features, 1), 4.0, device=m.weight.device, requires_grad=True),
                        torch.full((m.out_features, 1), 4.0, device=m.weight.device, requires_grad=True))
                    for n, m in mods.items()}
            opt = torch.optim.AdamW([t for pair in clip.values() for t in pair], lr=hp.lr, weight_decay=0.0)
            w_probe, b_probe = probes[l]
            acc_before.append(self.probe_acc(model, batches, l, w_probe, b_probe))
            for _ in range(hp.epochs):
                for b, tgt in zip(batches, targets):
                    over = {f"{n}.weight": fake_quant(m.weight, *clip[n], hp.bits) for n, m in mods.items()}
                    h = self.hidden(model, b, over)[l]
                    good, bad = b["y"] == 0, b["y"] == 1
                    loss = torch.zeros((), device=h.device)
                    if good.any():
                        m = b["attention_mask"][good].bool()
                        loss = loss + F.mse_loss(h[good][m], tgt[l][good][m])
                    if bad.any():
                        loss = loss + F.softplus(-(h[bad][:, -1] @ w_probe + b_probe)).mean()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    self.count([b])
            with torch.no_grad():
                for n, m in mods.items():
                    m.weight.copy_(fake_quant(m.weight, *clip[n], hp.bits))
            acc_after.append(self.probe_acc(model, batches, l, w_probe, b_probe))
        for p in model.parameters():
            p.requires_grad_(True)
        self.info = {"probe_acc_finetuned": acc_before, "probe_acc_restored": acc_after}
        return model

    @torch.no_grad()
    def probe_acc(self, model, batches, layer, w, b) -> float:
        hits = [((self.hidden(model, bt)[layer][:, -1] @ w + b > 0).float() == bt["y"]).float()
                for bt in batches]
        return float(torch.cat(hits).mean())
