"""The training recipe: config in, finished run directory out.

Order matters for users: everything that can be refused (config, budget, data) is refused
before weights load or any directory is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import random
import resource
import shlex
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from budgetlora.artifacts import (MetricsLog, atomic_write_text, read_run_config, require_tensorboard,
                                  save_trained_model, unique_run_dir, write_config, write_json)
from budgetlora.budget import BudgetReport, check_budget, count_trainable
from budgetlora.checkpoint import (CHECKPOINTS, Checkpoint, Checkpointer, checkpoint_name, load_latest_checkpoint,
                                   remove_stale_temp, restore_model, restore_rng, truncate_metrics)
from budgetlora.config import Config, config_from_dict, flatten, parse_override
from budgetlora.data.dataset import Splits, label_names_from_config, load_splits
from budgetlora.data.sources import detect_format
from budgetlora.data.tokens import TokenizedSet, bucketed_batches, tokenize
from budgetlora.distributed import (SINGLE, DistContext, barrier, broadcast, check_batch_divides, context_from_env,
                                    destroy_process_group, device_for, init_process_group)
from budgetlora.errors import BudgetLoraError, RunInterrupted
from budgetlora.evaluate import classification_metrics, predict_logits
from budgetlora.fast import prepare_for_training
from budgetlora.interrupt import StopFlag, stop_on_signals
from budgetlora.model import build_meta_model, build_model, load_tokenizer, pad_token_id, quiet_transformers
from budgetlora.optim import build_optimizer, build_scheduler
from budgetlora.train import LoopResult, LoopState, load_trainable_state, total_steps_for, train_loop


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        from budgetlora.errors import BudgetLoraError

        raise BudgetLoraError(f"config key 'train.device': '{name}' requested but no CUDA device is available")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def known_num_labels(cfg: Config) -> Optional[int]:
    """The class count when the config alone tells it (names, classes file, AG News format)."""
    names = label_names_from_config(cfg.data)
    if names:
        return len(names)
    if cfg.data.train_file and Path(cfg.data.train_file).is_file():
        try:
            if detect_format(Path(cfg.data.train_file), cfg.data.format) == "agnews":
                return 4
        except Exception:
            return None
    return None


def precheck_budget(cfg: Config) -> Optional[BudgetReport]:
    """Refuse an over-budget config from the architecture alone, before data or weights load.
    With the class count unknown, two classes (the smallest head) are assumed here and the exact
    count is checked again once the data has told it."""
    if cfg.budget is None or cfg.mode == "full":
        return None
    num_labels = known_num_labels(cfg) or 2
    report = count_trainable(build_meta_model(cfg, num_labels))
    check_budget(cfg, report, num_labels)
    return report


@dataclasses.dataclass
class Prepared:
    splits: Splits
    tokenizer: object
    train: TokenizedSet
    val: Optional[TokenizedSet]
    test: Optional[TokenizedSet]


def prepare_data(cfg: Config, trust_pickle: bool = False) -> Prepared:
    splits = load_splits(cfg.data, cfg.train.seed, trust_pickle)
    tokenizer = load_tokenizer(cfg.model)
    tok = lambda s: None if s is None else tokenize(tokenizer, s.texts, s.labels, cfg.data.max_length)  # noqa: E731
    return Prepared(splits, tokenizer, tok(splits.train), tok(splits.val), tok(splits.test))


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Progress:
    """One status line: step, loss, accuracy, throughput; a new line at every evaluation."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.start = time.perf_counter()

    def __call__(self, state: LoopState, total: int, record: dict) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        if "eval_acc" in record:
            line = f"step {state.step}/{total}  eval loss {record['eval_loss']:.4f}  eval acc {100 * record['eval_acc']:.2f}%"
        else:
            line = (f"step {state.step}/{total}  loss {record['train_loss']:.4f}  acc {100 * record['train_acc']:.1f}%  "
                    f"lr {record['lr']:.2e}  {record['samples_per_s']:.1f} samples/s  {elapsed:.0f}s")
        print(line, file=sys.stderr, flush=True)


def evaluate_split(model, data: Optional[TokenizedSet], names: list[str], device, pad_id: int,
                   precision: str, batch_tokens: int,
                   dist: DistContext = SINGLE) -> tuple[Optional[dict], Optional[np.ndarray]]:
    if data is None or len(data) == 0 or data.labels is None:
        return None, None
    logits = predict_logits(model, data, device, pad_id, precision, batch_tokens=batch_tokens, dist=dist)
    preds = logits.argmax(1)
    return classification_metrics(data.labels, preds, names, logits), preds


def train_run(cfg: Config, out_root: Path, overwrite: bool = False, trust_pickle: bool = False,
              verbose: bool = True, run_dir: Optional[Path] = None,
              log_line: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
              checkpoints: bool = True) -> Path:
    """Train one config end to end; returns the finished run directory.

    With `checkpoints`, the run checkpoints into RUN/checkpoints/ (see `resume_run`) and SIGINT /
    SIGTERM stop it at the next step boundary with a checkpoint (RunInterrupted).

    Launched by torchrun (RANK/WORLD_SIZE/LOCAL_RANK set), it trains data-parallel; every check
    that can refuse the run happens before the process group is formed."""
    wall_start = time.perf_counter()
    dist = context_from_env()
    quiet_transformers()
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    precheck_budget(cfg)
    if cfg.train.tensorboard:
        require_tensorboard()
    check_batch_divides(cfg.train.batch_size, dist)
    device = device_for(dist, resolve_device(cfg.train.device))
    precision = resolve_precision(cfg.train.precision, device)
    init_process_group(dist, device)
    try:
        return _train_run(cfg, out_root, overwrite, trust_pickle, verbose and dist.is_main, run_dir, log_line,
                          checkpoints, wall_start, dist, device, precision)
    finally:
        destroy_process_group(dist)


def _train_run(cfg: Config, out_root: Path, overwrite: bool, trust_pickle: bool, verbose: bool,
               run_dir: Optional[Path], log_line: Callable[[str], None], checkpoints: bool, wall_start: float,
               dist: DistContext, device: torch.device, precision: str) -> Path:
    prepared = prepare_data(cfg, trust_pickle)
    names = prepared.splits.label_names
    seed_everything(cfg.train.seed)
    model = build_model(cfg, len(names), weights=True)
    report = count_trainable(model)
    check_budget(cfg, report, len(names))
    model.to(device)

    if dist.is_main:
        run_dir = run_dir or unique_run_dir(out_root, cfg.name, overwrite)
        run_dir.mkdir(parents=True, exist_ok=False)
    run_dir = broadcast(run_dir, dist)  # rank 0 alone picks and creates the directory
    try:
        return _train_into(run_dir, cfg, model, report, prepared, names, device, precision,
                           verbose, log_line, wall_start, checkpoints=checkpoints, dist=dist)
    except BaseException:
        if dist.is_main and not (run_dir / "checkpoints").is_dir():
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing resumable: leave no half-written run
        raise


@dataclasses.dataclass
class Resumed:
    """What a resume hands to the training loop besides the (already restored) model."""

    checkpoint: Checkpoint
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler


def _train_into(run_dir: Path, cfg: Config, model, report: BudgetReport, prepared: Prepared,
                names: list[str], device: torch.device, precision: str, verbose: bool,
                log_line: Callable[[str], None], wall_start: float, checkpoints: bool = True,
                resumed: Optional[Resumed] = None, dist: DistContext = SINGLE) -> Path:
    if dist.is_main:
        write_config(cfg, run_dir)  # on a resume with --extend this records the new length
    if resumed is None and dist.is_main:
        write_json(run_dir / "labels.json", {"names": names})
        prepared.tokenizer.save_pretrained(str(run_dir / "tokenizer"))
    pad_id = pad_token_id(prepared.tokenizer)
    # before the RNG restore below: compile warm-up on CUDA draws dropout masks
    fast = prepare_for_training(model, cfg, device, precision, pad_id, len(names))
    if verbose and resumed is not None:
        log_line(f"resuming {run_dir} from {resumed.checkpoint.path.name}")
    if verbose:
        log_line(f"run directory: {run_dir}")
        log_line(f"trainable parameters: {report.trainable:,} of {report.total:,}"
                 + (f" (budget {cfg.budget:,})" if cfg.budget and cfg.mode == "lora" else ""))
        log_line(f"train {len(prepared.train):,} rows, val {len(prepared.val or [])} rows, "
                 f"test {len(prepared.test or [])} rows; device {device}, {precision}; {fast.describe()}")
    log = MetricsLog(run_dir / "metrics.jsonl",
                     tensorboard_dir=run_dir / "tensorboard" if cfg.train.tensorboard else None,
                     resume_step=resumed.checkpoint.step + 1 if resumed else None) if dist.is_main else None
    checkpoints = checkpoints and dist.is_main  # ranks > 0 join the checkpoint collectives, rank 0 writes
    checkpointer = Checkpointer(run_dir, model, cfg.to_dict(), data_fingerprint(prepared),
                                cfg.train.keep_checkpoints,
                                saved_step=resumed.checkpoint.step if resumed else None) if checkpoints else None
    resume_kwargs: dict = {}
    if resumed is not None:
        ckpt = resumed.checkpoint
        resume_kwargs = dict(state=ckpt.state, optimizer=resumed.optimizer, scheduler=resumed.scheduler,
                             scaler=resumed.scaler, best_trainable=ckpt.best_trainable, history=ckpt.history)
        restore_rng(ckpt.rng)  # last, so nothing between here and the first step draws from it
    try:
        # without checkpoints a signal keeps its default effect: there would be nothing to resume
        with (stop_on_signals() if checkpointer or dist.enabled else contextlib.nullcontext(StopFlag())) as stop:
            result = train_loop(model, prepared.train, prepared.val, cfg.train, device, pad_id, precision,
                                log or (lambda record: None), progress=Progress(verbose),
                                on_checkpoint=checkpointer, should_stop=stop, pad_to=fast.pad_to,
                                dist=dist, **resume_kwargs)
    finally:
        if log is not None:
            log.close()
    state = result.state
    if state.step < result.total_steps and not state.stopped_early and (stop() or dist.enabled):
        if not dist.is_main:
            raise RunInterrupted(f"rank {dist.rank} stopped at step {state.step}", stop.exit_code if stop() else 143)
        assert checkpointer is not None and checkpointer.saved_step == state.step
        where = run_dir / CHECKPOINTS / checkpoint_name(state.step)
        raise RunInterrupted(f"interrupted by {stop.name} at step {state.step}/{result.total_steps}; "
                             f"checkpoint written to {where}\n"
                             f"resume with: budgetlora train --resume {shlex.quote(str(run_dir.resolve()))}",
                             stop.exit_code)
    if checkpointer:
        checkpointer(state, "final", result)  # what `--resume --extend` continues from
    if cfg.train.restore_best and result.best_trainable is not None:
        load_trainable_state(model, result.best_trainable)
    if dist.is_main:
        save_trained_model(model, cfg, run_dir)
    summary = _summarize(cfg, model, report, prepared, names, device, precision, result, run_dir, wall_start,
                         dist)
    if dist.is_main:
        write_json(run_dir / "summary.json", summary)
    barrier(dist)  # no rank returns before the run directory is complete
    if verbose and "test" in summary:
        t = summary["test"]
        log_line(f"test accuracy {100 * t['accuracy']:.2f}% (95% CI {100 * t['ci_low']:.2f}-{100 * t['ci_high']:.2f}, "
                 f"n={t['n']:,}); macro-F1 {100 * t['macro_f1']:.2f}")
    return run_dir


def _summarize(cfg: Config, model, report: BudgetReport, prepared: Prepared, names: list[str],
               device: torch.device, precision: str, result: LoopResult, run_dir: Path,
               wall_start: float, dist: DistContext = SINGLE) -> dict:
    pad_id = pad_token_id(prepared.tokenizer)
    batch_tokens = cfg.train.eval_batch_size * cfg.data.max_length
    val_metrics, _ = evaluate_split(model, prepared.val, names, device, pad_id, precision, batch_tokens, dist)
    test_metrics, test_preds = evaluate_split(model, prepared.test, names, device, pad_id, precision, batch_tokens,
                                              dist)
    state = result.state
    summary = {
        "name": cfg.name, "mode": cfg.mode, "model": cfg.model,
        "trainable_params": report.trainable, "total_params": report.total, "budget": cfg.budget,
        "breakdown": report.breakdown,
        "best_step": state.best_step or state.step, "best_val_acc": state.best_acc if state.best_acc >= 0 else None,
        "steps": state.step, "total_steps": result.total_steps, "stopped_early": state.stopped_early,
        "final_train_loss": state.last_train_loss, "final_eval_loss": state.last_eval_loss,
        "train_time_s": state.train_time_s, "samples_per_s": state.samples_seen / max(state.train_time_s, 1e-9),
        "peak_memory_mb": peak_memory_mb(device), "device": str(device), "precision": precision,
        "processes": dist.world_size,
        "label_names": names,
    }
    if val_metrics is not None:
        summary["val"] = val_metrics
    if test_metrics is not None and dist.is_main:
        summary["test"] = test_metrics
        assert prepared.splits.test is not None and prepared.test is not None
        rows = ["ID,label,pred"] + [f"{i},{l},{p}" for i, l, p in
                                     zip(range(len(test_preds)), prepared.test.labels, test_preds)]
        atomic_write_text(run_dir / "test_predictions.csv", "\n".join(rows) + "\n")
    summary["wall_time_s"] = time.perf_counter() - wall_start
    return summary


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))


def data_fingerprint(prepared: Prepared) -> str:
    """A hash of the token ids and labels that training sees (train and validation), so a resume
    refuses data that changed since the checkpoint instead of silently training on other rows."""
    digest = hashlib.sha256()
    for part in (prepared.train, prepared.val):
        if part is None:
            digest.update(b"-")
            continue
        for array in (part.ids, part.offsets, part.labels):
            digest.update(b"|" if array is None else np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:32]


# keys a resume may change: they do not alter the trajectory (device and threads can change the
# last bits of float results, which is the user's call when moving a run to another machine)
RESUME_FREE_KEYS = ("train.device", "train.num_threads", "train.save_every", "train.keep_checkpoints",
                    "train.eval_batch_size")
# keys that change the schedule's length: only with --extend, which rebuilds the schedule
RESUME_EXTEND_KEYS = ("train.max_steps", "train.epochs")


def _resume_config(run_dir: Path, overrides: Optional[list[str]]) -> Config:
    cfg = read_run_config(run_dir)
    parsed = dict(parse_override(item) for item in (overrides or []))
    refused = [k for k in parsed if k not in RESUME_FREE_KEYS + RESUME_EXTEND_KEYS]
    if refused:
        raise BudgetLoraError(f"--set {refused[0]} cannot change on --resume (the run continues as "
                              f"configured); resume may set only {', '.join(RESUME_FREE_KEYS + RESUME_EXTEND_KEYS)}")
    return config_from_dict(cfg.to_dict(), parsed) if parsed else cfg


def resume_run(run_dir: str | Path, extend: bool = False, overrides: Optional[list[str]] = None,
               trust_pickle: bool = False, verbose: bool = True,
               log_line: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> Path:
    """Continue an interrupted run from its newest checkpoint, exactly where it stopped.

    The config is RUN/config.yaml; the model, optimizer, scheduler, grad scaler, RNG states and data
    position come from the checkpoint, and metrics.jsonl is cut back to the checkpoint's step. A
    changed length (train.max_steps / train.epochs) is refused unless `extend`, which rebuilds the
    schedule for the new length and also continues a finished run."""
    wall_start = time.perf_counter()
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise BudgetLoraError(f"run directory not found: {run_dir}")
    cfg = _resume_config(run_dir, overrides)
    remove_stale_temp(run_dir)
    ckpt = load_latest_checkpoint(run_dir, warn=log_line)
    if ckpt is None:
        raise BudgetLoraError(f"{run_dir} has no checkpoint to resume from (nothing in {run_dir / CHECKPOINTS}); "
                              "start the run again")
    old, new = flatten(ckpt.config), flatten(cfg.to_dict())
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k) and k not in RESUME_FREE_KEYS]
    other = [k for k in changed if k not in RESUME_EXTEND_KEYS]
    if other:
        raise BudgetLoraError(f"{run_dir / 'config.yaml'}: {other[0]} is {new.get(other[0])!r} but was "
                              f"{old.get(other[0])!r} at {ckpt.path.name}; a resume continues the same run, "
                              "start a new run to change it")
    if (run_dir / "summary.json").is_file() and not extend:
        raise BudgetLoraError(f"{run_dir} already finished (summary.json exists); to train it further: "
                              f"budgetlora train --resume {shlex.quote(str(run_dir))} --extend --set train.max_steps=N")
    if changed and not extend:
        key = changed[0]
        raise BudgetLoraError(f"{key} is {new.get(key)!r} but was {old.get(key)!r} at {ckpt.path.name}; "
                              "a resume keeps the schedule: pass --extend to rebuild it for the new length")
    if extend and not changed:
        raise BudgetLoraError("--extend needs a new length: add --set train.max_steps=N")

    quiet_transformers()
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    dist = context_from_env()
    check_batch_divides(cfg.train.batch_size, dist)
    device = device_for(dist, resolve_device(cfg.train.device))
    precision = resolve_precision(cfg.train.precision, device)
    init_process_group(dist, device)
    try:
        return _resume(run_dir, cfg, ckpt, extend, trust_pickle, verbose and dist.is_main, log_line, wall_start,
                       dist, device, precision)
    finally:
        destroy_process_group(dist)


def _resume(run_dir: Path, cfg: Config, ckpt: Checkpoint, extend: bool, trust_pickle: bool, verbose: bool,
            log_line: Callable[[str], None], wall_start: float, dist: DistContext, device: torch.device,
            precision: str) -> Path:
    prepared = prepare_data(cfg, trust_pickle)
    if ckpt.data_fingerprint and data_fingerprint(prepared) != ckpt.data_fingerprint:
        raise BudgetLoraError(f"the training data ({cfg.data.train_file or cfg.data.dataset}) changed since "
                              f"{ckpt.path.name}; resuming would not continue the same run")
    names = prepared.splits.label_names
    seed_everything(cfg.train.seed)
    model = build_model(cfg, len(names), weights=True)
    report = count_trainable(model)
    check_budget(cfg, report, len(names))
    restore_model(model, ckpt)
    model.to(device)

    batches_per_epoch = len(bucketed_batches(prepared.train.lengths, cfg.train.batch_size, cfg.train.seed, 0))
    total = total_steps_for(cfg.train, batches_per_epoch)
    optimizer = build_optimizer(model, cfg.train, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
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
        if verbose:
            log_line(f"schedule rebuilt for {total} steps (was {ckpt.total_steps}); "
                     f"lr at step {ckpt.step} is now {optimizer.param_groups[0]['lr']:.3g}")
        if dist.is_main:
            (run_dir / "summary.json").unlink(missing_ok=True)  # the run is unfinished again
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
    if dist.is_main:
        truncate_metrics(run_dir / "metrics.jsonl", ckpt.step)
    return _train_into(run_dir, cfg, model, report, prepared, names, device, precision, verbose, log_line,
                       wall_start, resumed=Resumed(ckpt, optimizer, scheduler, scaler), dist=dist)
