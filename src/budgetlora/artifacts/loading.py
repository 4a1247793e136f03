"""What a directory holds and how to load it for inference: a run, a merged export, or an ONNX
export. budgetlora reads its own exports without running any code from them (no
`trust_remote_code`): the modeling file beside an export is for other tools."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from budgetlora.artifacts import run_dir as rd
from budgetlora.artifacts.export_meta import export_config, read_export_meta
from budgetlora.artifacts.run_dir import EXPORT_META
from budgetlora.config import DataConfig
from budgetlora.errors import BudgetLoraError


def describe(path: Path) -> str:
    """ "run", "merged" or "onnx"; anything else is refused with what was expected."""
    path = Path(path)
    if not path.is_dir():
        raise BudgetLoraError(f"run or export directory not found: {path}")
    if (path / EXPORT_META).is_file():
        return str(read_export_meta(path)["kind"])
    if (path / rd.CONFIG).is_file():
        return "run"
    raise BudgetLoraError(f"{path} is neither a budgetlora run (config.yaml) nor a budgetlora export ({EXPORT_META})")


def data_config(path: Path) -> DataConfig:
    """The data settings a run or an export predicts with (format, columns, max_length)."""
    kind = describe(path)
    cfg = rd.read_run_config(path) if kind == "run" else export_config(read_export_meta(path), Path(path))
    return cfg.data


def load_trained(path: Path, device: str = "auto", backend: str = "auto") -> Any:
    """The model of a run or an export, on `device` (under torchrun: this rank's GPU), ready for
    `inference.predict_data`."""
    from budgetlora.distributed import context_from_env, device_for
    from budgetlora.runtime import quiet_transformers, resolve_device

    quiet_transformers()
    kind = describe(path)
    if backend == "onnxruntime" and kind != "onnx":
        raise BudgetLoraError(
            f"--backend onnxruntime needs an ONNX export (budgetlora export RUN --onnx OUT); {path} is a {kind}"
        )
    if kind == "onnx":
        if backend == "torch":
            raise BudgetLoraError(f"{path} is an ONNX export; predict it with --backend onnxruntime (or auto)")
        from budgetlora.artifacts.onnx import load_onnx

        return load_onnx(Path(path))
    torch_device = device_for(context_from_env(), resolve_device(device))
    if kind == "run":
        from budgetlora.artifacts.trained import load_run_model

        return load_run_model(Path(path), torch_device)
    from budgetlora.artifacts.export import load_merged

    return load_merged(Path(path), torch_device)
