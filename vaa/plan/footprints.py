"""Each training method's own memory, in units of the trainable parameters P_t and of the
batch's hidden states, read from its source (vaa/methods/*.py).

A method class may declare ``memory_footprint = {...}`` (the fields of :class:`Footprint`);
it wins over this table, so a new method states its memory in its own file. Fields:

- ``param_copies``: copies of the trainable parameters in their dtype (VAA's SAM restore
  buffer, ``perturb.py`` ``restore=copy``; Booster's restore buffer; Lisa's two anchors);
- ``fp32_copies``: fp32 copies (EMA's shadow, ``ema.py``: ``p.float().clone()``);
- ``grad_copies``: extra gradient-sized buffers kept all along (VAA ``lambda_mixing=weighted``:
  the stash of G0 for Eq. 5);
- ``grads_alive``: gradients left in ``.grad`` while a later pass holds its activations, the
  later backward accumulating into them (VAA: G0 during the perturbed pass);
- ``grads_held``: gradients handed over (taken out of ``.grad``) while later passes write
  fresh ones (Booster: g_h through passes 2–3): alive during the forward and at the end;
- ``batches``: batches whose activations are alive together (RepNoise: the harmful and the
  harmless forward feed one joint backward);
- ``hidden_per_layer``: extra (tokens × hidden) tensors per layer (Vaccine: ε_l added to
  every attention output in pass 2; RepNoise: the Gaussian noise per MLP output);
- ``lens_logits``: logit-lens CEs kept for the backward, each (masked tokens × V) fp32
  (RepNoise: N_L + 1 of them, at the masked positions only).
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Footprint:
    param_copies: float = 0
    fp32_copies: float = 0
    grad_copies: float = 0
    grads_alive: float = 0
    grads_held: float = 0
    batches: float = 1
    hidden_per_layer: float = 0
    lens_logits: bool = False
    note: str = ""


TABLE = {
    "SFT": Footprint(note="none"),
    "NoAlignment": Footprint(note="no training"),
    "VAA": Footprint(param_copies=1, grads_alive=1, note="SAM restore copy of θ; G0 alive in pass 2"),
    "GDRO": Footprint(note="sampler only"),
    "Booster": Footprint(param_copies=1, grads_held=1,
                         note="restore copy of θ; g_h handed over across passes 2-3"),
    "Vaccine": Footprint(hidden_per_layer=1, note="ε per attention output (hidden states)"),
    "RepNoise": Footprint(batches=2, hidden_per_layer=1, lens_logits=True,
                          note="harmful + harmless activations; noise per MLP; N_L+1 lens CEs"),
    "EMA": Footprint(fp32_copies=1, note="fp32 shadow of θ"),
    "Lisa": Footprint(param_copies=2, note="two anchors (align, fine-tune state)"),
    "LookAhead": Footprint(note="none"),
}


def footprint(cls: type, hparams: dict | None = None) -> Footprint:
    """The class's own ``memory_footprint``, else the table's entry by class name (an unknown
    method counts as SFT, said in ``note``); VAA's weighted mixing adds the gradient stash."""
    own = getattr(cls, "memory_footprint", None)
    if own is not None:
        fp = Footprint(**{f.name: own[f.name] for f in fields(Footprint) if f.name in own})
    else:
        fp = TABLE.get(cls.__name__, Footprint(note=f"{cls.__name__}: no footprint known, counted as SFT"))
    mixing = ((hparams or {}).get("dro") or {}).get("lambda_mixing") if cls.__name__ == "VAA" else None
    if mixing == "weighted":
        fp = Footprint(**{**fp.__dict__, "grad_copies": fp.grad_copies + 1,
                          "note": fp.note + "; weighted mixing: stash of G0"})
    return fp
