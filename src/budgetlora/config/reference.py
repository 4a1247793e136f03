"""The README's config table, made from the fields' help texts, defaults and ranges
(tests/test_docs.py keeps the README's copy equal to it)."""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal

from budgetlora.config.schema import SECTIONS, Config, fields_by_key


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return "—"
    if value is None:
        return "—"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, list):
        return f"`[{', '.join(map(str, value))}]`" if value else "`[]`"
    if isinstance(value, dict):
        return "`{}`"
    return f"`{value:g}`" if isinstance(value, float) else f"`{value}`"


def reference_markdown() -> str:
    """The README's config table, made from the fields' help texts, defaults and ranges."""
    lines = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    for key, f in fields_by_key().items():
        range_ = f.metadata.get("range")
        allowed = range_.describe() if range_ is not None else ""
        hint = (
            typing.get_type_hints(SECTIONS.get(key.split(".")[0], Config))
            if "." in key
            else typing.get_type_hints(Config)
        )
        tp = hint[key.rsplit(".", 1)[-1]]
        if typing.get_origin(tp) is Literal or (
            typing.get_origin(tp) is list and typing.get_origin(typing.get_args(tp)[0]) is Literal
        ):
            args = typing.get_args(tp) if typing.get_origin(tp) is Literal else typing.get_args(typing.get_args(tp)[0])
            allowed = ", ".join(f"`{a}`" for a in args)
        lines.append(f"| `{key}` | {_default_text(f)} | {allowed} | {f.metadata.get('help', '')} |")
    return "\n".join(lines) + "\n"
