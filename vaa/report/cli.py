"""``vaa-report DIR [--out OUT] [--columns KEY]``: the paper's table from a sweep."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="vaa-report",
        description="Collect every metrics.json under DIR into the paper's table "
                    "(report.md, report.csv, report.tex, report.png).")
    p.add_argument("dir", help="a sweep directory (e.g. outputs/multirun/<date>/<time>) or any parent")
    p.add_argument("--out", default=None, help="where to write the report (default: DIR)")
    p.add_argument("--columns", default=None,
                   help="what the columns are: 'task' (default), or a swept setting such as "
                        "attack.harmful_ratio (chosen automatically when the sweep has one task "
                        "and varies one other setting)")
    p.add_argument("--label", action="append", default=[], metavar="KEY",
                   help="a config key to add to the row labels (repeatable), for jobs that differ "
                        "in a setting no override names; settings that vary across the jobs' "
                        "overrides label the rows by themselves")
    p.add_argument("--no-figures", action="store_true", help="skip report.png")
    p.add_argument("--wandb", action="store_true",
                   help="also log the table and figures as a W&B run in the sweep's group "
                        "(offline unless WANDB_API_KEY is set)")
    p.add_argument("--wandb-project", default="vaa", help="W&B project (default: vaa)")
    args = p.parse_args(argv)
    from vaa.report import ReportError, write_report

    try:
        result = write_report(args.dir, args.out, columns=args.columns, figures=not args.no_figures,
                              labels=tuple(args.label))
    except (FileNotFoundError, ReportError) as e:
        print(e, file=sys.stderr)
        return 2
    print(result["markdown"])
    if args.wandb:
        from vaa.tracking.wandb import log_report

        group = log_report(result["table"], result["paths"], Path(args.dir), project=args.wandb_project)
        print(f"logged the report to W&B (project {args.wandb_project}, group {group})")
    print("wrote " + ", ".join(str(x) for x in result["paths"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
