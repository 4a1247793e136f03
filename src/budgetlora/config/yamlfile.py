"""YAML files read back bounded: a regular UTF-8 file of at most 1 MiB whose aliases expand to at
most 100,000 values, whose top level is a mapping (configs, study files)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from budgetlora.errors import BudgetLoraError

MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_VALUES = 100_000  # after aliases are expanded: a config or study file has a few hundred


def check_expansion(root: Any, path: Path) -> None:
    """Refuse a YAML document whose aliases (`*name`) expand to more than MAX_YAML_VALUES values
    ("billion laughs"): counted on the composed node graph, each node once, before anything
    builds or walks the expansion."""
    sizes: dict[int, int] = {}

    def size(node: Any) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        children = node.value if isinstance(node, (yaml.SequenceNode, yaml.MappingNode)) else []
        total = 1
        for child in children:
            parts = child if isinstance(child, tuple) else (child,)
            for part in parts:
                total += size(part)
                if total > MAX_YAML_VALUES:
                    raise BudgetLoraError(
                        f"{path}: expands to more than {MAX_YAML_VALUES:,} values through its "
                        "YAML aliases (&name / *name); write the values out"
                    )
        sizes[id(node)] = total
        return total

    if root is not None:
        size(root)


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping from a regular, UTF-8, reasonably small file."""
    path = Path(path)
    try:
        exists, regular = path.exists(), path.is_file()
    except OSError as exc:  # a name too long, a loop of links
        raise BudgetLoraError(f"cannot read config file {str(path)[:200]}: {exc.strerror or exc}") from None
    if not exists:
        raise BudgetLoraError(f"config file not found: {path}")
    if not regular:
        raise BudgetLoraError(f"{path} is not a regular file; expected a YAML config file")
    try:
        if path.stat().st_size == 0:  # an empty file, or a /proc file that may block on read
            data = b""
        else:
            with path.open("rb") as handle:
                data = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise BudgetLoraError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise BudgetLoraError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB; not a config file")
    try:
        text = data.decode("utf-8-sig")
        check_expansion(yaml.compose(text, Loader=yaml.SafeLoader), path)
        raw = yaml.safe_load(text)
    except UnicodeDecodeError:
        raise BudgetLoraError(f"{path}: not a UTF-8 text file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise BudgetLoraError(f"{path}{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    except RecursionError:
        raise BudgetLoraError(f"{path}: YAML nested too deeply") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise BudgetLoraError(f"{path}: the top level must be a mapping of config keys")
    return raw
