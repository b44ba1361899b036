"""The ``chat`` template: prompts and targets rendered by the tokenizer's own chat template.

Instruct and chat models (SmolLM2-Instruct, Qwen-Instruct, Llama-2-chat) were trained on their
chat markup, not on Alpaca's "### Response:"; ``template.train=chat`` / ``template.decode=chat``
use it (issue 11 item 2). One row becomes a two-turn conversation:

* user turn = the instruction, a blank line, the input (as the Alpaca text joins them; the
  instruction alone when the input is empty);
* assistant turn = the target.

Token ids: the prompt is the rendering with ``add_generation_prompt=True`` (it ends with the
assistant header, e.g. ``<|im_start|>assistant\\n``); the target is the rest of the full
two-turn rendering, cut right after the assistant's end-of-turn token (the first special token
after the prompt: ``<|im_end|>`` for SmolLM2 and Qwen, ``</s>`` for Llama-2-chat), so the loss
covers exactly the assistant's tokens and its end-of-turn token, and the newline some templates
put after it is not trained. Both parts are tokenised without added special tokens (the
rendering carries BOS where the template wants one), prompt and rest separately, so a training
row's prompt is token for token the decode prompt. Generation stops at the end-of-turn token
(:meth:`ChatTemplate.stop_ids`).

System prompt: none is added. A template that injects its own default system message when the
conversation has none (SmolLM2's "You are a helpful AI assistant named SmolLM, ...") keeps it:
that is what the model was trained with.

Errors: a tokenizer without a chat template (the tiny synthetic model's word tokenizer) raises
one ValueError naming the setting and the fix.
"""

from __future__ import annotations

from vaa.errors import ConfigError

class ChatTemplate:
    """Rendering through ``tokenizer.apply_chat_template`` (see the module docstring)."""

    name = "chat"

    def __init__(self, name: str = "chat"):
        self.name = name

    @staticmethod
    def user_text(instruction: str, input: str | None = None) -> str:
        """The user turn: instruction, blank line, input (per row, as the Alpaca text)."""
        if input is not None and input.strip():
            return f"{instruction}\n\n{input}"
        return instruction

    def format(self, instruction: str, input: str | None = None) -> str:
        """The user turn's text; the chat markup around it is the tokenizer's."""
        return self.user_text(instruction, input)

    def _render(self, tokenizer, messages: list[dict], generation_prompt: bool) -> str:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                f"template.train/template.decode={self.name!r} needs a tokenizer with a chat "
                f"template, and this model's tokenizer ({type(tokenizer).__name__}) has none "
                "(the tiny synthetic model's word tokenizer never has one): set template.train "
                "and template.decode to alpaca or compact, or use an instruct/chat model")
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=generation_prompt)
        if not isinstance(text, str):  # transformers may return a list for batched input
            raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
        return text

    def prompt_text(self, tokenizer, instruction: str, input: str | None) -> str:
        return self._render(tokenizer, [{"role": "user", "content": self.user_text(instruction, input)}],
                            generation_prompt=True)

    def prompt_ids(self, tokenizer, instruction: str, input: str | None) -> list[int]:
        """Ids of the prompt, ending with the assistant header."""
        return _ids(tokenizer, self.prompt_text(tokenizer, instruction, input))

    def target_ids(self, tokenizer, instruction: str, input: str | None, output: str) -> list[int]:
        """Ids of the assistant turn: its content and its end-of-turn token (nothing after)."""
        user = {"role": "user", "content": self.user_text(instruction, input)}
        prompt = self._render(tokenizer, [user], generation_prompt=True)
        full = self._render(tokenizer, [user, {"role": "assistant", "content": output}],
                            generation_prompt=False)
        if not full.startswith(prompt):
            raise ValueError(
                f"template={self.name!r}: the tokenizer's chat template renders the conversation "
                "with a different prefix than its generation prompt, so the assistant turn cannot "
                f"be located (prompt ends {prompt[-40:]!r}, conversation has {full[:len(prompt)][-40:]!r}); "
                "use template alpaca/compact for this model")
        rest = _ids(tokenizer, full[len(prompt):])
        specials = special_ids(tokenizer)
        for i, t in enumerate(rest):
            if t in specials:
                return rest[:i + 1]
        # a template without an end-of-turn token: end the target with EOS, as the Alpaca path
        return rest + [tokenizer.eos_token_id]

    def end_of_turn_id(self, tokenizer) -> int:
        """The token the template closes an assistant turn with (EOS when it has none)."""
        return self.target_ids(tokenizer, "x", "", "")[-1]

    def stop_ids(self, tokenizer) -> list[int]:
        """Generation stops at EOS or the end-of-turn token."""
        ids = [tokenizer.eos_token_id, self.end_of_turn_id(tokenizer)]
        return sorted({i for i in ids if i is not None})


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def special_ids(tokenizer) -> set[int]:
    """Ids of every special token that can close a turn: the named ones and added tokens
    marked special, except UNK (a word-level tokenizer's unknown word is not an end)."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for i, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            ids.add(int(i))
    ids.discard(getattr(tokenizer, "unk_token_id", None))
    return ids
