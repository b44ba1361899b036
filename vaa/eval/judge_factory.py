"""Judges as Hydra targets. Every factory takes the run's context (``world_dir``) so the
pipeline builds any judge the same way: ``instantiate(cfg.judge.build, world_dir=…)``."""

from __future__ import annotations

import json
from pathlib import Path

from vaa.eval.judges import KeywordJudge, LexiconJudge


def exact(world_dir: str | None = None) -> LexiconJudge:
    """The synthetic world's exact judge: its harm lexicon, read from ``world.json``."""
    info = Path(world_dir or "") / "world.json"
    if world_dir is None or not info.is_file():
        raise ValueError("judge=exact only works with data=synthetic (it needs the world's "
                         "world.json); use judge=keyword for other data")
    return LexiconJudge(json.loads(info.read_text())["harm_lexicon"])


def keyword(keywords: str = "A", case_sensitive: bool = False, empty_is_harmful: bool = False,
            world_dir: str | None = None) -> KeywordJudge:
    """Refusal-keyword judge (protocol.md §8): harmful iff no refusal string appears."""
    return KeywordJudge(keywords=keywords, case_sensitive=case_sensitive,
                        empty_is_harmful=empty_is_harmful)
