"""Results over finished runs: records (runs), the table with ties marked (table), side-by-side
comparison (compare), figures (plots) and reports (report). No torch anywhere here."""

from budgetlora.results.compare import compare_runs
from budgetlora.results.report import write_report
from budgetlora.results.runs import RunRecord, collect_runs, read_run
from budgetlora.results.table import build_table, display_table, markdown_table, mark_ties, write_results

__all__ = [
    "RunRecord",
    "build_table",
    "collect_runs",
    "compare_runs",
    "display_table",
    "mark_ties",
    "markdown_table",
    "read_run",
    "write_report",
    "write_results",
]
