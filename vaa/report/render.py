"""Write a :class:`~vaa.report.table.Table` as Markdown, CSV and LaTeX (booktabs)."""

from __future__ import annotations

import csv
from pathlib import Path

from vaa.report.table import AVG, DISPLAY, Stat, Table, cache_summary

MISSING_MD, MISSING_TEX = "—", "--"


def display(label: str) -> str:
    """``sft+lisa p=0.1`` → ``SFT+Lisa p=0.1``: known names in the paper's spelling."""
    head, _, rest = label.partition(" ")
    head = "+".join(DISPLAY.get(p, p) for p in head.split("+"))
    return f"{head} {rest}".strip()


def fmt(s: Stat | None, n_seeds: int, missing: str = MISSING_MD, pm: str = " ± ") -> str:
    if s is None:
        return missing
    text = f"{s.mean:.1f}" if s.std is None else f"{s.mean:.1f}{pm}{s.std:.1f}"
    return text + (f" (n={s.n})" if s.n < n_seeds else "")


def columns_with_avg(t: Table) -> list[tuple[str, str]]:
    """(key, header) per column, the average last."""
    return [(c, display(c)) for c in t.columns] + [(AVG, "avg")]


def markdown(t: Table) -> str:
    cols = columns_with_avg(t)
    head = ["method"] + [f"{h} {m}" for _, h in cols for m in ("HS", "FA")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in t.rows:
        cells = [display(r)] + [fmt(d[r, c], t.n_seeds) for c, _ in cols for d in (t.hs, t.fa)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def before_after_markdown(t: Table) -> str:
    stages = ["aligned", "finetuned"] + (["restored"] if any(v["restored"] for v in t.before_after.values()) else [])
    names = {"aligned": "HS before HFT (aligned)", "finetuned": "HS after HFT", "restored": "HS after repair"}
    lines = ["| method | " + " | ".join(names[s] for s in stages) + " |", "|---|" + "---|" * len(stages)]
    for r in t.rows:
        lines.append(f"| {display(r)} | " + " | ".join(fmt(t.before_after[r][s], 0) for s in stages) + " |")
    return "\n".join(lines)


def status_markdown(t: Table) -> str:
    jobs = t.jobs
    ok = sum(j.ok for j in jobs)
    dup = sum(len(d) - 1 for d in t.duplicates)
    counts = {word: sum(j.status == status for j in jobs) for status, word in
              (("failed", "failed"), ("interrupted", "interrupted"), ("incomplete", "unfinished"))}
    kinds = ", ".join(f"{n} {word}" for word, n in counts.items() if n)
    lines = [f"Jobs: {len(jobs)} found, {ok} finished, {len(jobs) - ok} failed or unfinished "
             + (f"({kinds}; " if kinds else "(")
             + "their cells are missing: —); "
             f"{ok - dup} finished jobs in the table" + (f", {dup} counted once as reruns" if dup else "")
             + "."]
    if t.row_keys:
        lines.append("Settings that vary across the jobs label the rows: "
                     + ", ".join(f"`{k}`" for k in t.row_keys) + ".")
    for d in t.duplicates:
        lines.append("- rerun with identical results, counted once: " + ", ".join(f"`{j.dir}`" for j in d)
                     + f" (method={d[0].method} task={d[0].task} seed={d[0].seed})")
    for j in jobs:
        if not j.ok:
            lines.append(f"- `{j.dir}` ({j.status}): method={j.method} task={j.task} seed={j.seed}: {j.error}")
    cs = cache_summary(jobs)
    a = cs["alignment_trainings"]
    lines.append(f"\nStage cache: alignment trained {a['built']}× for {a['distinct']} distinct alignment "
                 f"configs, {a['cache_hits']} cache hits; base models trained {cs['base']['built']}× "
                 f"({cs['base']['cache_hits']} hits); fine-tuning runs {cs['finetuned']['built']} "
                 f"({cs['finetuned']['cache_hits']} hits).")
    return "\n".join(lines)


def report_markdown(t: Table, source: str) -> str:
    what = "tasks" if t.column_key == "task" else f"`{t.column_key}`"
    return "\n\n".join([
        f"# vaa report: {source}",
        f"Rows: alignment method (+ fine-tuning defense, + repair); columns: {what}. "
        "HS = harmful score, FA = fine-tune accuracy, in %, of the final model; "
        f"mean ± std over seeds (up to {t.n_seeds}; (n=k) marks a cell with fewer).",
        markdown(t), "## Harmful score before / after the attack (mean over columns and seeds)",
        before_after_markdown(t), "## Jobs", status_markdown(t)]) + "\n"


def flat_rows(t: Table, missing="") -> tuple[list[str], list[list]]:
    """The table as a header and one flat row per method (CSV, the W&B table)."""
    cols = [c for c, _ in columns_with_avg(t)]
    header = ["row", "method", "ft_defense", "restore"]
    for c in cols:
        header += [f"{c}_hs_mean", f"{c}_hs_std", f"{c}_fa_mean", f"{c}_fa_std", f"{c}_n"]
    rows = []
    for r in t.rows:
        info = t.row_info[r]
        row = [r, info["method"], info["ft_defense"], info["restore"]]
        for c in cols:
            for d in (t.hs, t.fa):
                s = d[r, c]
                row += [missing if s is None else round(s.mean, 4),
                        missing if s is None or s.std is None else round(s.std, 4)]
            row.append(0 if t.hs[r, c] is None else t.hs[r, c].n)
        rows.append(row)
    return header, rows


def write_csv(t: Table, path: Path) -> None:
    header, rows = flat_rows(t)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _tex(text: str) -> str:
    return text.replace("\\", "\\textbackslash{}").replace("_", "\\_").replace("&", "\\&").replace("%", "\\%")


def latex(t: Table) -> str:
    cols = columns_with_avg(t)
    spec = "l" + " cc" * len(cols)
    groups = " & ".join(f"\\multicolumn{{2}}{{c}}{{{_tex(h if c != AVG else 'Average')}}}" for c, h in cols)
    rules = " ".join(f"\\cmidrule(lr){{{2 + 2 * i}-{3 + 2 * i}}}" for i in range(len(cols)))
    lines = [f"\\begin{{tabular}}{{{spec}}}", "\\toprule", f" & {groups} \\\\", rules,
             "Method & " + " & ".join("HS$\\downarrow$ & FA$\\uparrow$" for _ in cols) + " \\\\", "\\midrule"]
    for r in t.rows:
        cells = []
        for c, _ in cols:
            for d in (t.hs, t.fa):
                s = d[r, c]
                cells.append(MISSING_TEX if s is None else
                             f"{s.mean:.1f}" if s.std is None else f"${s.mean:.1f}_{{\\pm {s.std:.1f}}}$")
        lines.append(f"{_tex(display(r))} & " + " & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"
