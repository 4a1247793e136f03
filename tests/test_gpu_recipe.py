"""The GPU recipe, every switch of it, run end to end: compiled training step (fullgraph, fixed
widths), bf16 autocast, fp16 with its GradScaler, low-rank LoRA dropout, the first-token last
layer, fused AdamW and merged bf16 prediction.

Each test runs on the CPU in the normal suite (inductor generates C++ there; graph capture, guards
and recompiles are decided in Python, the same as on CUDA) and again on a CUDA GPU where there is
one (`pytest -m cuda` selects the GPU half; scripts/gpu-check runs it). The tiny model has
max_length 32, so a run compiles one width.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from budgetlora.config import config_from_dict
from budgetlora.data.tokens import TokenizedSet, collate
from budgetlora.model import build_model
from budgetlora.runtime import Runtime, autocast
from helpers import build_tiny_encoder, build_tiny_model, free_port

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
    ),
]
FAMILY_TARGETS = {"modernbert": ["qkv", "o", "ffn_in", "ffn_out"]}


def recipe_dict(model_dir: Path, data: dict, device: str, **train) -> dict:
    """The GPU recipe forced: compile, bf16, low-rank dropout, first-token head, every linear layer."""
    return {
        "name": "recipe",
        "model": str(model_dir),
        "budget": 1_000_000,
        "data": {"train_file": str(data["train"]), "test_file": str(data["test"]), "val_size": 40, "max_length": 32},
        "head": {"type": "auto"},
        "lora": {
            "r": 4,
            "alpha": 8,
            "dropout": 0.1,
            "dropout_position": "lowrank",
            "targets": ["q", "k", "v", "o", "ffn_in", "ffn_out"],
        },
        "train": {
            "lr": 1e-2,
            "max_steps": 60,
            "batch_size": 16,
            "eval_every": 10,
            "log_every": 1,
            "save_every": 5,
            "seed": 0,
            "warmup": 0.0,
            "compile": True,
            "precision": "bf16",
            "device": device,
            **train,
        },
    }


def tokens(n: int = 64, seed: int = 0, vocab: int = 60) -> TokenizedSet:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(6, 30, size=n)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return TokenizedSet(
        rng.integers(5, vocab, size=int(offsets[-1])).astype(np.int32), offsets, rng.integers(0, 4, size=n)
    )


# ----- capture: one graph, no break, on every supported family


FAMILY_CASES = [
    pytest.param(
        family, head, id=f"{head}-{family}", marks=() if (family, head) == ("roberta", "auto") else pytest.mark.slow
    )
    for family in ("roberta", "bert", "distilbert", "deberta-v2", "modernbert")
    for head in ("auto", "linear")
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family, head", FAMILY_CASES)
def test_the_training_step_is_captured_whole_on_every_family(family, head, device, tmp_path):
    """fullgraph=True (a graph break raises) through PEFT, the Transformers layers, low-rank dropout
    and, where it applies, the first-token layer; forward and backward. The `aot_eager` backend
    runs dynamo's capture and AOTAutograd without generating kernels, which keeps this quick."""
    from budgetlora.speedups import prepare_for_training
    from budgetlora.training.step import step_runner

    path = build_tiny_model(tmp_path / family) if family == "roberta" else build_tiny_encoder(tmp_path / family, family)
    cfg = config_from_dict(
        {
            "model": str(path),
            "head": {"type": head, "pooling": "cls"},
            "data": {"train_file": "unused.csv", "max_length": 32},
            "lora": {
                "r": 4,
                "dropout": 0.1,
                "dropout_position": "lowrank",
                "targets": FAMILY_TARGETS.get(family, ["q", "k", "v", "o", "ffn_in", "ffn_out"]),
            },
            "train": {"compile": True, "batch_size": 4, "device": device},
        }
    )
    model = build_model(cfg, 4).to(device)
    fast = prepare_for_training(model, cfg, torch.device(device), "fp32", pad_id=0)
    assert fast.compiled and fast.lowrank_adapters > 0
    rt = Runtime(torch.device(device), "fp32")
    runner = step_runner(
        model, cfg.train, rt, tokens(vocab=model.config.vocab_size), 0, fast.pad_to, backend="aot_eager"
    )
    assert runner.report.failure is None, runner.report.failure
    assert runner.report.graphs == 1  # one width, one graph: no break anywhere


def test_a_model_that_cannot_be_captured_whole_trains_eagerly_with_one_line(tiny_model_dir, tmp_path):
    from budgetlora.speedups import prepare_for_training
    from budgetlora.training.step import step_runner

    cfg = config_from_dict(
        {
            "model": str(tiny_model_dir),
            "data": {"train_file": "x.csv", "max_length": 32},
            "lora": {"r": 4, "targets": ["q", "v"]},
            "train": {"compile": True, "batch_size": 4},
        }
    )
    model = build_model(cfg, 4)

    class Breaks(torch.nn.Module):  # data-dependent Python control flow: a graph break
        def forward(self, x):
            return x * 2 if float(x.detach().sum()) > 0 else x

    model.base_model.model.classifier.add_module("breaks", Breaks())
    real = model.base_model.model.classifier.forward
    model.base_model.model.classifier.forward = lambda features, **kw: model.base_model.model.classifier.breaks(
        real(features, **kw)
    )
    fast = prepare_for_training(model, cfg, torch.device("cpu"), "fp32", pad_id=1)
    data = tokens(vocab=model.config.vocab_size)
    runner = step_runner(
        model, cfg.train, Runtime(torch.device("cpu"), "fp32"), data, 1, fast.pad_to, backend="aot_eager"
    )
    assert runner.report.failure is not None and runner.pad_to is None
    assert runner.report.describe().startswith("compile: not used (") and "\n" not in runner.report.describe()
    batch = collate(data, np.arange(4), 1)
    loss, _ = runner(runner.step, batch)  # still trains, eagerly
    assert torch.isfinite(loss)


# ----- one whole run of the recipe: checkpoints, evaluations, kill -9 and resume


@pytest.fixture(scope="module", params=DEVICES)
def recipe_run(request, tmp_path_factory, synthetic_data):
    """The forced GPU recipe end to end, under `TORCH_LOGS=recompiles` semantics: the run's own
    counter must stay at zero after warm-up."""
    from budgetlora.recipe import train_run

    device = request.param
    root = tmp_path_factory.mktemp(f"recipe-{device}")
    model_dir = build_tiny_model(root / "model")
    raw = recipe_dict(model_dir, synthetic_data, device)
    (root / "recipe.yaml").write_text(yaml.safe_dump(raw))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BUDGETLORA_CACHE", str(root / "cache"))
        run = train_run(config_from_dict(raw), root / "runs", verbose=False)
    return device, root, run


@pytest.mark.slow
def test_the_recipe_compiles_once_per_width_and_never_again(recipe_run):
    _, _, run = recipe_run
    summary = json.loads((run / "summary.json").read_text())
    assert summary["compile"]["failure"] is None
    assert summary["compile"]["widths"] == [32] and summary["compile"]["graphs"] == 1
    assert summary["compile"]["recompiles"] == 0  # over 60 steps, 6 evaluations, 12 checkpoints
    assert summary["precision"] == "bf16" and summary["steps"] == 60
    losses = [loss for _, loss in _train_losses(run)]
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.1  # it learned
    assert summary["test"]["accuracy"] > 0.35  # chance is 0.25


@pytest.mark.slow
def test_checkpoints_and_adapter_files_carry_the_plain_parameter_names(recipe_run):
    _, _, run = recipe_run
    files = [run / "adapter" / "adapter_model.safetensors"]
    files += sorted((run / "checkpoints").glob("*/*.safetensors"))
    assert len(files) > 1
    for path in files:
        names = list(load_file(str(path)).keys())
        assert names and not any("_orig_mod" in n or n.startswith("model.base_model") for n in names), path


@pytest.mark.slow
def test_merged_bf16_prediction_is_argmax_equal_to_the_adapter_model(recipe_run):
    from budgetlora.artifacts.loading import load_trained
    from budgetlora.evaluate.predict import predict_logits

    device, _, run = recipe_run
    trained = load_trained(run, device=device)
    data = tokens(256, seed=3, vocab=trained.model.config.vocab_size)
    merged = predict_logits(trained.model, data, Runtime(torch.device(device), "bf16"), 1, merge=True)
    adapter = predict_logits(trained.model, data, Runtime(torch.device(device), "fp32"), 1, merge=False)
    margin = np.sort(adapter, axis=1)
    clear = (margin[:, -1] - margin[:, -2]) > 0.05  # rows whose decision bf16 rounding cannot flip
    assert clear.mean() > 0.5
    assert (merged.argmax(1) == adapter.argmax(1))[clear].all()
    assert np.abs(merged - adapter).max() < 0.1


def _train_losses(run: Path) -> list[tuple[int, float]]:
    path, found = run / "metrics.jsonl", []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except ValueError:  # a line being written right now
            continue
        if "train_loss" in record:
            found.append((record["step"], record["train_loss"]))
    return found


@pytest.mark.slow
def test_kill9_and_resume_continue_the_same_loss_curve(recipe_run, tmp_path):
    """Killed mid-run in a subprocess and resumed in another: the resumed steps repeat the
    uninterrupted run's losses. Tolerance: exact on the CPU (same kernels from inductor's cache, the
    RNG state restored, inductor's dropout seeds drawn from it); on CUDA 1e-3 relative, for the
    order of atomic adds in some backward kernels."""
    device, root, reference = recipe_run
    env = dict(os.environ, BUDGETLORA_CACHE=str(root / "cache"), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "budgetlora",
            "train",
            str(root / "recipe.yaml"),
            "--out",
            str(tmp_path),
            "--name",
            "killed",
            "--quiet",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    run, deadline = tmp_path / "killed", time.monotonic() + 600
    while len(_train_losses(run)) < 17:  # past the checkpoints of steps 5, 10 and 15
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the run ended or stalled before step 17: {proc.communicate()[1][-2000:]}")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    resumed = subprocess.run(
        [sys.executable, "-m", "budgetlora", "train", "--resume", str(run)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Recompiling" not in resumed.stderr and "recompile_limit" not in resumed.stderr
    got, want = _train_losses(run), _train_losses(reference)
    assert [s for s, _ in got] == [s for s, _ in want]
    tolerance = 0 if device == "cpu" else 1e-3
    np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=tolerance, atol=0)
    assert json.loads((run / "summary.json").read_text())["compile"]["recompiles"] == 0


# ----- first step of each precision against fp32 eager


def _first_step(runner, batch, device: torch.device, precision: str) -> tuple[float, dict]:
    runner.step.train()
    with autocast(device, precision):
        loss, _ = runner(runner.step, batch)
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in runner.step.model.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision, loss_tolerance, grad_tolerance", [("bf16", 1e-2, 0.1), ("fp16", 2e-3, 0.03)])
def test_first_step_matches_fp32_eager_within_the_precision_tolerance(
    device, precision, loss_tolerance, grad_tolerance, tmp_path
):
    """Dropout off, in the encoder and the adapters (the compiled graph draws other random numbers
    than eager). bf16 keeps 8 bits of mantissa (a relative rounding of 2^-8), fp16 11 (2^-11); over
    the 2-layer model the loss moved 2e-3 (bf16) and the largest gradient element 3% (bf16) and 0.7%
    (fp16) of its tensor's largest: the bounds leave about 3x. fp16 goes through the GradScaler as
    the loop does, and its unscaled gradients compare."""
    from budgetlora.speedups import prepare_for_training
    from budgetlora.training.step import step_runner

    dev = torch.device(device)
    tiny_model_dir = build_tiny_model(tmp_path / "model", dropout=0.0)
    cfg = config_from_dict(
        {
            "model": str(tiny_model_dir),
            "data": {"train_file": "x.csv", "max_length": 32},
            "lora": {"r": 4, "dropout": 0.0, "targets": ["q", "k", "v", "o", "ffn_in", "ffn_out"]},
            "train": {"compile": True, "batch_size": 8, "precision": precision, "device": device},
        }
    )
    torch.manual_seed(0)
    reference = build_model(cfg, 4).to(dev)
    fast = build_model(cfg, 4).to(dev)
    fast.load_state_dict(reference.state_dict())
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "lora_B" in name:  # adapters that change the forward, so their gradients are not all alike
                param.normal_(std=0.1, generator=torch.Generator(device=dev).manual_seed(1))
    fast.load_state_dict(reference.state_dict())
    rt = Runtime(dev, precision)
    data = tokens(vocab=reference.config.vocab_size)
    eager = step_runner(reference, cfg.train, Runtime(dev, "fp32"), data, 1)
    compiled_fast = prepare_for_training(fast, cfg, dev, precision, pad_id=1)
    compiled = step_runner(fast, cfg.train, rt, data, 1, compiled_fast.pad_to)
    assert compiled.report.failure is None and compiled.pad_to == (32,)
    batch = {k: v.to(dev) for k, v in collate(data, np.arange(8), 1, pad_to=compiled.pad_to).items()}
    ref_loss, ref_grads = _first_step(eager, batch, dev, "fp32")
    if precision == "fp16":
        scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
        compiled.step.train()
        with autocast(dev, precision):
            loss, _ = compiled(compiled.step, batch)
        scaler.scale(loss).backward()
        optimizer = torch.optim.SGD([p for p in fast.parameters() if p.requires_grad], lr=0.0)
        scaler.unscale_(optimizer)
        fast_loss = float(loss.detach())
        fast_grads = {n: p.grad.float() for n, p in fast.named_parameters() if p.requires_grad}
    else:
        fast_loss, fast_grads = _first_step(compiled, batch, dev, precision)
    assert fast_loss == pytest.approx(ref_loss, rel=loss_tolerance)
    for name, grad in ref_grads.items():
        scale = grad.abs().max().clamp(min=1e-6)
        assert ((fast_grads[name] - grad).abs().max() / scale) < grad_tolerance, name
    assert compiled.report.recompiles == 0


# ----- a sweep trial and data-parallel training with compile on


@pytest.mark.slow
def test_a_sweep_trial_trains_compiled(recipe_run, tmp_path):
    from budgetlora.api import sweep

    device, root, _ = recipe_run
    base = yaml.safe_load((root / "recipe.yaml").read_text())
    base["train"].update(max_steps=20, save_every=None, early_stopping_patience=1)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "study.yaml").write_text(
        yaml.safe_dump({"name": "compiled", "base": "base.yaml", "grid": {"lora.r": [4]}})
    )
    out = sweep(tmp_path / "study.yaml", out=tmp_path / "out", quiet=True).out
    summaries = list(Path(out).rglob("summary.json"))
    assert summaries
    record = json.loads(summaries[0].read_text())["compile"]
    assert record["failure"] is None and record["recompiles"] == 0


@pytest.mark.slow
def test_two_gloo_processes_train_the_compiled_step(tmp_path, synthetic_data):
    """DDP wraps the compiled step (the frozen base has no gradient buckets); both ranks compile
    the same graph, and the run equals nothing less than a finished run with zero recompiles."""
    model_dir = build_tiny_model(tmp_path / "model", dropout=0.0)
    raw = recipe_dict(model_dir, synthetic_data, "cpu", max_steps=12, eval_every=6, save_every=4, num_threads=1)
    raw["lora"]["dropout"] = 0.0
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", BUDGETLORA_CACHE=str(tmp_path / "cache"))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
            "-m",
            "budgetlora",
            "train",
            str(tmp_path / "ddp.yaml"),
            "--out",
            str(tmp_path / "runs"),
            "--quiet",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "recipe" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 12
    assert summary["compile"]["failure"] is None and summary["compile"]["recompiles"] == 0
    assert "recompile_limit" not in done.stderr
