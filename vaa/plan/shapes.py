"""A decoder-only transformer's shape, where it comes from, and its parameter counts.

Sources, in order (:func:`shape_for`): ``model.arch`` (the tiny model built from config), a
``config.json`` in ``model.path``, a GGUF file's metadata (``model.gguf_file``), else the
preset table below by ``model.hub_name`` / ``model.name``. No download, ever.

Counts (Llama / Qwen2 blocks): embedding V·h (+ a separate LM head V·h when untied); per
layer q, o: h·h; k, v: h·kv (kv = kv_heads · h / heads); gate, up, down: h·I; two RMSNorm
h; Qwen2's q/k/v biases h + 2·kv; a final norm h. LoRA adds r·(in + out) per targeted
linear layer (peft's A: r×in, B: out×r).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Shape:
    name: str
    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    tied: bool = False
    qkv_bias: bool = False  # Qwen2

    @property
    def kv(self) -> int:  # width of the k and v projections
        return self.hidden // self.heads * self.kv_heads

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one block."""
        h, kv, i = self.hidden, self.kv, self.intermediate
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_params(self) -> int:
        h, kv = self.hidden, self.kv
        return (sum(a * b for a, b in self.linear_dims().values()) + 2 * h
                + ((h + 2 * kv) if self.qkv_bias else 0))

    def params(self) -> int:
        """Total parameter count P."""
        emb = self.vocab * self.hidden * (1 if self.tied else 2)
        return emb + self.layers * self.layer_params() + self.hidden

    def lora_params(self, r: int, targets=LINEARS) -> int:
        """Trainable parameters of LoRA rank ``r`` on ``targets`` of every block."""
        dims = self.linear_dims()
        unknown = [t for t in targets if t not in dims]
        if unknown:
            raise ValueError(f"model.lora.target_modules: {unknown} are not linear layers of a "
                             f"Llama/Qwen2 block ({', '.join(LINEARS)})")
        return self.layers * sum(r * (dims[t][0] + dims[t][1]) for t in targets)


# Published configs (config.json of each hub repository). Llama-2 gets `<pad>` added by the
# base stage (model.pad_token=add): vocab 32,001.
PRESETS = {
    "135m": Shape("SmolLM2-135M", 49152, 576, 30, 1536, 9, 3, tied=True),
    "0.5b": Shape("Qwen2.5-0.5B", 151936, 896, 24, 4864, 14, 2, tied=True, qkv_bias=True),
    "7b": Shape("Llama-2-7B", 32001, 4096, 32, 11008, 32, 32),
    "qwen7b": Shape("Qwen2.5-7B", 152064, 3584, 28, 18944, 28, 4, qkv_bias=True),
    "13b": Shape("Llama-2-13B", 32001, 5120, 40, 13824, 40, 40),
}
_BY_NAME = {"smollm2": "135m", "qwen2.5-0.5b": "0.5b", "qwen2_5_0_5b": "0.5b", "llama-2-7b": "7b",
            "llama2_7b": "7b", "qwen2.5-7b": "qwen7b", "qwen2_5_7b": "qwen7b", "llama-2-13b": "13b",
            "llama2_13b": "13b"}


def preset(name: str) -> Shape:
    """A preset by key (``7b``) or by a model / hub name that contains a known name."""
    key = name.lower()
    if key in PRESETS:
        return PRESETS[key]
    for pattern, k in _BY_NAME.items():
        if pattern in key.replace("/", "-"):
            return PRESETS[k]
    raise ValueError(f"no known shape for {name!r}; give model.path (a folder with config.json) "
                     f"or --shape one of {', '.join(PRESETS)}")


def from_config_json(path: Path, name: str = "") -> Shape:
    c = json.loads(Path(path).read_text())
    heads = c["num_attention_heads"]
    return Shape(name or c.get("_name_or_path") or path.parent.name, c["vocab_size"], c["hidden_size"],
                 c["num_hidden_layers"], c["intermediate_size"], heads, c.get("num_key_value_heads") or heads,
                 tied=bool(c.get("tie_word_embeddings", False)),
                 qkv_bias=c.get("model_type") == "qwen2" or bool(c.get("attention_bias", False)))


def from_gguf(path: Path) -> Shape:
    """Shape from a GGUF file's metadata (``gguf`` package; the tensors are not read)."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    arch = _field(r, "general.architecture")

    def num(key: str) -> int:
        return int(_field(r, f"{arch}.{key}"))
    tensors = {t.name for t in r.tensors}
    vocab = len(r.fields["tokenizer.ggml.tokens"].data)
    return Shape(Path(path).stem, vocab, num("embedding_length"), num("block_count"),
                 num("feed_forward_length"), num("attention.head_count"), num("attention.head_count_kv"),
                 tied="output.weight" not in tensors, qkv_bias="blk.0.attn_q.bias" in tensors)


def _field(reader, key: str):
    f = reader.fields[key]
    value = f.parts[f.data[0]]
    return bytes(value).decode() if value.dtype.kind == "u" and value.dtype.itemsize == 1 else value[0]


def shape_for(model_cfg, vocab_hint: int = 512) -> Shape:
    """The shape of ``model`` (a config mapping) without building it."""
    get = model_cfg.get
    if get("arch"):  # the tiny model: vocabulary from the world's words (a few hundred)
        a = get("arch")
        heads = a["num_attention_heads"]
        return Shape(get("name") or "tiny", a.get("vocab_size") or vocab_hint, a["hidden_size"],
                     a["num_hidden_layers"], a["intermediate_size"], heads,
                     a.get("num_key_value_heads") or heads, tied=bool(a.get("tie_word_embeddings", True)))
    path = Path(str(get("path"))).expanduser() if get("path") else None
    if path is not None and (path / "config.json").is_file():
        return from_config_json(path / "config.json", get("name") or "")
    if get("gguf_file"):
        from vaa.models.gguf import gguf_path

        return from_gguf(gguf_path(model_cfg))
    shape = preset(get("hub_name") or get("name") or "")
    return shape if not get("name") else replace(shape, name=shape.name)
