"""The training step the loop calls: forward + loss of one micro-batch, as one module with a fixed
signature, eager or compiled whole (speedups.compile)."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from budgetlora.config import TrainConfig
from budgetlora.data.tokens import TokenizedSet, bucketed_batches
from budgetlora.distributed import local_slice
from budgetlora.runtime import Runtime
from budgetlora.speedups.compile import CompiledStep, CompileReport, warm_up_batches
from budgetlora.training.losses import loss_function


class TrainStep(nn.Module):
    """`(input_ids, attention_mask, labels[, token_type_ids]) -> (loss, logits)`. Holding the model
    as a child keeps every parameter name as it was (checkpoints and adapter files never see this
    wrapper)."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        token_type_ids: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        segments = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, **segments).logits
        return self.loss_fn(logits.float(), labels), logits


class StepRunner:
    """Runs the step: eagerly, or through a `CompiledStep` with its fixed widths (`pad_to`)."""

    def __init__(self, step: TrainStep, compiled: Optional[CompiledStep] = None):
        self.step, self.compiled = step, compiled

    @property
    def pad_to(self) -> Optional[tuple[int, ...]]:
        return self.compiled.report.widths if self.compiled is not None and self.compiled.report.compiled else None

    @property
    def report(self) -> Optional[CompileReport]:
        return self.compiled.report if self.compiled is not None else None

    def __call__(self, module: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"]}
        if "token_type_ids" in batch:
            inputs["token_type_ids"] = batch["token_type_ids"]
        if self.compiled is not None:
            return self.compiled(module, **inputs)
        return module(**inputs)


def micro_batch_rows(train: TokenizedSet, cfg: TrainConfig, rt: Runtime) -> int:
    """Rows of this process's micro-batches (every batch has them: short batches are dropped)."""
    first = bucketed_batches(train.lengths, cfg.batch_size, cfg.seed, 0)[0]
    return len(local_slice(first, rt.dist))


def step_runner(
    model: nn.Module,
    cfg: TrainConfig,
    rt: Runtime,
    train: TokenizedSet,
    pad_id: int,
    widths: Optional[Sequence[int]] = None,
    backend: Optional[str] = None,
    loss_fn: Optional[nn.Module] = None,
) -> StepRunner:
    """The step for `model` with `loss_fn` (default: the single-label loss of `cfg`); with `widths`,
    compiled and warmed up for each of them here (the report says how many graphs and how long, or
    why it runs eagerly)."""
    step = TrainStep(model, loss_fn if loss_fn is not None else loss_function(cfg))
    if not widths:
        return StepRunner(step)
    compiled = CompiledStep(step, widths, backend)
    rows = micro_batch_rows(train, cfg, rt)
    labels = torch.from_numpy(np.asarray(train.labels[:rows]))
    batches = warm_up_batches(
        widths, rows, torch.from_numpy(train.ids), labels, pad_id, segments=train.segments is not None
    )
    compiled.warm_up(batches, rt.device, rt.precision)
    return StepRunner(step, compiled)
