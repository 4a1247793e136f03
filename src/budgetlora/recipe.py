"""The training recipe: config in, finished run directory out; train and resume share one setup.

Phases, as in torchtune's recipes: `setup_session` (data, model, budget; from a checkpoint when
resuming, see resuming.py), `train_session` (the loop with its sinks and checkpoints, then the
artifacts), and the
run directory's placement, committed only when the run finished. Everything that can be
refused (config, budget, data) is refused before weights load or any directory is written.
"""

from __future__ import annotations

import contextlib
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from torch import nn

from budgetlora import atomic
from budgetlora.artifacts import run_dir as rd
from budgetlora.artifacts.placement import place_exact, place_run
from budgetlora.artifacts.model_card import write_run_card
from budgetlora.artifacts.trained import save_trained_model
from budgetlora.config import Config
from budgetlora.data.dataset import rows_key
from budgetlora.data.prepare import Prepared, prepare_data
from budgetlora.distributed import barrier, broadcast
from budgetlora.errors import NotResumable, RunDiverged, RunInterrupted
from budgetlora.evaluate.final import Evaluated, final_evaluation
from budgetlora.evaluate.scoring import answer_cells, label_cells
from budgetlora.evaluate.task_metrics import validation_score
from budgetlora.model import (
    BudgetReport,
    build_model,
    check_budget,
    count_trainable,
    load_model_config,
    load_tokenizer,
    pad_token_id,
    precheck_budget,
    takes_segments,
)
from budgetlora.progress import QUIET, Console
from budgetlora.runtime import Runtime, peak_memory_mb, process_runtime, seed_everything
from budgetlora.speedups import CompileReport, prepare_for_training
from budgetlora.tracking import FanOut, open_sinks, require_trackers
from budgetlora.artifacts.summary import CompileRecord, RunSummary
from budgetlora.task import LabelSpace
from budgetlora.training.losses import class_weights, loss_function
from budgetlora.training import (
    Checkpoint,
    Checkpointer,
    Resumable,
    StopFlag,
    checkpoint_name,
    fresh_resumable,
    load_trainable_state,
    restore_model,
    restore_rng,
    stop_on_signals,
    train_loop,
)
from budgetlora.training.step import StepRunner, step_runner

EvalCallback = Callable[[int, np.ndarray, str], None]
SIGTERM_EXIT = 128 + 15  # the exit code of a process ended by SIGTERM, as shells report it


@dataclass
class Session:
    """One run in the making: what every phase after `setup_session` reads."""

    cfg: Config
    rt: Runtime
    prepared: Prepared
    model: nn.Module
    report: BudgetReport
    console: Console
    out_root: Path
    wall_start: float
    space: LabelSpace
    data_fingerprint: str  # of the data as read (regression targets in their own units), for resume checks

    @property
    def names(self) -> list[str]:
        return list(self.space.names)

    @property
    def pad_id(self) -> int:
        return pad_token_id(self.prepared.tokenizer)


def setup_session(
    cfg: Config,
    rt: Runtime,
    trust_pickle: bool,
    console: Console,
    out_root: Path,
    wall_start: float,
    checkpoint: Optional[Checkpoint] = None,
) -> Session:
    segments = bool(cfg.data.text_pair_columns) and takes_segments(load_model_config(cfg.model, 2))
    tokenizer = load_tokenizer(cfg.model)
    prepared = prepare_data(cfg.data, cfg.train.seed, tokenizer, trust_pickle, console, cfg.task, segments)
    data_fingerprint = prepared.fingerprint
    if checkpoint is not None and checkpoint.data_fingerprint and data_fingerprint != checkpoint.data_fingerprint:
        raise NotResumable(
            f"the training data ({cfg.data.train_file or cfg.data.dataset}) changed since "
            f"{checkpoint.path.name}; resuming would not continue the same run"
        )
    space = prepared.label_space(cfg.data.standardize_targets)
    prepared = prepared.in_model_units(space)
    assert prepared.train.labels is not None
    class_weights(cfg.train, cfg.task, space.names, prepared.train.labels)  # unknown class names: refused now
    seed_everything(cfg.train.seed)
    model = build_model(cfg, space.width, weights=True)
    report = count_trainable(model)
    check_budget(cfg, report, space.width)
    if checkpoint is not None:
        restore_model(model, checkpoint)
    model.to(rt.device)
    return Session(cfg, rt, prepared, model, report, console, out_root, wall_start, space, data_fingerprint)


def train_run(
    cfg: Config,
    out_root: Path | str = "runs",
    overwrite: bool = False,
    trust_pickle: bool = False,
    verbose: bool = True,
    run_dir: Optional[Path] = None,
    checkpoints: bool = True,
    console: Optional[Console] = None,
    on_eval: Optional[EvalCallback] = None,
) -> Path:
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
        session = setup_session(
            cfg, rt, trust_pickle, console if rt.dist.is_main else QUIET, Path(out_root), wall_start
        )
        placement = None
        if rt.dist.is_main:
            placement = (
                place_run(Path(out_root), cfg.name, overwrite) if run_dir is None else place_exact(Path(run_dir))
            )
        try:
            path = broadcast(placement.path if placement else None, rt.dist)  # rank 0 alone picks the directory
            train_session(session, path, None, checkpoints, on_eval=on_eval)
        except BaseException as exc:
            if placement is not None:
                placement.abandon(resumable=not isinstance(exc, RunDiverged))
            raise
        if placement is not None:
            placement.commit()
            return placement.final
        return path


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
    say(
        f"trainable parameters: {session.report.trainable:,} of {session.report.total:,}"
        + (f" (budget {cfg.budget:,})" if cfg.budget and cfg.mode == "lora" else "")
    )
    say(
        f"train {len(p.train):,} rows, val {len(p.val or [])} rows, test {len(p.test or [])} rows; "
        f"device {session.rt.device}, {session.rt.precision}; {fast_path}"
    )


def train_session(
    session: Session,
    run_dir: Path,
    progress: Optional[Resumable],
    checkpoints: bool,
    resumed: Optional[Checkpoint] = None,
    on_eval: Optional[EvalCallback] = None,
) -> None:
    """The phases of a run after setup: its files, the training step, the loop, the artifacts."""
    _write_run_files(session, run_dir, resumed)
    runner = _training_step(session, run_dir, resumed)
    progress = progress or fresh_resumable(session.model, session.prepared.train, session.cfg.train, session.rt)
    main = session.rt.dist.is_main
    sinks = (
        open_sinks(
            session.cfg,
            run_dir,
            session.out_root,
            session.console,
            progress.total_steps,
            progress.state.step,
            resumed is not None,
        )
        if main
        else FanOut([])
    )
    checkpointer = (
        Checkpointer(
            run_dir,
            session.model,
            session.cfg.to_dict(),
            session.data_fingerprint,
            session.cfg.train.keep_checkpoints,
            saved_step=resumed.step if resumed else None,
        )
        if checkpoints and main
        else None
    )
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
        rd.write_labels(run_dir, session.space)
        with atomic.atomic_dir(run_dir / rd.TOKENIZER, replace=True) as tmp:
            session.prepared.tokenizer.save_pretrained(str(tmp))


def _training_step(session: Session, run_dir: Path, resumed: Optional[Checkpoint]) -> StepRunner:
    """The fast path applied to the model, the run described, and the step compiled if it is."""
    cfg, rt = session.cfg, session.rt
    fast = prepare_for_training(session.model, cfg, rt.device, rt.precision, session.pad_id)
    _describe(session, run_dir, fast.describe(), resumed)
    if fast.compiled:
        session.console.say(f"compiling the training step for widths {'/'.join(map(str, fast.pad_to or ()))} ...")
    train = session.prepared.train
    assert train.labels is not None
    weights = class_weights(cfg.train, cfg.task, session.space.names, train.labels)
    runner = step_runner(
        session.model,
        cfg.train,
        rt,
        train,
        session.pad_id,
        fast.pad_to if fast.compiled else None,
        loss_fn=loss_function(cfg.train, cfg.task, weights),
    )
    if runner.report is not None:
        session.console.say(runner.report.describe())
    return runner


def _run_loop(
    session: Session,
    run_dir: Path,
    runner: StepRunner,
    progress: Resumable,
    sinks: FanOut,
    checkpointer: Optional[Checkpointer],
    resumed: Optional[Checkpoint],
    on_eval: Optional[EvalCallback],
) -> Resumable:
    """Train to the end (or an early stop); a signal ends in RunInterrupted after a checkpoint."""
    cfg, rt = session.cfg, session.rt
    if resumed is not None:
        restore_rng(resumed.rng)  # last, so nothing between here and the first step draws from it
    # without checkpoints a signal keeps its default effect: there would be nothing to resume
    signals = stop_on_signals() if checkpointer or rt.dist.enabled else contextlib.nullcontext(StopFlag())
    with signals as stop:
        progress = train_loop(
            session.model,
            session.prepared.train,
            session.prepared.val,
            cfg.train,
            rt,
            session.pad_id,
            sinks,
            resume=progress,
            on_checkpoint=checkpointer,
            should_stop=stop,
            runner=runner,
            on_eval=_eval_hook(session, on_eval),
            eval_batch=cfg.prediction_batch,
            score=validation_score(cfg.task, session.space.target_mean, session.space.target_std),
        )
    state = progress.state
    if state.step < progress.total_steps and not state.stopped_early and (stop() or rt.dist.enabled):
        code = stop.exit_code if stop() else SIGTERM_EXIT
        if not rt.dist.is_main:
            raise RunInterrupted(f"rank {rt.dist.rank} stopped at step {state.step}", code)
        raise RunInterrupted(
            f"interrupted by {stop.name} at step {state.step}/{progress.total_steps}; checkpoint "
            f"written to {run_dir / rd.CHECKPOINTS / checkpoint_name(state.step)}\n"
            f"resume with: budgetlora train --resume {shlex.quote(str(run_dir.resolve()))}",
            code,
        )
    return progress


def _finish(
    session: Session, run_dir: Path, progress: Resumable, runner: StepRunner, checkpointer: Optional[Checkpointer]
) -> RunSummary:
    """The final checkpoint, the weights to keep, the decisions tuned on validation, the
    evaluation, the card and summary.json (last: the run is finished once it exists)."""
    cfg, main = session.cfg, session.rt.dist.is_main
    if checkpointer:
        checkpointer("final", progress)  # what `--resume --extend` continues from
    if cfg.train.restore_best and progress.best_trainable is not None:
        load_trainable_state(session.model, progress.best_trainable)
    if main:
        save_trained_model(session.model, cfg, run_dir, session.names)
    if runner.report is not None and runner.report.recompiles:
        session.console.say(runner.report.describe())
    final = final_evaluation(
        session.model,
        session.prepared,
        session.space,
        cfg.train.calibrate,
        session.rt,
        session.pad_id,
        cfg.prediction_batch,
        session.console,
    )
    for note in final.decisions.notes:
        session.console.say(note)
    summary = _summarize(session, progress, final.splits, runner.report)
    if main:
        rd.write_decisions(run_dir, final.decisions)
        for split, name in (("test", rd.PREDICTIONS), ("val", rd.VAL_PREDICTIONS)):
            outcome, rows = final.splits[split], getattr(session.prepared.splits, split)
            if outcome is not None and rows is not None and rows.labels is not None:
                truth = label_cells(session.space, rows.labels)
                assert truth is not None
                rd.write_test_predictions(run_dir, rows.ids, truth, answer_cells(session.space, outcome.answers), name)
        write_run_card(run_dir, cfg, summary)
        rd.write_summary(run_dir, summary)
    return summary


def _summarize(
    session: Session, progress: Resumable, evaluated: dict[str, Optional[Evaluated]], compiled: Optional[CompileReport]
) -> RunSummary:
    cfg, rt, prepared, state = session.cfg, session.rt, session.prepared, progress.state
    return RunSummary(
        name=cfg.name,
        mode=cfg.mode,
        model=cfg.model,
        trainable_params=session.report.trainable,
        total_params=session.report.total,
        budget=cfg.budget,
        breakdown=dict(session.report.breakdown),
        best_step=state.best_step or state.step,
        best_val_acc=state.best_acc if state.best_acc >= 0 else None,
        steps=state.step,
        total_steps=progress.total_steps,
        stopped_early=state.stopped_early,
        final_train_loss=state.last_train_loss,
        final_eval_loss=state.last_eval_loss,
        train_time_s=state.train_time_s,
        samples_per_s=state.samples_seen / max(state.train_time_s, 1e-9),
        peak_memory_mb=peak_memory_mb(rt.device),
        device=str(rt.device),
        precision=rt.precision,
        processes=rt.dist.world_size,
        label_names=list(session.names),
        compile=CompileRecord(**compiled.as_dict()) if compiled is not None else None,
        truncation={
            name: part.truncation(cfg.data.max_length)
            for name, part in (("train", prepared.train), ("test", prepared.test))
            if part is not None
        },
        val=evaluated["val"].metrics if evaluated["val"] is not None else None,
        test=evaluated["test"].metrics if evaluated["test"] is not None and rt.dist.is_main else None,
        wall_time_s=time.perf_counter() - session.wall_start,
        task=cfg.task,
    )
