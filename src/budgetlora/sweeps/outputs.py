"""What a finished sweep leaves besides its runs: trials.json, skipped.json, pareto.json (two
objectives), results.csv/.md with the verdict, best.yaml, and optionally the report."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Optional

from budgetlora import atomic
from budgetlora.artifacts import run_dir as rd
from budgetlora.config import config_yaml
from budgetlora.errors import BudgetLoraError
from budgetlora.sweeps.spec import StudySpec
from budgetlora.sweeps.storage import open_optuna_study, open_storage
from budgetlora.sweeps.worker import SweepOptions

SKIPPED_FILE, TRIALS_FILE, PARETO_FILE, BEST_FILE, VERDICT_FILE = (
    "skipped.json",
    "trials.json",
    "pareto.json",
    "best.yaml",
    "verdict.md",
)
# every file a sweep writes into its folder besides runs and its storage (results.table.RESULTS_FILES too)
SWEEP_FILES = (SKIPPED_FILE, TRIALS_FILE, PARETO_FILE, BEST_FILE, VERDICT_FILE, "results.csv", "results.md")


def finite_values(values: Any) -> Optional[list[float]]:
    """A trial's objective values, or None when there are none or one is not a finite number (a
    tampered or damaged storage): such a trial ranks nowhere."""
    if not values or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        return None
    return [float(v) for v in values]


def trial_records(study: Any) -> list[dict[str, Any]]:
    return [
        {
            "number": t.number,
            "point": t.user_attrs["point"],
            "state": t.state.name,
            "values": finite_values(t.values),
            "params": t.params,
            **{k: v for k, v in t.user_attrs.items() if k != "point" and not k.startswith("rung:")},
        }
        for t in study.get_trials(deepcopy=False)
        if "point" in t.user_attrs
    ]


def pareto_front(study: Any, spec: StudySpec) -> list[dict[str, Any]]:
    """Optuna's non-dominated trials (accuracy up, trainable parameters down), by accuracy."""
    front = [
        {
            "point": t.user_attrs.get("point"),
            "run_dirs": t.user_attrs.get("run_dirs"),
            **dict(zip(spec.objectives, t.values, strict=False)),
            "test_acc": t.user_attrs.get("test_acc"),
        }
        for t in study.best_trials
        if finite_values(t.values) is not None
    ]
    return sorted(front, key=lambda r: -r.get("val_acc", 0.0))


def _retried(record: dict[str, Any], records: list[dict[str, Any]]) -> bool:
    return any(
        r["point"] == record["point"] and r["number"] > record["number"] and r["state"] == "COMPLETE" for r in records
    )


def best_config(run: Path, name: str) -> str:
    """The winner's config as `budgetlora train` takes it (every key, absolute data paths)."""
    cfg = rd.read_run_config(run)
    return f"# the winner of a budgetlora sweep: budgetlora train {BEST_FILE}\n" + config_yaml(
        dataclasses.replace(cfg, name=name)
    )


def _seed_groups(runs: list, prefix: str = "") -> dict[str, list]:
    """Configuration label -> its finished seed runs (labels `<point>-seed<N>` under `prefix`)."""
    groups: dict[str, list] = {}
    for run in runs:
        label = run.label[len(prefix) :] if run.label.startswith(prefix) else None
        if label is not None and "-seed" in label and run.pruned is None and (prefix or "/" not in label):
            groups.setdefault(label.rsplit("-seed", 1)[0], []).append(run)
    return groups


def _verdict(out: Path, confirmed: bool) -> Any:
    """The confirmation runs choose when there are some; else a study run over seeds chooses a
    configuration on its mean over them; else single runs."""
    from budgetlora.results.runs import collect_runs
    from budgetlora.results.verdict import confirmed_verdict, single_run_verdict

    runs = collect_runs(out)
    if confirmed:
        verdict = confirmed_verdict(_seed_groups(runs, "confirm/"))
        if verdict is not None:
            return verdict
    study_runs = [r for r in runs if not r.label.startswith("confirm/")]
    seeded = _seed_groups(study_runs)
    if any(len(members) > 1 for members in seeded.values()):
        verdict = confirmed_verdict(seeded, source="the study's seed runs")
        if verdict is not None:
            return verdict
    return single_run_verdict(study_runs)


def write_outputs(
    spec: StudySpec, opts: SweepOptions, skipped: list[dict[str, Any]], report: bool = False, confirmed: bool = False
) -> list[str]:
    """Write the sweep's files; returns the lines the command prints."""
    from budgetlora.results.table import display_table, markdown_table, write_results

    study = open_optuna_study(spec, open_storage(opts.storage_url, None), opts.study_name)
    records = trial_records(study)
    skipped = skipped + [
        {"name": r["point"], "axes": r.get("params", {}), "reason": r["skipped"]} for r in records if "skipped" in r
    ]
    folder = atomic.OutputFolder(opts.out, overwrite=True)  # claimed when the sweep started (run.run_sweep)
    folder.write_json(SKIPPED_FILE, skipped)
    folder.write_text(TRIALS_FILE, json.dumps(records, indent=2, default=str, allow_nan=False) + "\n")
    lines = []
    failed = [r for r in records if r["state"] == "FAIL" and not _retried(r, records)]
    if failed:
        lines.append(f"{len(failed)} failed trial(s):")
        lines += [f"  {r['point']}: {str(r.get('error', 'worker died')).splitlines()[0]}" for r in failed]
    if len(spec.objectives) > 1 and any(r["state"] == "COMPLETE" for r in records):
        front = pareto_front(study, spec)
        folder.write_json(PARETO_FILE, front)
        lines.append("Pareto front (" + " vs ".join(spec.objectives) + "):")
        lines += ["  " + r["point"] + "  " + "  ".join(f"{o} {r[o]:.6g}" for o in spec.objectives) for r in front]
    try:
        verdict = _verdict(opts.out, confirmed)
        table = write_results(opts.out, verdict=verdict.markdown() if verdict else "", overwrite=True)
    except BudgetLoraError as exc:
        return lines + [f"no results table: {exc}"]
    lines.append(markdown_table(display_table(table)).rstrip())
    if verdict is not None:
        folder.write_text(VERDICT_FILE, verdict.markdown())
        winner_dir = verdict.winner.runs[0].path
        folder.write_text(BEST_FILE, best_config(winner_dir, verdict.winner.label.replace("/", "-")))
        lines.append(verdict.markdown().rstrip())
    lines.append(
        f"wrote {opts.out / 'results.csv'}, results.md, {VERDICT_FILE}, {BEST_FILE}, {SKIPPED_FILE}, {TRIALS_FILE}"
    )
    if report:
        from budgetlora.results.report import write_report

        lines.append(f"wrote {write_report(opts.out, verdict.markdown() if verdict else '', overwrite=True)}")
    return lines
