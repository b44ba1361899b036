"""The paper's table from a sweep's jobs: rows methods, columns tasks (or one swept
setting), harmful score (HS) and fine-tune accuracy (FA) per cell, an average column,
mean ± std over seeds (sample std, n − 1; a single seed has no std).

A cell is keyed by (row, column) and holds one value per seed from the jobs that finished;
a failed or unfinished job adds nothing to it, so its cell (or its seed) is missing, never
a zero. Every setting that varies across the jobs' overrides labels the rows (or is the
column); jobs of one cell that still differ in a setting, or repeat a seed with another
result, make the report refuse (vaa.report.cells): no job is dropped or merged silently. The average column averages each seed's row over all columns, for the seeds that
have every column, then takes mean ± std over those seeds.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from vaa.report.cells import assign_cells
from vaa.report.collect import Job, varying_settings

METHOD_ORDER = ("sft", "vaa", "vaccine", "repnoise", "repnoise_vaa", "repnoise_vaa_qwen", "booster",
                "booster_vaa", "gdro")
TASK_ORDER = ("sst2", "agnews", "gsm8k", "alpacaeval")
DISPLAY = {"sft": "SFT", "vaa": "VAA", "vaccine": "Vaccine", "repnoise": "RepNoise",
           "booster": "Booster", "repnoise_vaa": "RepNoise (VAA setting)",
           "repnoise_vaa_qwen": "RepNoise (VAA setting, Qwen)",
           "booster_vaa": "Booster (VAA setting)", "gdro": "GDRO", "lisa": "Lisa", "ema": "EMA",
           "lookahead": "LookAhead", "sst2": "SST2", "agnews": "AG News", "gsm8k": "GSM8K",
           "alpacaeval": "AlpacaEval"}
AVG = "avg"


@dataclass
class Stat:
    mean: float
    std: float | None  # None for one value
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Stat | None:
        if not values:
            return None
        std = statistics.stdev(values) if len(values) > 1 else None
        return cls(statistics.fmean(values), std, len(values))


@dataclass
class Table:
    column_key: str  # "task" or the swept setting the columns are
    rows: list[str]
    columns: list[str]  # without the average
    hs: dict[tuple[str, str], Stat | None] = field(default_factory=dict)  # (row, col|AVG)
    fa: dict[tuple[str, str], Stat | None] = field(default_factory=dict)
    # row → stage → HS: each seed's mean over the columns, then mean ± std over seeds
    before_after: dict[str, dict[str, Stat | None]] = field(default_factory=dict)
    n_seeds: int = 0  # the most seeds any cell has
    jobs: list[Job] = field(default_factory=list)
    row_keys: list[str] = field(default_factory=list)  # settings folded into row labels
    row_info: dict[str, dict] = field(default_factory=dict)  # row → method, ft_defense, restore
    duplicates: list[list[Job]] = field(default_factory=list)  # reruns with identical results


def row_label(job: Job, settings: list[str]) -> str:
    label = job.method or "?"
    if job.ft_defense not in (None, "none"):
        label += f"+{job.ft_defense}"
    if job.restore not in (None, "none"):
        label += f"+{job.restore}"
    names = short_names(settings)
    return label + "".join(f" {names[k]}={job.setting(k)}" for k in settings)


def short_names(keys: list[str]) -> dict[str, str]:
    """Each key's shortest dotted suffix that no other key in ``keys`` shares: ``align.lr``
    and ``attack.lr`` stay apart (both would read ``lr=``), a lone ``trainer.precision`` reads
    ``precision``."""
    out = {}
    for k in keys:
        parts = k.split(".")
        for n in range(1, len(parts) + 1):
            tail = ".".join(parts[-n:])
            if not any(o != k and (o == tail or o.endswith("." + tail)) for o in keys):
                break
        out[k] = tail
    return out


def column_label(job: Job, column_key: str) -> str:
    value = job.setting(column_key)
    return str(value) if column_key == "task" else f"{column_key.rsplit('.', 1)[-1]}={value}"


def _order(values, canonical=()) -> list[str]:
    def key(v: str):
        head = v.split(" ", 1)[0].split("+", 1)[0]
        tail = v.split("=", 1)[-1] if "=" in v else v
        try:
            num = float(tail)
        except ValueError:
            num = math.inf
        return (canonical.index(head) if head in canonical else len(canonical), head, num, v)
    return sorted(values, key=key)


def choose_columns(jobs: list[Job], columns: str | None) -> str:
    """``task`` unless asked otherwise, or unless the sweep's finished jobs have one task and
    vary exactly one other setting (a harmful-ratio or epoch sweep): then that setting."""
    if columns:
        return columns
    finished = [j for j in jobs if j.ok]
    settings = varying_settings(finished)
    tasks = {j.task for j in finished}
    return settings[0] if len(tasks) == 1 and len(settings) == 1 else "task"


def _num(x) -> float | None:
    """A score, or None for a missing / non-numeric one (never averaged as a zero)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return float(x)


def _mean_over_seeds(groups, value) -> Stat | None:
    """Each seed's mean of ``value`` over its jobs (the seed is skipped when one is missing),
    then mean ± std over the seeds."""
    means = []
    for jobs in groups:
        values = [value(j) for j in jobs]
        if values and None not in values:
            means.append(statistics.fmean(values))
    return Stat.of(means)


def build_table(jobs: list[Job], columns: str | None = None, labels: tuple[str, ...] = ()) -> Table:
    """The table of ``jobs``; ``labels``: config keys to add to the row labels (beside the
    overrides that vary). Raises ``vaa.report.cells.ReportError`` when a cell would mix
    jobs of different settings or a seed's reruns disagree. The labels come from the finished
    jobs (those with cells); a failed, interrupted or unfinished job only marks its cell missing."""
    finished = [j for j in jobs if j.ok]
    column_key = choose_columns(jobs, columns)
    settings = [k for k in varying_settings(finished) if k != column_key]
    settings += [k for k in labels if k not in settings and k != column_key]
    if column_key != "task" and len({j.task for j in finished}) > 1 and "task" not in settings:
        settings.append("task")  # never average over tasks silently
    found = assign_cells(jobs, lambda j: row_label(j, settings), lambda j: column_label(j, column_key))
    cells = found.by_cell  # (row, col) → seed → job
    rows = {row_label(j, settings) for j in jobs}
    cols = {column_label(j, column_key) for j in jobs}
    t = Table(column_key=column_key, rows=_order(rows, METHOD_ORDER),
              columns=_order(cols, TASK_ORDER), jobs=jobs, row_keys=settings,
              row_info={row_label(j, settings): {"method": j.method, "ft_defense": j.ft_defense,
                                                 "restore": j.restore} for j in jobs},
              duplicates=found.duplicates)
    for r in t.rows:
        by_seed: dict = {}  # seed → this row's finished jobs of that seed (one per column)
        for c in t.columns:
            seeds = cells.get((r, c), {})
            t.n_seeds = max(t.n_seeds, len(seeds))
            for d, key in ((t.hs, "harmful_score"), (t.fa, "finetune_accuracy")):
                d[r, c] = Stat.of([v for j in seeds.values() if (v := _num(j.metrics.get(key))) is not None])
            for s, j in seeds.items():
                by_seed.setdefault(s, []).append(j)
        complete = [js for js in by_seed.values() if len(js) == len(t.columns)]
        for d, key in ((t.hs, "harmful_score"), (t.fa, "finetune_accuracy")):
            d[r, AVG] = _mean_over_seeds(complete, lambda j, key=key: _num(j.metrics.get(key)))
        t.before_after[r] = {stage: _mean_over_seeds(by_seed.values(), lambda j, stage=stage: _num(
            ((j.metrics.get("stages") or {}).get(stage) or {}).get("harmful_score")))
            for stage in ("aligned", "finetuned", "restored")}
    return t


def cache_summary(jobs: list[Job]) -> dict:
    """How often each training stage was built vs served by the stage cache across the sweep
    (``stages.<name>.cached`` of each finished job; VAA's SFT stage 1 when recorded), and
    how many distinct artifacts (cache keys) the jobs needed."""
    out = {}
    for stage in ("base", "aligned", "finetuned"):
        built = hits = 0
        keys = set()
        for j in jobs:
            m = ((j.metrics or {}).get("stages") or {}).get(stage) if j.ok else None
            if not m:
                continue
            keys.add(m.get("cache_key"))
            built += not m.get("cached", False)
            hits += bool(m.get("cached", False))
        out[stage] = {"built": built, "cache_hits": hits, "distinct": len(keys)}
    # alignment trainings also include VAA's stage-1 SFT model (same artifact as method=sft's)
    extra_built = extra_hits = 0
    align_keys = {((j.metrics.get("stages") or {}).get("aligned") or {}).get("cache_key") for j in jobs if j.ok}
    for j in jobs:
        if not j.ok:
            continue
        key = (j.metrics.get("cache_keys") or {}).get("sft_aligned")
        cached = (j.metrics.get("cached") or {}).get("sft_aligned")
        if key is None or cached is None:
            continue
        align_keys.add(key)
        extra_built += not cached
        extra_hits += bool(cached)
    align_keys.discard(None)
    out["alignment_trainings"] = {"built": out["aligned"]["built"] + extra_built,
                                  "cache_hits": out["aligned"]["cache_hits"] + extra_hits,
                                  "distinct": len(align_keys)}
    return out
