"""Pruning that asks whether a trial is significantly behind, confirmation with more seeds, and
the winner: decisions on constructed outcomes, then whole sweeps on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from budgetlora.errors import BudgetLoraError
from budgetlora.progress import QUIET
from budgetlora.sweeps import SweepRequest, run_sweep
from budgetlora.sweeps.prune import PruneSpec, RungRecord, decide, parse_confirm, parse_prune


def outcomes(n: int, correct: int, seed: int = 0) -> np.ndarray:
    out = np.zeros(n, dtype=bool)
    out[np.random.default_rng(seed).permutation(n)[:correct]] = True
    return out


def record(run: str, correct: np.ndarray, step: int = 100, key: str = "val") -> RungRecord:
    return RungRecord(run, step, correct, key)


SPEC = PruneSpec(rungs=[100, 200], comparisons=32)  # 16 points x 2 rungs: Bonferroni over 32 comparisons


def test_a_clearly_worse_trial_is_pruned_and_a_tied_one_kept():
    leader = outcomes(300, 255)  # 85%
    worse = outcomes(300, 165, seed=1)  # 55%
    decision = decide(record("worse", worse), [record("leader", leader), record("mid", outcomes(300, 240, 2))], SPEC)
    assert decision.prune and decision.leader == "leader" and decision.p_value < 0.05 / 32
    assert "significantly behind" in decision.reason and "0.05/32 (Bonferroni)" in decision.reason
    tied = leader.copy()
    tied[np.flatnonzero(leader)[:6]] = False  # 83%: six rows fewer, the same rows otherwise
    decision = decide(record("tied", tied), [record("leader", leader), record("other", outcomes(300, 250, 3))], SPEC)
    assert not decision.prune and "not significantly behind" in decision.reason and decision.p_value > 0.05 / 32


def test_the_top_of_a_rung_too_few_trials_and_other_rows_are_never_pruned():
    leader, worse = outcomes(300, 255), outcomes(300, 120, seed=1)
    assert not decide(record("worse", worse), [], SPEC).prune  # alone at the rung
    assert not decide(record("worse", worse), [record("leader", leader, step=200)], SPEC).prune  # another rung
    assert not decide(record("worse", worse), [record("leader", leader, key="other-rows")], SPEC).prune
    spec = PruneSpec(rungs=[100], comparisons=1, eta=1.0)  # eta 1 keeps every trial: no halving, no pruning
    assert not decide(record("worse", worse), [record("leader", leader)], spec).prune
    spec = PruneSpec(rungs=[100], comparisons=1, eta=3.0)  # the top third of three: the leader and no one else
    peers = [record("leader", leader), record("second", outcomes(300, 250, 4))]
    assert decide(record("worse", worse), peers, spec).prune
    assert not decide(record("second", outcomes(300, 250, 4)), [record("leader", leader)], PruneSpec([100])).prune


def test_paired_bootstrap_decides_like_mcnemar_on_clear_cases():
    spec = PruneSpec(rungs=[100], test="bootstrap", comparisons=4)
    leader = outcomes(300, 255)
    assert decide(record("worse", outcomes(300, 150, 1)), [record("leader", leader)], spec).prune
    assert not decide(record("same", leader.copy()), [record("leader", leader)], spec).prune


def test_rung_records_survive_the_storage_round_trip():
    original = record("r2", outcomes(301, 200))
    back = RungRecord.from_attr(json.loads(json.dumps(original.to_attr())))
    assert back.run == "r2" and back.step == 100 and (back.correct == original.correct).all()


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"rungs": []}, "study key 'prune.rungs': give the evaluation steps"),
        ({"rungs": [10, 10]}, "study key 'prune.rungs': lists a step twice"),
        ({"rungs": [0]}, r"study key 'prune.rungs\[0\]': got 0, must be >= 1"),
        ({"rungs": [10], "test": "ttest"}, "study key 'prune.test': got 'ttest'"),
        ({"rungs": [10], "alpha": 0}, r"study key 'prune.alpha': got 0.0, must be in \(0, 0.5\]"),
        ({"rungs": [10], "eta": 0.5}, "study key 'prune.eta'"),
        ({"rungs": [10], "min_trials": 1}, "prune.min_trials"),
        ({"rungs": [10], "every": 5}, "unknown study key 'prune.every'"),
        ({"rungs": [10], "comparisons": 5}, "unknown study key 'prune.comparisons'"),
    ],
)
def test_prune_section_errors_name_the_key(raw, message):
    with pytest.raises(BudgetLoraError, match=message):
        parse_prune(Path("study.yaml"), raw)


def test_confirm_section():
    assert parse_confirm(Path("s.yaml"), {"top": 2, "seeds": 3}).seeds == [1, 2, 3]
    assert parse_confirm(Path("s.yaml"), {"top": 1, "seeds": [7, 9]}).seeds == [7, 9]
    with pytest.raises(BudgetLoraError, match="confirm.top"):
        parse_confirm(Path("s.yaml"), {"top": 0})


@pytest.fixture()
def study(tiny_config, tiny_bert_dir, tmp_path):
    """On the tiny BERT with a mean-pooled head, lr 2e-2 learns the synthetic task in about 25
    steps (82% of the 40 validation rows) while lr 1e-7 stays at 37%: at the rung (step 25 of 30)
    the second is far behind the first on the same rows."""
    base = {
        **tiny_config,
        "model": str(tiny_bert_dir),
        "head": {"type": "linear", "pooling": "mean"},
        "train": {**tiny_config["train"], "max_steps": 30, "eval_every": 5, "save_every": None},
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))

    def write(extra: dict) -> Path:
        path = tmp_path / "study.yaml"
        path.write_text(yaml.safe_dump({"base": "base.yaml", "grid": {"train.lr": [2e-2, 1e-7]}, **extra}))
        return path

    return write


def _sweep(path: Path, out: Path, **options):
    return run_sweep(SweepRequest(study=path, out=out, heartbeat=None, console=QUIET, **options))


def _trials(out: Path) -> dict:
    return {t["point"]: t for t in json.loads((out / "trials.json").read_text())}


@pytest.mark.slow
def test_a_pruned_sweep_stops_the_hopeless_trial_resumes_without_redoing_it_and_names_a_winner(study, tmp_path):
    from budgetlora import load
    from budgetlora.resuming import resume_run

    out = tmp_path / "out"
    outcome = _sweep(study({"prune": {"rungs": [25]}}), out)
    assert outcome.stats.trained == 1 and outcome.stats.pruned == 1
    assert list(_trials(out)) == ["lr0.02"]  # the final phase: only the survivor trains to the end
    (rung,) = json.loads((out / "rung-decisions.json").read_text())["25"][1:]
    assert rung["point"] == "lr1e_07" and rung["pruned"] and rung["leader"] == "lr0.02" and rung["p_value"] < 0.05
    pruned_run = out / "lr1e_07"
    record = json.loads((pruned_run / "pruned.json").read_text())
    assert record["step"] == 25 and "significantly behind: " in record["reason"] and record["trainable_params"] > 0
    assert (pruned_run / "checkpoints" / "step-00000025").is_dir() and not (pruned_run / "summary.json").exists()
    survivor = yaml.safe_load((out / "lr0.02" / "config.yaml").read_text())
    assert survivor["train"]["eval_at"] == [25]  # the rung is an evaluation of every trial, and of a resume
    results = (out / "results.md").read_text()
    assert "pruned @ 25" in results and "significantly behind" in results and "## Verdict" in results
    assert "winner: lr0.02" in results
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["train"]["lr"] == 2e-2 and best["name"] == "lr0.02"

    again = _sweep(study({"prune": {"rungs": [25]}}), out)  # rerun: nothing left, nothing redone
    assert (again.stats.trained, again.stats.pruned) == (0, 0) and list(_trials(out)) == ["lr0.02"]

    resume_run(pruned_run, verbose=False)  # a pruned trial taken on to full length
    assert json.loads((pruned_run / "summary.json").read_text())["steps"] == 30
    assert not (pruned_run / "pruned.json").exists()

    winner = load(out / "lr0.02")
    assert winner.summary.test.accuracy > 0.5
    from budgetlora import train

    retrained = train(out / "best.yaml", out=tmp_path / "again", quiet=True, train={"max_steps": 4})
    assert retrained.summary.steps == 4  # best.yaml is a config `train` takes as is


@pytest.mark.slow
def test_without_prune_every_trial_runs_to_the_end(study, tmp_path):
    out = tmp_path / "out"
    outcome = _sweep(study({"prune": {"rungs": [25]}}), out, prune=False, overrides=["train.max_steps=10"])
    assert outcome.stats.trained == 2 and outcome.stats.pruned == 0


@pytest.mark.slow
def test_confirmation_reruns_the_best_with_more_seeds(study, tmp_path):
    out = tmp_path / "out"
    outcome = _sweep(study({}), out, confirm_top=1, confirm_seeds=2, overrides=["train.max_steps=10"])
    confirmed = sorted(p.name for p in (out / "confirm").iterdir() if (p / "summary.json").is_file())
    assert confirmed == ["lr0.02-seed1", "lr0.02-seed2"]
    seeds = [
        yaml.safe_load((out / "confirm" / name / "config.yaml").read_text())["train"]["seed"] for name in confirmed
    ]
    assert seeds == [1, 2]
    verdict = (out / "verdict.md").read_text()
    assert "winner: lr0.02" in verdict and "sd over 2 seeds" in verdict and "confirmation runs" in verdict
    assert outcome.stats.trained == 2  # the main phase; the confirmation phase trained 2 more


@pytest.mark.slow
def test_journal_storage_works_like_sqlite(study, tmp_path):
    out = tmp_path / "out"
    journal = f"journal:{tmp_path / 'study.log'}"
    short = ["train.max_steps=5"]
    outcome = _sweep(study({}), out, storage=journal, overrides=short)
    assert outcome.stats.trained == 2 and (tmp_path / "study.log").stat().st_size > 0
    assert _sweep(study({}), out, storage=journal, overrides=short).stats.trained == 0


@pytest.mark.slow
def test_optuna_pruners_are_options(study, tmp_path):
    out = tmp_path / "out"
    outcome = _sweep(study({"prune": {"rungs": [25], "test": "median"}}), out)
    assert outcome.stats.trained + outcome.stats.pruned == 2
    assert all(t["state"] in ("COMPLETE", "PRUNED") for t in _trials(out).values())


def test_a_trial_paused_at_a_rung_reports_its_accuracy_without_a_trainable_count():
    from types import SimpleNamespace

    from budgetlora.artifacts.run_dir import Paused
    from budgetlora.errors import BudgetLoraError
    from budgetlora.sweeps.worker import RunOutcome, summary_values

    paused = RunOutcome(None, Paused(step=30, val_acc=0.75), reused=False)  # no summary: it paused at a rung
    assert summary_values(SimpleNamespace(objectives=["val_acc"]), [paused]) == [0.75]
    with pytest.raises(BudgetLoraError, match="paused at a rung has no trainable count"):
        summary_values(SimpleNamespace(objectives=["val_acc", "trainable_params"]), [paused])
    finished = RunOutcome(SimpleNamespace(val_acc=0.8, trainable_params=1234), None, reused=True)
    assert summary_values(SimpleNamespace(objectives=["val_acc", "trainable_params"]), [finished]) == [0.8, 1234.0]
