"""Fine-tuning-accuracy scorers per task (protocol.md §6, §9). FA = 100 * correct / N.

Each scorer is a callable ``scorer(prediction, gold) -> bool``. ``prediction`` is the extracted
answer (see ``vaa.data.templates.extract_answer``), never the full decoded text.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping, Sequence

MATCH_MODES = ("first_label", "gold_substring", "vaa_bidirectional")


def _norm(text: str) -> str:
    return text.strip().lower()


class LabelScorer:
    """Classification scorer for SST2 / AG News with three matching rules (§6).

    * ``first_label`` (both presets' recommended rule): the label word (or alias) occurring first
      in the prediction, whole-word, decides; it must be the gold label.
    * ``gold_substring`` (git-disl rule, preset ``reference``): the gold word (or one of its
      aliases) occurs anywhere. "positive, not negative" is therefore correct for BOTH golds.
    * ``vaa_bidirectional``: !!! BUG-FOR-BUG reproduction of VAA ``eval_benign.py`` !!!
      correct iff ``pred in gold or gold in pred``. An EMPTY prediction is always correct and so
      is any fragment of the label ("pos", "e"). Use only to reproduce reference numbers.
    """

    def __init__(
        self,
        labels: Sequence[str],
        match: str = "first_label",
        aliases: Mapping[str, str] | None = None,
    ) -> None:
        if match not in MATCH_MODES:
            raise ValueError(f"unknown match mode {match!r}; allowed: {list(MATCH_MODES)}")
        self.labels = [_norm(label) for label in labels]
        self.match = match
        self.aliases = {_norm(a): _norm(c) for a, c in (aliases or {}).items()}
        # surface form -> canonical label
        self._canon = {label: label for label in self.labels}
        self._canon.update(self.aliases)
        # Longest form first, so that at one position "sci/tech" wins over its alias "sci".
        # re.escape handles the "/" in "sci/tech"; \b works because both ends are word chars.
        forms = sorted(self._canon, key=len, reverse=True)
        self._pattern = re.compile(r"\b(?:" + "|".join(re.escape(f) for f in forms) + r")\b")

    def canonical(self, text: str) -> str:
        text = _norm(text)
        return self._canon.get(text, text)

    def first_label(self, prediction: str) -> str | None:
        """Canonical label of the label word appearing first (by position) in the prediction."""
        m = self._pattern.search(_norm(prediction))
        return None if m is None else self._canon[m.group(0)]

    def __call__(self, prediction: str, gold: str) -> bool:
        pred, gold_n = _norm(prediction), _norm(gold)
        if self.match == "vaa_bidirectional":
            return pred in gold_n or gold_n in pred  # reproduces the bug, see class docstring
        if not pred:
            return False
        gold_c = self.canonical(gold_n)
        if self.match == "first_label":
            return self.first_label(pred) == gold_c
        # gold_substring: git-disl accepts an alias (e.g. "sci") for its label.
        forms = [gold_c] + [a for a, c in self.aliases.items() if c == gold_c]
        return any(f in pred for f in forms)


def sst2_scorer(match: str = "first_label") -> LabelScorer:
    return LabelScorer(["negative", "positive"], match=match)


def agnews_scorer(match: str = "first_label") -> LabelScorer:
    # git-disl accepts the bare "sci" for Sci/Tech.
    return LabelScorer(
        ["world", "sports", "business", "sci/tech"], match=match, aliases={"sci": "sci/tech"}
    )


# A number as models write one: an optional minus sign (not glued to a preceding digit: "5-3" is
# 5 and 3), an integer part that is either plain digits or 1-3 digits followed by comma-grouped
# thousands ("1,234,567"; a comma not followed by exactly three digits separates two numbers:
# "3,4" is 3 and 4), an optional decimal part ("2.50"); or a bare decimal part (".5"). A
# trailing period is not part of a number (a decimal part needs digits after the dot). A "$"
# between the sign and the digits is skipped ("-$5" is -5).
_NUMBER = re.compile(r"(?:(?<!\d)-)?\$?(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)")
# Thousands separators other than the comma, rewritten to a comma first: LaTeX "9{,}500" and
# "9\,500", and no-break / thin spaces (U+00A0, U+2009, U+202F). A plain ASCII space is NOT a
# separator ("1 234" is 1 and 234): in running text it separates two numbers far more often.
_OTHER_SEPARATOR = re.compile(r"(?<=\d)(?:\{,\}|\\,|[\u00a0\u2009\u202f])(?=\d{3}(?!\d))")
# Tolerate arbitrary whitespace, including " :" from tokenizers that decode with spaces around
# punctuation ("the final answer is : 42").
_FINAL_ANSWER = re.compile(r"the\s+final\s+answer\s+is\s*:", re.IGNORECASE)
_GSM8K_MARK = re.compile(r"####")


def _to_float(number: str) -> float:
    return float(number.replace(",", "").replace("$", ""))


class GSM8KScorer:
    """Numeric answer match (§6). Gold answers may be targets ("The final answer is: 72") or
    raw GSM8K solutions ("... #### 72"); both are extracted with the same rule."""

    tolerance = 1e-6

    @staticmethod
    def extract_number(text: str) -> float | None:
        """The first number after "The final answer is:" (or "####"), else the last number, read
        as models write numbers (``_NUMBER``): "$1,000.00" → 1000.0, "9{,}500" → 9500.0, "−3"
        (Unicode minus) → -3.0. Departure from protocol.md §6 ("remove commas"): commas are
        removed only inside a number's thousands groups; deleting every comma first turned
        "$9{,}500" into 500 and the list "3,4" into 34."""
        text = _OTHER_SEPARATOR.sub(",", text.replace("\u2212", "-"))
        for marker in (_FINAL_ANSWER, _GSM8K_MARK):
            m = marker.search(text)
            if m is not None:
                num = _NUMBER.search(text, m.end())
                if num is not None:
                    return _to_float(num.group(0))
        # No marker (or no number after it): the last number in the text.
        nums = _NUMBER.findall(text)
        return _to_float(nums[-1]) if nums else None

    def __call__(self, prediction: str, gold: str) -> bool:
        a, b = self.extract_number(prediction), self.extract_number(gold)
        if a is None or b is None:
            return False
        return abs(a - b) < self.tolerance


def _norm_exact(text: str) -> str:
    text = " ".join(text.lower().split())
    return re.sub(r"\s*\.$", "", text).strip()


class ExactMatchScorer:
    """For the synthetic AlpacaEval-style task, whose reference output is deterministic."""

    def __call__(self, prediction: str, gold: str) -> bool:
        pred = _norm_exact(prediction)
        return bool(pred) and pred == _norm_exact(gold)


def rouge_l_f1(prediction: str, reference: str) -> float:
    """ROUGE-L F1 on lowercased whitespace tokens, via an O(n*m) LCS (no dependency)."""
    p, r = prediction.lower().split(), reference.lower().split()
    if not p or not r:
        return 0.0
    prev = [0] * (len(r) + 1)
    for tp in p:
        cur = [0] * (len(r) + 1)
        for j, tr in enumerate(r, 1):
            cur[j] = prev[j - 1] + 1 if tp == tr else max(prev[j], cur[j - 1])
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


class RougeLScorer:
    """SMOKE TESTS ONLY (protocol §9): a surface-overlap proxy, not a quality measure and not
    comparable with any win rate. Correct iff ROUGE-L F1 >= threshold."""

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = threshold

    def __call__(self, prediction: str, gold: str) -> bool:
        if not prediction.strip():
            return False
        return rouge_l_f1(prediction, gold) >= self.threshold


Scorer = Callable[[str, str], bool]


def accuracy(scorer: Scorer, predictions: Sequence[str], golds: Sequence[str]) -> float:
    """Percent correct, 0-100."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions but {len(golds)} golds")
    if not predictions:
        raise ValueError("no examples to score")
    correct = sum(bool(scorer(p, g)) for p, g in zip(predictions, golds))
    return 100.0 * correct / len(predictions)


SCORERS: dict[str, Callable[..., Scorer]] = {
    "sst2": sst2_scorer,
    "agnews": agnews_scorer,
    "gsm8k": GSM8KScorer,
    "exact": ExactMatchScorer,
    "rougeL": RougeLScorer,
}


def build_scorer(name: str, **kwargs) -> Scorer:
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; known scorers: {sorted(SCORERS)}")
    return SCORERS[name](**kwargs)
