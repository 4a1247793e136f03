"""Typed, validated experiment configuration.

One YAML file per experiment maps onto the dataclasses below. Every key is checked against its
declared type and allowed values, so a typo fails at load time with a message naming the key
instead of silently falling back to a default deep inside training.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from budgetlora.errors import BudgetLoraError

TARGET_NAMES = ("q", "k", "v", "o", "ffn_in", "ffn_out", "head")


@dataclass
class DataConfig:
    dataset: Optional[str] = None  # hub dataset id, e.g. "ag_news"
    dataset_config: Optional[str] = None
    train_split: str = "train"
    test_split: Optional[str] = "test"
    train_file: Optional[str] = None
    test_file: Optional[str] = None
    format: Literal["auto", "agnews", "csv", "tsv", "jsonl", "parquet", "pickle"] = "auto"
    text_columns: list[str] = field(default_factory=lambda: ["text"])
    label_column: str = "label"
    label_names: Optional[list[str]] = None
    classes_file: Optional[str] = None
    val_size: float = 0.1  # < 1: fraction of train; >= 1: number of rows
    max_length: int = 128
    clean_text: bool = True  # undo AG News' HTML remnants (#39; &lt;) and backslash line breaks
    max_train_rows: Optional[int] = None
    max_test_rows: Optional[int] = None
    trust_pickle: bool = False


@dataclass
class HeadConfig:
    type: Literal["auto", "linear"] = "auto"  # auto: the model's own classification head
    pooling: Literal["cls", "mean"] = "cls"  # for type=linear
    trainable: bool = True


@dataclass
class LoraSettings:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.1
    targets: list[str] = field(default_factory=lambda: ["q", "v"])
    layers: Optional[list[int]] = None
    bias: Literal["none", "lora_only", "all"] = "none"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False
    # where LoRA dropout acts: input = PEFT's dropout(x) (a dropped copy of every adapted input),
    # lowrank = dropout(x @ A^T) (r features; see budgetlora.fast); auto = lowrank on CUDA, input on CPU
    dropout_position: Literal["auto", "input", "lowrank"] = "auto"


@dataclass
class TrainConfig:
    lr: float = 5e-4
    head_lr: Optional[float] = None  # defaults to lr
    lora_plus_ratio: Optional[float] = None  # LoRA+: lr of B = ratio * lr of A
    max_steps: Optional[int] = 1000
    epochs: Optional[float] = None  # used when max_steps is null
    batch_size: int = 16
    grad_accum: int = 1
    optimizer: Literal["adamw", "rmsprop", "adagrad", "sgd", "muon"] = "adamw"
    momentum: float = 0.9  # sgd, rmsprop, muon
    weight_decay: float = 0.01
    scheduler: Literal["linear", "cosine", "cosine_with_restarts", "constant"] = "linear"
    warmup: float = 0.06  # < 1: fraction of max_steps; >= 1: steps
    num_cycles: int = 1  # for cosine_with_restarts
    grad_clip: Optional[float] = 1.0
    label_smoothing: float = 0.0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: str = "auto"
    seed: int = 42
    eval_every: Optional[int] = 200
    log_every: int = 20
    early_stopping_patience: Optional[int] = None  # in evaluations without improvement
    restore_best: bool = True
    eval_batch_size: int = 128
    save_every: Optional[int] = None  # checkpoint every N steps (and at evaluations)
    keep_checkpoints: int = 2
    num_threads: Optional[int] = None  # CPU threads; None = torch's default
    compile: Union[bool, Literal["auto"]] = "auto"  # torch.compile the backbone; auto = on CUDA only
    tensorboard: bool = False  # also write TensorBoard event files into RUN/tensorboard/


@dataclass
class Config:
    name: str = "run"
    model: str = "roberta-base"
    model_init: Literal["pretrained", "random"] = "pretrained"  # random: same FLOPs, for benchmarks
    mode: Literal["lora", "full"] = "lora"
    budget: Optional[int] = 1_000_000
    data: DataConfig = field(default_factory=DataConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PATH_KEYS = ("data.train_file", "data.test_file", "data.classes_file")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    wrong = BudgetLoraError(f"config key '{key}': got {value!r}, expected {_type_name(tp)}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise wrong
        return value
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except BudgetLoraError:
                continue
        raise wrong
    if tp is type(None):
        if value is not None:
            raise wrong
        return None
    if origin is list:
        if isinstance(value, str) and typing.get_args(tp)[0] is str:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise wrong
        return [_coerce(v, typing.get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise wrong
        key_tp, val_tp = typing.get_args(tp)
        return {str(k): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise wrong
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise wrong
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise wrong
        return value
    raise wrong


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            raise BudgetLoraError(
                f"unknown config key '{dotted}'; valid keys{' in ' + prefix[:-1] if prefix else ''}: "
                + ", ".join(names)
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise BudgetLoraError(f"config key '{dotted}' must be a mapping of {', '.join(f.name for f in dataclasses.fields(tp))}")
            kwargs[key] = _build(tp, value, dotted + ".")
        else:
            kwargs[key] = _coerce(value, tp, dotted)
    return cls(**kwargs)


def _check_values(cfg: Config) -> None:
    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise BudgetLoraError(f"config key '{key}': {what}")

    unknown = [t for t in cfg.lora.targets if t not in TARGET_NAMES]
    need(not unknown, "lora.targets", f"unknown target(s) {unknown}; valid: {', '.join(TARGET_NAMES)}")
    need(cfg.mode == "full" or bool(cfg.lora.targets), "lora.targets", "must name at least one module")
    need(cfg.lora.r >= 1, "lora.r", "must be >= 1")
    need(0.0 <= cfg.lora.dropout < 1.0, "lora.dropout", "must be in [0, 1)")
    need(not (cfg.lora.use_dora and cfg.lora.dropout_position == "lowrank"), "lora.dropout_position",
         "lowrank is not available with lora.use_dora (DoRA reuses the dropped input); use input or auto")
    need(cfg.train.lr > 0, "train.lr", "must be > 0")
    need(cfg.train.batch_size >= 1, "train.batch_size", "must be >= 1")
    need(cfg.train.grad_accum >= 1, "train.grad_accum", "must be >= 1")
    need(cfg.train.max_steps is not None or cfg.train.epochs is not None, "train.max_steps", "set max_steps or epochs")
    need(cfg.train.max_steps is None or cfg.train.max_steps >= 1, "train.max_steps", "must be >= 1")
    need(cfg.train.warmup >= 0, "train.warmup", "must be >= 0")
    need(0.0 <= cfg.train.label_smoothing < 1.0, "train.label_smoothing", "must be in [0, 1)")
    need(cfg.train.log_every >= 1, "train.log_every", "must be >= 1")
    need(cfg.data.max_length >= 8, "data.max_length", "must be >= 8")
    need(cfg.data.val_size >= 0, "data.val_size", "must be >= 0 (fraction < 1 or a row count)")
    need(cfg.data.dataset is not None or cfg.data.train_file is not None, "data.train_file",
         "set data.train_file (a local file) or data.dataset (a hub dataset id)")
    need(cfg.budget is None or cfg.budget >= 1, "budget", "must be a positive integer or null")
    need(bool(cfg.data.text_columns), "data.text_columns", "must name at least one column")


def parse_override(item: str) -> tuple[str, Any]:
    """`train.lr=1e-4` -> ("train.lr", 0.0001); the value is parsed as YAML."""
    if "=" not in item:
        raise BudgetLoraError(f"--set {item!r}: expected KEY=VALUE, e.g. --set lora.r=4")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    # YAML 1.1 reads "1e-4" as a string; users mean a number.
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    return key.strip(), value


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise BudgetLoraError(f"config key '{key}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def flatten(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict) and key not in ("rank_pattern", "alpha_pattern"):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise BudgetLoraError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise BudgetLoraError(f"{path}{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    except UnicodeDecodeError:
        raise BudgetLoraError(f"{path}: not a UTF-8 text file") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise BudgetLoraError(f"{path}: the top level must be a mapping of config keys")
    return raw


def resolve_paths(raw: dict[str, Any], base_dir: Path) -> None:
    """Relative data paths in a config file are relative to that file, so it runs from anywhere."""
    flat = flatten(raw)
    for key in PATH_KEYS:
        value = flat.get(key)
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            set_dotted(raw, key, str((base_dir / value).resolve()))
        elif isinstance(value, str) and value:
            set_dotted(raw, key, str(Path(value).expanduser()))
    model = raw.get("model")
    if isinstance(model, str) and (model.startswith("./") or model.startswith("../")):
        raw["model"] = str((base_dir / model).resolve())


def config_from_dict(raw: dict[str, Any], overrides: Optional[dict[str, Any]] = None) -> Config:
    """Validate a raw mapping (plus dotted overrides) into a Config."""
    raw = yaml.safe_load(yaml.safe_dump(raw))  # deep copy, plain types only
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    cfg = _build(Config, raw, "")
    _check_values(cfg)
    return cfg


def load_config(path: str | Path, overrides: Optional[list[str]] = None) -> Config:
    """Load a YAML config file and apply `--set KEY=VALUE` overrides (paths relative to CWD)."""
    path = Path(path)
    raw = read_yaml(path)
    resolve_paths(raw, path.resolve().parent)
    parsed = dict(parse_override(item) for item in (overrides or []))
    override_raw: dict[str, Any] = {}
    for key, value in parsed.items():
        set_dotted(override_raw, key, value)
    resolve_paths(override_raw, Path.cwd())
    return config_from_dict(raw, flatten(override_raw))


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
