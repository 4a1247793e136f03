"""An export's description, budgetlora.json (EXPORT_META): what budgetlora reads back from a
merged or ONNX export (its config, its outputs and the decisions baked into its last layer), each
checked before use. No torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from budgetlora import jsonfile
from budgetlora.artifacts.run_dir import EXPORT_FORMAT, EXPORT_META, valid_names
from budgetlora.config import Config, config_from_dict
from budgetlora.errors import BudgetLoraError
from budgetlora.task import Decisions, LabelSpace, check_decisions_fit


def read_export_meta(path: Path) -> dict[str, Any]:
    file = Path(path) / EXPORT_META
    try:
        meta = jsonfile.read(file)
    except OSError as exc:
        raise BudgetLoraError(f"{file}: unreadable export description ({type(exc).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT or meta.get("kind") not in ("merged", "onnx"):
        raise BudgetLoraError(f"{file}: not a budgetlora export description (format {EXPORT_FORMAT})")
    return meta


def export_config(meta: dict[str, Any], where: Path) -> Config:
    if not isinstance(meta.get("config"), dict):
        raise BudgetLoraError(
            f"{where / EXPORT_META}: the saved config is missing or not a mapping; the export is damaged"
        )
    try:
        return config_from_dict(meta["config"])
    except (KeyError, TypeError, AttributeError, BudgetLoraError) as exc:
        raise BudgetLoraError(f"{where / EXPORT_META}: the saved config is not valid ({exc})") from None


def space_of(meta: dict[str, Any], where: Path) -> LabelSpace:
    """An export's outputs (exports made before tasks existed list only single-label class names)."""
    if "label_space" in meta:
        space = LabelSpace.from_json(meta["label_space"], str(where / EXPORT_META))
        if list(space.names) != meta.get("label_names"):
            raise BudgetLoraError(f"{where / EXPORT_META}: label_names and label_space disagree; the export was edited")
        return space
    names = meta.get("label_names")
    if not valid_names(names):
        raise BudgetLoraError(f"{where / EXPORT_META}: label_names must list two or more distinct class names")
    return LabelSpace("single_label", tuple(names))


def decisions_of(meta: dict[str, Any], where: Path, space: LabelSpace) -> Decisions:
    """The decisions an export's last layer applies (baked): its outputs are used as they come."""
    if "decisions" not in meta:
        return Decisions.default(space).as_baked()
    decisions = Decisions.from_json(meta["decisions"], str(where / EXPORT_META))
    check_decisions_fit(decisions, space, str(where / EXPORT_META))
    if not decisions.baked:
        raise BudgetLoraError(f"{where / EXPORT_META}: decisions not marked as baked; the export was edited")
    return decisions
