"""AlpacaEval fine-tune accuracy as a local pairwise win rate (protocol.md §9, `local_pairwise`).

A local open-weight judge model (``task.scorer_args.path`` or ``.hub_name``) compares the
model's answer with the AlpacaEval reference output for the same instruction, AlpacaEval's
pairwise protocol without the API: the judge reads both answers and we compare the
probability of its next token being "A" with that of "B" (one forward pass per pair, no
sampling). Each pair is judged in both orders and the preferences averaged, which cancels the
judge's position bias; the model wins when its averaged preference exceeds 0.5. FA = win
rate in percent. Label it "local win rate": it is not comparable with `alpaca_eval` API
numbers. An empty answer loses without being judged.
"""

from __future__ import annotations

from typing import Sequence

import torch

PROMPT = (
    "Below are two responses to the same instruction. Decide which response follows the "
    "instruction better: more helpful, accurate and complete.\n\n"
    "### Instruction:\n{instruction}\n\n### Response A:\n{first}\n\n### Response B:\n{second}\n\n"
    "### Which response is better, A or B? Answer:"
)


class PairwiseJudge:
    def __init__(self, model, tokenizer, *, batch_size: int = 8, max_length: int = 2048,
                 max_answer_tokens: int = 512) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        self.max_answer_tokens = max_answer_tokens
        self.choice_ids = [tokenizer(" " + c, add_special_tokens=False)["input_ids"][-1] for c in "AB"]
        if self.choice_ids[0] == self.choice_ids[1]:
            raise ValueError("the pairwise judge's tokenizer maps 'A' and 'B' to one token")

    def _clip(self, text: str) -> str:  # long answers are judged on a prefix, never the template
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= self.max_answer_tokens else self.tokenizer.decode(ids[:self.max_answer_tokens])

    @torch.no_grad()
    def prefer_first(self, instructions: Sequence[str], firsts: Sequence[str],
                     seconds: Sequence[str]) -> list[float]:
        """P(A) / (P(A) + P(B)) per pair: how strongly the judge prefers the first answer."""
        device = next(self.model.parameters()).device
        ids = [self.tokenizer(PROMPT.format(instruction=i, first=self._clip(a), second=self._clip(b)))
               ["input_ids"][-self.max_length:] for i, a, b in zip(instructions, firsts, seconds)]
        out: list[float] = []
        for start in range(0, len(ids), self.batch_size):
            rows = ids[start:start + self.batch_size]
            width = max(map(len, rows))
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            x = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros_like(x)
            for k, r in enumerate(rows):  # right padding: positions as in a single call
                x[k, :len(r)] = torch.tensor(r)
                mask[k, :len(r)] = 1
            x, mask = x.to(device), mask.to(device)
            logits = next_token_logits(self.model, x, mask)[:, self.choice_ids].float()
            out += torch.softmax(logits, dim=-1)[:, 0].cpu().tolist()
        return out

    def wins(self, instructions: Sequence[str], answers: Sequence[str],
             references: Sequence[str]) -> list[bool]:
        if not len(instructions) == len(answers) == len(references):
            raise ValueError("instructions, answers and references differ in length")
        p1 = self.prefer_first(instructions, answers, references)
        p2 = self.prefer_first(instructions, references, answers)
        return [bool(a.strip()) and (x + (1 - y)) / 2 > 0.5 for a, x, y in zip(answers, p1, p2)]


@torch.no_grad()
def next_token_logits(model, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits after each row's last real token; only those positions reach the output layer."""
    last = mask.sum(1) - 1
    rows = torch.arange(len(input_ids), device=input_ids.device)
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    if decoder is None or head is None:
        return model(input_ids=input_ids, attention_mask=mask).logits[rows, last]
    hidden = decoder(input_ids=input_ids, attention_mask=mask)[0]
    return head(hidden[rows, last])


class PairwiseScorer:
    """FA scorer over a whole test set: ``score_batch(instructions, predictions, golds)``."""

    def __init__(self, judge: PairwiseJudge) -> None:
        self.judge = judge

    def score_batch(self, instructions, predictions, golds) -> list[bool]:
        return self.judge.wins(instructions, predictions, golds)

    def __call__(self, prediction: str, gold: str) -> bool:
        raise TypeError("the pairwise scorer needs each row's instruction: call score_batch")


def build_pairwise_scorer(hub_name: str | None = "Qwen/Qwen2.5-7B-Instruct", path: str | None = None,
                          revision: str | None = None, batch_size: int = 8, max_length: int = 2048,
                          max_answer_tokens: int = 512, dtype: str | None = None) -> PairwiseScorer:
    """The `local_pairwise` scorer of ``task.scorer_args`` (path / hub_name of the judge)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vaa.models.hub import model_dir

    src = model_dir(path=path, hub_name=hub_name, revision=revision, key="task.scorer_args",
                    what="pairwise judge model")
    cuda = torch.cuda.is_available()
    torch_dtype = getattr(torch, dtype or ("bfloat16" if cuda else "float32"))
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch_dtype).to("cuda" if cuda else "cpu")
    judge = PairwiseJudge(model, AutoTokenizer.from_pretrained(src), batch_size=batch_size,
                          max_length=max_length, max_answer_tokens=max_answer_tokens)
    return PairwiseScorer(judge)
