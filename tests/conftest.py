"""Shared fixtures (what they build lives in helpers.py): the tiny model and data, a finished run
for read-only tests, per-test token caches, and the resume harness's config and reference run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from helpers import MAX_STEPS, build_tiny_encoder, build_tiny_model, synthetic_rows, tiny_config, write_csv

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite's tolerances are fp32's: `precision: auto` would pick bf16 on CPUs with AMX or
# AVX512-BF16 (and in every process a test starts); tests of bf16 name it.
os.environ["BUDGETLORA_CPU_BF16"] = "0"


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return build_tiny_encoder(tmp_path_factory.mktemp("tiny-bert"), "bert")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-roberta"))


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synthetic")
    return {
        "train": write_csv(root / "train.csv", synthetic_rows(320, seed=1)),
        "test": write_csv(root / "test.csv", synthetic_rows(120, seed=2)),
    }


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_model_dir, synthetic_data) -> Path:
    """One finished run shared by the tests that only read it (or write beside it)."""
    from budgetlora.config import config_from_dict
    from budgetlora.recipe import train_run

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BUDGETLORA_CACHE", str(tmp_path_factory.mktemp("trained-run-cache")))
        return train_run(
            config_from_dict(tiny_config(tiny_model_dir, synthetic_data)),
            tmp_path_factory.mktemp("runs"),
            verbose=False,
        )


@pytest.fixture(name="tiny_config")
def tiny_config_fixture(tiny_model_dir, synthetic_data):
    """A config dict that trains the tiny model for a few steps in seconds."""
    return tiny_config(tiny_model_dir, synthetic_data, train={"max_steps": 30})


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Token caches go to the test's tmp dir, never the user's home."""
    monkeypatch.setenv("BUDGETLORA_CACHE", str(tmp_path / "cache"))


# ----- the resume harness shared by the checkpoint, optimizer and hardening tests


@pytest.fixture(scope="module")
def _restore_threads():
    import torch

    # the runs set torch's thread count (train.num_threads: 1, for a bit-exact comparison between
    # processes); give the rest of the session its own setting back
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run_config(tiny_model_dir, synthetic_data, tmp_path_factory) -> Path:
    """Dropout on (LoRA and the encoder), so a resume that lost the torch RNG state would diverge;
    a log line per step and a checkpoint every 5 steps; 35 batches per epoch, so most steps are
    mid-epoch."""
    cfg = tiny_config(
        tiny_model_dir,
        synthetic_data,
        lora={"dropout": 0.1},
        train={
            "lr": 5e-3,
            "max_steps": MAX_STEPS,
            "batch_size": 8,
            "eval_every": 20,
            "log_every": 1,
            "warmup": 0.1,
            "save_every": 5,
            "keep_checkpoints": 2,
            "num_threads": 1,
            "device": "cpu",
            "precision": "fp32",
        },
    )
    path = tmp_path_factory.mktemp("resume-config") / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reference(run_config, tmp_path_factory) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        from budgetlora.config import load_config
        from budgetlora.recipe import train_run

        mp.setenv("BUDGETLORA_CACHE", str(tmp_path_factory.mktemp("ref-cache")))
        return train_run(load_config(run_config), tmp_path_factory.mktemp("ref"), verbose=False)
