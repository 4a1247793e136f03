"""Resuming a run: continue an interrupted run from its newest checkpoint exactly where it
stopped, or (`extend`) train a finished run further with the schedule rebuilt for the new length.
It shares the recipe's setup and phases (recipe.py); what differs is restoring the optimizer,
schedule, grad scaler and RNG, and cutting the run directory back to the checkpoint's step."""

from __future__ import annotations

import os
import shlex
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

from budgetlora.artifacts import run_dir as rd
from budgetlora.artifacts.placement import reclaim
from budgetlora.config import Config, config_from_dict, flatten, parse_override
from budgetlora.data import bucketed_batches
from budgetlora.distributed import context_from_env
from budgetlora.errors import BudgetLoraError, NotResumable
from budgetlora.progress import QUIET, Console
from budgetlora.recipe import EvalCallback, Session, setup_session, train_session
from budgetlora.runtime import process_runtime
from budgetlora.tracking import require_trackers
from budgetlora.training import (
    Checkpoint,
    Resumable,
    build_optimizer,
    build_scheduler,
    complete_checkpoints,
    load_latest_checkpoint,
    remove_stale_temp,
    total_steps_for,
)

# keys a resume may change: they do not alter the trajectory (device and threads can change the
# last bits of float results, which is the user's call when moving a run to another machine)
RESUME_FREE_KEYS = (
    "train.device",
    "train.num_threads",
    "train.save_every",
    "train.keep_checkpoints",
    "train.eval_batch_size",
)
# keys that change the schedule's length: only with --extend, which rebuilds the schedule
RESUME_EXTEND_KEYS = ("train.max_steps", "train.epochs")


def _resume_config(run_dir: Path, overrides: Optional[list[str]]) -> Config:
    cfg = rd.read_run_config(run_dir)
    parsed = dict(parse_override(item) for item in (overrides or []))
    refused = [k for k in parsed if k not in RESUME_FREE_KEYS + RESUME_EXTEND_KEYS]
    if refused:
        raise BudgetLoraError(
            f"--set {refused[0]} cannot change on --resume (the run continues as "
            f"configured); resume may set only {', '.join(RESUME_FREE_KEYS + RESUME_EXTEND_KEYS)}"
        )
    return config_from_dict(cfg.to_dict(), parsed) if parsed else cfg


def _check_resumable(run_dir: Path, cfg: Config, ckpt: Checkpoint, extend: bool) -> None:
    old, new = flatten(ckpt.config), flatten(cfg.to_dict())
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k) and k not in RESUME_FREE_KEYS]
    other = [k for k in changed if k not in RESUME_EXTEND_KEYS]
    if other:
        raise NotResumable(
            f"{run_dir / rd.CONFIG}: {other[0]} is {new.get(other[0])!r} but was "
            f"{old.get(other[0])!r} at {ckpt.path.name}; a resume continues the same run, "
            "start a new run to change it"
        )
    if rd.is_finished(run_dir) and not extend:
        raise BudgetLoraError(
            f"{run_dir} already finished ({rd.SUMMARY} exists); to train it further: "
            f"budgetlora train --resume {shlex.quote(str(run_dir))} --extend --set train.max_steps=N"
        )
    if changed and not extend:
        raise BudgetLoraError(
            f"{changed[0]} is {new.get(changed[0])!r} but was {old.get(changed[0])!r} at "
            f"{ckpt.path.name}; a resume keeps the schedule: pass --extend to rebuild it for the "
            "new length"
        )
    if extend and not changed:
        raise BudgetLoraError("--extend needs a new length: add --set train.max_steps=N")


def _restore(session: Session, ckpt: Checkpoint, extend: bool, run_dir: Path) -> Resumable:
    """The optimizer, schedule and grad scaler of the checkpoint (the schedule rebuilt for a new
    length with `extend`), and the run directory cut back to the checkpoint's step."""
    cfg, rt, model = session.cfg, session.rt, session.model
    batches_per_epoch = len(bucketed_batches(session.prepared.train.lengths, cfg.train.batch_size, cfg.train.seed, 0))
    total = total_steps_for(cfg.train, batches_per_epoch)
    optimizer = build_optimizer(model, cfg.train, rt.device)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.precision == "fp16")
    if ckpt.scaler:
        scaler.load_state_dict(ckpt.scaler)
    if extend:
        if total <= ckpt.step:
            raise BudgetLoraError(f"cannot extend to {total} steps: {ckpt.path.name} is already at step {ckpt.step}")
        optimizer.load_state_dict(ckpt.optimizer)
        # the schedule as if the run had been this long from the start, advanced to the current step
        scheduler = build_scheduler(optimizer, cfg.train, total)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": intended here
            for _ in range(ckpt.step):
                scheduler.step()
        session.console.say(
            f"schedule rebuilt for {total} steps (was {ckpt.total_steps}); "
            f"lr at step {ckpt.step} is now {optimizer.param_groups[0]['lr']:.3g}"
        )
        if rt.dist.is_main:
            # unfinished again, but the result it had stays readable until the extension finishes
            if (run_dir / rd.SUMMARY).is_file():
                os.replace(run_dir / rd.SUMMARY, run_dir / rd.PREVIOUS_SUMMARY)
    else:
        if total != ckpt.total_steps:
            raise BudgetLoraError(
                f"the run now has {total} steps but {ckpt.path.name} was written for "
                f"{ckpt.total_steps}; pass --extend to rebuild the schedule"
            )
        # the scheduler's constructor rewrites the learning rates; the optimizer state then
        # restores the exact ones, and the scheduler state its position
        scheduler = build_scheduler(optimizer, cfg.train, total)
        optimizer.load_state_dict(ckpt.optimizer)
        scheduler.load_state_dict(ckpt.scheduler)
    ckpt.state.stopped_early = False
    if rt.dist.is_main:
        rd.truncate_metrics(run_dir / rd.METRICS, ckpt.step)
        (run_dir / rd.PRUNED).unlink(missing_ok=True)  # a pruned trial taken on to full length
    return Resumable(ckpt.state, optimizer, scheduler, scaler, total, ckpt.best_trainable, ckpt.history)


def resume_run(
    run_dir: str | Path,
    extend: bool = False,
    overrides: Optional[list[str]] = None,
    trust_pickle: bool = False,
    verbose: bool = True,
    console: Optional[Console] = None,
    on_eval: Optional[EvalCallback] = None,
) -> Path:
    """Continue an interrupted run from its newest checkpoint, exactly where it stopped.

    The config is RUN/config.yaml; the model, optimizer, scheduler, grad scaler, RNG states and data
    position come from the checkpoint, and metrics.jsonl is cut back to the checkpoint's step. A
    changed length (train.max_steps / train.epochs) is refused unless `extend`, which rebuilds the
    schedule for the new length and also continues a finished run."""
    wall_start = time.perf_counter()
    console = console or Console(verbose)
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise BudgetLoraError(f"run directory not found: {run_dir}")
    cfg = _resume_config(run_dir, overrides)
    main = context_from_env().is_main
    placement = reclaim(run_dir, "resume it") if main else None
    try:
        if main:
            remove_stale_temp(run_dir)
        ckpt = load_latest_checkpoint(run_dir, warn=console.say)
        if ckpt is None:
            found = len(complete_checkpoints(run_dir))
            raise NotResumable(
                f"{run_dir}: none of its {found} checkpoint(s) loads (each is damaged, see above); start the run again"
                if found
                else f"{run_dir} has no checkpoint to resume from (nothing in "
                f"{run_dir / rd.CHECKPOINTS}); start the run again"
            )
        _check_resumable(run_dir, cfg, ckpt, extend)
        require_trackers(cfg)
        with process_runtime(cfg.train.device, cfg.train.precision, cfg.train.batch_size, cfg.train.num_threads) as rt:
            session = setup_session(cfg, rt, trust_pickle, console if main else QUIET, run_dir.parent, wall_start, ckpt)
            train_session(
                session,
                run_dir,
                _restore(session, ckpt, extend, run_dir),
                checkpoints=True,
                resumed=ckpt,
                on_eval=on_eval,
            )
    except BaseException:
        if placement is not None:
            placement.release()
        raise
    if placement is not None:
        placement.commit()
        return placement.final
    return run_dir
