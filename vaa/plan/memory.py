"""Peak memory of one training stage as a sum of terms, each a formula of the parameter count.

P: all parameters; P_t: the trainable ones (P in full fine-tuning, LoRA's adapters otherwise);
b_p: bytes per parameter of the model's dtype (4 fp32, 2 under ``bf16-true``); N = batch ×
length tokens; L layers, h hidden, I intermediate, V vocabulary.

- weights  P·b_p (+ LoRA adapters P_t·4: peft keeps adapters fp32). Under ``*-mixed`` the fp32
  model *is* the master copy, and autocast adds the bf16 **casts** of every weight the forward
  uses (2·P, saved for the backward);
- gradients P_t·b_g (dtype of the trainable parameters); optimizer AdamW m, v: 2·P_t·b_p
  (torch keeps them in the parameter's dtype), 8-bit AdamW (bitsandbytes): 2·P_t·1;
- the method's own copies (vaa/plan/footprints.py);
- activations N·L·a(h, I) with a = (11h + 4I)·4 B in fp32, (12h + 4I)·2 B in bf16, 0.7× fp32
  under autocast: saved tensors per token and layer counted with
  ``torch.autograd.graph.saved_tensors_hooks`` on transformers 5 Llama blocks (sdpa) of four
  shapes (h 512–896, I 1024–4864; within 8 %). LoRA with dropout adds each target's dropped
  input (6h + I per layer) and its mask. Gradient checkpointing keeps one h per layer and token
  plus one layer's activations;
- logits: the loss's log-softmax output per token (fp32: 4V B; autocast: +2V for the bf16
  logits) and, during the head's backward, two V-sized gradients;
- runtime: the process itself (CPU: its RSS before the model; GPU: CUDA context + allocator
  slack, 1 GB).

peak = weights + casts + optimizer + copies + max(activations + logits + extras + gradients
alive or held during a later pass, gradients·(1 + held)) + runtime. Gradients are freed between steps
(``zero_grad(set_to_none=True)``), so in SFT they never coexist with a full set of activations.
"""

from __future__ import annotations

from dataclasses import dataclass

from vaa.plan.footprints import Footprint
from vaa.plan.shapes import LINEARS, Shape

GB = 1e9
MIXED = ("bf16-mixed", "16-mixed")
HALF = ("bf16-true", "16-true", "bf16", "16")
CPU_RUNTIME_GB = 0.39  # RSS of python + torch + transformers + lightning before the model (0.387 measured here)
GPU_RUNTIME_GB = 1.0   # CUDA context, cuBLAS workspace, allocator slack


@dataclass
class Term:
    name: str
    formula: str
    bytes: float


def _act_per_token_layer(s: Shape, precision: str) -> float:
    h, i = s.hidden, s.intermediate
    if precision in HALF:
        return (12 * h + 4 * i) * 2
    fp32 = (11 * h + 4 * i) * 4
    return 0.7 * fp32 if precision in MIXED else fp32


def plan_stage(shape: Shape, *, method: str = "sft", footprint: Footprint | None = None, batch: int,
               length: int, precision: str = "32-true", lora: dict | None = None,
               gradient_checkpointing: bool = False, optimizer: str = "adamw",
               runtime_gb: float | None = None, accelerator: str = "cpu",
               response_fraction: float = 0.5, devices: int = 1, sharded: bool = False) -> dict:
    """Terms and peak (GB) of training ``shape`` with ``method`` for one stage.

    ``lora``: ``{"r", "target_modules", "dropout"}`` or None (full fine-tuning). ``sharded``
    (FSDP over ``devices``): weights, gradients, optimizer state and copies divide by
    ``devices``. Raises ValueError for an unknown precision or optimizer."""
    if precision not in ("32-true", "32", *MIXED, *HALF):
        raise ValueError(f"trainer.precision={precision!r}: plan knows 32-true, bf16-mixed, 16-mixed, bf16-true")
    fp = footprint or Footprint()
    P = shape.params()
    pb = 2 if precision in HALF else 4
    if lora:
        targets = tuple(lora.get("target_modules") or LINEARS)
        Pt, gb = shape.lora_params(int(lora["r"]), targets), 4
    else:
        targets, Pt, gb = (), P, pb
    if optimizer in ("adamw", "adam"):
        ob, oform = 2 * gb, f"2·P_t·{gb}"
    elif optimizer in ("adamw_8bit", "paged_adamw_8bit", "adamw8bit", "paged_adamw8bit"):
        ob, oform = 2.0, "2·P_t·1"
    else:
        raise ValueError(f"optimizer {optimizer!r}: plan knows adamw, adamw_8bit, paged_adamw_8bit")
    shard = devices if sharded else 1
    N, L, h, V = batch * length, shape.layers, shape.hidden, shape.vocab
    terms = [Term("weights", f"P·{pb}" + (" + P_t·4" if lora else ""), (P * pb + (Pt * 4 if lora else 0)) / shard)]
    if precision in MIXED:
        terms.append(Term("autocast casts", "P·2", P * 2 / shard))
    terms.append(Term("optimizer", oform, Pt * ob / shard))
    copies = (fp.param_copies * gb + fp.fp32_copies * 4 + fp.grad_copies * gb) * Pt / shard
    terms.append(Term("method copies", _copies_formula(fp, gb), copies))
    grads = Pt * gb / shard
    act_tok = _act_per_token_layer(shape, precision)
    if lora and float(lora.get("dropout") or 0) > 0:
        dims = shape.linear_dims()
        extra = sum(dims[t][0] for t in targets)  # each target's dropped input (+ its bool mask)
        act_tok += extra * ((2 if precision != "32-true" and precision != "32" else 4) + 1)
    if gradient_checkpointing:
        act = N * fp.batches * L * h * pb + N * act_tok
        aform = "N·L·h·b_p + N·a(h,I)"
    else:
        act = N * fp.batches * L * act_tok
        aform = "N·L·a(h,I)" + (f"·{fp.batches:g}" if fp.batches != 1 else "")
    logit_saved = (6 if precision in MIXED else 4) * V
    logits = N * fp.batches * logit_saved + N * 8 * V
    extras = N * fp.batches * L * h * fp.hidden_per_layer * pb
    if fp.lens_logits:
        extras += (L + 1) * N * response_fraction * V * 4
    during = act + logits + extras + (fp.grads_alive + fp.grads_held) * grads
    after = grads * (1 + fp.grads_held)
    held = fp.grads_alive + fp.grads_held
    terms += [Term("activations", aform, act), Term("logits", f"N·{logit_saved // V + 8}·V", logits),
              Term("method activations", _extras_formula(fp), extras),
              Term("gradients", f"P_t·{gb}" + (f" (×{1 + held:g} during a later pass)" if held else ""), grads)]
    rt = runtime_gb if runtime_gb is not None else (CPU_RUNTIME_GB if accelerator == "cpu" else GPU_RUNTIME_GB)
    static = sum(t.bytes for t in terms if t.name in ("weights", "autocast casts", "optimizer", "method copies"))
    peak = static + max(during, after) + rt * GB
    return {"method": method, "shape": shape.name, "P": P, "P_t": Pt, "precision": precision,
            "batch": batch, "length": length, "lora": bool(lora), "gradient_checkpointing": gradient_checkpointing,
            "optimizer": optimizer,
            # a paged optimizer's state lives in CUDA unified memory: under pressure the driver
            # pages it to host memory, so the GPU needs at least peak − pageable
            "pageable_gb": Pt * ob / shard / GB if optimizer.startswith("paged") else 0.0,
            "terms": terms, "terms_gb": {t.name: t.bytes / GB for t in terms} | {"runtime": rt},
            "peak_gb": peak / GB, "static_gb": static / GB, "note": fp.note}


def _copies_formula(fp: Footprint, gb: int) -> str:
    parts = [f"{fp.param_copies:g}·P_t·{gb}" if fp.param_copies else "",
             f"{fp.fp32_copies:g}·P_t·4" if fp.fp32_copies else "",
             f"{fp.grad_copies:g}·P_t·{gb}" if fp.grad_copies else ""]
    return " + ".join(p for p in parts if p) or "0"


def _extras_formula(fp: Footprint) -> str:
    parts = [f"{fp.hidden_per_layer:g}·N·L·h·b_p" if fp.hidden_per_layer else "",
             "(L+1)·N·f_resp·V·4" if fp.lens_logits else ""]
    return " + ".join(p for p in parts if p) or "0"
