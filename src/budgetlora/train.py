"""The training loop: one readable function over pre-tokenized, length-bucketed batches.

Host synchronisation happens only at log and evaluation points: loss and accuracy are summed on
the device between them, so a GPU never waits for Python per step.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn

from budgetlora.config import TrainConfig
from budgetlora.data.tokens import TokenizedSet, bucketed_batches, collate, pad_multiple_for
from budgetlora.distributed import SINGLE, DistContext, all_reduce_sum, local_slice, wrap_model
from budgetlora.errors import BudgetLoraError
from budgetlora.evaluate import autocast, cross_entropy, predict_logits
from budgetlora.model import forward_logits
from budgetlora.optim import build_optimizer, build_scheduler


@dataclass
class LoopState:
    """Everything that, with the model/optimizer/scheduler states, makes a resume exact."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    position: int = 0  # next batch index within the epoch
    best_acc: float = -1.0
    best_step: int = 0
    evals_without_gain: int = 0
    samples_seen: int = 0
    train_time_s: float = 0.0
    last_train_loss: Optional[float] = None
    last_eval_loss: Optional[float] = None
    stopped_early: bool = False
    # the log window in progress (sums since the last log line), so a resume mid-window logs the
    # same means as an uninterrupted run; synced from the device only at checkpoints
    window_loss: float = 0.0
    window_correct: int = 0
    window_rows: int = 0


@dataclass
class LoopResult:
    state: LoopState
    total_steps: int
    best_trainable: Optional[dict[str, torch.Tensor]] = None
    history: list[dict] = field(default_factory=list)
    optimizer: Optional[torch.optim.Optimizer] = None
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None
    scaler: Optional[torch.amp.GradScaler] = None


class BatchStream:
    """Endless training batches, epoch after epoch, resumable at (epoch, position)."""

    def __init__(self, data: TokenizedSet, batch_size: int, seed: int, epoch: int, position: int):
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.epoch, self.position = epoch, position
        self._batches = bucketed_batches(data.lengths, batch_size, seed, epoch)

    def batches_per_epoch(self) -> int:
        return len(self._batches)

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            if self.position >= len(self._batches):
                self.epoch, self.position = self.epoch + 1, 0
                self._batches = bucketed_batches(self.data.lengths, self.batch_size, self.seed, self.epoch)
            index = self._batches[self.position]
            self.position += 1
            yield index


def total_steps_for(cfg: TrainConfig, batches_per_epoch: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    assert cfg.epochs is not None
    return max(1, math.ceil(cfg.epochs * batches_per_epoch / cfg.grad_accum))


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def check_gradients_flow(model: nn.Module) -> None:
    """Fail loudly if a trainable tensor got no gradient (e.g. gradient checkpointing on a frozen
    base detaches the adapters, and training then silently does nothing)."""
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    if missing:
        raise BudgetLoraError(f"{len(missing)} trainable tensors received no gradient after the first "
                              f"backward step (first: {missing[0]}); the adapters would not train")


Hook = Callable[[LoopState, str, LoopResult], None]


def train_loop(model: nn.Module, train_data: TokenizedSet, val_data: Optional[TokenizedSet],
               cfg: TrainConfig, device: torch.device, pad_id: int, precision: str,
               log: Callable[[dict], None], state: Optional[LoopState] = None,
               optimizer: Optional[torch.optim.Optimizer] = None, scheduler=None,
               scaler: Optional[torch.amp.GradScaler] = None,
               on_checkpoint: Optional[Hook] = None, should_stop: Callable[[], bool] = lambda: False,
               progress: Optional[Callable[[LoopState, int, dict], None]] = None,
               best_trainable: Optional[dict[str, torch.Tensor]] = None,
               history: Optional[list[dict]] = None,
               pad_to: Optional[Sequence[int]] = None, dist: DistContext = SINGLE) -> LoopResult:
    """Train until max_steps (or early stopping); evaluate on `val_data` every `eval_every` steps.

    `on_checkpoint(state, reason, result)` is called at save/eval points and when `should_stop()` turns
    true (a signal); the loop then returns with the state so far. To resume, pass the restored
    `state`, `optimizer`, `scheduler`, `scaler`, `best_trainable` and `history`.

    Under `dist`, every rank draws the same global batches and trains on its slice of each; logged
    metrics and checkpointed sums are global, so a checkpoint resumes on any number of processes."""
    state = state or LoopState()
    stream = BatchStream(train_data, cfg.batch_size, cfg.seed, state.epoch, state.position)
    total = total_steps_for(cfg, stream.batches_per_epoch())
    optimizer = optimizer or build_optimizer(model, cfg, fused=device.type == "cuda")
    scheduler = scheduler or build_scheduler(optimizer, cfg, total)
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    trainable = [p for p in model.parameters() if p.requires_grad]
    result = LoopResult(state, total, best_trainable=best_trainable, history=list(history or []),
                        optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    # a restored window holds global sums: one rank carries them on, or a reduce would multiply them
    carried = dist.is_main
    window_loss = torch.full((), state.window_loss if carried else 0.0, device=device, dtype=torch.float32)
    window_correct = torch.full((), state.window_correct if carried else 0, device=device, dtype=torch.long)
    window_rows, window_start = state.window_rows if carried else 0, time.perf_counter()

    def global_window() -> tuple[float, int, int]:
        loss_sum, correct, rows = all_reduce_sum([float(window_loss), int(window_correct), window_rows], dist, device)
        return loss_sum, int(correct), int(rows)

    def checkpoint(reason: str) -> None:
        window = global_window()  # collective: every rank reaches the same checkpoint points
        if on_checkpoint is not None:
            state.window_loss, state.window_correct, state.window_rows = window
            on_checkpoint(state, reason, result)

    def stop_requested() -> bool:
        # ranks must agree on where to stop, or the others would wait forever in the next all-reduce
        return bool(all_reduce_sum([float(should_stop())], dist, device)[0]) if dist.enabled else should_stop()
    forward_model = wrap_model(model, dist, device)
    pad_multiple = pad_multiple_for(device)
    batches = iter(stream)
    model.train()
    while state.step < total:
        step_start = time.perf_counter()
        for micro in range(cfg.grad_accum):
            index = local_slice(next(batches), dist)
            batch = collate(train_data, index, pad_id, pad_multiple, pad_to)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            # gradients are all-reduced once per optimizer step, on the last micro-batch
            sync = contextlib.nullcontext() if not dist.enabled or micro == cfg.grad_accum - 1 else forward_model.no_sync()
            with sync:
                with autocast(device, precision):
                    logits = forward_logits(forward_model, batch)
                loss = loss_fn(logits.float(), batch["labels"])
                scaler.scale(loss / cfg.grad_accum).backward()
            window_loss += loss.detach() * len(batch["labels"])
            window_correct += (logits.detach().argmax(-1) == batch["labels"]).sum()
            window_rows += len(batch["labels"])
        if state.step == 0:
            check_gradients_flow(model)
        if cfg.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.epoch, state.position = stream.epoch, stream.position
        state.samples_seen += cfg.batch_size * cfg.grad_accum
        state.train_time_s += time.perf_counter() - step_start

        if state.step % cfg.log_every == 0 or state.step == total:
            elapsed = time.perf_counter() - window_start
            loss_sum, correct, rows = global_window()
            record = {"step": state.step, "epoch": round(state.epoch + state.position / stream.batches_per_epoch(), 4),
                      "train_loss": loss_sum / rows, "train_acc": correct / rows,
                      "lr": optimizer.param_groups[0]["lr"], "samples_per_s": rows / max(elapsed, 1e-9)}
            state.last_train_loss = record["train_loss"]
            log(record)
            result.history.append(record)
            if progress:
                progress(state, total, record)
            window_loss.zero_()
            window_correct.zero_()
            window_rows, window_start = 0, time.perf_counter()

        evaluating = val_data is not None and len(val_data) > 0 and cfg.eval_every and (
            state.step % cfg.eval_every == 0 or state.step == total)
        if evaluating:
            logits = predict_logits(model, val_data, device, pad_id, precision, dist=dist)
            acc = float((logits.argmax(1) == val_data.labels).mean())
            state.last_eval_loss = cross_entropy(logits, val_data.labels)
            record = {"step": state.step, "eval_loss": state.last_eval_loss, "eval_acc": acc}
            log(record)
            result.history.append(record)
            if progress:
                progress(state, total, record)
            if acc > state.best_acc:
                state.best_acc, state.best_step, state.evals_without_gain = acc, state.step, 0
                result.best_trainable = trainable_state(model)
            else:
                state.evals_without_gain += 1
            window_start = time.perf_counter()  # evaluation time is not training throughput
        checkpointing = on_checkpoint is not None or dist.enabled  # non-main ranks join the collective
        if checkpointing and (evaluating or (cfg.save_every and state.step % cfg.save_every == 0)):
            checkpoint("eval" if evaluating else "periodic")
        if evaluating and cfg.early_stopping_patience and state.evals_without_gain >= cfg.early_stopping_patience:
            state.stopped_early = True
            break
        if state.step < total and stop_requested():
            if checkpointing:
                checkpoint("signal")
            break
    return result
