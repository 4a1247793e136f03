"""From YAML and `--set KEY=VALUE` to a checked Config.

Every key is checked against its declared type and range, then the keys are checked against
each other, all before any data or weights load, so a typo or a nonsense value fails at once
with a message naming the key instead of silently training something else.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from budgetlora.config.yamlfile import MAX_CONFIG_BYTES, read_yaml  # noqa: F401  (re-exported)

from budgetlora.config.schema import Config, Range
from budgetlora.config.checks import check_values
from budgetlora.errors import BudgetLoraError

PATH_KEYS = ("data.train_file", "data.test_file", "data.val_file", "data.classes_file")
PATTERN_KEYS = ("rank_pattern", "alpha_pattern")  # mappings that are one value, not a section


class _OutOfRange(BudgetLoraError):
    """A value of the right type outside the key's range."""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of names to {_type_name(typing.get_args(tp)[1])}"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str, range_: Optional[Range], kind: str = "config key") -> Any:
    """Check `value` against the annotation `tp` and the range; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    wrong = BudgetLoraError(f"{kind} '{key}': got {value!r}, expected {_type_name(tp)}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise wrong
        return value
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key, range_, kind)
            except _OutOfRange:
                raise  # the right type, a wrong value: that is the message
            except BudgetLoraError:
                continue
        raise wrong
    if tp is type(None):
        if value is not None:
            raise wrong
        return None
    if origin is list:
        if isinstance(value, str) and typing.get_origin(typing.get_args(tp)[0]) in (None, Literal):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise wrong
        return [_coerce(v, typing.get_args(tp)[0], f"{key}[{i}]", range_, kind) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise wrong
        return {str(k): _coerce(v, typing.get_args(tp)[1], f"{key}.{k}", range_, kind) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise wrong
        return value
    if tp is str:
        if not isinstance(value, str):
            raise wrong
        return value
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong
        if isinstance(value, float) and not math.isfinite(value):
            raise _OutOfRange(f"{kind} '{key}': got {value!r}, must be a finite number")
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise wrong
            value = int(value)
        else:
            value = float(value)
        if range_ is not None and not range_.allows(value):
            raise _OutOfRange(f"{kind} '{key}': got {value!r}, must be {range_.describe()}")
        return value
    raise wrong


def _build(cls: type, raw: dict[str, Any], prefix: str, kind: str = "config key") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            near = _near(str(key), list(fields))
            raise BudgetLoraError(
                f"unknown {kind} '{dotted}'{near}; valid keys"
                f"{' in ' + prefix[:-1] if prefix else ''}: {', '.join(fields)}"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise BudgetLoraError(
                    f"{kind} '{dotted}' must be a mapping of {', '.join(f.name for f in dataclasses.fields(tp))}"
                )
            kwargs[key] = _build(tp, value, dotted + ".", kind)
        else:
            kwargs[key] = _coerce(value, tp, dotted, fields[key].metadata.get("range"), kind)
    return cls(**kwargs)


def coerce_value(value: Any, tp: Any, key: str, range_: Optional[Range], kind: str) -> Any:
    """One value checked against a type annotation and range, with the config's wording."""
    return _coerce(value, tp, key, range_, kind)


def build_section(cls: type, raw: Any, prefix: str, kind: str) -> Any:
    """A dataclass whose fields carry `opt(...)` metadata (type, range), built from a mapping with
    the config's validation and wording: `kind` names what the keys are ("study key", "sweep
    option"); keys marked `internal` in their metadata are not accepted from `raw`."""
    if not isinstance(raw, dict):
        raise BudgetLoraError(
            f"{kind} '{prefix.rstrip('.')}' must be a mapping of "
            f"{', '.join(f.name for f in dataclasses.fields(cls) if not f.metadata.get('internal'))}"
        )
    internal = [k for k in raw if any(f.name == k and f.metadata.get("internal") for f in dataclasses.fields(cls))]
    if internal:
        raise BudgetLoraError(f"unknown {kind} '{prefix}{internal[0]}'")
    return _build(cls, raw, prefix, kind)


# what users of Transformers' Trainer and PEFT call budgetlora's keys
_FAMILIAR = {
    "learning_rate": "lr",
    "num_train_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "warmup_ratio": "warmup",
    "warmup_steps": "warmup",
    "max_grad_norm": "grad_clip",
    "lr_scheduler_type": "scheduler",
    "fp16": "precision",
    "bf16": "precision",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "rank": "r",
    "lora_r": "r",
    "model_name": "model",
    "model_name_or_path": "model",
    "max_seq_length": "max_length",
}


def _near(word: str, options: list[str]) -> str:
    import difflib

    if _FAMILIAR.get(word) in options:
        return f" (did you mean {_FAMILIAR[word]}?)"
    close = difflib.get_close_matches(word, options, n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def parse_override(item: str) -> tuple[str, Any]:
    """`train.lr=1e-4` -> ("train.lr", 0.0001); the value is parsed as YAML."""
    if "=" not in item:
        raise BudgetLoraError(f"--set {item!r}: expected KEY=VALUE, e.g. --set lora.r=4")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as exc:
        if text.lstrip().startswith(("[", "{", '"', "'")):  # meant as a list, mapping or quoted string
            raise BudgetLoraError(
                f"--set {item!r}: the value is not valid YAML "
                f"({getattr(exc, 'problem', None) or 'parse error'}); e.g. --set lora.targets=[q,v]"
            ) from None
        value = text
    if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string; users mean a number
        try:
            value = float(value)
        except ValueError:
            pass
    return key.strip(), value


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    if not all(parts):
        raise BudgetLoraError(f"config key {key!r}: empty part in the dotted name")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise BudgetLoraError(f"config key '{key}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def flatten(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> dotted keys; `rank_pattern` / `alpha_pattern` stay whole (one value each)."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict) and value and key not in PATTERN_KEYS:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


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


def _migrate(raw: dict[str, Any]) -> None:
    """Keys of earlier versions, as run directories on disk still hold them."""
    data, train = raw.get("data"), raw.get("train")
    if isinstance(data, dict):
        data.pop("trust_pickle", None)  # trust comes from the invocation (--trust-pickle), never a file
    if isinstance(train, dict) and "tensorboard" in train:
        if train.pop("tensorboard") is True:
            train.setdefault("report_to", ["tensorboard"])


def config_from_dict(raw: dict[str, Any], overrides: Optional[dict[str, Any]] = None) -> Config:
    """Validate a raw mapping (plus dotted overrides) into a Config."""
    try:
        raw = yaml.safe_load(yaml.safe_dump(raw))  # deep copy, plain types only
    except yaml.YAMLError:
        raise BudgetLoraError("the config holds values that are not plain YAML data") from None
    _migrate(raw)
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    cfg = _build(Config, raw, "")
    check_values(cfg)
    return cfg


def load_config(path: str | Path, overrides: Optional[list[str]] = None) -> Config:
    """Load a YAML config file and apply `--set KEY=VALUE` overrides (paths relative to CWD)."""
    path = Path(path)
    raw = read_yaml(path)
    resolve_paths(raw, path.resolve().parent)
    override_raw: dict[str, Any] = {}
    for key, value in dict(parse_override(item) for item in (overrides or [])).items():
        set_dotted(override_raw, key, value)
    resolve_paths(override_raw, Path.cwd())
    return config_from_dict(raw, flatten(override_raw))


def config_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
