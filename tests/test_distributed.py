"""Data-parallel training under torchrun with gloo on CPU equals a single-process run with the
same global batch and seed; one run directory; a 2-process checkpoint resumes in 1 process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from budgetlora.distributed import context_from_env
from budgetlora.errors import BudgetLoraError
from helpers import build_tiny_model, free_port

pytestmark = pytest.mark.slow  # subprocesses and minutes of CPU: the full suite runs it


def budgetlora(*args: str, procs: int = 1, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if procs == 1:
        cmd = [sys.executable, "-m", "budgetlora", *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={procs}",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
            "-m",
            "budgetlora",
            *args,
        ]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def ddp_setup(tmp_path_factory, synthetic_data):
    root = tmp_path_factory.mktemp("ddp")
    model = build_tiny_model(root / "model", dropout=0.0)  # dropout masks would differ per rank
    config = {
        "name": "tiny",
        "model": str(model),
        "budget": 1_000_000,
        "data": {
            "train_file": str(synthetic_data["train"]),
            "test_file": str(synthetic_data["test"]),
            "val_size": 40,
            "max_length": 64,
        },
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q", "v"]},
        "train": {
            "lr": 2e-2,
            "max_steps": 12,
            "batch_size": 16,
            "eval_every": 6,
            "log_every": 2,
            "save_every": 4,
            "keep_checkpoints": 10,
            "seed": 0,
            "warmup": 0.0,
            "num_threads": 1,
        },
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    single = budgetlora("train", str(path), "--out", str(root / "single"), "--quiet", cwd=root)
    assert single.returncode == 0, single.stderr
    double = budgetlora("train", str(path), "--out", str(root / "double"), "--quiet", procs=2, cwd=root)
    assert double.returncode == 0, double.stderr
    return root, root / "single" / "tiny", root / "double" / "tiny"


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def assert_adapters_close(a: Path, b: Path) -> None:
    wa, wb = adapter(a), adapter(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.allclose(wa[key], wb[key], atol=1e-5, rtol=0), (key, (wa[key] - wb[key]).abs().max())


def test_two_processes_equal_one(ddp_setup):
    root, single, double = ddp_setup
    assert [p.name for p in (root / "double").iterdir()] == ["tiny"]  # rank 0 alone wrote a run
    assert_adapters_close(single, double)
    assert (single / "test_predictions.csv").read_text() == (double / "test_predictions.csv").read_text()
    s = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
    d = [json.loads(line) for line in (double / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in s] == [r["step"] for r in d]  # one log, not one per rank
    for a, b in zip(s, d, strict=True):
        for key in ("train_loss", "eval_loss"):
            if key in a:
                assert abs(a[key] - b[key]) < 1e-5
    assert json.loads((double / "summary.json").read_text())["processes"] == 2


def test_predict_under_torchrun_equals_single_process(ddp_setup, synthetic_data):
    root, single, _ = ddp_setup
    outputs = {}
    for procs in (1, 2):
        out = root / f"predictions-{procs}.csv"
        result = budgetlora(
            "predict", str(single), "--data", str(synthetic_data["test"]), "--out", str(out), procs=procs, cwd=root
        )
        assert result.returncode == 0, result.stderr
        outputs[procs] = out.read_text()
    assert outputs[1] == outputs[2] and outputs[1].count("\n") == 121
    assert not list(root.glob(".predictions-*"))  # no temp files left by either rank


def test_resume_two_process_checkpoint_in_one_process(ddp_setup):
    root, single, double = ddp_setup
    resumed = root / "resumed"
    shutil.copytree(double, resumed)
    checkpoints = sorted((resumed / "checkpoints").iterdir())
    keep = next(c for c in checkpoints if c.name.endswith("00000008"))
    for later in checkpoints:
        if later.name > keep.name:
            shutil.rmtree(later)
    (resumed / "summary.json").unlink()
    result = budgetlora("train", "--resume", str(resumed), "--quiet", cwd=root)
    assert result.returncode == 0, result.stderr
    assert_adapters_close(single, resumed)


def test_launch_environment_is_checked_before_any_work():
    assert context_from_env({}).world_size == 1
    with pytest.raises(BudgetLoraError, match="RANK set but WORLD_SIZE, LOCAL_RANK missing"):
        context_from_env({"RANK": "0"})
    with pytest.raises(BudgetLoraError, match="RANK=3, LOCAL_RANK=0, WORLD_SIZE=2"):
        context_from_env({"RANK": "3", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    with pytest.raises(BudgetLoraError, match="MASTER_ADDR/MASTER_PORT unset"):
        context_from_env({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})


def test_global_batch_must_split_evenly(ddp_setup, tmp_path):
    root, _, _ = ddp_setup
    config = yaml.safe_load((root / "config.yaml").read_text())
    config["train"]["batch_size"] = 15
    path = tmp_path / "odd.yaml"
    path.write_text(yaml.safe_dump(config))
    result = budgetlora("train", str(path), "--out", str(tmp_path / "runs"), procs=2, cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.count("budgetlora: error: config key 'train.batch_size': 15") == 1  # said once
    assert not (tmp_path / "runs").exists()
