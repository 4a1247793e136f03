"""Trained weights on disk: saved from a finished run, loaded back strictly (every expected tensor
present with its shape, from safetensors only) from a run directory or a merged export."""

from __future__ import annotations

import errno
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from budgetlora import atomic, jsonfile
from budgetlora.artifacts import run_dir as rd
from budgetlora.artifacts.model_card import base_model_id
from budgetlora.config import Config
from budgetlora.errors import BudgetLoraError
from budgetlora.task import Decisions, LabelSpace

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MODEL_WEIGHTS = "model.safetensors"
# the pooled head for plain Transformers, saved beside exported and adapter weights
MODELING_FILE = Path(__file__).with_name("modeling_budgetlora.py")
POOLED_CLASS = "BudgetLoraPooledForSequenceClassification"


@dataclass
class TrainedModel:
    """A trained model ready for inference, with what prediction needs besides the weights: what
    its outputs mean (`space`) and how they become answers (`decisions`; baked into an export)."""

    cfg: Config
    model: nn.Module
    tokenizer: Any
    label_names: list[str]
    source: Path
    kind: str  # "run", "merged" or "onnx"
    space: Optional[LabelSpace] = None
    decisions: Optional[Decisions] = None

    @property
    def segments(self) -> bool:
        """Whether text pairs go in with segment ids: a pair-trained model with segment embeddings
        (an ONNX graph: one that takes token_type_ids)."""
        if not self.cfg.data.text_pair_columns:
            return False
        if self.kind == "onnx":
            return "token_type_ids" in {i.name for i in self.model.get_inputs()}
        from budgetlora.model import takes_segments

        return takes_segments(getattr(self.model, "config", None))

    def __post_init__(self) -> None:
        if self.space is None:
            self.space = LabelSpace("single_label", tuple(self.label_names))
        if self.decisions is None:
            self.decisions = Decisions.default(self.space)


def untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies safetensors accepts: it refuses tensors that share memory, so duplicates are cloned."""
    seen: set[int] = set()
    out = {}
    for key, tensor in state.items():
        tensor = tensor.detach().to("cpu").contiguous()
        out[key] = tensor.clone() if tensor.data_ptr() in seen else tensor
        seen.add(tensor.data_ptr())
    return out


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: Optional[dict[str, str]] = None) -> None:
    """safetensors' save_file, with a full disk reported as the OSError it is (safetensors raises
    its own SafetensorError), so the atomic writers turn it into one line naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as exc:
        raise OSError(errno.EIO, str(exc).splitlines()[0][:200], str(path)) from None


def save_trained_model(model: nn.Module, cfg: Config, run_dir: Path, label_names: list[str]) -> None:
    """LoRA: the PEFT adapter (+ head) as safetensors, naming its base model by hub id or alias;
    for a pooled head also the encoder config and `modeling_budgetlora.py`, so plain PEFT can
    rebuild the base (docs/interop.md). Full mode: every weight as safetensors."""
    if cfg.mode == "lora":
        with atomic.atomic_dir(Path(run_dir) / rd.ADAPTER, replace=True) as tmp:
            for peft_config in model.peft_config.values():
                peft_config.base_model_name_or_path = base_model_id(cfg)
            # embeddings are never adapted here; "auto" would look the base up on the hub
            model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
            (tmp / "README.md").unlink(missing_ok=True)  # PEFT's template; the run's card replaces it
            if cfg.head.type == "linear":
                _pooled_base_files(model.get_base_model(), tmp, label_names)
        return
    with atomic.atomic_dir(Path(run_dir) / rd.FULL_MODEL, replace=True) as tmp:
        save_tensors(untie(model.state_dict()), tmp / MODEL_WEIGHTS)


def _pooled_base_files(base: nn.Module, adapter_dir: Path, names: list[str]) -> None:
    import copy
    import shutil

    config = copy.deepcopy(base.config)
    config.problem_type = getattr(base.config, "problem_type", None)
    config.architectures = [POOLED_CLASS]
    config.budgetlora_pooling = base.pooling
    config.num_labels = len(names)
    config.id2label, config.label2id = dict(enumerate(names)), {n: i for i, n in enumerate(names)}
    config.save_pretrained(str(adapter_dir))
    shutil.copyfile(MODELING_FILE, adapter_dir / MODELING_FILE.name)
    config_file = adapter_dir / ADAPTER_CONFIG
    adapter_config = jsonfile.read(config_file)
    adapter_config["auto_mapping"] = {"base_model_class": POOLED_CLASS, "parent_library": "modeling_budgetlora"}
    atomic.write_json(config_file, adapter_config)


def _tensor_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        pickled = path.with_suffix(".bin")
        if pickled.is_file():
            raise BudgetLoraError(
                f"{pickled} is a torch pickle; budgetlora loads weights only from safetensors "
                f"({path.name}), because unpickling can run code"
            )
        raise BudgetLoraError(f"{path} is missing; the run did not finish or its weights were removed")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BudgetLoraError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0][:120]})") from None
    bad = next((k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:  # a damaged file would give NaN probabilities and label 0 for every row
        raise BudgetLoraError(
            f"{path}: tensor {bad} holds NaN or infinite values; the file is damaged "
            "(or its run diverged): train the run again"
        )
    return tensors


def check_keys(model: nn.Module, state: dict[str, torch.Tensor], expected: set[str], where: Path) -> None:
    """Before `state` is copied into `model`: every key of `expected` must be present with the
    model's shape and nothing else may be there, or the weights on disk are not this model's."""
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise BudgetLoraError(
            f"{where}: the weights do not belong to this model ({len(missing)} missing, e.g. "
            f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})"
        )
    own = model.state_dict()
    for key, value in state.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            raise BudgetLoraError(
                f"{where}: tensor {key} has shape {tuple(value.shape)}, the model expects {tuple(own[key].shape)}"
            )


def _read_adapter_file(path: Path) -> Any:
    """A JSON file of the run's adapter folder, or one clear error when it is missing or unreadable."""
    try:
        return jsonfile.read(path, max_bytes=2**20)
    except FileNotFoundError:
        raise BudgetLoraError(f"{path} is missing; the run's adapter is incomplete") from None
    except OSError as exc:
        raise BudgetLoraError(f"{path}: unreadable ({type(exc).__name__})") from None


def _check_pooling(adapter_dir: Path, cfg: Config) -> None:
    """A pooled head's adapter records its pooling (config.json, for plain PEFT): config.yaml must
    say the same, or an edit would silently change every prediction (mean and CLS pooling have the
    same tensors)."""
    if cfg.head.type != "linear":
        return
    path = adapter_dir / "config.json"
    recorded = _read_adapter_file(path)
    pooling = recorded.get("budgetlora_pooling") if isinstance(recorded, dict) else None
    if pooling != cfg.head.pooling:
        raise BudgetLoraError(
            f"{adapter_dir.parent / rd.CONFIG}: head.pooling is {cfg.head.pooling!r} but the "
            f"adapter was trained with {pooling!r} ({path}); restore config.yaml"
        )


ADAPTER_KEYS = {
    "r": "lora.r",
    "lora_alpha": "lora.alpha",
    "use_rslora": "lora.use_rslora",
    "use_dora": "lora.use_dora",
    "bias": "lora.bias",
    "rank_pattern": "lora.rank_pattern",
    "alpha_pattern": "lora.alpha_pattern",
    "target_modules": "lora.targets / lora.target_modules",
}


def _check_adapter_config(adapter_dir: Path, model: nn.Module, run: Path) -> None:
    """The adapter as config.yaml rebuilds it must be the one adapter_config.json describes: an
    edited alpha or rsLoRA scaling has the same tensors but other predictions."""
    path = adapter_dir / ADAPTER_CONFIG
    saved = _read_adapter_file(path)
    if not isinstance(saved, dict):
        raise BudgetLoraError(f"{path}: not a JSON object; the adapter is damaged")
    built = next(iter(model.peft_config.values())).to_dict()
    for key, config_key in ADAPTER_KEYS.items():
        want, have = built.get(key), saved.get(key)
        if key == "target_modules":
            want, have = sorted(want or []), sorted(have or []) if isinstance(have, list) else have
        if isinstance(want, float) or isinstance(have, float):
            same = isinstance(have, (int, float)) and float(want) == float(have)
        else:
            same = want == have
        if not same:
            raise BudgetLoraError(
                f"{run / rd.CONFIG}: {config_key} gives {key}={want!r} but the adapter was trained with "
                f"{have!r} ({path}); restore config.yaml"
            )


def _load_adapter(base: nn.Module, cfg: Config, run: Path) -> nn.Module:
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from budgetlora.model import wrap_with_lora

    adapter_dir = run / rd.ADAPTER
    _check_pooling(adapter_dir, cfg)
    model = wrap_with_lora(base, cfg)
    _check_adapter_config(adapter_dir, model, run)
    state = _tensor_file(adapter_dir / ADAPTER_WEIGHTS)
    check_keys(model, state, set(get_peft_model_state_dict(model)), adapter_dir / ADAPTER_WEIGHTS)
    _copying(lambda: set_peft_model_state_dict(model, state), adapter_dir / ADAPTER_WEIGHTS)
    return model


def _copying(load: Any, where: Path) -> None:
    """A state-dict copy whose size mismatches (weights of another head size) are one error."""
    try:
        load()
    except RuntimeError as exc:
        detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc)[:200])
        raise BudgetLoraError(
            f"{where}: the weights do not fit this model ({detail[:300]}); was labels.json or "
            "config.yaml changed after training?"
        ) from None


def load_run_model(run: Path, device: torch.device) -> TrainedModel:
    """A finished run, from its directory alone (plus the base weights it was trained from)."""
    from budgetlora.model import build_base_model, load_tokenizer

    run = Path(run)
    if not run.is_dir():
        raise BudgetLoraError(f"run directory not found: {run}")
    cfg = rd.read_run_config(run)
    space = rd.read_label_space(run)
    if space.task != cfg.task:
        raise BudgetLoraError(
            f"{run / rd.CONFIG}: task is {cfg.task!r} but the run was trained as {space.task!r} "
            f"({run / rd.LABELS}); restore config.yaml"
        )
    decisions = rd.read_decisions(run, space)
    names = list(space.names)
    if cfg.model_init == "random":
        raise BudgetLoraError(
            f"{run} was trained on randomly initialised weights (a benchmark run); it cannot be reloaded"
        )
    base = build_base_model(cfg, space.width, weights=True)
    if cfg.mode == "lora":
        model = _load_adapter(base, cfg, run)
    else:
        weights = run / rd.FULL_MODEL / MODEL_WEIGHTS
        state = _tensor_file(weights)
        check_keys(base, state, set(base.state_dict()), weights)
        _copying(lambda: base.load_state_dict(state), weights)
        model = base
    tokenizer_dir = run / rd.TOKENIZER
    tokenizer = load_tokenizer(str(tokenizer_dir) if tokenizer_dir.is_dir() else cfg.model)
    model.to(device).eval()
    return TrainedModel(cfg, model, tokenizer, names, run, "run", space, decisions)
