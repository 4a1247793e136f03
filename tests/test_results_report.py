"""results/report on fake run directories shaped like docs/run-directory.md (no training)."""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from budgetlora.artifacts import run_dir as rd
from budgetlora.artifacts.summary import RunSummary
from budgetlora.evaluate.stats import wilson_interval
from budgetlora.config import config_from_dict
from budgetlora.errors import BudgetLoraError
from budgetlora.results import build_table, collect_runs, compare_runs, read_run, write_report, write_results
from budgetlora.results.plots import sweep_grid

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N_TEST = 1000
LABELS = ["World", "Sports", "Business", "Sci/Tech"]
QV = ["q", "v"]
QKV = ["q", "k", "v"]


def write_fake_run(
    path: Path,
    *,
    r: int,
    targets: list[str],
    seed: int,
    correct: np.ndarray | None,
    predictions: bool = True,
    params: int | None = None,
    truncated_metrics: bool = False,
    val_correct: np.ndarray | None = None,
) -> Path:
    """A finished run written through the run directory's own writers (artifacts.run_dir):
    config.yaml, metrics.jsonl, summary.json and (optionally) test_predictions.csv.

    Validation: 500 rows at 0.8 + r/1000 without per-row outcomes, or, given `val_correct`, those
    per-row outcomes (with val_predictions.csv when `predictions`)."""
    path.mkdir(parents=True)
    rd.write_config(
        config_from_dict(
            {
                "name": path.name.lstrip("."),
                "model": "minilm",
                "data": {"train_file": "/abs/data/train.csv", "test_file": "/abs/data/test.csv", "max_length": 128},
                "lora": {"r": r, "alpha": 2 * r, "targets": targets},
                "train": {"lr": 5e-4, "seed": seed, "max_steps": 100},
            }
        ),
        path,
    )
    lines = []
    for step in range(10, 101, 10):
        lines.append(
            {
                "step": step,
                "train_loss": 1.4 / step**0.3,
                "train_acc": 0.5 + step / 250,
                "lr": 5e-4 * (1 - step / 100),
                "samples_per_s": 30.0,
                "epoch": step / 50,
            }
        )
        if step % 50 == 0:
            lines.append({"step": step, "eval_loss": 1.3 / step**0.3, "eval_acc": 0.55 + step / 250})
    text = "".join(json.dumps(line) + "\n" for line in lines)
    if truncated_metrics:
        text += '{"step": 110, "train_lo'  # a run killed mid-write
    (path / "metrics.jsonl").write_text(text)

    labels = np.arange(N_TEST) % 4
    summary: dict[str, Any] = {
        "name": path.name,
        "mode": "lora",
        "model": "minilm",
        "trainable_params": params if params is not None else r * 4000 * len(targets) + 1540,
        "total_params": 22_713_988,
        "budget": 1_000_000,
        "best_step": 100,
        "best_val_acc": 0.8 + r / 1000,
        "steps": 100,
        "val": _split(int(500 * (0.8 + r / 1000)), 500),
        "final_train_loss": 0.25 + r / 100,
        "final_eval_loss": 0.3 + r / 100,
        "train_time_s": 600.0 + r,
        "wall_time_s": 700.0 + r,
        "samples_per_s": 32.0 - r / 8,
        "peak_memory_mb": 1000.0 + 10 * r,
        "device": "cpu",
        "precision": "fp32",
        "label_names": LABELS,
    }
    if val_correct is not None:
        val_labels = np.arange(len(val_correct)) % 4
        val_preds = np.where(val_correct, val_labels, (val_labels + 1) % 4)
        summary["val"] = _split(int(val_correct.sum()), len(val_correct))
        if predictions:
            ids = [f"v{i:04d}" for i in range(len(val_correct))]
            rd.write_test_predictions(path, ids, val_labels, val_preds, rd.VAL_PREDICTIONS)
    if correct is not None:
        preds = np.where(correct, labels, (labels + 1) % 4)
        cm = np.zeros((4, 4), dtype=int)
        np.add.at(cm, (labels, preds), 1)
        k = int(correct.sum())
        summary["test"] = {**_split(k, N_TEST), "loss": 0.3, "confusion_matrix": cm.tolist()}
        if predictions:
            rd.write_test_predictions(path, [f"{i:04d}" for i in range(N_TEST)], labels, preds)
    rd.write_summary(path, RunSummary.from_json(summary, str(path)))
    return path


def _split(correct: int, n: int) -> dict[str, Any]:
    low, high = wilson_interval(correct, n)
    return {
        "accuracy": correct / n,
        "n": n,
        "correct": correct,
        "ci_low": low,
        "ci_high": high,
        "macro_f1": correct / n,
    }


def nested(k: int) -> np.ndarray:
    out = np.zeros(N_TEST, dtype=bool)
    out[:k] = True
    return out


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """Five runs forming a lora.r × lora.targets grid, with a seed repeat; each run's validation
    rows have the same outcomes as its test rows, so the choosing split orders them as below.

    a  r16 QV  s1  910 correct                       best
    b  r8  QV  s1  905, 5 vs 10 discordant with a    tie (McNemar p≈0.30)
    c  r8  QV  s2  895, nested inside a              not a tie (McNemar p<0.001, though z-test would tie)
    d  r8  QKV s1  800                               not a tie
    e  r16 QKV s1  905, no test_predictions.csv      tie by the two-proportion test (p≈0.70)
    """
    root = tmp_path / "sweep"
    b = nested(900)
    b[910:915] = True
    write_fake_run(root / "a", r=16, targets=QV, seed=1, correct=nested(910), val_correct=nested(910))
    write_fake_run(root / "b", r=8, targets=QV, seed=1, correct=b, truncated_metrics=True, val_correct=b)
    write_fake_run(root / "c", r=8, targets=QV, seed=2, correct=nested(895), val_correct=nested(895))
    write_fake_run(root / "group" / "d", r=8, targets=QKV, seed=1, correct=nested(800), val_correct=nested(800))
    write_fake_run(
        root / "group" / "deeper" / "e",
        r=16,
        targets=QKV,
        seed=1,
        correct=nested(905),
        predictions=False,
        val_correct=nested(905),
    )
    # Neither of these may be collected: an unfinished run's temp dir and a run 4 levels down.
    write_fake_run(root / ".f.tmp-123", r=4, targets=QV, seed=1, correct=nested(999))
    write_fake_run(root / "x" / "y" / "z" / "g", r=4, targets=QV, seed=1, correct=nested(999))
    return root


def by_run(table: pd.DataFrame) -> dict[str, dict[str, Any]]:
    return {row["run"]: row for row in table.to_dict("records")}


# collect / table ---------------------------------------------------------------------------


def test_collect_finds_runs_up_to_three_levels_and_skips_hidden(sweep: Path) -> None:
    labels = [r.label for r in collect_runs(sweep)]
    assert labels == ["a", "b", "c", "group/d", "group/deeper/e"]


def test_collect_single_run_dir(sweep: Path) -> None:
    runs = collect_runs(sweep / "a")
    assert [r.label for r in runs] == ["a"]


def test_metrics_skip_truncated_line(sweep: Path) -> None:
    run = read_run(sweep / "b")
    assert len(run.metrics) == 12
    assert run.metrics[-1]["step"] == 100


def test_varying_columns_drop_constant_and_name(sweep: Path) -> None:
    table = build_table(collect_runs(sweep))
    assert table.attrs["varying"] == ["lora.r", "lora.alpha", "lora.targets", "train.seed"]
    assert "name" not in table.columns
    assert "train.lr" not in table.columns and "model.name" not in table.columns
    rows = by_run(table)
    assert rows["group/d"]["lora.targets"] == "q,k,v"
    assert rows["a"]["lora.r"] == 16


def test_tie_marking(sweep: Path) -> None:
    rows = by_run(build_table(collect_runs(sweep)))
    assert rows["a"]["mark"] == "best" and math.isnan(rows["a"]["p_vs_best"])
    assert rows["b"]["mark"] == "tie" and rows["b"]["p_test"] == "mcnemar"
    assert rows["b"]["p_vs_best"] == pytest.approx(0.3017578125)  # binomtest(5, 15)
    assert rows["c"]["mark"] == "" and rows["c"]["p_vs_best"] < 0.001
    assert rows["group/d"]["mark"] == "" and rows["group/d"]["p_vs_best"] < 1e-10
    assert rows["group/deeper/e"]["mark"] == "tie" and rows["group/deeper/e"]["p_test"] == "z-test"


def test_test_accuracy_with_ci_columns(sweep: Path) -> None:
    rows = by_run(build_table(collect_runs(sweep)))
    a = rows["a"]
    assert a["test_acc"] == pytest.approx(0.91)
    assert a["test_ci_low"] == pytest.approx(0.8907, abs=1e-4)
    assert a["test_ci_high"] == pytest.approx(0.9262, abs=1e-4)
    assert a["test"] == "91.00 ± 1.78"
    assert a["best_step"] == 100 and a["best_val_acc"] == pytest.approx(0.816)
    assert a["trainable_params"] == 16 * 4000 * 2 + 1540
    assert a["train_time_s"] == 616.0 and a["samples_per_s"] == 30.0


def test_seed_group_row(sweep: Path) -> None:
    table = build_table(collect_runs(sweep))
    means = table[table["kind"] == "mean"]
    assert len(means) == 1
    row = means.iloc[0]
    assert row["seeds"] == "1,2"
    assert row["run"] == "mean of b, c"
    assert row["lora.r"] == 8 and row["train.seed"] == ""
    assert row["test_acc"] == pytest.approx(0.900)
    assert row["test_acc_std"] == pytest.approx(math.sqrt(2) * 0.005)
    assert row["test"] == "90.00 ± 0.71"
    assert (table["kind"] == "run").sum() == 5


def test_sorting(sweep: Path) -> None:
    runs = collect_runs(sweep)
    desc = build_table(runs)
    assert list(desc["run"])[:2] == ["a", "b"]
    assert list(desc["test_acc"]) == sorted(desc["test_acc"], reverse=True)
    asc = build_table(runs, sort_by="trainable_params", descending=False)
    assert list(asc["trainable_params"]) == sorted(asc["trainable_params"])
    by_r = build_table(runs, sort_by="lora.r", descending=False)
    assert list(by_r["lora.r"])[:3] == [8, 8, 8]
    by_name = build_table(runs, sort_by="name", descending=False)  # alias for "run"
    assert by_name["run"].iloc[0] == "a"


def test_unknown_sort_column_lists_valid_ones(sweep: Path) -> None:
    with pytest.raises(BudgetLoraError, match=r"unknown sort column 'bogus'") as info:
        build_table(collect_runs(sweep), sort_by="bogus")
    message = str(info.value)
    for column in ["test_acc", "lora.r", "trainable_params", "samples_per_s", "test (= test_acc)"]:
        assert column in message


def test_write_results_files(sweep: Path) -> None:
    table = write_results(sweep, sort_by="test_acc")
    csv = pd.read_csv(sweep / "results.csv")
    assert list(csv["run"]) == list(table["run"])
    assert csv.loc[csv["run"] == "a", "mark"].item() == "best"
    md = (sweep / "results.md").read_text()
    assert "| run |" in md and "lora.targets" in md
    assert re.search(r"\| a \|.*91\.00 ± 1\.78 \| best \|", md)
    assert "mean of b, c" in md
    assert not list(sweep.glob(".results*.tmp"))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((sweep / "results.md").stat().st_mode) == 0o666 & ~umask


def test_user_errors(tmp_path: Path) -> None:
    with pytest.raises(BudgetLoraError, match="not found"):
        write_results(tmp_path / "missing")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(BudgetLoraError, match="no runs found"):
        write_results(tmp_path / "empty")
    with pytest.raises(BudgetLoraError, match="not a finished run"):
        compare_runs([tmp_path / "empty", tmp_path / "empty" / "sub"], tmp_path / "out")
    with pytest.raises(BudgetLoraError, match="is given twice"):
        compare_runs([tmp_path / "empty", tmp_path / "empty"], tmp_path / "out")


def test_corrupt_summary_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "summary.json").write_text("{not json")
    with pytest.raises(BudgetLoraError, match="summary.json"):
        collect_runs(tmp_path)


# compare ---------------------------------------------------------------------------------


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000, path
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50
    assert image.std() > 0.01  # not a blank canvas


def test_compare_runs(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    table = compare_runs([sweep / "a", sweep / "group" / "d", sweep / "group" / "deeper" / "e"], out)
    assert list(table["run"]) == ["a", "d", "e"]
    rows = by_run(table)
    assert rows["a"]["trainable_params"] == 129540 and rows["d"]["trainable_params"] == 97540
    assert rows["a"]["wall_time_s"] == 716.0 and rows["a"]["peak_memory_mb"] == 1160.0
    assert rows["d"]["final_eval_loss"] == pytest.approx(0.38)
    assert rows["a"]["mark"] == "best" and rows["d"]["mark"] == "" and rows["e"]["mark"] == "tie"
    assert rows["e"]["test"] == "90.50 ± 1.82"
    for name in [
        "compare_trainable_params",
        "compare_wall_time",
        "compare_samples_per_s",
        "compare_peak_memory",
        "compare_loss",
        "compare_test_acc",
    ]:
        assert_png(out / f"{name}.png")
    md = (out / "compare.md").read_text()
    assert "![compare_test_acc](compare_test_acc.png)" in md and "| d | 97,540 |" in md
    assert len(pd.read_csv(out / "compare.csv")) == 3


def test_compare_disambiguates_same_named_runs(tmp_path: Path) -> None:
    one = write_fake_run(tmp_path / "s1" / "r8", r=8, targets=QV, seed=1, correct=nested(900))
    two = write_fake_run(tmp_path / "s2" / "r8", r=8, targets=QV, seed=2, correct=nested(900))
    table = compare_runs([one, two], tmp_path / "out")
    assert list(table["run"]) == ["s1/r8", "s2/r8"]
    assert list(table["mark"]) == ["best", "tie"]


# report ----------------------------------------------------------------------------------


def embedded_pngs(html_text: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html_text)]


def test_report_for_folder(sweep: Path) -> None:
    report = write_report(sweep)
    assert report == sweep / "report.html"
    for name in ["loss", "accuracy", "lr", "accuracy_vs_params", "confusion_matrix", "sweep_heatmap"]:
        assert_png(sweep / f"{name}.png")
    html_text = report.read_text()
    images = embedded_pngs(html_text)
    assert len(images) == 6 and all(img.startswith(PNG_MAGIC) for img in images)
    assert "<table" in html_text and "mean of b, c" in html_text and "best" in html_text
    assert 'src="http' not in html_text and '.png"' not in html_text  # self-contained
    md = (sweep / "report.md").read_text()
    assert "![sweep heatmap](sweep_heatmap.png)" in md and "![loss](loss.png)" in md
    assert (sweep / "results.csv").is_file() and (sweep / "results.md").is_file()
    # Run directories are not written into when reporting on their folder.
    assert not (sweep / "a" / "loss.png").exists()


def test_sweep_grid_means_over_seeds(sweep: Path) -> None:
    grid = sweep_grid(collect_runs(sweep))
    assert grid is not None
    # lora.alpha = 2r only forms a diagonal with lora.r, so r × targets is the grid.
    assert (grid.row_key, grid.col_key) == ("lora.r", "lora.targets")
    assert grid.rows == [8, 16] and grid.cols == [QKV, QV]
    assert grid.metric == "test" and grid.averaged_over == []
    expected = np.array([[0.800, 0.900], [0.905, 0.910]])  # (8, QV) is the mean of seeds 1 and 2
    np.testing.assert_allclose(grid.values, expected)


def test_sweep_grid_falls_back_to_val_and_allows_holes(tmp_path: Path) -> None:
    for r, targets in [(4, QV), (8, QV), (4, QKV)]:  # (8, QKV) skipped: "over budget"
        write_fake_run(tmp_path / f"r{r}-{len(targets)}", r=r, targets=targets, seed=1, correct=None)
    grid = sweep_grid(collect_runs(tmp_path))
    assert grid is not None and grid.metric == "val"
    assert np.isnan(grid.values).sum() == 1
    report = write_report(tmp_path)
    assert_png(tmp_path / "sweep_heatmap.png")
    assert "confusion matrix" in report.read_text() and "no run has a test confusion matrix" in report.read_text()


def test_no_grid_when_one_key_varies(tmp_path: Path) -> None:
    for r in (4, 8):
        write_fake_run(tmp_path / f"r{r}", r=r, targets=QV, seed=1, correct=nested(900), params=1000 * r)
    assert sweep_grid(collect_runs(tmp_path)) is None


def test_report_for_single_run_without_test_set(tmp_path: Path) -> None:
    run = write_fake_run(tmp_path / "solo", r=8, targets=QV, seed=1, correct=None)
    report = write_report(run)
    assert report == run / "report.html"
    for name in ["loss", "accuracy", "lr"]:
        assert_png(run / f"{name}.png")
    assert not (run / "confusion_matrix.png").exists()
    html_text = report.read_text()
    assert len(embedded_pngs(html_text)) == 3
    assert "no test confusion matrix" in html_text
    assert "no test confusion matrix" in (run / "report.md").read_text()


def test_report_for_single_run_with_confusion_matrix(sweep: Path) -> None:
    write_report(sweep / "a")
    assert_png(sweep / "a" / "confusion_matrix.png")
    assert len(embedded_pngs((sweep / "a" / "report.html").read_text())) == 4


def test_report_missing_dir_is_user_error(tmp_path: Path) -> None:
    with pytest.raises(BudgetLoraError, match="not found"):
        write_report(tmp_path / "nope")


# CLI registration ------------------------------------------------------------------------


def make_parser() -> argparse.ArgumentParser:
    from budgetlora.cli import build_parser

    return build_parser()


def test_cli_results_compare_report(sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = make_parser()
    args = parser.parse_args(["results", str(sweep), "--sort", "trainable_params", "--ascending"])
    assert args.func(args) == 0
    csv = pd.read_csv(sweep / "results.csv")
    assert list(csv["trainable_params"]) == sorted(csv["trainable_params"])
    assert "| run |" in capsys.readouterr().out

    args = parser.parse_args(["compare", str(sweep / "a"), str(sweep / "b"), "--out", str(tmp_path / "c")])
    assert args.func(args) == 0 and (tmp_path / "c" / "compare.md").is_file()

    args = parser.parse_args(["report", str(sweep / "a")])
    assert args.func(args) == 0 and (sweep / "a" / "report.html").is_file()


def test_cli_errors_are_budgetlora_errors(sweep: Path) -> None:
    parser = make_parser()
    args = parser.parse_args(["results", str(sweep), "--sort", "nope"])
    with pytest.raises(BudgetLoraError, match="valid columns"):
        args.func(args)
    args = parser.parse_args(["compare", str(sweep / "a")])
    with pytest.raises(BudgetLoraError, match="at least two"):
        args.func(args)


# selection on validation ----------------------------------------------------------------------


def test_the_winner_is_chosen_on_validation_and_the_test_choice_is_reported_beside(tmp_path: Path) -> None:
    """Run a has the better validation accuracy (0.816 vs 0.804, from r), run b the better test
    accuracy (95.0% vs 90.0%): the mark, the verdict and best.yaml's source follow validation; the
    results say what choosing on test would have claimed; 500 validation rows cannot separate them."""
    from budgetlora.results.table import results_markdown
    from budgetlora.results.verdict import single_run_verdict

    root = tmp_path / "sweep"
    write_fake_run(root / "a", r=16, targets=QV, seed=1, correct=nested(900))
    write_fake_run(root / "b", r=4, targets=QV, seed=1, correct=nested(950))
    runs = collect_runs(root)
    table = build_table(runs)
    marks = dict(zip(table["run"], table["mark"], strict=True))
    assert marks["a"] == "best" and marks["b"] == "tie"
    assert list(table["run"][:2]) == ["a", "b"]  # sorted by the choosing split
    verdict = single_run_verdict(runs)
    assert verdict.winner.label == "a" and verdict.winner.test_accuracy == pytest.approx(0.90)
    assert "validation accuracy 81.60%" in verdict.markdown() and "test accuracy 90.00% (not used to choose)" in (
        verdict.markdown()
    )
    text = results_markdown(table, root)
    assert "chosen on validation: **a**, validation accuracy 81.60%, test 90.00%" in text
    assert "would have picked b and reported 95.00%: 5.00 points more" in text
    assert "too small to separate the top 2 runs" in text


def test_a_study_over_seeds_chooses_a_configuration_on_its_mean_validation(tmp_path: Path) -> None:
    """Seed 1 of configuration a has the best single validation score, but b is better on the mean
    over both seeds: the verdict and best.yaml name b, with its spread, not one lucky seed."""
    from budgetlora.sweeps.outputs import _verdict

    def outcomes(k: int) -> np.ndarray:
        out = np.zeros(500, dtype=bool)
        out[:k] = True
        return out

    for name, seed, k in (("a-seed1", 1, 470), ("a-seed2", 2, 400), ("b-seed1", 1, 450), ("b-seed2", 2, 445)):
        write_fake_run(tmp_path / name, r=4, targets=QV, seed=seed, correct=nested(900), val_correct=outcomes(k))
    verdict = _verdict(tmp_path, confirmed=False)
    assert verdict.winner.label == "b" and [r.label for r in verdict.winner.runs] == ["b-seed1", "b-seed2"]
    assert verdict.winner.accuracy == pytest.approx((450 + 445) / 1000)
    text = verdict.markdown()
    assert "**winner: b**" in text and "sd over 2 seeds" in text and "the study's seed runs" in text
