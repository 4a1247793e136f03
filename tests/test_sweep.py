"""Sweeps: study-file expansion and naming, budget filtering and `lora.r: max` on the roberta-base
architecture (no weights), and real sweeps of the tiny random RoBERTa: resume, a killed sweep,
two worker processes sharing one SQLite study, failures, a random search with a Pareto front."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from budgetlora.cli import main
from budgetlora.errors import BudgetLoraError
from budgetlora.progress import QUIET
from budgetlora.sweeps import SweepRequest, build_config, load_study, plan, run_sweep


def quiet_sweep(study, out, **options):
    """One sweep in this process, without heartbeats or progress output; this process's counts."""
    return run_sweep(SweepRequest(study=study, out=out, heartbeat=None, console=QUIET, **options)).stats


REPO = Path(__file__).resolve().parents[1]


def write_study(tmp_path: Path, base: dict[str, Any], study: dict[str, Any], name: str = "study.yaml") -> Path:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base), encoding="utf-8")
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"base": "base.yaml", **study}, sort_keys=False), encoding="utf-8")
    return path


ROBERTA = {"name": "rb", "model": "roberta-base", "budget": 1_000_000, "data": {"train_file": "unused.csv"}}


def sweep_cli(study: Path, out: Path, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "budgetlora", "sweep", str(study), "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        check=False,
    )


def trials(out: Path) -> list[dict[str, Any]]:
    return json.loads((out / "trials.json").read_text(encoding="utf-8"))


def finished_mtimes(out: Path) -> dict[str, float]:
    return {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/summary.json")}


# --------------------------------------------------------------------------------------------
# The study file, without training


@pytest.mark.parametrize("study", sorted((REPO / "studies").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_study_preset_plans_without_skips(study: Path) -> None:
    """The presets in studies/ load, and every grid point passes the budget check (search presets:
    their space is valid); the offline ones point at ../shared and the packaged MiniLM."""
    spec = load_study(study)
    if spec.sampler is None:
        runnable, skipped = plan(spec)
        assert runnable and not skipped, [s["name"] for s in skipped]
        assert all(p.trainable is None or p.trainable <= p.cfg.budget for p in runnable if p.cfg.mode == "lora")
    else:
        assert spec.search and spec.n_trials
    if study.stem.endswith("-offline"):
        base = build_config(spec, spec.points[0].overrides if spec.points else {}, "check")
        assert base.model == "minilm" and Path(base.data.train_file).is_file()


def test_grid_zip_seeds_expand_in_file_order_with_readable_names(tmp_path):
    study = write_study(
        tmp_path,
        ROBERTA,
        {
            "set": {"train.max_steps": 20},
            "grid": {"lora.r": [1, 2], "lora.targets": [["q", "v"], ["q", "k", "v"]]},
            "zip": {"train.optimizer": ["adamw", "sgd"], "train.lr": [5e-4, 1e-2]},
            "seeds": [1, 2],
        },
    )
    spec = load_study(study)
    names = [p.name for p in spec.points]
    assert len(names) == 2 * 2 * 2 * 2
    assert names[:4] == [
        "r1-targets_q_v-opt_adamw-lr0.0005-seed1",
        "r1-targets_q_v-opt_adamw-lr0.0005-seed2",
        "r1-targets_q_v-opt_sgd-lr0.01-seed1",
        "r1-targets_q_v-opt_sgd-lr0.01-seed2",
    ]
    assert "r2-targets_q_k_v-opt_sgd-lr0.01-seed2" in names
    point = spec.points[2]
    assert point.overrides == {
        "lora.r": 1,
        "lora.targets": ["q", "v"],
        "train.optimizer": "sgd",
        "train.lr": 0.01,
        "train.seed": 1,
    }
    cfg = build_config(spec, point.overrides, point.name)
    assert (cfg.name, cfg.train.max_steps, cfg.train.optimizer, cfg.train.lr, cfg.train.seed) == (
        point.name,
        20,
        "sgd",
        0.01,
        1,
    )
    # zipped lists stay paired: never adamw with sgd's lr
    assert not any("opt_adamw-lr0.01" in n or "opt_sgd-lr0.0005" in n for n in names)


def test_bundle_axis_alpha_over_r_and_cli_overrides(tmp_path):
    study = write_study(
        tmp_path,
        ROBERTA,
        {"grid": {"method": {"lora": {}, "full": {"mode": "full", "train.lr": 2e-5}}, "lora.alpha_over_r": [0.5, 2]}},
    )
    spec = load_study(study, ["train.max_steps=7"])
    assert [p.name for p in spec.points] == ["lora-alpha0.5r", "lora-alpha2r", "full-alpha0.5r", "full-alpha2r"]
    lora = build_config(spec, {**spec.points[1].overrides, "lora.r": 4}, "x")
    assert (lora.lora.alpha, lora.train.max_steps) == (8.0, 7)
    full = build_config(spec, spec.points[2].overrides, "y")
    assert (full.mode, full.train.lr) == ("full", 2e-5)
    with pytest.raises(BudgetLoraError, match="the study varies"):
        load_study(study, ["lora.alpha_over_r=3"])


@pytest.mark.parametrize(
    "study, message",
    [
        ({"grid": {"lora.r": [1, 1]}}, "same run name"),
        ({"zip": {"lora.r": [1, 2], "lora.alpha": [2]}}, "same length"),
        ({"grid": {"lora.r": [1]}, "optuna": {"lora.r": [1, 2]}, "n_trials": 2}, "not both"),
        ({"random": {"lora.r": {"low": 1, "high": 4}}}, "n_trials"),
        ({"grid": {"lora.r": [1]}, "objectives": ["test_acc"]}, "objectives"),
        ({"grdi": {"lora.r": [1]}}, "unknown study key"),
        ({"grid": {"lora.r": ["big"]}}, "integers or 'max'"),
    ],
)
def test_study_file_errors_name_the_problem(tmp_path, study, message):
    with pytest.raises(BudgetLoraError, match=message):
        load_study(write_study(tmp_path, ROBERTA, study))


# --------------------------------------------------------------------------------------------
# Budget on the roberta-base architecture (meta device: no weights, no data)


def test_over_budget_points_are_skipped_before_anything_runs(tmp_path):
    spec = load_study(
        write_study(tmp_path, ROBERTA, {"grid": {"lora.r": [4, 64], "lora.targets": [["v"], ["q", "k", "v"]]}})
    )
    runnable, skipped = plan(spec)
    assert [p.point.name for p in runnable] == ["r4-targets_v", "r4-targets_q_k_v"]
    assert [s["name"] for s in skipped] == ["r64-targets_v", "r64-targets_q_k_v"]
    assert all("exceed the budget of 1,000,000" in s["reason"] and s["trainable_params"] > 1_000_000 for s in skipped)
    # r=64 on q,k,v: the 2-class head (class count unknown from the config) + 64 * 12 * 3 * 1536
    assert skipped[1]["trainable_params"] == 592_130 + 64 * 12 * 3 * 1536


def test_sweep_of_only_over_budget_points_writes_skipped_json_and_trains_nothing(tmp_path, capsys):
    study = write_study(tmp_path, ROBERTA, {"grid": {"lora.r": [64, 128], "lora.targets": [["q", "k", "v"]]}})
    out = tmp_path / "out"
    assert main(["sweep", str(study), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    printed = captured.out + captured.err  # progress on stderr, the outcome on stdout
    assert "skipping 2 point(s) over the budget" in printed and "r64-targets_q_k_v" in printed
    skipped = json.loads((out / "skipped.json").read_text())
    assert [s["name"] for s in skipped] == ["r64-targets_q_k_v", "r128-targets_q_k_v"]
    assert not list(out.glob("*/config.yaml"))


@pytest.mark.parametrize("targets, rank", [(["v"], 22), (["q", "v"], 11), (["q", "k", "v"], 7)])
def test_r_max_resolves_to_the_largest_rank_under_the_budget(tmp_path, targets, rank):
    spec = load_study(
        write_study(
            tmp_path, ROBERTA, {"set": {"lora.r": "max", "lora.alpha_over_r": 2}, "grid": {"lora.targets": [targets]}}
        )
    )
    (planned,), skipped = plan(spec)
    assert not skipped
    assert (planned.cfg.lora.r, planned.cfg.lora.alpha) == (rank, 2.0 * rank)
    assert planned.trainable <= 1_000_000


def test_r_max_as_a_grid_value_and_no_rank_fits(tmp_path):
    spec = load_study(
        write_study(tmp_path, {**ROBERTA, "budget": 650_000}, {"grid": {"lora.r": [1, "max"], "lora.targets": [["v"]]}})
    )
    runnable, skipped = plan(spec)
    assert [p.point.name for p in runnable] == ["r1-targets_v", "rmax-targets_v"]
    assert runnable[1].cfg.lora.r == 3  # (650,000 - 592,130 for the 2-class head) // (12 * 1536 per rank)
    tight = load_study(
        write_study(
            tmp_path,
            {**ROBERTA, "budget": 592_000},
            {"set": {"lora.r": "max"}, "grid": {"lora.targets": [["v"]]}},
            name="tight.yaml",
        )
    )
    runnable, skipped = plan(tight)
    assert not runnable and "no rank fits" in skipped[0]["reason"]


def test_full_fine_tuning_points_ignore_max_rank_and_the_budget(tmp_path):
    spec = load_study(
        write_study(
            tmp_path,
            {**ROBERTA, "lora": {"r": 5}},
            {"set": {"lora.r": "max"}, "grid": {"method": {"lora": {}, "full": {"mode": "full"}}}},
        )
    )
    (lora, full), skipped = plan(spec)
    assert not skipped
    assert (lora.cfg.mode, lora.cfg.lora.r) == ("lora", 11)  # (1M - 592,130) // (12 * 2 * 1536) on q, v
    assert (full.cfg.mode, full.cfg.lora.r, full.trainable) == ("full", 5, None)


# --------------------------------------------------------------------------------------------
# Real sweeps on the tiny model


@pytest.fixture()
def tiny_base(tiny_config) -> dict[str, Any]:
    return {**tiny_config, "train": {**tiny_config["train"], "max_steps": 6, "eval_every": 6}}


@pytest.mark.slow
def test_sweep_trains_every_point_writes_results_and_resumes_without_retraining(tmp_path, tiny_base):
    study = write_study(tmp_path, tiny_base, {"grid": {"lora.r": [1, 2]}, "seeds": [1]})
    out = tmp_path / "out"
    stats = quiet_sweep(study, out)
    assert (stats.trained, stats.failed) == (2, 0)
    assert sorted(finished_mtimes(out)) == ["r1-seed1", "r2-seed1"]
    assert {t["point"]: t["state"] for t in trials(out)} == {"r1-seed1": "COMPLETE", "r2-seed1": "COMPLETE"}
    assert "r1-seed1" in (out / "results.md").read_text() and (out / "results.csv").is_file()
    assert json.loads((out / "skipped.json").read_text()) == []
    before = finished_mtimes(out)

    stats = quiet_sweep(study, out)  # same command again: nothing left to do
    assert (stats.trained, stats.reused) == (0, 0) and finished_mtimes(out) == before

    (out / "study.db").unlink()  # even without the storage, finished run directories are not redone
    stats = quiet_sweep(study, out)
    assert (stats.trained, stats.reused) == (0, 2) and finished_mtimes(out) == before

    # a new seed adds only the new points
    study = write_study(tmp_path, tiny_base, {"grid": {"lora.r": [1, 2]}, "seeds": [1, 2]})
    stats = quiet_sweep(study, out)
    assert stats.trained == 2 and {k: v for k, v in finished_mtimes(out).items() if k in before} == before


@pytest.mark.slow
def test_a_killed_sweep_resumes_and_finished_trials_are_not_redone(tmp_path, tiny_base):
    base = {**tiny_base, "train": {**tiny_base["train"], "max_steps": 40, "eval_every": 20}}
    study = write_study(tmp_path, base, {"grid": {"lora.r": [1, 2, 3]}})
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "budgetlora", "sweep", str(study), "--out", str(out), "--heartbeat", "1"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not finished_mtimes(out) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)  # no cleanup at all: the running trial is left RUNNING
    proc.wait()
    done_before = finished_mtimes(out)
    assert done_before and len(done_before) < 3

    result = sweep_cli(study, out, "--heartbeat", "1")
    assert result.returncode == 0, result.stderr
    after = finished_mtimes(out)
    assert sorted(after) == ["r1", "r2", "r3"]
    assert {k: after[k] for k in done_before} == done_before  # not retrained
    complete = [t for t in trials(out) if t["state"] == "COMPLETE"]
    assert sorted(t["point"] for t in complete) == ["r1", "r2", "r3"]


@pytest.mark.slow
def test_two_worker_processes_share_one_sqlite_study_and_never_run_a_trial_twice(tmp_path, tiny_base):
    base = {**tiny_base, "train": {**tiny_base["train"], "max_steps": 12, "eval_every": 12}}
    study = write_study(tmp_path, base, {"grid": {"lora.r": [1, 2, 3, 4], "lora.targets": [["q"], ["v"]]}})
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "budgetlora",
        "sweep",
        str(study),
        "--out",
        str(out),
        "--heartbeat",
        "2",
        "--threads",
        "1",
    ]
    workers = [
        subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    logs = [w.communicate(timeout=900)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], logs
    started = [line.split(": ", 1)[1] for log in logs for line in log.splitlines() if line.startswith("trial ")]
    assert sorted(started) == sorted(set(started)) and len(started) == 8, logs  # each point trained once
    assert all(any(line.startswith("trial ") for line in log.splitlines()) for log in logs), logs  # both worked
    records = trials(out)
    assert len({t["worker"] for t in records if t["state"] == "COMPLETE"}) == 2
    assert sorted(t["point"] for t in records if t["state"] == "COMPLETE") == sorted(started)
    assert not [t for t in records if t["state"] != "COMPLETE"]
    assert len(finished_mtimes(out)) == 8


def test_a_trial_that_fails_with_a_bug_keeps_its_traceback(tmp_path, tiny_base, monkeypatch, capsys):
    """A planted non-BudgetLoraError: the trial record holds its traceback, --verbose prints it, the
    sweep stops there (Optuna's `catch` semantics) unless --keep-going."""
    from budgetlora import recipe
    from budgetlora.cli import main

    def broken(*args, **kwargs):
        return {}["a planted bug"]

    monkeypatch.setattr(recipe, "train_run", broken)
    study = write_study(tmp_path, tiny_base, {"grid": {"lora.r": [1, 2]}})
    out = tmp_path / "out"
    assert main(["sweep", str(study), "--out", str(out), "--heartbeat", "0", "--verbose"]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("budgetlora: error:") == 1 and "failed with an unexpected error (KeyError" in captured.err
    assert "Traceback (most recent call last)" in captured.err and "in broken" in captured.err
    import optuna

    stored = optuna.load_study(study_name="study", storage=f"sqlite:///{out / 'study.db'}").get_trials()
    failed = [t for t in stored if t.state.name == "FAIL"]
    assert len(failed) == 1 and "KeyError" in failed[0].user_attrs["error"]
    assert 'return {}["a planted bug"]' in failed[0].user_attrs["traceback"]
    capsys.readouterr()
    assert main(["sweep", str(study), "--out", str(out), "--heartbeat", "0", "--keep-going"]) == 0
    assert "this process: 0 trained, 0 already finished, 0 pruned, 2 failed" in capsys.readouterr().out  # both tried


@pytest.mark.slow
def test_two_workers_share_a_postgresql_study(tmp_path, tiny_base):
    """`--workers 2` (this process and a child given the serialized request) on a real PostgreSQL
    server, which scripts/test (and so CI) starts with scripts/test-postgres."""
    url = os.environ.get("BUDGETLORA_TEST_POSTGRES")
    if not url:
        pytest.skip("no PostgreSQL server: scripts/test starts one where Debian's postgresql package is installed")
    pytest.importorskip("psycopg", reason="the postgres extra (psycopg) is not installed")
    import optuna

    name = f"pg-{os.getpid()}-{tmp_path.name}"[-60:]
    base = {**tiny_base, "train": {**tiny_base["train"], "max_steps": 8, "eval_every": 8}}
    study = write_study(tmp_path, base, {"name": name, "grid": {"lora.r": [1, 2, 3, 4]}})
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "budgetlora",
            "sweep",
            str(study),
            "--out",
            str(tmp_path / "out"),
            "--storage",
            url,
            "--workers",
            "2",
            "--heartbeat",
            "2",
            "--threads",
            "1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    stored = optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
    complete = [t for t in stored if t.state.name == "COMPLETE"]
    assert sorted(t.user_attrs["point"] for t in complete) == ["r1", "r2", "r3", "r4"]  # each point once
    # Which worker takes which point is a race (on a loaded machine the first may finish all four
    # before the child has imported torch); what must hold is that no point ran twice, that only
    # these two processes ran any, and that the child worker exited cleanly.
    assert 1 <= len({t.user_attrs["worker"] for t in complete}) <= 2
    assert "exited with an error" not in done.stdout + done.stderr
    assert sorted(finished_mtimes(tmp_path / "out")) == ["r1", "r2", "r3", "r4"]


def test_a_missing_database_driver_is_named(tmp_path, tiny_base, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_psycopg(name, *args, **kwargs):
        if name.split(".")[0] == "psycopg":
            raise ImportError("No module named 'psycopg'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_psycopg)
    from budgetlora.sweeps.run import check_storage_url

    with pytest.raises(BudgetLoraError, match=r"the postgresql driver 'psycopg' is not installed: pip install psycopg"):
        check_storage_url("postgresql://user:secret@localhost/db")


CLAIM_SCRIPT = """
import sys, json
from budgetlora.sweeps import open_storage
import optuna, warnings
warnings.simplefilter("ignore")
optuna.logging.set_verbosity(optuna.logging.ERROR)
url, out = sys.argv[1], sys.argv[2]
study = optuna.load_study(study_name="claims", storage=open_storage(url, None))
got = []
while True:
    if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
        break
    trial = study.ask()
    if "i" in trial.user_attrs:
        got.append(trial.user_attrs["i"])
    study.tell(trial, 0.0)
json.dump(got, open(out, "w"))
"""


@pytest.mark.slow
def test_claiming_a_waiting_trial_is_exclusive_between_processes_on_sqlite(tmp_path):
    """Plain Optuna on SQLite lets two processes claim the same WAITING trial (read, then write);
    open_storage's BEGIN IMMEDIATE makes the claim one transaction."""
    import optuna

    url = f"sqlite:///{tmp_path / 'claims.db'}"
    study = optuna.create_study(study_name="claims", storage=open_storage_for_test(url))
    for i in range(150):
        study.enqueue_trial({}, user_attrs={"i": i})
    script = tmp_path / "claim.py"
    script.write_text(CLAIM_SCRIPT, encoding="utf-8")
    procs = [subprocess.Popen([sys.executable, str(script), url, str(tmp_path / f"got{k}.json")]) for k in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    got = [json.loads((tmp_path / f"got{k}.json").read_text()) for k in range(2)]
    assert not set(got[0]) & set(got[1])
    assert sorted(got[0] + got[1]) == list(range(150))


def open_storage_for_test(url: str):
    from budgetlora.sweeps import open_storage

    return open_storage(url, None)


@pytest.mark.slow
def test_a_failing_trial_is_recorded_with_its_reason_and_the_sweep_goes_on(tmp_path, tiny_base, capsys):
    study = write_study(
        tmp_path, tiny_base, {"grid": {"columns": {"ok": {}, "broken": {"data.text_columns": ["no_such_column"]}}}}
    )
    out = tmp_path / "out"
    outcome = run_sweep(SweepRequest(study=study, out=out, heartbeat=None, console=QUIET))
    stats = outcome.stats
    assert (stats.trained, stats.failed) == (1, 1)
    states = {t["point"]: t for t in trials(out)}
    assert states["ok"]["state"] == "COMPLETE"
    assert states["broken"]["state"] == "FAIL" and "no_such_column" in states["broken"]["error"]
    assert "1 failed trial(s):" in outcome.lines
    assert (out / "ok" / "summary.json").is_file() and not (out / "broken").exists()


@pytest.mark.slow
def test_random_search_with_two_objectives_skips_over_budget_samples_and_reports_the_pareto_front(tmp_path, tiny_base):
    # q,v on the tiny model: 1,188 (4-class head) + 256 per rank; under 3,300 only r <= 8 fits
    study = write_study(
        tmp_path,
        {**tiny_base, "budget": 3_300},
        {
            "random": {"lora.r": {"low": 1, "high": 16}, "train.lr": {"low": 1e-3, "high": 1e-2, "log": True}},
            "n_trials": 3,
            "objectives": ["val_acc", "trainable_params"],
            "sampler_seed": 3,
        },
    )
    out = tmp_path / "out"
    quiet_sweep(study, out)
    records = trials(out)
    complete = [t for t in records if t["state"] == "COMPLETE"]
    assert len(complete) == 3
    assert all(t["params"]["lora.r"] <= 8 for t in complete)
    assert all("skipped" in t and t["params"]["lora.r"] > 8 for t in records if t["state"] == "PRUNED")
    skipped = json.loads((out / "skipped.json").read_text())
    assert len(skipped) == len(records) - 3
    front = json.loads((out / "pareto.json").read_text())
    assert front and {"point", "val_acc", "trainable_params"} <= set(front[0])
    assert all((out / d / "summary.json").is_file() for t in complete for d in t["run_dirs"])
