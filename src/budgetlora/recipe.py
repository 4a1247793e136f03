"""The training recipe: config in, finished run directory out; train and resume share one setup.

Phases, as in torchtune's recipes: `_setup` (data, model, budget; from a checkpoint when
resuming), `_train` (the loop with its sinks and checkpoints, then the artifacts), and the
run directory's placement, committed only when the run finished. Everything that can be
refused (config, budget, data) is refused before weights load or any directory is written.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from budgetlora import atomic
from budgetlora.artifacts import run_dir as rd
from budgetlora.artifacts.placement import place_exact, place_run, reclaim
from budgetlora.artifacts.model_card import write_run_card
from budgetlora.artifacts.trained import save_trained_model
from budgetlora.config import Config, config_from_dict, flatten, parse_override
from budgetlora.data import Splits, TokenizedSet, bucketed_batches, load_splits, tokenize
from budgetlora.data.dataset import rows_key
from budgetlora.data.tokens import tokens_fingerprint
from budgetlora.distributed import barrier, broadcast, context_from_env
from budgetlora.errors import BudgetLoraError, NotResumable, RunDiverged, RunInterrupted
from budgetlora.evaluate.predict import evaluate_split
from budgetlora.model import (BudgetReport, build_model, check_budget, count_trainable, load_tokenizer, pad_token_id,
                              precheck_budget)
from budgetlora.progress import QUIET, Console, TrainingDisplay
from budgetlora.runtime import Runtime, peak_memory_mb, process_runtime, seed_everything
from budgetlora.speedups import CompileReport, prepare_for_training
from budgetlora.tracking import FanOut, MLflowSink, TensorBoardSink, require_trackers
from budgetlora.artifacts.summary import CompileRecord, RunSummary, SplitMetrics
from budgetlora.training import (Checkpoint, Checkpointer, Resumable, StopFlag, build_optimizer, build_scheduler,
                              checkpoint_name, complete_checkpoints, fresh_resumable, load_latest_checkpoint,
                              load_trainable_state, remove_stale_temp, restore_model, restore_rng, stop_on_signals,
                              total_steps_for, train_loop)
from budgetlora.training.step import StepRunner, step_runner

EvalCallback = Callable[[int, np.ndarray, str], None]
SIGTERM_EXIT = 128 + 15  # the exit code of a process ended by SIGTERM, as shells report it

# keys a resume may change: they do not alter the trajectory (device and threads can change the
# last bits of float results, which is the user's call when moving a run to another machine)
RESUME_FREE_KEYS = ("train.device", "train.num_threads", "train.save_every", "train.keep_checkpoints",
                    "train.eval_batch_size")
# keys that change the schedule's length: only with --extend, which rebuilds the schedule
RESUME_EXTEND_KEYS = ("train.max_steps", "train.epochs")


@dataclass
class Prepared:
    splits: Splits
    tokenizer: Any
    train: TokenizedSet
    val: Optional[TokenizedSet]
    test: Optional[TokenizedSet]


def prepare_data(cfg: Config, trust_pickle: bool = False, console: Console = QUIET) -> Prepared:
    splits = load_splits(cfg.data, cfg.train.seed, trust_pickle)
    tokenizer = load_tokenizer(cfg.model)

    def tok(texts, name: str) -> Optional[TokenizedSet]:
        if texts is None:
            return None
        with console.task(f"tokenizing {name}", len(texts)) as task:
            return tokenize(tokenizer, texts.texts, texts.labels, cfg.data.max_length, progress=task.advance)

    prepared = Prepared(splits, tokenizer, tok(splits.train, "train"), tok(splits.val, "val"), tok(splits.test, "test"))
    for name, part in (("train", prepared.train), ("test", prepared.test)):
        cut = part.truncation(cfg.data.max_length) if part is not None else None
        if cut and cut["truncated"]:
            console.say(f"{name}: {cut['truncated']:,} of {cut['rows']:,} rows ({100 * cut['truncated_fraction']:.1f}%) "
                        f"cut at data.max_length {cut['max_length']} (token lengths p50 {cut['p50']}, p90 "
                        f"{cut['p90']}, p99 {cut['p99']}, max {cut['max']})")
    return prepared


def data_fingerprint(prepared: Prepared) -> str:
    return tokens_fingerprint(prepared.train, prepared.val)


@dataclass
class Session:
    """One run in the making: what every phase after `_setup` reads."""

    cfg: Config
    rt: Runtime
    prepared: Prepared
    model: nn.Module
    report: BudgetReport
    console: Console
    out_root: Path
    wall_start: float

    @property
    def names(self) -> list[str]:
        return self.prepared.splits.label_names

    @property
    def pad_id(self) -> int:
        return pad_token_id(self.prepared.tokenizer)


def _setup(cfg: Config, rt: Runtime, trust_pickle: bool, console: Console, out_root: Path, wall_start: float,
           checkpoint: Optional[Checkpoint] = None) -> Session:
    prepared = prepare_data(cfg, trust_pickle, console)
    if checkpoint is not None and checkpoint.data_fingerprint and data_fingerprint(prepared) != checkpoint.data_fingerprint:
        raise NotResumable(f"the training data ({cfg.data.train_file or cfg.data.dataset}) changed since "
                              f"{checkpoint.path.name}; resuming would not continue the same run")
    names = prepared.splits.label_names
    seed_everything(cfg.train.seed)
    model = build_model(cfg, len(names), weights=True)
    report = count_trainable(model)
    check_budget(cfg, report, len(names))
    if checkpoint is not None:
        restore_model(model, checkpoint)
    model.to(rt.device)
    return Session(cfg, rt, prepared, model, report, console, out_root, wall_start)


def train_run(cfg: Config, out_root: Path | str = "runs", overwrite: bool = False, trust_pickle: bool = False,
              verbose: bool = True, run_dir: Optional[Path] = None, checkpoints: bool = True,
              console: Optional[Console] = None, on_eval: Optional[EvalCallback] = None) -> Path:
    """Train one config end to end; returns the finished run directory (`out_root/<name>`, or
    exactly `run_dir`, which must not exist yet).

    With `checkpoints`, the run checkpoints into RUN/checkpoints/ (see `resume_run`) and SIGINT /
    SIGTERM stop it at the next step boundary with a checkpoint (RunInterrupted). `on_eval(step,
    correct, val_key)` sees every evaluation's per-row outcomes (a sweep's pruner raises RunPruned
    there). Launched by torchrun it trains data-parallel; every check that can refuse the run
    happens first."""
    wall_start = time.perf_counter()
    console = console or Console(verbose)
    precheck_budget(cfg)
    require_trackers(cfg)
    with process_runtime(cfg.train.device, cfg.train.precision, cfg.train.batch_size, cfg.train.num_threads) as rt:
        session = _setup(cfg, rt, trust_pickle, console if rt.dist.is_main else QUIET, Path(out_root), wall_start)
        placement = None
        if rt.dist.is_main:
            placement = place_run(Path(out_root), cfg.name, overwrite) if run_dir is None else \
                place_exact(Path(run_dir))
        try:
            path = broadcast(placement.path if placement else None, rt.dist)  # rank 0 alone picks the directory
            _train(session, path, None, checkpoints, on_eval=on_eval)
        except BaseException as exc:
            if placement is not None:
                placement.abandon(resumable=not isinstance(exc, RunDiverged))
            raise
        if placement is not None:
            placement.commit()
            return placement.final
        return path


def _sinks(session: Session, run_dir: Path, progress: Resumable, resumed: bool) -> FanOut:
    cfg = session.cfg
    resume_step = progress.state.step + 1 if resumed else None
    sinks: list[Any] = [rd.MetricsFile(run_dir), TrainingDisplay(session.console, progress.total_steps,
                                                                 progress.state.step)]
    try:
        if "tensorboard" in cfg.train.report_to:
            sinks.append(TensorBoardSink(run_dir / rd.TENSORBOARD, resume_step))
        if "mlflow" in cfg.train.report_to:
            sinks.append(MLflowSink(cfg, run_dir, session.out_root, resume_step))
        fan_out = FanOut(sinks)
        fan_out.log_config(cfg)
    except BaseException:
        FanOut(sinks).close()  # the files opened so far, before the error leaves
        raise
    return fan_out


def _eval_hook(session: Session, on_eval: Optional[EvalCallback]) -> Optional[Callable[[int, np.ndarray], None]]:
    if on_eval is None:
        return None
    key = rows_key(session.prepared.splits.val)
    return lambda step, correct: on_eval(step, correct, key)


def _describe(session: Session, run_dir: Path, fast_path: str, resumed: Optional[Checkpoint]) -> None:
    cfg, say, p = session.cfg, session.console.say, session.prepared
    if resumed is not None:
        say(f"resuming {run_dir} from {resumed.path.name}")
    say(f"run directory: {run_dir}")
    say(f"trainable parameters: {session.report.trainable:,} of {session.report.total:,}"
        + (f" (budget {cfg.budget:,})" if cfg.budget and cfg.mode == "lora" else ""))
    say(f"train {len(p.train):,} rows, val {len(p.val or [])} rows, test {len(p.test or [])} rows; "
        f"device {session.rt.device}, {session.rt.precision}; {fast_path}")


def _train(session: Session, run_dir: Path, progress: Optional[Resumable], checkpoints: bool,
           resumed: Optional[Checkpoint] = None, on_eval: Optional[EvalCallback] = None) -> None:
    """The phases of a run after setup: its files, the training step, the loop, the artifacts."""
    _write_run_files(session, run_dir, resumed)
    runner = _training_step(session, run_dir, resumed)
    progress = progress or fresh_resumable(session.model, session.prepared.train, session.cfg.train, session.rt)
    main = session.rt.dist.is_main
    sinks = _sinks(session, run_dir, progress, resumed is not None) if main else FanOut([])
    checkpointer = Checkpointer(run_dir, session.model, session.cfg.to_dict(), data_fingerprint(session.prepared),
                                session.cfg.train.keep_checkpoints, saved_step=resumed.step if resumed else None) \
        if checkpoints and main else None
    try:
        progress = _run_loop(session, run_dir, runner, progress, sinks, checkpointer, resumed, on_eval)
    finally:
        sinks.close()
    summary = _finish(session, run_dir, progress, runner, checkpointer)
    if main:
        sinks.finish(run_dir, summary, warn=session.console.say)
    barrier(session.rt.dist)  # no rank returns before the run directory is complete


def _write_run_files(session: Session, run_dir: Path, resumed: Optional[Checkpoint]) -> None:
    if not session.rt.dist.is_main:
        return
    rd.write_config(session.cfg, run_dir)  # on a resume with --extend this records the new length
    if resumed is None:
        rd.write_labels(run_dir, session.names)
        with atomic.atomic_dir(run_dir / rd.TOKENIZER, replace=True) as tmp:
            session.prepared.tokenizer.save_pretrained(str(tmp))


def _training_step(session: Session, run_dir: Path, resumed: Optional[Checkpoint]) -> StepRunner:
    """The fast path applied to the model, the run described, and the step compiled if it is."""
    cfg, rt = session.cfg, session.rt
    fast = prepare_for_training(session.model, cfg, rt.device, rt.precision, session.pad_id)
    _describe(session, run_dir, fast.describe(), resumed)
    if fast.compiled:
        session.console.say(f"compiling the training step for widths {'/'.join(map(str, fast.pad_to or ()))} ...")
    runner = step_runner(session.model, cfg.train, rt, session.prepared.train, session.pad_id,
                         fast.pad_to if fast.compiled else None)
    if runner.report is not None:
        session.console.say(runner.report.describe())
    return runner


def _run_loop(session: Session, run_dir: Path, runner: StepRunner, progress: Resumable, sinks: FanOut,
              checkpointer: Optional[Checkpointer], resumed: Optional[Checkpoint],
              on_eval: Optional[EvalCallback]) -> Resumable:
    """Train to the end (or an early stop); a signal ends in RunInterrupted after a checkpoint."""
    cfg, rt = session.cfg, session.rt
    if resumed is not None:
        restore_rng(resumed.rng)  # last, so nothing between here and the first step draws from it
    # without checkpoints a signal keeps its default effect: there would be nothing to resume
    signals = stop_on_signals() if checkpointer or rt.dist.enabled else contextlib.nullcontext(StopFlag())
    with signals as stop:
        progress = train_loop(session.model, session.prepared.train, session.prepared.val, cfg.train, rt,
                              session.pad_id, sinks, resume=progress, on_checkpoint=checkpointer, should_stop=stop,
                              runner=runner, on_eval=_eval_hook(session, on_eval), eval_batch=cfg.prediction_batch)
    state = progress.state
    if state.step < progress.total_steps and not state.stopped_early and (stop() or rt.dist.enabled):
        code = stop.exit_code if stop() else SIGTERM_EXIT
        if not rt.dist.is_main:
            raise RunInterrupted(f"rank {rt.dist.rank} stopped at step {state.step}", code)
        raise RunInterrupted(f"interrupted by {stop.name} at step {state.step}/{progress.total_steps}; checkpoint "
                             f"written to {run_dir / rd.CHECKPOINTS / checkpoint_name(state.step)}\n"
                             f"resume with: budgetlora train --resume {shlex.quote(str(run_dir.resolve()))}", code)
    return progress


def _finish(session: Session, run_dir: Path, progress: Resumable, runner: StepRunner,
            checkpointer: Optional[Checkpointer]) -> RunSummary:
    """The final checkpoint, the weights to keep, the evaluation, the card and summary.json (last:
    the run is finished once it exists)."""
    cfg, main = session.cfg, session.rt.dist.is_main
    if checkpointer:
        checkpointer("final", progress)  # what `--resume --extend` continues from
    if cfg.train.restore_best and progress.best_trainable is not None:
        load_trainable_state(session.model, progress.best_trainable)
    if main:
        save_trained_model(session.model, cfg, run_dir, session.names)
    if runner.report is not None and runner.report.recompiles:
        session.console.say(runner.report.describe())
    evaluated = _evaluate_splits(session)
    summary = _summarize(session, progress, evaluated, runner.report)
    if main:
        test = evaluated["test"]
        if test is not None:
            assert session.prepared.splits.test is not None and session.prepared.test is not None
            rd.write_test_predictions(run_dir, session.prepared.splits.test.ids, session.prepared.test.labels,
                                      test.preds)
        write_run_card(run_dir, cfg, summary)
        rd.write_summary(run_dir, summary)
    return summary


@dataclass
class Evaluated:
    metrics: SplitMetrics
    preds: np.ndarray


def _evaluate_splits(session: Session) -> dict[str, Optional[Evaluated]]:
    """Validation and test metrics of the final model (None for a split the run does not have)."""
    out: dict[str, Optional[Evaluated]] = {}
    for name, data in (("val", session.prepared.val), ("test", session.prepared.test)):
        rows = len(data) if data is not None else 0
        with (session.console.task(f"evaluating {name}", rows) if rows else contextlib.nullcontext()) as task:
            metrics, preds = evaluate_split(session.model, data, session.names, session.rt, session.pad_id,
                                            session.cfg.prediction_batch, progress=task.advance if task else None)
        out[name] = None if metrics is None else Evaluated(SplitMetrics.from_dict(metrics, name), preds)
    return out


def _summarize(session: Session, progress: Resumable, evaluated: dict[str, Optional[Evaluated]],
               compiled: Optional[CompileReport]) -> RunSummary:
    cfg, rt, prepared, state = session.cfg, session.rt, session.prepared, progress.state
    return RunSummary(
        name=cfg.name, mode=cfg.mode, model=cfg.model, trainable_params=session.report.trainable,
        total_params=session.report.total, budget=cfg.budget, breakdown=dict(session.report.breakdown),
        best_step=state.best_step or state.step, best_val_acc=state.best_acc if state.best_acc >= 0 else None,
        steps=state.step, total_steps=progress.total_steps, stopped_early=state.stopped_early,
        final_train_loss=state.last_train_loss, final_eval_loss=state.last_eval_loss,
        train_time_s=state.train_time_s, samples_per_s=state.samples_seen / max(state.train_time_s, 1e-9),
        peak_memory_mb=peak_memory_mb(rt.device), device=str(rt.device), precision=rt.precision,
        processes=rt.dist.world_size, label_names=list(session.names),
        compile=CompileRecord(**compiled.as_dict()) if compiled is not None else None,
        truncation={name: part.truncation(cfg.data.max_length)
                    for name, part in (("train", prepared.train), ("test", prepared.test)) if part is not None},
        val=evaluated["val"].metrics if evaluated["val"] is not None else None,
        test=evaluated["test"].metrics if evaluated["test"] is not None and rt.dist.is_main else None,
        wall_time_s=time.perf_counter() - session.wall_start)


def _resume_config(run_dir: Path, overrides: Optional[list[str]]) -> Config:
    cfg = rd.read_run_config(run_dir)
    parsed = dict(parse_override(item) for item in (overrides or []))
    refused = [k for k in parsed if k not in RESUME_FREE_KEYS + RESUME_EXTEND_KEYS]
    if refused:
        raise BudgetLoraError(f"--set {refused[0]} cannot change on --resume (the run continues as "
                              f"configured); resume may set only {', '.join(RESUME_FREE_KEYS + RESUME_EXTEND_KEYS)}")
    return config_from_dict(cfg.to_dict(), parsed) if parsed else cfg


def _check_resumable(run_dir: Path, cfg: Config, ckpt: Checkpoint, extend: bool) -> None:
    old, new = flatten(ckpt.config), flatten(cfg.to_dict())
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k) and k not in RESUME_FREE_KEYS]
    other = [k for k in changed if k not in RESUME_EXTEND_KEYS]
    if other:
        raise NotResumable(f"{run_dir / rd.CONFIG}: {other[0]} is {new.get(other[0])!r} but was "
                              f"{old.get(other[0])!r} at {ckpt.path.name}; a resume continues the same run, "
                              "start a new run to change it")
    if rd.is_finished(run_dir) and not extend:
        raise BudgetLoraError(f"{run_dir} already finished ({rd.SUMMARY} exists); to train it further: "
                              f"budgetlora train --resume {shlex.quote(str(run_dir))} --extend --set train.max_steps=N")
    if changed and not extend:
        raise BudgetLoraError(f"{changed[0]} is {new.get(changed[0])!r} but was {old.get(changed[0])!r} at "
                              f"{ckpt.path.name}; a resume keeps the schedule: pass --extend to rebuild it for the "
                              "new length")
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
        session.console.say(f"schedule rebuilt for {total} steps (was {ckpt.total_steps}); "
                            f"lr at step {ckpt.step} is now {optimizer.param_groups[0]['lr']:.3g}")
        if rt.dist.is_main:
            # unfinished again, but the result it had stays readable until the extension finishes
            if (run_dir / rd.SUMMARY).is_file():
                os.replace(run_dir / rd.SUMMARY, run_dir / rd.PREVIOUS_SUMMARY)
    else:
        if total != ckpt.total_steps:
            raise BudgetLoraError(f"the run now has {total} steps but {ckpt.path.name} was written for "
                                  f"{ckpt.total_steps}; pass --extend to rebuild the schedule")
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


def resume_run(run_dir: str | Path, extend: bool = False, overrides: Optional[list[str]] = None,
               trust_pickle: bool = False, verbose: bool = True, console: Optional[Console] = None,
               on_eval: Optional[EvalCallback] = None) -> Path:
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
            raise NotResumable(f"{run_dir}: none of its {found} checkpoint(s) loads (each is damaged, see above); "
                                  "start the run again" if found else
                                  f"{run_dir} has no checkpoint to resume from (nothing in "
                                  f"{run_dir / rd.CHECKPOINTS}); start the run again")
        _check_resumable(run_dir, cfg, ckpt, extend)
        require_trackers(cfg)
        with process_runtime(cfg.train.device, cfg.train.precision, cfg.train.batch_size, cfg.train.num_threads) as rt:
            session = _setup(cfg, rt, trust_pickle, console if main else QUIET, run_dir.parent, wall_start, ckpt)
            _train(session, run_dir, _restore(session, ckpt, extend, run_dir), checkpoints=True, resumed=ckpt,
                   on_eval=on_eval)
    except BaseException:
        if placement is not None:
            placement.release()
        raise
    if placement is not None:
        placement.commit()
        return placement.final
    return run_dir
