"""The training loop: one readable function over pre-tokenized, length-bucketed batches.

Host synchronisation happens only at log, evaluation and checkpoint points: loss, accuracy and
the first non-finite step are kept on the device between them, so a GPU never waits for Python.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch import nn

from budgetlora.config import PredictionBatch, TrainConfig
from budgetlora.data.tokens import TokenizedSet, bucketed_batches, collate, pad_multiple_for
from budgetlora.distributed import all_reduce_sum, local_slice, wrap_model
from budgetlora.errors import BudgetLoraError, RunDiverged
from budgetlora.evaluate.predict import DEFAULT_BATCH, predict_logits
from budgetlora.evaluate.task_metrics import ValidationScore, validation_score
from budgetlora.runtime import Runtime, autocast
from budgetlora.task import MULTI, REGRESSION, SINGLE
from budgetlora.training.losses import loss_function, train_hits
from budgetlora.training.optim import build_optimizer, build_scheduler
from budgetlora.training.step import StepRunner, TrainStep


@dataclass
class LoopState:
    """The loop's counters: with the tensors of `Resumable`, what makes a resume exact."""

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
class Resumable:
    """Everything a checkpoint holds besides the model, and a resume hands back to the loop."""

    state: LoopState
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    total_steps: int
    best_trainable: Optional[dict[str, torch.Tensor]] = None
    history: list[dict] = field(default_factory=list)


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


def fresh_resumable(model: nn.Module, train_data: TokenizedSet, cfg: TrainConfig, rt: Runtime) -> Resumable:
    """The starting point of a new run: step 0, a new optimizer, schedule and grad scaler."""
    batches = len(bucketed_batches(train_data.lengths, cfg.batch_size, cfg.seed, 0))
    total = total_steps_for(cfg, batches)
    optimizer = build_optimizer(model, cfg, rt.device)
    return Resumable(
        LoopState(),
        optimizer,
        build_scheduler(optimizer, cfg, total),
        torch.amp.GradScaler(rt.device.type, enabled=rt.precision == "fp16"),
        total,
    )


def trainable_tensors(model: nn.Module, copy: bool = True) -> dict[str, torch.Tensor]:
    return {n: (p.detach().clone() if copy else p.detach()) for n, p in model.named_parameters() if p.requires_grad}


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
        raise BudgetLoraError(
            f"{len(missing)} trainable tensors received no gradient after the first "
            f"backward step (first: {missing[0]}); the adapters would not train"
        )


class _Window:
    """Loss / accuracy sums since the last log line, and the first step with a non-finite loss,
    kept on the device."""

    def __init__(self, state: LoopState, rt: Runtime, task: str = SINGLE):
        self.rt, self.task = rt, task
        carried = rt.dist.is_main  # a restored window holds global sums: one rank carries them on
        device = rt.device
        self.loss = torch.full((), state.window_loss if carried else 0.0, device=device, dtype=torch.float32)
        self.correct = torch.full((), state.window_correct if carried else 0, device=device, dtype=torch.long)
        self.rows = state.window_rows if carried else 0
        self.nonfinite_at = torch.full((), -1, device=device, dtype=torch.long)
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, step: int) -> None:
        loss = loss.detach()
        self.nonfinite_at = torch.where(torch.isfinite(loss) | (self.nonfinite_at >= 0), self.nonfinite_at, step)
        self.loss += loss * len(labels)
        self.correct += train_hits(self.task, logits.detach(), labels)
        self.rows += len(labels)

    def check_finite(self, lr: float) -> None:
        step = int(self.nonfinite_at)  # a host sync: only at log, evaluation and checkpoint points
        if step >= 0:
            raise RunDiverged(
                f"the training loss became NaN or infinite at step {step} (lr {lr:.3g}); the run is "
                "removed: lower train.lr, keep train.grad_clip on, or use bf16/fp32 instead of fp16"
            )

    def totals(self) -> tuple[float, int, int]:
        loss, correct, rows = all_reduce_sum(
            [float(self.loss), int(self.correct), self.rows], self.rt.dist, self.rt.device
        )
        return loss, int(correct), int(rows)

    def reset(self) -> None:
        self.loss.zero_()
        self.correct.zero_()
        self.rows, self.start = 0, time.perf_counter()


Sink = Callable[[dict], None]
Hook = Callable[[str, Resumable], None]
EvalHook = Callable[[int, np.ndarray], None]


def _log_window(window: _Window, progress: Resumable, stream: BatchStream, log: Sink) -> None:
    state = progress.state
    window.check_finite(progress.optimizer.param_groups[0]["lr"])
    elapsed = time.perf_counter() - window.start
    loss_sum, correct, rows = window.totals()
    record = {
        "step": state.step,
        "epoch": round(state.epoch + state.position / stream.batches_per_epoch(), 4),
        "train_loss": loss_sum / rows,
        "train_acc": correct / rows,
        "lr": progress.optimizer.param_groups[0]["lr"],
        "samples_per_s": rows / max(elapsed, 1e-9),
    }
    if window.task == MULTI:  # every label right at 0.5: subset accuracy
        record["train_subset_acc"] = record.pop("train_acc")
    elif window.task == REGRESSION:
        del record["train_acc"]
    state.last_train_loss = record["train_loss"]
    progress.history.append(record)
    log(record)
    window.reset()


def _evaluate(
    model: nn.Module,
    val_data: TokenizedSet,
    rt: Runtime,
    pad_id: int,
    progress: Resumable,
    log: Sink,
    batch: PredictionBatch,
    score: ValidationScore,
) -> np.ndarray:
    """Validation metrics into the log and the best-so-far tracking; returns per-row correctness."""
    state = progress.state
    logits = predict_logits(model, val_data, rt, pad_id, batch)
    acc, state.last_eval_loss, correct = score(logits, val_data.labels)
    if not math.isfinite(state.last_eval_loss):  # the model's outputs overflowed: its accuracy means nothing
        raise RunDiverged(
            f"the validation loss became NaN or infinite at step {state.step} (lr "
            f"{progress.optimizer.param_groups[0]['lr']:.3g}); the run is removed: lower train.lr, "
            "keep train.grad_clip on, or use bf16/fp32 instead of fp16"
        )
    record = {"step": state.step, "eval_loss": state.last_eval_loss, score.key: acc}
    progress.history.append(record)
    log(record)
    if acc > state.best_acc:
        state.best_acc, state.best_step, state.evals_without_gain = acc, state.step, 0
        progress.best_trainable = trainable_tensors(model)
    else:
        state.evals_without_gain += 1
    return correct


def _backward(
    module: nn.Module,
    runner: StepRunner,
    batch: dict[str, torch.Tensor],
    rt: Runtime,
    scaler: torch.amp.GradScaler,
    grad_accum: int,
    sync: bool,
    window: _Window,
    step: int,
) -> None:
    """Forward and backward of one micro-batch; its loss and accuracy go into the window."""
    batch = {k: v.to(rt.device, non_blocking=True) for k, v in batch.items()}
    with contextlib.nullcontext() if sync else module.no_sync():
        with autocast(rt.device, rt.precision):
            loss, logits = runner(module, batch)
        scaler.scale(loss / grad_accum).backward()
    window.add(loss, logits, batch["labels"], step)


def _evaluation_due(cfg: TrainConfig, step: int, total: int, val_data: Optional[TokenizedSet]) -> bool:
    scheduled = (cfg.eval_every and (step % cfg.eval_every == 0 or step == total)) or step in cfg.eval_at
    return bool(val_data is not None and len(val_data) > 0 and scheduled)


def _stop_agreed(should_stop: Callable[[], bool], rt: Runtime) -> bool:
    """Ranks must agree on where to stop, or the others would wait forever in the next all-reduce."""
    return bool(all_reduce_sum([float(should_stop())], rt.dist, rt.device)[0]) if rt.dist.enabled else should_stop()


def _optimizer_step(progress: Resumable, trainable: list[torch.Tensor], grad_clip: Optional[float]) -> None:
    """Clip (unscaled), step, advance the schedule and drop the gradients."""
    optimizer, scaler = progress.optimizer, progress.scaler
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    progress.scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def train_loop(
    model: nn.Module,
    train_data: TokenizedSet,
    val_data: Optional[TokenizedSet],
    cfg: TrainConfig,
    rt: Runtime,
    pad_id: int,
    log: Sink,
    resume: Optional[Resumable] = None,
    on_checkpoint: Optional[Hook] = None,
    should_stop: Callable[[], bool] = lambda: False,
    runner: Optional[StepRunner] = None,
    on_eval: Optional[EvalHook] = None,
    eval_batch: PredictionBatch = DEFAULT_BATCH,
    score: Optional[ValidationScore] = None,
) -> Resumable:
    """Train until the last step (or early stopping); evaluate on `val_data` every `eval_every` steps.

    `on_checkpoint(reason, progress)` is called at save/eval points and when `should_stop()` turns
    true (a signal); the loop then returns. `on_eval(step, correct)` sees each evaluation's per-row
    outcomes after its checkpoint (a pruner may raise there). `resume` continues a checkpointed run
    exactly. `runner` runs the step (`training.step.step_runner`: compiled for fixed widths, or
    eagerly, the default); validation predicts in `eval_batch`es (Config.prediction_batch) and is
    scored by `score` (the task's objective and training log; default single-label). Under `rt.dist`, every rank draws the same global batches and trains on its slice of each; logged
    metrics and checkpointed sums are global, so a checkpoint resumes on any number of processes."""
    progress = resume or fresh_resumable(model, train_data, cfg, rt)
    state, total, dist = progress.state, progress.total_steps, rt.dist
    stream = BatchStream(train_data, cfg.batch_size, cfg.seed, state.epoch, state.position)
    runner = runner or StepRunner(TrainStep(model, loss_function(cfg)))
    score = score or validation_score()
    trainable = [p for p in model.parameters() if p.requires_grad]
    window = _Window(state, rt, score.task)
    checkpointing = on_checkpoint is not None or dist.enabled  # non-main ranks join the collectives

    def checkpoint(reason: str) -> None:
        window.check_finite(progress.optimizer.param_groups[0]["lr"])  # never checkpoint a diverged model
        state.window_loss, state.window_correct, state.window_rows = window.totals()
        if on_checkpoint is not None:
            on_checkpoint(reason, progress)

    forward_module = wrap_model(runner.step, dist, rt.device)
    pad_multiple = pad_multiple_for(rt.device)
    batches = iter(stream)
    optimizer, scaler = progress.optimizer, progress.scaler
    model.train()
    while state.step < total:
        step_start = time.perf_counter()
        for micro in range(cfg.grad_accum):
            batch = collate(train_data, local_slice(next(batches), dist), pad_id, pad_multiple, runner.pad_to)
            # gradients are all-reduced once per optimizer step, on the last micro-batch
            sync = not dist.enabled or micro == cfg.grad_accum - 1
            _backward(forward_module, runner, batch, rt, scaler, cfg.grad_accum, sync, window, state.step + 1)
        if state.step == 0:
            check_gradients_flow(model)
        _optimizer_step(progress, trainable, cfg.grad_clip)
        state.step += 1
        state.epoch, state.position = stream.epoch, stream.position
        state.samples_seen += cfg.batch_size * cfg.grad_accum
        state.train_time_s += time.perf_counter() - step_start

        if state.step % cfg.log_every == 0 or state.step == total:
            _log_window(window, progress, stream, log)
        evaluating = _evaluation_due(cfg, state.step, total, val_data)
        if evaluating:
            window.check_finite(optimizer.param_groups[0]["lr"])
            correct = _evaluate(model, val_data, rt, pad_id, progress, log, eval_batch, score)
            window.start = time.perf_counter()  # evaluation time is not training throughput
        if checkpointing and (evaluating or (cfg.save_every and state.step % cfg.save_every == 0)):
            checkpoint("eval" if evaluating else "periodic")
        if evaluating and on_eval is not None:
            on_eval(state.step, correct)
        if evaluating and cfg.early_stopping_patience and state.evals_without_gain >= cfg.early_stopping_patience:
            state.stopped_early = True
            break
        if state.step < total and _stop_agreed(should_stop, rt):
            if checkpointing:
                checkpoint("signal")
            break
    window.check_finite(optimizer.param_groups[0]["lr"])
    return progress
