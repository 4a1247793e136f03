"""The run directory: what a run writes, and how a finished run is loaded back or exported."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from budgetlora.config import Config, config_from_dict, read_yaml, save_config
from budgetlora.errors import BudgetLoraError


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temp file beside `path`, fsync, rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def unique_run_dir(root: Path, name: str, overwrite: bool) -> Path:
    """`root/name`, or `root/name-2`, ... so a rerun never clobbers an earlier result."""
    path = root / name
    if overwrite and path.exists():
        shutil.rmtree(path)
    suffix = 2
    while path.exists():
        path = root / f"{name}-{suffix}"
        suffix += 1
    return path


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl, flushed so a crash loses nothing; with
    `tensorboard_dir`, mirrors every number as a TensorBoard scalar (train/loss, eval/acc, lr, ...).
    `resume_step` drops TensorBoard events from that step on, as metrics.jsonl is cut back on resume."""

    def __init__(self, path: Path, tensorboard_dir: Optional[Path] = None, resume_step: Optional[int] = None):
        self.path = path
        self._handle = path.open("a", encoding="utf-8")
        self._writer = None
        if tensorboard_dir is not None:
            self._writer = tensorboard_writer(tensorboard_dir, resume_step)

    def __call__(self, record: dict) -> None:
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()
        if self._writer is not None:
            step = int(record["step"])
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._writer.add_scalar(_tensorboard_tag(key), value, step)

    def close(self) -> None:
        self._handle.close()
        if self._writer is not None:
            self._writer.close()


def _tensorboard_tag(key: str) -> str:
    """train_loss -> train/loss, eval_acc -> eval/acc: TensorBoard groups by the part before '/'."""
    for split in ("train_", "eval_"):
        if key.startswith(split):
            return f"{split[:-1]}/{key[len(split):]}"
    return key


def require_tensorboard() -> None:
    """Fail before any work when `train.tensorboard` is on but the package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise BudgetLoraError("config key 'train.tensorboard' needs the tensorboard package: "
                              "pip install 'budgetlora[tensorboard]' (or set train.tensorboard: false)") from None


def tensorboard_writer(log_dir: Path, resume_step: Optional[int] = None):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir), purge_step=resume_step)


def save_trained_model(model: nn.Module, cfg: Config, run_dir: Path) -> None:
    """LoRA: PEFT adapter (+ head) as safetensors; full mode: the whole model as safetensors."""
    if cfg.mode == "lora":
        model.save_pretrained(str(run_dir / "adapter"), safe_serialization=True)
        return
    from safetensors.torch import save_file

    target = run_dir / "model"
    target.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(_untie(state), str(target / "model.safetensors"))


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory; copy the duplicates."""
    seen: dict[int, str] = {}
    out = {}
    for key, tensor in state.items():
        ptr = tensor.data_ptr()
        out[key] = tensor.clone() if ptr in seen else tensor
        seen.setdefault(ptr, key)
    return out


@dataclass
class LoadedRun:
    cfg: Config
    model: nn.Module
    tokenizer: Any
    label_names: list[str]
    run_dir: Path


def read_run_config(run_dir: Path) -> Config:
    if not (run_dir / "config.yaml").is_file():
        raise BudgetLoraError(f"{run_dir} is not a budgetlora run directory (no config.yaml)")
    return config_from_dict(read_yaml(run_dir / "config.yaml"))


def load_run(run_dir: str | Path, device: torch.device) -> LoadedRun:
    """A trained run, ready for inference, from its directory alone (plus the base weights)."""
    from budgetlora.model import build_base_model, load_tokenizer, quiet_transformers

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    labels_file = run_dir / "labels.json"
    if not labels_file.is_file():
        raise BudgetLoraError(f"{run_dir} has no labels.json; the run did not finish")
    names = json.loads(labels_file.read_text(encoding="utf-8"))["names"]
    quiet_transformers()
    if cfg.model_init == "random":
        raise BudgetLoraError(f"{run_dir} was trained on randomly initialised weights (a benchmark run); "
                              "it cannot be reloaded")
    base = build_base_model(cfg, len(names), weights=True)
    if cfg.mode == "lora":
        if not (run_dir / "adapter" / "adapter_config.json").is_file():
            raise BudgetLoraError(f"{run_dir}/adapter has no adapter_config.json; the run did not finish")
        from peft import PeftModel

        model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    else:
        from safetensors.torch import load_file

        weights = run_dir / "model" / "model.safetensors"
        if not weights.is_file():
            raise BudgetLoraError(f"{weights} is missing; the run did not finish")
        base.load_state_dict(load_file(str(weights)), strict=False)
        model = base
    tokenizer_dir = run_dir / "tokenizer"
    tokenizer = load_tokenizer(str(tokenizer_dir) if tokenizer_dir.is_dir() else cfg.model)
    model.to(device).eval()
    return LoadedRun(cfg, model, tokenizer, names, run_dir)


def export_merged(run: LoadedRun, out_dir: Path) -> Path:
    """Fold the adapters into the base weights and save a plain model (safetensors) that
    predicts exactly like the adapter model, loadable without PEFT."""
    from safetensors.torch import save_file

    from budgetlora.model import PooledClassifier

    model = run.model.merge_and_unload() if run.cfg.mode == "lora" else run.model
    model = model.to("cpu")
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent if out_dir.parent.exists() else None,
                                prefix=f".{out_dir.name}.tmp-"))
    try:
        if isinstance(model, PooledClassifier):
            state = {k: v.contiguous() for k, v in model.state_dict().items()}
            save_file(_untie(state), str(tmp / "model.safetensors"))
            model.config.save_pretrained(str(tmp))
            write_json(tmp / "budgetlora_head.json", {"type": "linear", "pooling": model.pooling,
                                                      "num_labels": len(run.label_names)})
        else:
            model.config.id2label = dict(enumerate(run.label_names))
            model.config.label2id = {n: i for i, n in enumerate(run.label_names)}
            model.save_pretrained(str(tmp), safe_serialization=True)
        run.tokenizer.save_pretrained(str(tmp))
        write_json(tmp / "labels.json", {"names": run.label_names})
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def write_predictions_csv(path: Path, ids: list[str], preds: np.ndarray, names: Optional[list[str]]) -> None:
    """`ID,Label` rows; Label is the class index, or the class name when `names` is given."""
    lines = ["ID,Label"]
    for row_id, pred in zip(ids, preds):
        label = names[int(pred)] if names else str(int(pred))
        if any(c in label for c in ',"\n'):
            label = '"' + label.replace('"', '""') + '"'
        lines.append(f"{row_id},{label}")
    atomic_write_text(path, "\n".join(lines) + "\n")


def write_config(cfg: Config, run_dir: Path) -> None:
    save_config(cfg, run_dir / "config.yaml")
