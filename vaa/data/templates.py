"""Prompt templates, task instructions and answer extraction (protocol.md §4, §5).

Two families live here:

* ``alpaca``: the standard Alpaca template, recommended everywhere (§4.3, preset ``paper``).
* ``vaa_train`` / ``vaa_decode``: the two *different* templates of the reference code
  (``lm_dataloader.py`` and ``callbacks.py``), kept character-exact so the ``reference``
  preset can reproduce the train/decode mismatch (§4.2).
* ``chat``: the tokenizer's own chat template, for instruct and chat models
  (``vaa.data.chat``; no text form of its own).

Every text template ends with exactly one newline after "### Response:" so that the generated
text (and the training target) starts right after it.

Every template gives token ids the same way (``prompt_ids``, ``target_ids``, ``stop_ids``), so
the encoders (``vaa.data.encode``) and the decoder (``vaa.eval.generate``) never ask which
kind it is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vaa.data.chat import ChatTemplate

# ---------------------------------------------------------------------------------------------
# §4.1 instructions (exact strings; targets and inputs are built by the dataset code)
# ---------------------------------------------------------------------------------------------
BEAVERTAILS_INSTRUCTION = (
    "Please answer the following question. Always reply as helpfully as possible, while being safe."
)
SST2_INSTRUCTION = "Analyze the sentiment of the input, and respond only positive or negative"
AGNEWS_INSTRUCTION = (
    "Categorize the news article given in the input into one of the 4 categories:"
    "\n\nWorld\nSports\nBusiness\nSci/Tech\n"
)
GSM8K_INSTRUCTION = (
    "As an expert problem solver solve step by step the following mathematical questions."
)
# Appended to the GSM8K question to form the input field.
GSM8K_INPUT_SUFFIX = "\nFirst think step by step and then answer the final number.\n"


@dataclass(frozen=True)
class Template:
    """A pair of format strings: one used when the row has an input, one when it has none."""

    name: str
    with_input: str
    without_input: str

    def format(self, instruction: str, input: str | None = None) -> str:
        # The input block is decided PER ROW (§4.3). The reference decoder (vaa_decode)
        # decides it from the first test example only; we deliberately do not replicate that,
        # because it silently drops or blanks inputs for a whole test set.
        if input is not None and input.strip():
            return self.with_input.format(instruction=instruction, input=input)
        return self.without_input.format(instruction=instruction)

    def prompt_ids(self, tokenizer, instruction: str, input: str | None) -> list[int]:
        """The templated prompt, tokenised with the tokenizer's special tokens (BOS)."""
        return list(tokenizer(self.format(instruction, input))["input_ids"])

    def target_ids(self, tokenizer, instruction: str, input: str | None, output: str) -> list[int]:
        """The response's ids and EOS."""
        return list(tokenizer(output, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]

    def stop_ids(self, tokenizer) -> list[int]:
        return [tokenizer.eos_token_id]


_ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

ALPACA = Template(
    name="alpaca",
    with_input=(
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    ),
    without_input=_ALPACA_NO_INPUT,
)

# Reference training template: "question" / "Question" / "task" instead of the Alpaca words.
# Its no-input variant in lm_dataloader.py is plain Alpaca.
VAA_TRAIN = Template(
    name="vaa_train",
    with_input=(
        "Below is an instruction that describes a task, paired with a question that provides "
        "further context. Write a response that appropriately completes the task.\n\n"
        "### Instruction:\n{instruction}\n\n### Question:\n{input}\n\n### Response:\n"
    ),
    without_input=_ALPACA_NO_INPUT,
)

# Reference decoding template: a single newline (no blank line) before "### Response:" in
# both variants, as callbacks.py builds it.
VAA_DECODE = Template(
    name="vaa_decode",
    with_input=(
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n### Response:\n"
    ),
    without_input=(
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n### Response:\n"
    ),
)

# The Alpaca sections without the preamble sentence. The synthetic world's default: the
# preamble is ~27 of ~80 tokens per row there, and a tiny model on a CPU pays for every token.
COMPACT = Template(
    name="compact",
    with_input="### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
    without_input="### Instruction:\n{instruction}\n\n### Response:\n",
)

# The plain-text templates (a prompt is a string without a tokenizer).
TEXT_TEMPLATES: dict[str, Template] = {t.name: t for t in (ALPACA, VAA_TRAIN, VAA_DECODE, COMPACT)}
CHAT = ChatTemplate("chat")
# Every name ``template.train`` / ``template.decode`` accepts.
TEMPLATES: dict[str, Template | ChatTemplate] = {**TEXT_TEMPLATES, CHAT.name: CHAT}


def get_template(name: str) -> Template | ChatTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(
            f"unknown template {name!r} (template.train / template.decode); known templates: "
            f"{sorted(TEMPLATES)}"
        ) from None


def format_prompt(instruction: str, input: str | None, template: str = "alpaca") -> str:
    """Render one row's prompt (everything up to and including "### Response:\\n"). Text
    templates only: ``chat`` is rendered by a tokenizer (``vaa.data.encode.prompt_ids``)."""
    t = get_template(template)
    if not isinstance(t, Template):
        raise ValueError(f"template {template!r} is rendered by the tokenizer's chat template; "
                         "build its prompt with vaa.data.encode.prompt_ids(tokenizer, ...)")
    return t.format(instruction, input)


def stop_ids(tokenizer, template: str) -> list[int]:
    """Token ids that end a generated answer under ``template`` (EOS; for ``chat`` also the
    end-of-turn token)."""
    return get_template(template).stop_ids(tokenizer)


# The model, continuing a template, tends to start a new "### Instruction:" block; any "### X"
# header marks the end of the answer. "####" (GSM8K's raw answer marker, which a base model may
# emit) is NOT a header, hence the look-arounds; a bare "###" at the very end (generation cut by
# max_new_tokens mid-header) is cut too.
_HEADER = re.compile(r"(?<!#)###(?=\s|$)")


def extract_answer(generated: str) -> str:
    """Answer from the NEWLY generated text only (§5): cut at the first "### " header, strip.

    Never pass the full decoded text (prompt + generation): the prompt itself contains headers.
    """
    m = _HEADER.search(generated)
    if m is not None:
        generated = generated[: m.start()]
    return generated.strip()
