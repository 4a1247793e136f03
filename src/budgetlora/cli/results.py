"""`results`, `compare`, `report`: tables, comparisons and reports over finished runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from budgetlora.errors import BudgetLoraError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "results",
        help="table of all runs under DIR with ties marked; writes DIR/results.csv and .md",
        description="Collect every run (folder with summary.json, up to 3 levels deep) under DIR.",
    )
    p.add_argument("dir", metavar="DIR", help="a sweep's --out folder or any folder of runs")
    p.add_argument("--sort", metavar="COL", default=None, help="column to sort by (default: test_acc)")
    p.add_argument("--ascending", action="store_true", help="sort ascending (default: descending)")
    p.add_argument("--overwrite", action="store_true", help="replace results.csv/.md that budgetlora did not write")
    p.set_defaults(func=cmd_results)

    p = sub.add_parser("compare", help="side-by-side cost/accuracy table and bar charts for two or more runs")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    p.add_argument("--out", metavar="DIR", default="compare", help="output folder (default: ./compare)")
    p.add_argument("--overwrite", action="store_true", help="replace compare.* files that budgetlora did not write")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("report", help="plots plus a self-contained report.html for a run or a folder of runs")
    p.add_argument("path", metavar="RUN_OR_DIR", help="a run directory or a folder of runs")
    p.add_argument("--overwrite", action="store_true", help="replace report files that budgetlora did not write")
    p.set_defaults(func=cmd_report)


def cmd_results(args: argparse.Namespace) -> int:
    from budgetlora.results.table import display_table, markdown_table, write_results

    root = Path(args.dir).expanduser()
    table = write_results(root, args.sort, descending=not args.ascending, overwrite=args.overwrite)
    print(markdown_table(display_table(table)), end="")
    print(f"\nwrote {root / 'results.csv'} and {root / 'results.md'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from budgetlora.results.compare import compare_markdown, compare_runs

    if len(args.runs) < 2:  # noqa: PLR2004 - a comparison of two runs at least
        raise BudgetLoraError("compare needs at least two run directories")
    out = Path(args.out).expanduser()
    table = compare_runs([Path(r).expanduser() for r in args.runs], out, overwrite=args.overwrite)
    print(compare_markdown(table, []), end="")
    print(f"\nwrote {out / 'compare.md'}, compare.csv and {len(table.attrs['charts'])} charts")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from budgetlora.results.report import write_report

    report = write_report(Path(args.path).expanduser(), overwrite=args.overwrite)
    print(f"wrote {report} and {report.with_name('report.md')}")
    return 0
