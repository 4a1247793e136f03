"""`budgetlora report`: PNGs plus a self-contained report.html and report.md for one run or a
folder of runs. Every plot is skipped (with a note in the report) when its data is missing."""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from budgetlora import atomic
from budgetlora.artifacts import run_dir as rd
from budgetlora.errors import BudgetLoraError
from budgetlora.results.plots import (
    accuracy_vs_params,
    confusion_heatmap,
    curve_plot,
    per_label_f1,
    predicted_vs_true,
    reliability_diagram,
    sweep_heatmap,
)
from budgetlora.results.runs import RunRecord, collect_runs
from budgetlora.results.wording import table_task, tie_note
from budgetlora.results.table import (
    RESULTS_FILES,
    accuracy_of,
    build_table,
    csv_safe_frame,
    display_table,
    markdown_table,
    results_markdown,
)


@dataclass
class Plots:
    """What the report shows: written images (title, path) and why others were skipped."""

    images: list[tuple[str, Path]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def add(self, title: str, path: Path | None, reason: str) -> None:
        if path is None:
            self.skipped.append(f"{title}: {reason}")
        else:
            self.images.append((title, path))


def _curves(runs: Sequence[RunRecord], out: Path, plots: Plots) -> None:
    plots.add(
        "loss",
        curve_plot(runs, ["train_loss", "eval_loss"], "loss", "loss", out / "loss.png"),
        "no loss in metrics.jsonl",
    )
    plots.add(
        "accuracy",
        curve_plot(runs, ["train_acc", "eval_acc"], "accuracy", "accuracy", out / "accuracy.png"),
        "no accuracy in metrics.jsonl",
    )
    plots.add(
        "learning rate", curve_plot(runs, ["lr"], "learning rate", "lr", out / "lr.png"), "no lr in metrics.jsonl"
    )


def _best_run(runs: Sequence[RunRecord]) -> RunRecord | None:
    scored = [(acc.accuracy, i, run) for i, run in enumerate(runs) if (acc := accuracy_of(run.test))]
    # Highest accuracy; on equal accuracy the first run, as in the results table's "best".
    return max(scored, key=lambda t: (t[0], -t[1]))[2] if scored else None


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 1200px; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; }
td:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin-bottom: 1em; }
.note { color: #555; font-size: 0.9em; }
"""


def _verdict_html(verdict: str) -> list[str]:
    """The verdict's few markdown lines (a heading, bullets with bold) as HTML."""
    out, items = [], []
    for line in verdict.splitlines():
        text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(line.strip()))
        if line.startswith("## "):
            out.append(f"<h2>{text[3:]}</h2>")
        elif line.startswith("- "):
            items.append(f"<li>{text[2:]}</li>")
        elif text:
            out += ["<ul>", *items, "</ul>"] if items else []
            items = []
            out.append(f'<p class="note">{text}</p>')
    return out + (["<ul>", *items, "</ul>"] if items else [])


def render_html(title: str, subtitle: str, table: pd.DataFrame, plots: Plots, verdict: str = "") -> str:
    shown = display_table(table)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="note">{html.escape(subtitle)}</p>',
        "<h2>Results</h2>",
        shown.to_html(index=False, escape=True, border=0, na_rep=""),
        f'<p class="note">{html.escape(tie_note(table_task(table)))}</p>',
        *_verdict_html(verdict),
        "<h2>Plots</h2>",
    ]
    for name, path in plots.images:
        parts.append(f"<h3>{html.escape(name)}</h3>")
        parts.append(f'<img alt="{html.escape(name)}" src="{_data_uri(path)}">')
    if plots.skipped:
        parts.append('<h2>Skipped</h2><ul class="note">')
        parts.extend(f"<li>{html.escape(s)}</li>" for s in plots.skipped)
        parts.append("</ul>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def render_markdown(title: str, subtitle: str, table: pd.DataFrame, plots: Plots, out: Path, verdict: str = "") -> str:
    lines = [
        f"# {title}",
        "",
        subtitle,
        "",
        "## Results",
        "",
        markdown_table(display_table(table)),
        tie_note(table_task(table)),
        "",
        verdict,
        "## Plots",
        "",
    ]
    for name, path in plots.images:
        lines += [f"### {name}", "", f"![{name}]({path.relative_to(out).as_posix()})", ""]
    if plots.skipped:
        lines += ["## Skipped", ""] + [f"- {s}" for s in plots.skipped] + [""]
    return "\n".join(lines)


def _task_plots(run: RunRecord, out: Path, plots: Plots, of: str = "") -> None:
    """What fits the run's task: calibration (single-label), per-label F1 (multi-label), predicted
    vs true (regression); the others are skipped without a note."""
    task = run.summary.task if run.summary is not None else "single_label"
    if task == "single_label":
        plots.add(
            f"reliability{of}",
            reliability_diagram(run, out / "reliability.png"),
            "no reliability bins in summary.json (a run without a validation split, or from before they were saved)",
        )
    elif task == "multi_label":
        plots.add(f"per-label F1{of}", per_label_f1(run, out / "per_label_f1.png"), "no test per-label metrics")
    else:
        plots.add(
            f"predicted vs true{of}",
            predicted_vs_true(run, out / "predicted_vs_true.png"),
            "no test_predictions.csv with values",
        )


def _single_run_plots(run: RunRecord, out: Path) -> Plots:
    plots = Plots()
    _curves([run], out, plots)
    if run.summary is None or run.summary.task == "single_label":
        plots.add(
            "confusion matrix",
            confusion_heatmap(run, out / "confusion_matrix.png"),
            "no test confusion matrix in summary.json",
        )
    _task_plots(run, out, plots)
    return plots


def _folder_plots(runs: Sequence[RunRecord], out: Path) -> Plots:
    plots = Plots()
    _curves(runs, out, plots)
    plots.add(
        "accuracy vs trainable parameters",
        accuracy_vs_params(runs, out / "accuracy_vs_params.png"),
        "no run has both trainable_params and a test or val accuracy",
    )
    best = _best_run(runs)
    cm_path = confusion_heatmap(best, out / "confusion_matrix.png") if best else None
    plots.add(
        f"confusion matrix of the best run ({best.label if best else '-'})",
        cm_path,
        "no run has a test confusion matrix",
    )
    plots.add("sweep heatmap", sweep_heatmap(runs, out / "sweep_heatmap.png"), "no two varying config keys form a grid")
    if best is not None:
        _task_plots(best, out, plots, f" of the best run ({best.label})")
    return plots


REPORT_FILES = (
    "report.md",
    "report.html",
    "loss.png",
    "accuracy.png",
    "lr.png",
    "confusion_matrix.png",
    "accuracy_vs_params.png",
    "sweep_heatmap.png",
    "reliability.png",
    "per_label_f1.png",
    "predicted_vs_true.png",
)


def write_report(path: str | Path, verdict: str = "", overwrite: bool = False) -> Path:
    """Write PNGs, report.html (self-contained) and report.md into a run dir or a folder of runs,
    with a sweep's verdict when given. Returns the path of report.html. A folder also gets
    results.csv/results.md (the same table)."""
    out = Path(path)
    if not out.is_dir():
        raise BudgetLoraError(f"directory not found: {out}")
    folder = atomic.OutputFolder(out, overwrite)
    folder.claim(REPORT_FILES + (() if rd.is_finished(out) else RESULTS_FILES))
    runs = collect_runs(out)
    table = build_table(runs)
    if rd.is_finished(out):
        title = f"budgetlora report: {(runs[0].summary.name if runs[0].summary else '') or out.name}"
        subtitle = f"run directory {out}"
        plots = _single_run_plots(runs[0], out)
    else:
        title = f"budgetlora report: {out.name}"
        subtitle = f"{len(runs)} runs under {out}"
        plots = _folder_plots(runs, out)
        folder.write_text("results.csv", csv_safe_frame(table).to_csv(index=False))
        folder.write_text("results.md", results_markdown(table, out, verdict))
    folder.write_text("report.md", render_markdown(title, subtitle, table, plots, out, verdict))
    return folder.write_text("report.html", render_html(title, subtitle, table, plots, verdict))
