"""The CUDA fast path on a real GPU (skipped without one; `pytest -m cuda` runs only these):
bf16 + compile against fp32 eager on the first step, compile warm-up covering every width,
low-rank dropout and the first-token layer exact in eval mode, merged bf16 prediction against
the adapter model, and a kill + resume on the GPU continuing the same loss curve."""

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

from budgetlora.config import config_from_dict
from budgetlora.data.tokens import TokenizedSet, collate
from budgetlora.model import build_model, forward_logits
from budgetlora.runtime import Runtime

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")


def _cfg(tiny_config, **train):
    tiny_config["train"].update(device="cuda", **train)
    return config_from_dict(tiny_config)


def _data(n: int = 64, seed: int = 0) -> TokenizedSet:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(6, 60, size=n)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return TokenizedSet(rng.integers(5, 200, size=int(offsets[-1])).astype(np.int32), offsets, rng.integers(0, 4, size=n))


def _first_step(model, batch, precision: str) -> tuple[float, dict]:
    from budgetlora.runtime import autocast

    model.train()
    with autocast(CUDA, precision):
        logits = forward_logits(model, batch)
    loss = torch.nn.functional.cross_entropy(logits.float(), batch["labels"])
    loss.backward()
    return float(loss), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_fast_path_first_step_matches_fp32_eager_within_bf16_tolerance(tiny_config):
    from budgetlora.speedups import prepare_for_training

    tiny_config["lora"]["dropout"] = 0.0
    cfg = _cfg(tiny_config, compile=True)
    torch.manual_seed(0)
    reference = build_model(cfg, 4).to(CUDA)
    torch.manual_seed(0)
    fast = build_model(cfg, 4).to(CUDA)
    fast.load_state_dict(reference.state_dict())
    prepared = prepare_for_training(fast, cfg, CUDA, "bf16", pad_id=1, num_labels=4)
    assert prepared.compiled
    batch = {k: v.to(CUDA) for k, v in collate(_data(), np.arange(16), 1, pad_to=prepared.pad_to).items()}
    ref_loss, ref_grads = _first_step(reference, batch, "fp32")
    fast_loss, fast_grads = _first_step(fast, batch, "bf16")
    assert fast_loss == pytest.approx(ref_loss, rel=2e-2)
    for name, grad in ref_grads.items():
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), fast_grads[name].flatten(), dim=0)
        assert cosine > 0.98, name


def test_compile_warm_up_covers_every_width(tiny_config):
    from torch._dynamo.utils import counters

    from budgetlora.speedups import prepare_for_training
    from budgetlora.training import train_loop

    cfg = _cfg(tiny_config, compile=True, max_steps=30, eval_every=None)
    model = build_model(cfg, 4).to(CUDA)
    prepared = prepare_for_training(model, cfg, CUDA, "bf16", pad_id=1, num_labels=4)
    compiled_after_warm_up = counters["stats"]["unique_graphs"]
    train_loop(model, _data(512), None, cfg.train, Runtime(CUDA, "bf16"), 1, lambda record: None, pad_to=prepared.pad_to)
    assert counters["stats"]["unique_graphs"] == compiled_after_warm_up  # no recompile during training


def test_low_rank_dropout_and_first_token_layer_are_exact_in_eval_mode(tiny_config):
    from budgetlora.speedups.first_token import use_first_token_last_layer
    from budgetlora.speedups.lowrank_dropout import use_lowrank_dropout

    tiny_config["lora"]["dropout"] = 0.2
    cfg = _cfg(tiny_config)
    torch.manual_seed(0)
    plain = build_model(cfg, 4).to(CUDA).eval()
    changed = build_model(cfg, 4).to(CUDA).eval()
    changed.load_state_dict(plain.state_dict())
    assert use_lowrank_dropout(changed) > 0 and use_first_token_last_layer(changed, pad_id=1)
    batch = {k: v.to(CUDA) for k, v in collate(_data(), np.arange(32), 1).items()}
    with torch.inference_mode():
        assert torch.allclose(forward_logits(plain, batch), forward_logits(changed, batch), atol=1e-5)


def test_merged_bf16_prediction_agrees_with_the_adapter_model(tiny_config):
    from budgetlora.evaluate.predict import predict_logits

    cfg = _cfg(tiny_config)
    model = build_model(cfg, 4).to(CUDA)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)  # adapters that change the logits
    data = _data(256)
    merged = predict_logits(model, data, Runtime(CUDA, "bf16"), 1, merge=True)
    adapter = predict_logits(model, data, Runtime(CUDA, "fp32"), 1, merge=False)
    assert (merged.argmax(1) == adapter.argmax(1)).mean() >= 0.98
    assert np.abs(merged - adapter).max() < 0.1


def test_kill_and_resume_on_the_gpu_continue_the_same_loss_curve(run_config, tmp_path):
    raw = yaml.safe_load(run_config.read_text())
    raw["train"].update(device="cuda", precision="bf16", num_threads=None)
    config = tmp_path / "cuda.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = dict(os.environ, BUDGETLORA_CACHE=str(tmp_path / "cache"))

    def train(name: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "budgetlora", "train", str(config), "--out", str(tmp_path),
                                 "--name", name, "--quiet"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    reference = train("reference")
    assert reference.wait(timeout=600) == 0, reference.stderr.read().decode()[-2000:]
    killed = train("killed")
    deadline = time.monotonic() + 600
    while _last_step(tmp_path / "killed") < 37 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    resumed = subprocess.run([sys.executable, "-m", "budgetlora", "train", "--resume", str(tmp_path / "killed"),
                              "--quiet"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ref, got = _losses(tmp_path / "reference"), _losses(tmp_path / "killed")
    assert [s for s, _ in got] == [s for s, _ in ref]
    assert np.allclose([l for _, l in got], [l for _, l in ref], rtol=5e-2, atol=5e-3)


def _last_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    steps = [0]
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                steps.append(json.loads(line)["step"])
            except (ValueError, KeyError):
                pass
    return max(steps)


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["train_loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "train_loss" in r]
