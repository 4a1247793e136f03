"""Training: the loop (loop), parameter groups and schedules (optim), crash-safe checkpoints
and exact resume (checkpoint), and stopping at a step boundary on SIGINT / SIGTERM (interrupt)."""

from budgetlora.training.checkpoint import (
    CHECKPOINTS,
    Checkpoint,
    Checkpointer,
    checkpoint_name,
    complete_checkpoints,
    load_checkpoint,
    load_latest_checkpoint,
    remove_stale_temp,
    restore_model,
    restore_rng,
)
from budgetlora.training.interrupt import StopFlag, stop_on_signals
from budgetlora.training.loop import (
    LoopState,
    Resumable,
    fresh_resumable,
    load_trainable_state,
    total_steps_for,
    train_loop,
    trainable_tensors,
)
from budgetlora.training.optim import build_optimizer, build_scheduler

__all__ = [
    "CHECKPOINTS",
    "Checkpoint",
    "Checkpointer",
    "LoopState",
    "Resumable",
    "StopFlag",
    "build_optimizer",
    "build_scheduler",
    "checkpoint_name",
    "complete_checkpoints",
    "fresh_resumable",
    "load_checkpoint",
    "load_latest_checkpoint",
    "load_trainable_state",
    "remove_stale_temp",
    "restore_model",
    "restore_rng",
    "stop_on_signals",
    "total_steps_for",
    "train_loop",
    "trainable_tensors",
]
