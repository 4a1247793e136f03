"""Optimizers and parameter groups: LoRA+ and head learning rates, no decay on biases/norms, and
`optimizer: muon` (Muon on the 2-D adapter matrices, AdamW on the rest) through the schedule,
a training run and an exact resume."""

from __future__ import annotations

import json

import pytest
import torch

from budgetlora.config import config_from_dict, load_config
from budgetlora.errors import RunInterrupted
from budgetlora.model import build_model
from budgetlora.training.optim import MuonWithAdamW, build_optimizer, build_scheduler
from budgetlora.recipe import train_run
from budgetlora.resuming import resume_run
from helpers import assert_same_run, interrupt_at

# the resume harness: its config fixture (dropout on, a checkpoint every 5 steps, one thread) and
# the autouse fixture that gives the session its thread count back
pytestmark = pytest.mark.usefixtures("_restore_threads")


def _model_and_cfg(tiny_config, **train):
    tiny_config["train"].update(train)
    cfg = config_from_dict(tiny_config)
    torch.manual_seed(0)
    return build_model(cfg, 4), cfg


def _groups_of(optimizer) -> dict[str, dict]:
    return {g["name"]: g for g in optimizer.param_groups}


def test_lora_plus_head_lr_and_no_decay_groups(tiny_config):
    model, cfg = _model_and_cfg(tiny_config, lr=1e-3, head_lr=3e-3, lora_plus_ratio=16, weight_decay=0.05)
    groups = _groups_of(build_optimizer(model, cfg.train))
    names = {id(p): n for n, p in model.named_parameters()}
    assert groups["lora_B"]["lr"] == pytest.approx(16e-3) and groups["base"]["lr"] == pytest.approx(1e-3)
    assert all(".lora_A." in names[id(p)] for p in groups["base"]["params"])
    assert groups["head"]["lr"] == pytest.approx(3e-3) and groups["head_no_decay"]["weight_decay"] == 0.0
    assert all(names[id(p)].endswith("bias") for p in groups["head_no_decay"]["params"])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == trainable


def test_muon_takes_the_adapter_matrices_and_adamw_the_rest(tiny_config):
    model, cfg = _model_and_cfg(tiny_config, optimizer="muon", lr=1e-3, lora_plus_ratio=4)
    optimizer = build_optimizer(model, cfg.train)
    assert isinstance(optimizer, MuonWithAdamW)
    muon, adamw = optimizer._inner
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    in_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert in_muon and all(".lora_A." in n or ".lora_B." in n for n in in_muon)
    assert in_adamw and all("modules_to_save" in n or "classifier" in n for n in in_adamw)
    assert in_muon | in_adamw == {n for n, p in model.named_parameters() if p.requires_grad}
    # the schedule drives both inner optimizers through the shared group dicts
    scheduler = build_scheduler(optimizer, cfg.train, total_steps=10)
    assert all("initial_lr" in g for g in muon.param_groups + adamw.param_groups)
    model(
        input_ids=torch.tensor([[0, 7, 9, 2]]), attention_mask=torch.ones(1, 4, dtype=torch.long)
    ).logits.sum().backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer.step()
    scheduler.step()
    lrs = {g["name"]: g["lr"] for g in muon.param_groups + adamw.param_groups}
    assert lrs["lora_B_muon"] == pytest.approx(4 * lrs["base_muon"]) and lrs["base_muon"] > 0
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any(".lora_A." in n for n in moved) and any("classifier" in n for n in moved)


def test_muon_trains_and_resumes_bit_identically(run_config, tmp_path, monkeypatch):
    cfg = load_config(run_config, ["train.optimizer=muon", "train.max_steps=30", "train.lr=2e-2"])
    reference = train_run(cfg, tmp_path / "ref", verbose=False)
    summary = json.loads((reference / "summary.json").read_text())
    losses = [
        json.loads(line)["train_loss"]
        for line in (reference / "metrics.jsonl").read_text().splitlines()
        if "train_loss" in line
    ]
    assert sum(losses[-5:]) < sum(losses[:5]) and summary["test"]["accuracy"] > 0.25  # it learns
    interrupt_at(monkeypatch, 12)
    with pytest.raises(RunInterrupted):
        train_run(cfg, tmp_path / "runs", verbose=False)
    monkeypatch.undo()
    run = tmp_path / "runs" / "tiny"
    assert resume_run(run, verbose=False) == run
    assert_same_run(run, reference)
