"""LookAhead Tuning (Liu et al., arXiv 2503.19041; zjunlp/LookAheadTuning ``main.py``), a
fine-tuning-stage defense that only transforms the training rows (``ft_defense=lookahead``).
Spec: baselines.md §7.

Preview the first answer tokens in the input, so that fine-tuning moves the distribution of
the first output tokens (where shallow safety lives) less. For a row (x, y) with connector
c = " The answer begins with: ":
- ``mode: real``: x′ = x + c + detok(tok(y)[:m]), y′ = y (m = ``preview_tokens``, 6, tokens
  of the target model's tokenizer, decoded without clean-up);
- ``mode: virtual``: x′ = x + c + P, y′ = P + y (P = ``virtual_prefix``,
  "Let's solve this problem. ").
The preview goes into ``input``, or into ``instruction`` when ``input`` is empty. Every
training row is transformed, harmful ones included (a provider cannot tell them apart); the
loss and optimiser are SFT's, and inference prompts are unchanged (the evaluation stage
never sees this method). Caveats: with one-word labels (SST2, AG News) real mode previews
the whole answer, so training becomes copying; in virtual mode the model learns to start
answers with P (label and number scorers find the answer after it, exact match does not).
"""

from __future__ import annotations

from dataclasses import replace

from vaa.data.formats import Example
from vaa.methods.sft import SFT

CONNECTOR = " The answer begins with: "
MODES = ("real", "virtual")


def lookahead_row(ex: Example, tokenizer, mode: str = "real", preview_tokens: int = 6,
                  virtual_prefix: str = "Let's solve this problem. ",
                  connector: str = CONNECTOR) -> Example:
    """The transformed training row (see the module docstring)."""
    if mode == "real":
        ids = tokenizer(ex.output, add_special_tokens=False)["input_ids"][:preview_tokens]
        preview = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
        output = ex.output
    elif mode == "virtual":
        preview, output = virtual_prefix, virtual_prefix + ex.output
    else:
        raise ValueError(f"ft_defense.mode must be one of {MODES}, got {mode!r}")
    if ex.input:
        return replace(ex, input=ex.input + connector + preview, output=output)
    return replace(ex, instruction=ex.instruction + connector + preview, output=output)


class LookAhead(SFT):
    name = "lookahead"

    def __init__(self, mode: str = "real", preview_tokens: int = 6,
                 virtual_prefix: str = "Let's solve this problem. ", connector: str = CONNECTOR,
                 **hparams):
        super().__init__(**hparams)
        if mode not in MODES:
            raise ValueError(f"ft_defense.mode must be one of {MODES}, got {mode!r}")
        if preview_tokens < 0:
            raise ValueError(f"ft_defense.preview_tokens must be >= 0, got {preview_tokens}")
        self.mode, self.preview_tokens = mode, int(preview_tokens)
        self.virtual_prefix, self.connector = virtual_prefix, connector

    def make_datamodule(self, examples, tokenizer, **kw):
        rows = [lookahead_row(ex, tokenizer, self.mode, self.preview_tokens, self.virtual_prefix,
                              self.connector) for ex in examples]
        return super().make_datamodule(rows, tokenizer, **kw)


# --- typed hyperparameters (conf/ft_defense/lookahead.yaml): /_schema_ft_defense_lookahead --------
from dataclasses import dataclass  # noqa: E402

from vaa.config.methods import DefenseConfig, defense_schema  # noqa: E402


@defense_schema
@dataclass
class LookAheadConfig(DefenseConfig):
    _target_: str = "vaa.methods.lookahead.LookAhead"
    name: str = "lookahead"
    mode: str = "real"  # real | virtual
    preview_tokens: int = 6
    virtual_prefix: str = "Let's solve this problem. "
    connector: str = " The answer begins with: "

    @staticmethod
    def check(c) -> None:
        c.one_of("mode", MODES)
        c.count("preview_tokens", minimum=0)
