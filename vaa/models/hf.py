"""Real (Hugging Face) models: base pointer, PAD handling, dtype / SDPA, gradient
checkpointing, peft LoRA, and adapter-only artifacts.

Artifacts. A stage that trains every parameter saves the whole model (``save_pretrained``,
safetensors). With LoRA a stage saves only adapters: ``lineage.json`` names the base weights
(a pretrained directory, or a full checkpoint in the cache) and the ordered adapter folders
(``adapter_0``, ``adapter_1``, … written by peft's ``save_pretrained``, safetensors) that are
applied to it; each artifact carries copies of its earlier adapters, so it is self-contained.
Loading merges every adapter, so evaluation and repair see a plain model with the base
model's parameter names. A fine-tuning stage then attaches a new adapter (``new_lora``,
"double LoRA") or trains everything (``full``); for ``continue_lora`` ("single LoRA") the
attack loads the aligned artifact with its last adapter attached and trainable and keeps
training it (VAA's proxy runs, which load a merged model, start a fresh adapter from the
same weights) — see ``prepare_for_training``. The base stage of a real model is only
``lineage.json`` + the tokenizer: no copy of 7B weights enters the cache.

Tokenizer PAD (baselines.md §1): a tokenizer without PAD gets ``<pad>`` (``model.pad_token=add``;
the new embedding row is the mean of the others) or reuses EOS (``eos``). The embedding matrix
is resized only when the vocabulary grows: Qwen's matrix (152,064 rows) is larger than its
tokenizer (151,665) and must not shrink. Qwen's PAD equals its EOS; that is harmless here,
because attention masks are built from sequence lengths, never from ``ids != pad``, so the
final EOS of a target is attended to and trained on.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from pathlib import Path

import torch

from vaa.models.hub import MissingResource, has_weights, model_dir
from vaa.models.gguf import GGUF_WEIGHTS, convert_gguf, file_sha256, gguf_path

LINEAGE = "lineage.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_hf_model(model_cfg) -> bool:
    """A pretrained model (hub name or local path) instead of the tiny model built from ``arch``
    (a config without ``arch`` is a real model whose source is still to be set)."""
    return bool(model_cfg.get("hub_name") or model_cfg.get("path") or model_cfg.get("gguf_file")
                or model_cfg.get("arch") is None)


def resolve_dtype(model_cfg, precision: str | None) -> str:
    """Weights' dtype: ``model.dtype`` if set; else bf16 for ``bf16-true`` training (pure
    bf16, the `reference` preset), fp16 for ``16-true``, fp32 otherwise (``bf16-mixed`` keeps
    fp32 master weights and autocasts, the `paper` preset)."""
    if model_cfg.get("dtype"):
        if model_cfg.dtype not in DTYPES:
            raise ValueError(f"model.dtype={model_cfg.dtype!r}; use one of {sorted(DTYPES)} or null")
        return model_cfg.dtype
    return {"bf16-true": "bfloat16", "16-true": "float16"}.get(str(precision), "float32")


def load_tokenizer(src: str | Path, pad_policy: str = "add"):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)  # a local directory: no network, no remote code
    if tok.pad_token is None:
        if pad_policy == "eos":
            tok.pad_token = tok.eos_token
        elif pad_policy == "add":
            tok.add_special_tokens({"pad_token": "<pad>"})
        else:
            raise ValueError(f"model.pad_token={pad_policy!r}; use add or eos")
    if tok.eos_token_id is None:
        raise ValueError(f"the tokenizer at {src} has no EOS token; targets end with EOS")
    return tok


@torch.no_grad()
def fit_embeddings(model, tokenizer) -> None:
    """Grow (never shrink) the embeddings to the tokenizer; new rows = the mean row."""
    emb = model.get_input_embeddings()
    rows = emb.weight.shape[0]
    if len(tokenizer) > rows:
        out = model.get_output_embeddings()
        means = [emb.weight[:rows].mean(0)]
        untied = out is not None and out.weight.data_ptr() != emb.weight.data_ptr()
        if untied:
            means.append(out.weight[:rows].mean(0))
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        model.get_input_embeddings().weight[rows:] = means[0]
        if untied:
            model.get_output_embeddings().weight[rows:] = means[1]
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def _from_pretrained(src: Path, dtype: str, attn: str | None):
    from transformers import AutoModelForCausalLM

    kw = {"attn_implementation": attn} if attn else {}
    return AutoModelForCausalLM.from_pretrained(src, dtype=DTYPES[dtype], **kw)


def write_base(model_cfg, out: Path, dtype: str) -> None:
    """The base stage of a real model: where the weights are, and the (PAD-fixed) tokenizer.
    A GGUF source (``model.gguf_file``, vaa.models.gguf) is de-quantised once into
    ``out/weights`` (safetensors), which the pointer then names relative to the artifact."""
    gguf = gguf_path(model_cfg)
    if gguf is not None:
        src = out / GGUF_WEIGHTS
        convert_gguf(gguf, src, DTYPES[dtype])
    else:
        src = model_dir(path=model_cfg.get("path"), hub_name=model_cfg.get("hub_name"),
                        revision=model_cfg.get("revision"), key="model")
    if not has_weights(src):
        raise MissingResource(f"model weights missing in {src} (no *.safetensors / *.bin); set "
                              f"model.path to a complete save_pretrained directory")
    load_tokenizer(src, model_cfg.pad_token).save_pretrained(out)
    base = {"dir": GGUF_WEIGHTS if gguf is not None else str(src.resolve()),
            "hub_name": model_cfg.get("hub_name"),
            "revision": model_cfg.get("revision"), "dtype": dtype,
            "attn_implementation": model_cfg.attn_implementation}
    (out / LINEAGE).write_text(json.dumps({"base": base, "adapters": []}, indent=1))


def mark_full(model, path: Path, dtype: str = "float32") -> None:
    """A model loaded from a full checkpoint: LoRA trained on it later points back here."""
    model.vaa_lineage = {"base": {"dir": str(Path(path).resolve()), "dtype": dtype,
                                  "attn_implementation": None}, "adapters": [],
                         "attached_last": False}


def load_lineage(path: Path, dtype: str | None = None, attach_last: bool = False):
    """(model, tokenizer) of a base pointer or adapter artifact (see the module docstring):
    a plain model with every adapter merged (what evaluation and repair read), or with
    ``attach_last`` the last adapter attached and trainable (single-LoRA fine-tuning)."""
    from peft import PeftModel

    info = json.loads((path / LINEAGE).read_text())
    base = info["base"]
    src = Path(base["dir"])
    if not src.is_absolute():  # weights inside the artifact (a converted GGUF): absolute from
        src = (path / src).resolve()  # here on, so adapters trained on it point back to them
        base = {**base, "dir": str(src)}
    if not (src / "config.json").is_file():
        src = model_dir(path=None, hub_name=base.get("hub_name"), revision=base.get("revision"),
                        key="model")
    tok = load_tokenizer(path)
    model = _from_pretrained(src, dtype or base["dtype"], base.get("attn_implementation"))
    fit_embeddings(model, tok)
    adapters = [str((path / a).resolve()) for a in info["adapters"]]
    attach = attach_last and bool(adapters)
    lineage = {"base": base, "adapters": adapters, "attached_last": attach}
    for i, a in enumerate(adapters):
        keep = attach and i == len(adapters) - 1
        with _peft_quiet():
            pm = PeftModel.from_pretrained(model, a, is_trainable=keep)
        model = pm if keep else pm.merge_and_unload()
    base_model(model).vaa_lineage = lineage
    return model, tok


@contextlib.contextmanager
def _peft_quiet():
    """peft (0.18-0.21) reads ``model.is_gradient_checkpointing``, which transformers 5
    deprecates with a FutureWarning on every adapter attached: theirs, not the user's to fix."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                category=FutureWarning)
        yield


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def base_model(model):
    return model.get_base_model() if is_peft(model) else model


def _merge(model):
    """Merge an attached adapter into the weights (the lineage then holds it as merged)."""
    if not is_peft(model):
        return model
    lineage = getattr(base_model(model), "vaa_lineage", None)
    merged = model.merge_and_unload()
    if lineage is not None:
        merged.vaa_lineage = {**lineage, "attached_last": False}
    return merged


def prepare_for_training(model, model_cfg, role: str):
    """The model a stage trains (``role``: base | align | finetune): LoRA attached, kept or
    merged as ``model.lora`` says; gradient checkpointing. Returns the model to train and
    save (a peft model with LoRA). The tiny default (no LoRA, no checkpointing) is untouched."""
    lora = model_cfg.get("lora")
    enabled = bool(lora and lora.enabled) and role != "base"
    mode = "new_lora" if role == "align" else (lora.finetune_adapter if lora else "full")
    if mode not in ("new_lora", "continue_lora", "full"):
        raise ValueError(f"model.lora.finetune_adapter={mode!r}; use new_lora, continue_lora or full")
    if not enabled or mode == "full":
        if is_peft(model) or enabled:  # an adapter merged: every parameter trains again
            model = _merge(model)
            for p in model.parameters():
                p.requires_grad_(True)
    elif mode == "new_lora" or not is_peft(model):
        model = attach_lora(_merge(model), lora)
    else:  # continue_lora: the loaded adapter is already attached and trainable
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
    if model_cfg.get("gradient_checkpointing"):
        enable_checkpointing(model)
    return model


def enable_checkpointing(model) -> None:
    """Activation (gradient) checkpointing, non-reentrant (no input-grad hook needed with
    frozen embeddings, as under LoRA), and no KV cache while training; transformers 5 calls it
    ``activation_checkpointing_enable`` and warns on the old name."""
    kw = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    model.config.use_cache = False


def attach_lora(model, lora):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                     target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    lineage = getattr(model, "vaa_lineage", None)
    with _peft_quiet():
        pm = get_peft_model(model, cfg)
    if lineage is not None:
        pm.get_base_model().vaa_lineage = {**lineage, "attached_last": False}
    return pm


def save_adapter_artifact(model, tokenizer, out: Path) -> None:
    """Adapter-only artifact: earlier adapters (copied), this stage's adapter, the tokenizer."""
    lineage = getattr(base_model(model), "vaa_lineage", None)
    if lineage is None:
        raise ValueError("a LoRA model without lineage: load it with vaa.models.build.load_model")
    earlier = lineage["adapters"][:-1] if lineage["attached_last"] else lineage["adapters"]
    names = []
    for i, src in enumerate(earlier):
        names.append(f"adapter_{i}")
        shutil.copytree(src, out / names[-1])
    names.append(f"adapter_{len(earlier)}")
    # The embedding rows a PAD added are re-created (mean init) when the base loads, so the
    # adapter never carries a copy of the resized embedding matrices (0.5 GB for Llama-7B).
    model.save_pretrained(out / names[-1], safe_serialization=True, save_embedding_layers=False)
    tokenizer.save_pretrained(out)
    (out / LINEAGE).write_text(json.dumps({"base": lineage["base"], "adapters": names}, indent=1))


def hashed_model_config(model: dict) -> dict:
    """The model subtree as cache keys hash it: the real-model keys only where they differ
    from their defaults, so the tiny model's keys stay what they were before those keys."""
    from vaa.config.schema import LoraSettings, ModelConfig

    defaults = {"hub_name": None, "revision": None, "dtype": None,
                "attn_implementation": ModelConfig.attn_implementation,
                "gradient_checkpointing": False, "pad_token": ModelConfig.pad_token,
                "gguf_file": None, "gguf_package": None}
    out = {k: v for k, v in model.items() if k not in defaults or v != defaults[k]}
    gguf = gguf_path(model) if model.get("gguf_file") else None
    if gguf is not None:  # the file's content, not its name (vaa.models.gguf: hashed once)
        out["gguf_sha256"] = file_sha256(gguf)
    lora = out.pop("lora", None)
    if lora and lora.get("enabled", LoraSettings.enabled):
        out["lora"] = lora
    return out


def to_eval_device(model, trainer_cfg):
    """Evaluation runs where training ran: the GPU when the trainer uses one (in bf16 when
    it trains in bf16, protocol.md §5), else unchanged (the CPU default)."""
    if torch.cuda.is_available() and str(trainer_cfg.accelerator) in ("gpu", "cuda", "auto"):
        model = model.to("cuda")
        if "bf16" in str(trainer_cfg.precision):
            model = model.to(torch.bfloat16)
    return model
