"""The training recipe: config in, finished run directory out.

Order matters for users: everything that can be refused (config, budget, data) is refused
before weights load or any directory is written.
"""

from __future__ import annotations

import dataclasses
import json
import random
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from budgetlora.artifacts import (MetricsLog, atomic_write_text, save_trained_model, unique_run_dir,
                                  write_config, write_json)
from budgetlora.budget import BudgetReport, check_budget, count_trainable
from budgetlora.config import Config
from budgetlora.data.dataset import Splits, label_names_from_config, load_splits
from budgetlora.data.sources import detect_format
from budgetlora.data.tokens import TokenizedSet, tokenize
from budgetlora.evaluate import classification_metrics, predict_logits
from budgetlora.model import build_meta_model, build_model, load_tokenizer, pad_token_id, quiet_transformers
from budgetlora.train import LoopResult, LoopState, load_trainable_state, train_loop


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
                   precision: str, batch_tokens: int) -> tuple[Optional[dict], Optional[np.ndarray]]:
    if data is None or len(data) == 0 or data.labels is None:
        return None, None
    logits = predict_logits(model, data, device, pad_id, precision, batch_tokens=batch_tokens)
    preds = logits.argmax(1)
    return classification_metrics(data.labels, preds, names, logits), preds


def train_run(cfg: Config, out_root: Path, overwrite: bool = False, trust_pickle: bool = False,
              verbose: bool = True, run_dir: Optional[Path] = None,
              log_line: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> Path:
    """Train one config end to end; returns the finished run directory."""
    wall_start = time.perf_counter()
    quiet_transformers()
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    precheck_budget(cfg)
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    prepared = prepare_data(cfg, trust_pickle)
    names = prepared.splits.label_names
    seed_everything(cfg.train.seed)
    model = build_model(cfg, len(names), weights=True)
    report = count_trainable(model)
    check_budget(cfg, report, len(names))
    model.to(device)

    run_dir = run_dir or unique_run_dir(out_root, cfg.name, overwrite)
    run_dir.mkdir(parents=True, exist_ok=False)
    try:
        return _train_into(run_dir, cfg, model, report, prepared, names, device, precision,
                           verbose, log_line, wall_start)
    except BaseException:
        if not (run_dir / "checkpoints").is_dir():
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing resumable: leave no half-written run
        raise


def _train_into(run_dir: Path, cfg: Config, model, report: BudgetReport, prepared: Prepared,
                names: list[str], device: torch.device, precision: str, verbose: bool,
                log_line: Callable[[str], None], wall_start: float) -> Path:
    write_config(cfg, run_dir)
    write_json(run_dir / "labels.json", {"names": names})
    prepared.tokenizer.save_pretrained(str(run_dir / "tokenizer"))
    pad_id = pad_token_id(prepared.tokenizer)
    if verbose:
        log_line(f"run directory: {run_dir}")
        log_line(f"trainable parameters: {report.trainable:,} of {report.total:,}"
                 + (f" (budget {cfg.budget:,})" if cfg.budget and cfg.mode == "lora" else ""))
        log_line(f"train {len(prepared.train):,} rows, val {len(prepared.val or [])} rows, "
                 f"test {len(prepared.test or [])} rows; device {device}, {precision}")
    log = MetricsLog(run_dir / "metrics.jsonl")
    try:
        result = train_loop(model, prepared.train, prepared.val, cfg.train, device, pad_id, precision,
                            log, progress=Progress(verbose))
    finally:
        log.close()
    if cfg.train.restore_best and result.best_trainable is not None:
        load_trainable_state(model, result.best_trainable)
    save_trained_model(model, cfg, run_dir)
    summary = _summarize(cfg, model, report, prepared, names, device, precision, result, run_dir, wall_start)
    write_json(run_dir / "summary.json", summary)
    if verbose and "test" in summary:
        t = summary["test"]
        log_line(f"test accuracy {100 * t['accuracy']:.2f}% (95% CI {100 * t['ci_low']:.2f}-{100 * t['ci_high']:.2f}, "
                 f"n={t['n']:,}); macro-F1 {100 * t['macro_f1']:.2f}")
    return run_dir


def _summarize(cfg: Config, model, report: BudgetReport, prepared: Prepared, names: list[str],
               device: torch.device, precision: str, result: LoopResult, run_dir: Path,
               wall_start: float) -> dict:
    pad_id = pad_token_id(prepared.tokenizer)
    batch_tokens = cfg.train.eval_batch_size * cfg.data.max_length
    val_metrics, _ = evaluate_split(model, prepared.val, names, device, pad_id, precision, batch_tokens)
    test_metrics, test_preds = evaluate_split(model, prepared.test, names, device, pad_id, precision, batch_tokens)
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
        "label_names": names,
    }
    if val_metrics is not None:
        summary["val"] = val_metrics
    if test_metrics is not None:
        summary["test"] = test_metrics
        assert prepared.splits.test is not None and prepared.test is not None
        rows = ["ID,label,pred"] + [f"{i},{l},{p}" for i, l, p in
                                     zip(range(len(test_preds)), prepared.test.labels, test_preds)]
        atomic_write_text(run_dir / "test_predictions.csv", "\n".join(rows) + "\n")
    summary["wall_time_s"] = time.perf_counter() - wall_start
    return summary


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
