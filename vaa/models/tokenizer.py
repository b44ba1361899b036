"""An offline word-level tokenizer built from the synthetic world's text.

No tokenizer can be downloaded, and the world's text is a closed vocabulary, so one token
per word is both exact (decode(encode(x)) == x for the world's space-separated text) and
small. The vocabulary is sorted explicitly by (-count, word): the `tokenizers` trainers
break frequency ties in a different order per run, which would scramble token ids when a
cached checkpoint is reused.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIALS = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>"}


def _pre_tokenizer():
    return pre_tokenizers.Whitespace()  # \w+ | [^\w\s]+ : words and punctuation runs


def build_word_tokenizer(texts: Iterable[str], extra_words: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over every word in ``texts`` (lower-cased), plus ``extra_words``."""
    normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    pre = _pre_tokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    counts.update({w: 0 for w in extra_words if w not in counts})
    words = sorted(counts, key=lambda w: (-counts[w], w))
    vocab = {tok: i for i, tok in enumerate(SPECIALS.values())}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIALS["unk"]))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    # No decoder: tokens are joined with single spaces, exact for the world's text. (A
    # WordPiece decoder would glue "###" onto the previous word as a "##" continuation.)
    bos = SPECIALS["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=SPECIALS["pad"], unk_token=SPECIALS["unk"],
        bos_token=bos, eos_token=SPECIALS["eos"], padding_side="right")
