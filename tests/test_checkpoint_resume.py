"""Crash-safe checkpoints and exact resume, on CPU with the tiny random RoBERTa.

The reference is one uninterrupted in-process run; every interrupted-then-resumed run (SIGKILL in
a subprocess, SIGTERM in a subprocess, SIGINT in-process, a failed checkpoint write) must log the
same per-step losses and end with bit-identical adapter weights.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from budgetlora.training import checkpoint as ckpt_mod
from budgetlora.training.checkpoint import complete_checkpoints, load_checkpoint
from budgetlora.cli import main as cli_main
from budgetlora.config import load_config
from budgetlora.errors import BudgetLoraError, RunInterrupted
from budgetlora.recipe import train_run
from budgetlora.resuming import resume_run
from helpers import MAX_STEPS, adapter, assert_same_run, interrupt_at, metrics  # noqa: F401  (shared resume harness)

pytestmark = pytest.mark.usefixtures("_restore_threads")


def last_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [0]
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass  # a line being written right now
    return max(steps)


def start_cli_run(run_config: Path, out: Path, name: str, cache: Path) -> subprocess.Popen:
    env = dict(os.environ, BUDGETLORA_CACHE=str(cache), TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen(
        [sys.executable, "-m", "budgetlora", "train", str(run_config), "--out", str(out), "--name", name],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_step(proc: subprocess.Popen, run: Path, step: int, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while last_step(run) < step:
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"the run ended (rc {proc.returncode}) before step {step}:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the run did not reach step {step} in {timeout:.0f}s")
        time.sleep(0.005)


@pytest.mark.slow
def test_kill9_at_random_step_then_resume_is_bit_identical(run_config, reference, tmp_path):
    target = random.Random().randint(8, 90)  # anywhere: mid-epoch, mid-window, even mid-checkpoint
    run = tmp_path / "runs" / "killed"
    proc = start_cli_run(run_config, tmp_path / "runs", "killed", tmp_path / "cache")
    wait_for_step(proc, run, target)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    killed_at = last_step(run)
    assert killed_at < MAX_STEPS and not (run / "summary.json").exists()
    # shown by pytest if the comparison fails, to reproduce the case
    print(f"killed at step {killed_at} (target {target}), resuming from {complete_checkpoints(run)[-1].name}")

    assert resume_run(run, verbose=False) == run
    assert_same_run(run, reference)


@pytest.mark.slow
def test_sigterm_stops_at_step_boundary_with_resumable_checkpoint(run_config, reference, tmp_path):
    run = tmp_path / "runs" / "termed"
    proc = start_cli_run(run_config, tmp_path / "runs", "termed", tmp_path / "cache")
    wait_for_step(proc, run, 13)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err
    stopped = last_step(run)
    assert f"budgetlora: interrupted by SIGTERM at step {stopped}/{MAX_STEPS}" in err
    assert f"resume with: budgetlora train --resume {run.resolve()}" in err
    # the checkpoint is exactly at the step the loop stopped on, not at the last periodic save
    assert complete_checkpoints(run)[-1].name == f"step-{stopped:08d}"
    assert load_checkpoint(complete_checkpoints(run)[-1]).state.step == stopped

    assert cli_main(["train", "--resume", str(run), "--quiet"]) == 0
    assert_same_run(run, reference)


def test_sigint_in_process_then_cli_resume(run_config, reference, tmp_path, monkeypatch):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    interrupt_at(monkeypatch, 9)
    with pytest.raises(RunInterrupted) as info:
        train_run(load_config(run_config), tmp_path, verbose=False)
    run = tmp_path / "tiny"
    assert info.value.exit_code == 130
    assert f"budgetlora train --resume {run.resolve()}" in str(info.value)
    assert [p.name for p in complete_checkpoints(run)] == ["step-00000005", "step-00000009"]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # handlers restored
    monkeypatch.undo()
    assert resume_run(run, verbose=False) == run
    assert_same_run(run, reference)


@pytest.mark.parametrize("failing", ["_save_tensors", "_write_json"])
def test_failed_checkpoint_write_keeps_previous_checkpoint(run_config, reference, tmp_path, monkeypatch, failing):
    """Disk full on the 3rd checkpoint, half-way through a file: the run stops with one clear
    error, the 2nd checkpoint stays complete and loadable, and resuming from it is still exact."""
    real = getattr(ckpt_mod, failing)
    written = {"n": 0}
    last_file = "state.safetensors" if failing == "_save_tensors" else "state.json"

    def disk_full(*args):
        path = next(a for a in args if isinstance(a, Path))
        if path.name == last_file:
            written["n"] += 1
            if written["n"] == 3:
                path.write_bytes(b"\x00" * 10)  # a torn file in the temp dir
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args)

    monkeypatch.setattr(ckpt_mod, failing, disk_full)
    with pytest.raises(BudgetLoraError) as info:
        train_run(load_config(run_config), tmp_path, verbose=False)
    message = str(info.value)
    run = tmp_path / "tiny"
    assert "cannot write the checkpoint for step 15" in message and "No space left on device" in message
    assert "step-00000010 is intact" in message and "\n" not in message
    assert [p.name for p in complete_checkpoints(run)] == ["step-00000005", "step-00000010"]
    assert not list(run.glob(".checkpoint-*"))  # the torn temp dir is gone
    assert load_checkpoint(run / "checkpoints" / "step-00000010").state.step == 10
    monkeypatch.undo()
    resume_run(run, verbose=False)
    assert_same_run(run, reference)


def test_unwritable_run_dir_is_one_clear_error(run_config, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(ckpt_mod.tempfile, "mkdtemp", refuse)  # root ignores chmod; simulate it
    with pytest.raises(BudgetLoraError, match=r"^cannot write \S+/tiny/\S+: Permission denied$"):
        train_run(load_config(run_config), tmp_path, verbose=False)
    assert not (tmp_path / "tiny").exists()  # nothing resumable was written: no half-made run is left


def test_checkpoints_keep_last_k_and_best_and_hold_no_pickle(reference):
    paths = complete_checkpoints(reference)
    summary = json.loads((reference / "summary.json").read_text())
    names = [p.name for p in paths]
    best = f"step-{summary['best_step']:08d}"
    assert names[-2:] == [f"step-{MAX_STEPS - 5:08d}", f"step-{MAX_STEPS:08d}"]  # keep_checkpoints: 2
    assert best in names and len(names) <= 3
    for path in paths:
        assert {p.name for p in path.iterdir()} <= {
            "best.safetensors",
            "state.json",
            "state.safetensors",
            "trainable.safetensors",
        }
    final = load_checkpoint(paths[-1])
    assert final.step == final.state.step == MAX_STEPS and final.reason == "eval"  # the last step evaluates
    assert final.state.best_step == summary["best_step"]
    assert final.best_trainable is not None and final.optimizer["state"]
    assert [r["step"] for r in final.history] == [r["step"] for r in metrics(reference)]
    # restore_best: the saved adapter holds the best checkpoint's weights (under PEFT's key names)
    best_weights = list(load_checkpoint(reference / "checkpoints" / best).trainable.values())
    for tensor in adapter(reference).values():
        assert any(t.shape == tensor.shape and torch.equal(t, tensor) for t in best_weights)


def test_resume_refusals_and_extend(run_config, tmp_path, monkeypatch):
    interrupt_at(monkeypatch, 6)
    with pytest.raises(RunInterrupted):
        train_run(load_config(run_config), tmp_path, verbose=False)
    monkeypatch.undo()
    run = tmp_path / "tiny"
    with pytest.raises(BudgetLoraError, match=r"train.max_steps is 200 but was 120 at step-00000006; .*--extend"):
        resume_run(run, overrides=["train.max_steps=200"], verbose=False)
    with pytest.raises(BudgetLoraError, match=r"--set lora.r cannot change on --resume"):
        resume_run(run, overrides=["lora.r=8"], verbose=False)
    with pytest.raises(BudgetLoraError, match=r"--extend needs a new length"):
        resume_run(run, extend=True, verbose=False)
    with pytest.raises(BudgetLoraError, match=r"cannot extend to 4 steps: step-00000006 is already at step 6"):
        resume_run(run, extend=True, overrides=["train.max_steps=4"], verbose=False)
    # a hand-edited config.yaml is caught as well
    edited = yaml.safe_load((run / "config.yaml").read_text())
    edited["train"]["lr"] = 1.0
    (run / "config.yaml").write_text(yaml.safe_dump(edited))
    with pytest.raises(BudgetLoraError, match=r"train.lr is 1.0 but was 0.005 at step-00000006"):
        resume_run(run, verbose=False)
    edited["train"]["lr"] = 5e-3
    (run / "config.yaml").write_text(yaml.safe_dump(edited))

    # --extend rebuilds the schedule: linear decay to 0 at the new length, continued at step 6
    assert resume_run(run, extend=True, overrides=["train.max_steps=30"], verbose=False) == run
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == summary["total_steps"] == 30
    lrs = {r["step"]: r["lr"] for r in metrics(run) if "lr" in r}
    assert sorted(lrs) == list(range(1, 31))
    for step in range(7, 31):
        assert lrs[step] == pytest.approx(5e-3 * (30 - step) / (30 - 3), rel=1e-6)  # warmup 0.1 -> 3 steps
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == 30

    with pytest.raises(BudgetLoraError, match=r"already finished"):
        resume_run(run, verbose=False)
    assert cli_main(["train", "--resume", str(run), "--extend", "--set", "train.max_steps=34", "--quiet"]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 34


def test_resume_refuses_changed_data_and_missing_checkpoints(run_config, synthetic_data, tmp_path, monkeypatch):
    data = tmp_path / "train.csv"
    lines = synthetic_data["train"].read_text().splitlines()
    data.write_text("\n".join(lines) + "\n")
    interrupt_at(monkeypatch, 5)
    with pytest.raises(RunInterrupted):
        train_run(load_config(run_config, [f"data.train_file={data}"]), tmp_path, verbose=False)
    monkeypatch.undo()
    run = tmp_path / "tiny"
    data.write_text("\n".join(lines[:-1] + [lines[-1].replace(",", " extra words,")]) + "\n")
    with pytest.raises(BudgetLoraError, match=r"the training data \(.*train.csv\) changed since step-00000005"):
        resume_run(run, verbose=False)

    empty = tmp_path / "empty-run"
    empty.mkdir()
    (empty / "config.yaml").write_text((run / "config.yaml").read_text())
    with pytest.raises(BudgetLoraError, match=r"has no checkpoint to resume from"):
        resume_run(empty, verbose=False)
    with pytest.raises(BudgetLoraError, match=r"run directory not found"):
        resume_run(tmp_path / "nope", verbose=False)


def test_cli_train_argument_errors(capsys, run_config):
    assert cli_main(["train", str(run_config), "--resume", "x"]) == 2
    assert cli_main(["train", str(run_config), "--extend"]) == 2
    assert cli_main(["train"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("budgetlora: error: ") for line in err)
