"""Crash-safe training checkpoints: write, prune, find and load them.

A checkpoint is a directory `RUN/checkpoints/step-NNNNNNNN/` holding
- `trainable.safetensors`: every trainable tensor (LoRA A/B, head, biases) by parameter name,
- `best.safetensors`: the trainable tensors of the best evaluation so far (for `restore_best`),
- `state.safetensors`: the tensors of the optimizer state and the torch/CUDA RNG states,
- `state.json`: the loop state (step, data position, best score, ...), the metrics so far, the
  scheduler / grad-scaler / optimizer structure, the python and numpy RNG states, the resolved
  config and a fingerprint of the training data.

Nothing is pickled, so loading a checkpoint cannot run code. A checkpoint is assembled in a temp
directory beside `checkpoints/`, every file is fsynced, and it appears under its final name by one
rename: a crash or a full disk at any moment leaves the previous checkpoints complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from budgetlora.artifacts.run_dir import CHECKPOINTS
from budgetlora.artifacts.trained import save_tensors, untie
from budgetlora import jsonfile
from budgetlora.atomic import fsync_path, settle_tree
from budgetlora.errors import BudgetLoraError
from budgetlora.training.loop import LoopState, Resumable, trainable_tensors

FORMAT_VERSION = 1
_TMP_PREFIX = ".checkpoint-tmp-"
_TRASH_PREFIX = ".checkpoint-trash-"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def _step_of(path: Path) -> Optional[int]:
    name = path.name
    if not name.startswith("step-") or not name[5:].isdigit():
        return None
    return int(name[5:])


def _encode(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON-able mirror of `obj`; tensors go to `tensors` under their path and leave a reference."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, f"{key}.{k}", tensors) for k, v in obj.items()}
        # optimizer state is keyed by int parameter index; JSON would turn the keys into strings
        return {
            "__items__": [
                [_encode(k, f"{key}.k{i}", tensors), _encode(v, f"{key}.{k}", tensors)]
                for i, (k, v) in enumerate(obj.items())
            ]
        }
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {key}")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def capture_rng() -> dict[str, Any]:
    """Every RNG a training step can draw from (dropout uses torch's; CUDA kernels use CUDA's)."""
    rng: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=False),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict[str, Any]) -> None:
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_tensors(tensors, path)
    fsync_path(path)


def _write_json(path: Path, data: Any) -> None:
    with path.open("w", encoding="utf-8") as handle:
        handle.write(json.dumps(data, indent=1, allow_nan=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories by ascending step. Only the final rename creates `step-*`, so each
    one listed was written completely."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(step, p) for p in root.iterdir() if p.is_dir() and (step := _step_of(p)) is not None]
    return [p for _, p in sorted(found)]


def remove_stale_temp(run_dir: Path) -> None:
    """Temp and trash directories that a killed process left behind."""
    for parent in (Path(run_dir), Path(run_dir) / CHECKPOINTS):
        if parent.is_dir():
            for p in parent.iterdir():
                if p.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
                    shutil.rmtree(p, ignore_errors=True)


def _remove(path: Path) -> None:
    # rename first: a deletion cut short must not leave a `step-*` that looks complete but is not
    trash = path.with_name(f"{_TRASH_PREFIX}{path.name}")
    try:
        os.replace(path, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def prune_checkpoints(run_dir: Path, keep: int, best_step: Optional[int]) -> None:
    """Keep the newest `keep` checkpoints (at least one: it is what a resume needs) and the best."""
    paths = complete_checkpoints(run_dir)
    newest = set(paths[-max(1, keep) :])
    for path in paths:
        if path not in newest and _step_of(path) != best_step:
            _remove(path)


def save_checkpoint(
    run_dir: Path,
    model: nn.Module,
    progress: Resumable,
    reason: str,
    config: dict[str, Any],
    data_fingerprint: str = "",
    keep: int = 2,
) -> Path:
    """Write one checkpoint atomically and prune old ones; returns its directory.

    A failure while writing (disk full, unwritable directory) raises BudgetLoraError and leaves
    every earlier checkpoint as it was."""
    run_dir = Path(run_dir)
    state = progress.state
    final = run_dir / CHECKPOINTS / checkpoint_name(state.step)
    tmp: Optional[Path] = None
    try:
        tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=_TMP_PREFIX))
        _save_tensors(untie(trainable_tensors(model, copy=False)), tmp / "trainable.safetensors")
        if progress.best_trainable is not None:
            _save_tensors(untie(progress.best_trainable), tmp / "best.safetensors")
        tensors: dict[str, torch.Tensor] = {}
        structure = {
            "optimizer": _encode(progress.optimizer.state_dict(), "optimizer", tensors),
            "scheduler": _encode(progress.scheduler.state_dict(), "scheduler", tensors),
            "scaler": _encode(progress.scaler.state_dict(), "scaler", tensors),
            "rng": _encode(capture_rng(), "rng", tensors),
        }
        _save_tensors(tensors, tmp / "state.safetensors")
        _write_json(
            tmp / "state.json",
            {
                "format": FORMAT_VERSION,
                "step": state.step,
                "reason": reason,
                "time": time.time(),
                "total_steps": progress.total_steps,
                "loop_state": dataclasses.asdict(state),
                "history": progress.history,
                "config": config,
                "data_fingerprint": data_fingerprint,
                **structure,
            },
        )
        settle_tree(tmp)
        final.parent.mkdir(exist_ok=True)
        if final.exists():  # the same step saved again (e.g. after a resume): replace it whole
            _remove(final)
        os.replace(tmp, final)
        tmp = None
        fsync_path(final.parent)
    except OSError as exc:
        previous = [p.name for p in complete_checkpoints(run_dir)]
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        raise BudgetLoraError(
            f"cannot write the checkpoint for step {state.step} in {run_dir / CHECKPOINTS}: "
            f"{exc.strerror or exc}; {kept}"
        ) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    prune_checkpoints(run_dir, keep, state.best_step or None)
    return final


class Checkpointer:
    """The `on_checkpoint` hook of `train_loop`: one checkpoint per step at most."""

    def __init__(
        self,
        run_dir: Path,
        model: nn.Module,
        config: dict[str, Any],
        data_fingerprint: str,
        keep: int,
        saved_step: Optional[int] = None,
    ):
        self.run_dir, self.model, self.config = Path(run_dir), model, config
        self.data_fingerprint, self.keep = data_fingerprint, keep
        self.saved_step = saved_step

    def __call__(self, reason: str, progress: Resumable) -> None:
        if progress.state.step == self.saved_step:
            return
        save_checkpoint(self.run_dir, self.model, progress, reason, self.config, self.data_fingerprint, self.keep)
        self.saved_step = progress.state.step


@dataclass
class Checkpoint:
    path: Path
    step: int
    reason: str
    total_steps: int
    state: LoopState
    trainable: dict[str, torch.Tensor]
    best_trainable: Optional[dict[str, torch.Tensor]]
    optimizer: Optional[dict]
    scheduler: Optional[dict]
    scaler: Optional[dict]
    rng: dict[str, Any]
    history: list[dict] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    data_fingerprint: str = ""


def load_checkpoint(path: Path) -> Checkpoint:
    """One checkpoint directory, tensors on the CPU. Raises BudgetLoraError naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    meta_file = path / "state.json"
    try:
        meta = jsonfile.read(meta_file)
    except FileNotFoundError:
        raise BudgetLoraError(f"{meta_file} is missing; not a budgetlora checkpoint") from None
    except OSError as exc:
        raise BudgetLoraError(f"{meta_file}: unreadable checkpoint state ({type(exc).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise BudgetLoraError(
            f"{meta_file}: unknown checkpoint format {meta.get('format') if isinstance(meta, dict) else None!r}"
        )

    def tensors(name: str, required: bool = True) -> Optional[dict[str, torch.Tensor]]:
        file = path / name
        if not file.is_file():
            if required:
                raise BudgetLoraError(f"{file} is missing; the checkpoint is incomplete")
            return None
        try:
            return load_file(str(file))
        except (OSError, SafetensorError, ValueError) as exc:
            raise BudgetLoraError(f"{file}: unreadable tensors ({type(exc).__name__})") from None

    state_tensors = tensors("state.safetensors") or {}
    try:
        decoded = {k: _decode(meta[k], state_tensors) for k in ("optimizer", "scheduler", "scaler", "rng")}
        loop_state = _loop_state(meta["loop_state"])
        return Checkpoint(
            path=path,
            step=_count(meta["step"]),
            reason=str(meta.get("reason", "")),
            total_steps=_count(meta["total_steps"]),
            state=loop_state,
            trainable=tensors("trainable.safetensors") or {},
            best_trainable=tensors("best.safetensors", required=False),
            optimizer=decoded["optimizer"],
            scheduler=decoded["scheduler"],
            scaler=decoded["scaler"],
            rng=decoded["rng"],
            history=list(meta.get("history") or []),
            config=dict(meta.get("config") or {}),
            data_fingerprint=str(meta.get("data_fingerprint", "")),
        )
    except KeyError as exc:
        raise BudgetLoraError(f"{meta_file}: incomplete checkpoint state (missing {exc})") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise BudgetLoraError(f"{meta_file}: damaged checkpoint state ({str(exc)[:120]})") from None


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{value!r} is not a step count")
    return value


def _loop_state(raw: Any) -> LoopState:
    """The loop's counters, each of its declared type (a damaged file must not resume as garbage)."""
    if not isinstance(raw, dict):
        raise TypeError("loop_state is not a mapping")
    values: dict[str, Any] = {}
    for f in dataclasses.fields(LoopState):
        if f.name not in raw:
            continue
        value, default = raw[f.name], f.default
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:  # floats, and the optional losses
            ok = (value is None and default is None) or (
                isinstance(value, (int, float)) and not isinstance(value, bool)
            )
        if not ok:
            raise ValueError(f"loop_state.{f.name} is {value!r}")
        values[f.name] = value
    return LoopState(**values)


def load_latest_checkpoint(run_dir: Path, warn: Callable[[str], None] = lambda s: None) -> Optional[Checkpoint]:
    """The newest checkpoint that loads; an unreadable one is reported and skipped."""
    for path in reversed(complete_checkpoints(run_dir)):
        try:
            return load_checkpoint(path)
        except BudgetLoraError as exc:
            warn(f"skipping checkpoint {path.name}: {exc}")
    return None


def restore_model(model: nn.Module, checkpoint: Checkpoint) -> None:
    """Copy the checkpoint's trainable tensors into `model`; names and shapes must match exactly."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(checkpoint.trainable))
    unexpected = sorted(set(checkpoint.trainable) - set(params))
    if missing or unexpected:
        raise BudgetLoraError(
            f"{checkpoint.path}: the checkpoint does not match the model "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    with torch.no_grad():
        for name, param in params.items():
            value = checkpoint.trainable[name]
            if value.shape != param.shape:
                raise BudgetLoraError(
                    f"{checkpoint.path}: tensor {name} has shape {tuple(value.shape)}, "
                    f"the model expects {tuple(param.shape)}"
                )
            param.copy_(value)
