"""VAA stage 1's proxy rows must be disjoint from every attack's rows (issue 12 item 3; vaa.md
§2.1: the proxy stands for a user's fine-tuning data, not for the attack itself).

A proxy run trains on the first floor((1-p)·n) rows of its slice
(``dro.estimate.proxies.<i>``: dataset, split, start, stop; vaa.data.datamodule.hft_mix), and
an attack on the first floor((1-p)·n) rows of its task's train split. Groups are estimated once
per alignment and reused by every task, so a proxy is checked against the attack of every
task (``ATTACK_SPLITS``, its n from ``protocol.attack_n`` where the protocol sets one per task,
else ``attack.n``), and against the run's own task as configured. Positions are compared
(the rows of one table), and on real data texts too (:func:`proxy_content_overlaps`: a
stand-in proxy is another table's rows); the real data stage also drops from the Alpaca table
the rows whose text is an AlpacaEval instruction (vaa.data.hub.alpaca_proxy).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

from omegaconf import OmegaConf

from vaa.data.content import content_key
from vaa.models.hub import MissingResource

# task name -> the (dataset folder, split) its attack trains on, from row 0 (conf/task/*.yaml)
ATTACK_SPLITS = {"sst2": ("sst2", "train"), "agnews": ("ag_news", "train"),
                 "gsm8k": ("gsm8k", "train"), "alpacaeval": ("alpaca_eval", "eval")}
RowCount = Callable[[str, str], Optional[int]]  # (dataset, split) -> rows (None: unknown)


def _ints(*xs) -> bool:
    return all(isinstance(x, int) and not isinstance(x, bool) for x in xs)


def benign_rows(n: int, p: float) -> int:
    return math.floor((1 - p) * n + 1e-9)


def attack_rows(cfg) -> dict[str, tuple[str, str, int, int]]:
    """task -> (dataset, split, first row, stop row) of the benign rows its attack trains on."""
    p = cfg.attack.harmful_ratio
    per_task = OmegaConf.select(cfg, "protocol.attack_n", default=None) or {}
    out = {task: (ds, split, 0, benign_rows(per_task.get(task, cfg.attack.n), p))
           for task, (ds, split) in ATTACK_SPLITS.items()}
    t = cfg.task
    out[t.name] = (t.dataset, t.train.file, t.train.start, t.train.start + benign_rows(cfg.attack.n, p))
    return out


def proxy_overlaps(cfg, n_rows: RowCount) -> list[tuple[str, str]]:
    """(dotted key, message) for each proxy run whose rows meet an attack's rows."""
    est, problems = cfg.dro.estimate, []
    if not _ints(est.n, cfg.attack.n, cfg.task.train.start) or not 0 <= cfg.attack.harmful_ratio <= 1:
        return problems  # the range rules report these values (vaa.config.rules)
    attacks = attack_rows(cfg)
    for i, proxy in enumerate(est.proxies):
        if not _ints(proxy.start) or not (proxy.stop is None or _ints(proxy.stop)) \
                or not 0 <= proxy.harmful_ratio <= 1:
            continue
        total = n_rows(proxy.dataset, proxy.split)
        if total is None and proxy.start < 0:
            continue  # the last rows of a table of unknown size: checked when it is read
        span = range(total if total is not None else proxy.start + benign_rows(est.n, proxy.harmful_ratio))
        rows = span[proxy.start:proxy.stop][:benign_rows(est.n, proxy.harmful_ratio)]
        for task, (ds, split, a, b) in attacks.items():
            lo, hi = max(rows.start, a), min(rows.stop, b)
            if (ds, split) == (proxy.dataset, proxy.split) and lo < hi:
                problems.append((f"dro.estimate.proxies.{i}", (
                    f"dro.estimate.proxies.{i} ({proxy.name}: {ds}/{split} rows {rows.start}-"
                    f"{rows.stop - 1}) shares rows {lo}-{hi - 1} with the {task} attack's benign rows "
                    f"{a}-{b - 1}: stage 1 would estimate on the attack itself; draw the proxy from "
                    f"rows no attack reads (dataset alpaca, split train: the default) or start it "
                    f"after row {b - 1}")))
                break
    return problems


def _user_text(e) -> str:
    return content_key(e.input if e.input.strip() else e.instruction)


def proxy_content_overlaps(cfg, source) -> list[tuple[str, str]]:
    """Real data: (key, message) for each proxy run whose benign rows share a text (the user's
    input, vaa.data.content) with an attack's benign rows, whatever table either is read from
    (a stand-in proxy is another table's rows). Tables the folder lacks are skipped."""
    est, problems = cfg.dro.estimate, []
    attacks = {}
    for task, (ds, split, a, b) in attack_rows(cfg).items():
        try:
            attacks[task] = {_user_text(e) for e in source.examples(ds, split, a, b)}
        except (FileNotFoundError, MissingResource, ValueError):
            continue
    for i, proxy in enumerate(est.proxies):
        rows = source.examples(proxy.dataset, proxy.split, proxy.start, proxy.stop, proxy.format)
        for e in rows[:benign_rows(est.n, proxy.harmful_ratio)]:
            task = next((t for t, keys in attacks.items() if _user_text(e) in keys), None)
            if task is not None:
                problems.append((f"dro.estimate.proxies.{i}", (
                    f"dro.estimate.proxies.{i} ({proxy.name}: {proxy.dataset}/{proxy.split}) has a row "
                    f"the {task} attack trains on ({(e.input or e.instruction)[:60]!r}): stage 1 would "
                    f"estimate on the attack itself; use rows no attack reads (data.alpaca.path=FILE, "
                    f"or a later data.alpaca_stand_in_rows.start / a smaller attack.n)")))
                break
    return problems


def assert_proxies_disjoint(cfg, n_rows: RowCount, source=None) -> None:
    """Raise ValueError listing every proxy that meets an attack's rows: by position, and with
    ``source`` (real data) by content too."""
    problems = proxy_overlaps(cfg, n_rows)
    if source is not None and not problems:
        problems = proxy_content_overlaps(cfg, source)
    if problems:
        raise ValueError("\n".join(msg for _, msg in problems))
