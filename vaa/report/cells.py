"""Put each finished job into its table cell, and refuse when a cell would mix jobs that
are not replicates of one configuration (issue 12, item 7).

A cell's jobs must differ only in ``seed`` (and in where and how they ran: ``hydra``,
``paths``, ``logger`` and the trainer's logging / progress / checkpoint cadence). Settings
that vary across the sweep's overrides are already part of the row labels
(``vaa.report.table``); here every job of a cell is compared with the cell's first job on its
whole saved config (``.hydra/config.yaml``), so a difference no override names (an edited
default, a preset that sets values) is found too. Two finished jobs of one cell and one seed
are a duplicate: identical results are counted once and listed in the report; different
results make the report refuse. Nothing is ever dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import OmegaConf

from vaa.report.collect import IGNORED_PREFIXES, Job

# Config keys that may differ between the replicates of one cell: the replicate's seed, and
# where / how a job ran or logged (the overrides vaa.report.collect ignores: none of them
# changes an artifact).
REPLICATE_KEYS = ("seed",)
RUN_ONLY_PREFIXES = IGNORED_PREFIXES
MAX_LISTED = 8  # disagreements listed in an error; the count says how many more


class ReportError(ValueError):
    """The jobs cannot be one table without mixing or dropping some; the message says which
    jobs disagree on what, and how to report them."""


@dataclass
class Cells:
    by_cell: dict[tuple[str, str], dict] = field(default_factory=dict)  # (row, col) → seed → job
    duplicates: list[list[Job]] = field(default_factory=list)  # same cell and seed, same results


def _flat(node, prefix: str = "") -> dict[str, str]:
    if isinstance(node, dict):
        out: dict[str, str] = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: "{}"}
    return {prefix[:-1]: repr(node)}


def flat_config(job: Job) -> dict[str, str] | None:
    """The job's saved config as dotted key → value text (interpolations unresolved, so a
    ``${seed}`` is the same text in every replicate); None without a readable config."""
    if job.cfg is None:
        return None
    try:
        return {k: v for k, v in _flat(OmegaConf.to_container(job.cfg, resolve=False)).items()
                if k not in REPLICATE_KEYS and not _run_only(k)}
    except Exception:  # noqa: BLE001 - an odd config is compared on its overrides only
        return None


def _run_only(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in RUN_ONLY_PREFIXES)


def config_diff(a: Job, b: Job) -> list[str]:
    """Keys whose values differ between two jobs' configs, as ``key: A vs B``. A key only one
    of them has is no disagreement: the config schema grew between the runs (a cached rerun
    after a new option landed), and the key says nothing of the older run's value."""
    fa, fb = flat_config(a), flat_config(b)
    if fa is None or fb is None:
        return []
    return [f"{k}: {fa[k]} vs {fb[k]}" for k in sorted(set(fa) & set(fb)) if fa[k] != fb[k]]


def results(job: Job) -> tuple:
    """What a job measured: final HS / FA and each stage's, to tell a rerun from a new result."""
    m = job.metrics or {}
    stages = m.get("stages") or {}
    return (m.get("harmful_score"), m.get("finetune_accuracy"),
            tuple((s, (v or {}).get("harmful_score"), (v or {}).get("finetune_accuracy"))
                  for s, v in sorted(stages.items())))


def _cell_name(cell: tuple[str, str], seed=None) -> str:
    return f"row '{cell[0]}', column '{cell[1]}'" + ("" if seed is None else f", seed {seed}")


def assign_cells(jobs: list[Job], row_of, col_of) -> Cells:
    """Finished jobs by (row, column) and seed; raises ReportError naming every cell whose
    jobs disagree on a setting or repeat a seed with different results."""
    out = Cells()
    members: dict[tuple[str, str], list[Job]] = {}
    for job in jobs:
        if job.ok:
            members.setdefault((row_of(job), col_of(job)), []).append(job)
    problems: list[str] = []
    for cell, js in members.items():
        first = js[0]
        for other in js[1:]:
            diff = config_diff(first, other)
            if diff:
                shown = "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
                problems.append(f"{_cell_name(cell)}: `{first.dir}` and `{other.dir}` differ in "
                                f"{shown}")
        seeds: dict = {}
        for job in js:
            seeds.setdefault(job.seed, []).append(job)
        out.by_cell[cell] = {}
        for seed, same in seeds.items():
            out.by_cell[cell][seed] = same[0]
            if len(same) > 1:
                if len({results(j) for j in same}) == 1:
                    out.duplicates.append(same)
                else:
                    shown = ", ".join(f"`{j.dir}` (HS {j.metrics.get('harmful_score')}, FA "
                                      f"{j.metrics.get('finetune_accuracy')})" for j in same)
                    problems.append(f"{_cell_name(cell, seed)}: {len(same)} finished jobs with "
                                    f"different results: {shown}")
    if problems:
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise ReportError(
            "vaa-report: refusing to build the table: some cells hold jobs that are not replicates "
            "of one configuration (only the seed may differ)\n  " + "\n  ".join(problems[:MAX_LISTED])
            + more + "\nFix: report each sweep on its own (vaa-report <sweep dir>), move the "
            "unwanted jobs away, or make a differing setting part of the row labels with "
            "--label KEY (e.g. --label align.lr).")
    return out
