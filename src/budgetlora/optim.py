"""Optimizer parameter groups (head LR, LoRA+ LR for B, no decay on biases/norms) and schedules."""

from __future__ import annotations

import torch
from torch import nn

from budgetlora.config import TrainConfig

_NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "lora_magnitude")


def _group_of(name: str) -> str:
    if ".lora_B." in name:
        return "lora_B"
    if "modules_to_save" in name or "classifier" in name:
        return "head"
    return "base"


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Trainable parameters split by role, each with its learning rate and weight decay."""
    lr_of = {"base": cfg.lr, "head": cfg.head_lr or cfg.lr,
             "lora_B": cfg.lr * (cfg.lora_plus_ratio or 1.0)}
    groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not any(marker in name for marker in _NO_DECAY)
        groups.setdefault((_group_of(name), decay), []).append(param)
    return [{"params": params, "lr": lr_of[role], "weight_decay": cfg.weight_decay if decay else 0.0,
             "name": f"{role}{'' if decay else '_no_decay'}"}
            for (role, decay), params in sorted(groups.items())]


def build_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool = False) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused or None)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.optimizer == "adagrad":
        return torch.optim.Adagrad(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    return int(round(cfg.warmup * total_steps)) if cfg.warmup < 1 else int(cfg.warmup)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    from transformers import get_scheduler

    name = "constant_with_warmup" if cfg.scheduler == "constant" else cfg.scheduler
    extra = {"num_cycles": cfg.num_cycles} if cfg.scheduler == "cosine_with_restarts" else None
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps(cfg, total_steps),
                         num_training_steps=total_steps, scheduler_specific_kwargs=extra)
