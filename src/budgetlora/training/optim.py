"""Optimizer parameter groups (head LR, LoRA+ LR for B, no decay on biases/norms) and schedules."""

from __future__ import annotations

import torch
from torch import nn

from budgetlora.config import TrainConfig
from budgetlora.errors import BudgetLoraError

_NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "lora_magnitude")


class MuonWithAdamW(torch.optim.Optimizer):
    """`train.optimizer: muon`: torch's Muon on the trainable 2-D hidden matrices (LoRA A and B;
    under `mode: full` every encoder weight matrix) and AdamW on the rest (the classification head,
    embeddings, biases, norms, DoRA magnitudes), the split Muon's authors prescribe. Muon scales its
    step to AdamW's RMS (`adjust_lr_fn="match_rms_adamw"`), so AdamW learning rates carry over.

    One optimizer to the loop, the schedulers, the grad scaler and checkpoints: its param_groups
    are the two inner optimizers' own group dicts, so a schedule that sets `lr` sets it for both."""

    def __init__(self, muon_groups: list[dict], adamw_groups: list[dict], momentum: float, fused: bool = False):
        self._inner = []
        if muon_groups:
            self._inner.append(torch.optim.Muon(muon_groups, momentum=momentum, adjust_lr_fn="match_rms_adamw"))
        if adamw_groups:
            self._inner.append(torch.optim.AdamW(adamw_groups, fused=fused or None))
        super().__init__(self._shared_groups(), {})

    def _shared_groups(self) -> list[dict]:
        return [group for inner in self._inner for group in inner.param_groups]

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for inner in self._inner:
            inner.step()
        return loss

    def state_dict(self) -> dict:
        return {"inner": [inner.state_dict() for inner in self._inner]}

    def load_state_dict(self, state_dict: dict) -> None:
        for inner, state in zip(self._inner, state_dict["inner"], strict=True):
            inner.load_state_dict(state)
        self.param_groups = self._shared_groups()  # loading gave the inner optimizers new group dicts


def _takes_muon(name: str, param: torch.nn.Parameter) -> bool:
    return param.ndim == 2 and _group_of(name) != "head" and "embeddings" not in name  # noqa: PLR2004 - a matrix


def _group_of(name: str) -> str:
    if ".lora_B." in name:
        return "lora_B"
    if "modules_to_save" in name or "classifier" in name:
        return "head"
    return "base"


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Trainable parameters split by role, each with its learning rate and weight decay (and, for
    `muon`, by whether Muon or AdamW updates them: the group's "muon" flag)."""
    lr_of = {"base": cfg.lr, "head": cfg.head_lr or cfg.lr, "lora_B": cfg.lr * (cfg.lora_plus_ratio or 1.0)}
    groups: dict[tuple[str, bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not any(marker in name for marker in _NO_DECAY)
        muon = cfg.optimizer == "muon" and _takes_muon(name, param)
        groups.setdefault((_group_of(name), decay, muon), []).append(param)
    return [
        {
            "params": params,
            "lr": lr_of[role],
            "weight_decay": cfg.weight_decay if decay else 0.0,
            "name": f"{role}{'' if decay else '_no_decay'}{'_muon' if muon else ''}",
            "muon": muon,
        }
        for (role, decay, muon), params in sorted(groups.items())
    ]


def fused_available(device: torch.device) -> bool:
    """Whether torch has a fused (one kernel for every tensor) AdamW for `device`: CUDA, and CPU
    since torch 2.4, where it is several times faster than the per-tensor loop."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:
        return device.type == "cuda"
    return device.type in _get_fused_kernels_supported_devices()


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device | None = None) -> torch.optim.Optimizer:
    """The configured optimizer over the trainable parameters; AdamW fused where torch offers it on
    `device` (the parameters' device)."""
    groups = param_groups(model, cfg)
    fused = device is not None and fused_available(device)
    if cfg.optimizer == "muon":
        return MuonWithAdamW(
            [g for g in groups if g["muon"]], [g for g in groups if not g["muon"]], momentum=cfg.momentum, fused=fused
        )
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused or None)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.optimizer == "adagrad":
        return torch.optim.Adagrad(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    return int(round(cfg.warmup * total_steps)) if cfg.warmup < 1 else int(cfg.warmup)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    from transformers import get_scheduler

    warmup = warmup_steps(cfg, total_steps)
    if warmup >= total_steps and cfg.warmup >= 1:
        raise BudgetLoraError(
            f"config key 'train.warmup': {warmup} warmup steps is not shorter than the {total_steps} steps of the run"
        )
    name = "constant_with_warmup" if cfg.scheduler == "constant" else cfg.scheduler
    extra = {"num_cycles": cfg.num_cycles} if cfg.scheduler == "cosine_with_restarts" else None
    return get_scheduler(
        name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps, scheduler_specific_kwargs=extra
    )
