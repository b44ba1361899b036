"""RepNoise: representation noising (Rosati et al., arXiv 2405.14577;
domenicrosati/representation-noising ``loss.py``). Spec: baselines.md §3.

    Loss = CE_M(harmless)
         + β · (1/N_L) Σ_l MMD( flat(a_l^harm ⊙ M), flat(z ⊙ M) ),          z ~ N(0, I)
         − α · log( mean{ CE_M(harmful), CE_M(W_U·norm(H_j^harm)) for j = 0..N_L } + 1 )

a_l: layer l's MLP output on the harmful batch; H_j: the embeddings and every layer's output
(pre-norm); W_U·norm(·): the logit lens through the final norm and the output head. MMD: each
masked sequence flattened is one sample; kernel = Σ_{i=0..4} exp(−d²/(b·2^{i−2})), b = the
mean pairwise squared distance of the pooled batch. Per step: a fresh harmful batch (the
``harmful`` stream), two forwards (harmful with hooks, harmless), one joint backward.

Names: ``noise_weight`` = β and ``ascent_weight`` = α (the git-disl / VAA scripts call them
``--lamb`` and ``--rho``, swapped). ``mask``:
- ``response`` (default): M = the response tokens of each batch (harmless CE = the usual
  response loss; the harmful terms over the harmful responses);
- ``diff_tokens`` (reference): M = positions where the harmful and harmless input ids differ
  after padding / truncating the harmless batch to the harmful one's length, token id 0
  ignored (Llama's ``<unk>``, kept for parity); both CEs are taken over M. Under unpaired
  batches M covers almost everything after the first differing token, prompts included.
``layer_average``: the ascent term averages N_L + 2 CEs (the harmful CE and N_L + 1 lens
terms). ``mean`` (default) divides their sum by N_L + 2; ``upstream`` divides it by N_L + 1 as
upstream ``loss.py`` and the spec's formula do (an off-by-one the upstream maintainer agreed
was wrong; on a 2-layer model the inner value is sum/3 instead of sum/4).
The logit lens is computed layer by layer at the masked positions only (never all
(N_L+1)·B·T·V logits at once); hooks are removed on every call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vaa.methods.base import TrainingMethod
from vaa.methods.hooks import MLP, CaptureOutputs, layer_modules

LAYER = r"(^|\.)layers\.\d+$"
MASKS = ("response", "diff_tokens")
LAYER_AVERAGES = ("mean", "upstream")


def ascent_term(ce_harm: torch.Tensor, lens: list[torch.Tensor], how: str = "mean") -> torch.Tensor:
    """log(average + 1) of the harmful CE and the N_L + 1 logit-lens CEs (scalars).
    ``mean``: sum / (N_L + 2); ``upstream``: sum / (N_L + 1) (upstream's count, kept as an option)."""
    total = ce_harm + torch.stack(lens).sum()
    if how == "mean":
        return torch.log(total / (len(lens) + 1) + 1)
    if how == "upstream":
        return torch.log(total / len(lens) + 1)
    raise ValueError(f"method.layer_average must be one of {LAYER_AVERAGES}, got {how!r}")


def mmd(x: torch.Tensor, y: torch.Tensor, kernels: int = 5, mul: float = 2.0) -> torch.Tensor:
    """Biased MMD² between samples x (n, D) and y (m, D) with a sum of Gaussian kernels of
    bandwidths b·mul^(i − kernels//2), b = mean pairwise squared distance of x ∪ y."""
    z = torch.cat([x, y]).float()
    n = z.shape[0]
    d2 = torch.cdist(z, z).pow(2)
    b = d2.sum().detach() / max(1, n * n - n)
    k = sum(torch.exp(-d2 / (b * mul ** (i - kernels // 2) + 1e-12)) for i in range(kernels))
    nx = x.shape[0]
    return k[:nx, :nx].mean() + k[nx:, nx:].mean() - 2 * k[:nx, nx:].mean()


def masked_ce(logits_fn, hidden: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean next-token CE at the positions ``keep`` (B, T−1) of the shifted sequence."""
    h = hidden[:, :-1][keep]
    if h.shape[0] == 0:
        return hidden.sum() * 0.0
    return F.cross_entropy(logits_fn(h).float(), ids[:, 1:][keep])


def align_to(batch: dict[str, torch.Tensor], width: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Pad (with ``pad_id``, attention 0, label -100) or truncate a batch to ``width``."""
    t = batch["input_ids"].shape[1]
    if t >= width:
        return {k: v[:, :width] for k, v in batch.items() if v.dim() == 2}
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": -100}
    return {k: F.pad(v, (0, width - t), value=fill[k]) for k, v in batch.items() if k in fill}


class RepNoise(TrainingMethod):
    name = "repnoise"
    requires = ("harmful",)
    passes_per_step = 2  # forwards (harmful, harmless); one joint backward

    def __init__(self, noise_weight: float = 0.001, ascent_weight: float = 1.0, mask: str = "response",
                 mlp_pattern: str = MLP, layer_pattern: str = LAYER, final_norm: str = "norm",
                 seed: int = 0, layer_average: str = "mean", **hparams):
        super().__init__(**hparams)
        if mask not in MASKS:
            raise ValueError(f"method.mask must be one of {MASKS}, got {mask!r}")
        if layer_average not in LAYER_AVERAGES:
            raise ValueError(f"method.layer_average must be one of {LAYER_AVERAGES}, got {layer_average!r}")
        self.layer_average = layer_average
        self.beta, self.alpha, self.mask = float(noise_weight), float(ascent_weight), mask
        self.mlp_pattern, self.layer_pattern, self.final_norm = mlp_pattern, layer_pattern, final_norm
        self.noise = torch.Generator().manual_seed(seed)

    def setup(self, module, datamodule) -> None:
        model = module.model
        self.harmful = datamodule.streams["harmful"]
        self.mlps = layer_modules(model, self.mlp_pattern)
        self.layers = layer_modules(model, self.layer_pattern)
        decoder = model.get_decoder()
        self.norm = getattr(decoder, self.final_norm, None)
        if self.norm is None:
            raise ValueError(f"{type(decoder).__name__} has no final norm {self.final_norm!r}; set "
                             "method.final_norm to the attribute of the decoder's last norm")
        self.pad_id = datamodule.tokenizer.pad_token_id

    def masks(self, harm: dict, harmless: dict) -> tuple[dict, torch.Tensor, torch.Tensor | None]:
        """(harmless batch as used, M on the harmful batch (B, T−1), M on the harmless batch or
        None for its plain response loss)."""
        if self.mask == "response":
            return harmless, harm["labels"][:, 1:] != -100, None
        n = min(harm["input_ids"].shape[0], harmless["input_ids"].shape[0])
        harm = {k: v[:n] for k, v in harm.items()}
        harmless = align_to({k: v[:n] for k, v in harmless.items()}, harm["input_ids"].shape[1], 0)
        ids_h, ids_s = harm["input_ids"][:, 1:], harmless["input_ids"][:, 1:]
        m = (ids_h != ids_s)
        return harmless, m & (ids_h != 0), m & (ids_s != 0)

    def training_step(self, module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        model = module.model
        harm = {k: v.to(module.device) for k, v in self.harmful.next_batch(0).items()}
        if self.mask == "diff_tokens":
            n = min(harm["input_ids"].shape[0], batch["input_ids"].shape[0])
            harm = {k: v[:n] for k, v in harm.items()}
        harmless, m_harm, m_safe = self.masks(harm, batch)
        decoder, head = model.get_decoder(), model.get_output_embeddings()
        embed = model.get_input_embeddings()
        with CaptureOutputs(self.mlps) as mlp, CaptureOutputs(self.layers) as lay, \
                CaptureOutputs([embed]) as emb:
            h_last = decoder(input_ids=harm["input_ids"], attention_mask=harm["attention_mask"])[0]
        ids = harm["input_ids"]
        ce_harm = masked_ce(head, h_last, ids, m_harm)
        lens = [masked_ce(lambda x: head(self.norm(x)), h, ids, m_harm)
                for h in [emb.outputs[0], *lay.outputs]]
        ascent = ascent_term(ce_harm, lens, self.layer_average)
        keep = torch.cat([torch.zeros_like(m_harm[:, :1]), m_harm], 1).unsqueeze(-1)  # (B, T, 1)
        noise = []
        for a in mlp.outputs:
            x = (a * keep).flatten(1)
            # the seeded CPU generator draws on the host (the same noise on any device)
            z = torch.randn(a.shape, generator=self.noise, device="cpu").to(a) * keep
            noise.append(mmd(x, z.flatten(1)))
        noise_term = torch.stack(noise).mean()
        if m_safe is None:
            ce_safe = module.lm_loss(harmless)
        else:
            h_safe = decoder(input_ids=harmless["input_ids"], attention_mask=harmless["attention_mask"])[0]
            ce_safe = masked_ce(head, h_safe, harmless["input_ids"], m_safe)
        loss = ce_safe + self.beta * noise_term - self.alpha * ascent
        module.manual_backward(loss)
        return {"loss": loss.detach(), "harmless_loss": ce_safe.detach(),
                "harmful_loss": ce_harm.detach(), "noise_mmd": noise_term.detach(),
                "ascent_log": ascent.detach(), "grad_norm": self.apply_gradients(module)}

    def state_dict(self) -> dict:
        return {"noise": self.noise.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.noise.set_state(state["noise"])


# --- typed hyperparameters (conf/method/repnoise*.yaml): /_schema_method_repnoise -----------------
from dataclasses import dataclass  # noqa: E402

from vaa.config.methods import MethodConfig, method_schema  # noqa: E402


@method_schema
@dataclass
class RepNoiseMethodConfig(MethodConfig):
    """RepNoise (baselines.md §3): noise_weight = β, ascent_weight = α."""

    _target_: str = "vaa.methods.repnoise.RepNoise"
    name: str = "repnoise"
    noise_weight: float = 0.001
    ascent_weight: float = 1.0
    mask: str = "response"  # response | diff_tokens (reference)
    layer_average: str = "mean"  # mean (harmful CE + N_L+1 lens CEs over N_L+2) | upstream (over N_L+1)
    mlp_pattern: str = MLP
    layer_pattern: str = r"(^|\.)layers\.\d+$"
    final_norm: str = "norm"
    seed: int = 0

    @staticmethod
    def check(c) -> None:
        c.nonneg("noise_weight", "ascent_weight")
        c.one_of("mask", ("response", "diff_tokens"))
        c.one_of("layer_average", ("mean", "upstream"))
