"""`vaa-report DIR`: every job under DIR (a sweep, or several) as the paper's table.

Rows are methods (alignment method, ``+<ft_defense>``, ``+<restore>``), columns tasks, each
cell HS and FA of the final model as mean ± std over seeds, plus an average column;
written as ``report.md``, ``report.csv``, ``report.tex``, ``report.png`` and
``report_hs_before_after.png`` (DESIGN.md, "Observable contracts"). Failed or unfinished
jobs leave their cells missing and are listed; the report itself never fails on them. Jobs
that differ in a setting are never merged: varying settings label the rows, and a cell whose
jobs still disagree (or repeat a seed with another result) makes the report refuse.
"""

from vaa.report.cells import ReportError
from vaa.report.collect import Job, collect
from vaa.report.table import Table, build_table, cache_summary

__all__ = ["Job", "ReportError", "Table", "build_table", "cache_summary", "collect", "write_report"]


def write_report(root, out_dir=None, columns: str | None = None, figures: bool = True,
                 labels: tuple[str, ...] = ()) -> dict:
    """Collect the jobs under ``root`` and write the report files into ``out_dir``
    (default: ``root``); ``labels``: config keys added to the row labels. Returns
    {"table", "paths", "markdown"}. Raises ``ReportError`` when jobs of one cell disagree."""
    from pathlib import Path

    from vaa.report.render import latex, report_markdown, write_csv

    root = Path(root)
    out = Path(out_dir) if out_dir is not None else root
    out.mkdir(parents=True, exist_ok=True)
    jobs = collect(root)
    if not jobs:
        raise FileNotFoundError(f"vaa-report: no jobs under {root} (no metrics.json, failed.json "
                                "or .hydra/config.yaml); give a sweep directory such as "
                                "outputs/multirun/<date>/<time>")
    table = build_table(jobs, columns, labels=tuple(labels))
    md = report_markdown(table, str(root))
    paths = [out / "report.md", out / "report.csv", out / "report.tex"]
    paths[0].write_text(md)
    write_csv(table, paths[1])
    paths[2].write_text(latex(table))
    if figures:
        from vaa.report.figures import write_figures

        paths += write_figures(table, out)
    return {"table": table, "paths": paths, "markdown": md}
