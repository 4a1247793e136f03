"""The Python API: what the command line does, for notebooks and scripts.

    import budgetlora
    run = budgetlora.train("configs/agnews-minilm-offline.yaml", train={"max_steps": 200})
    run.evaluate("test.csv")["accuracy"]
    run.predict(["Stocks rally as the Fed holds rates"]).labels

Every function validates as the CLI does and raises `BudgetLoraError` (one readable message)
for bad input; nothing here exits the process.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from budgetlora.config import SECTIONS, Config, config_from_dict, flatten, load_config, resolve_paths, set_dotted
from budgetlora.artifacts.summary import RunSummary
from budgetlora.config.schema import MIN_CLASSES
from budgetlora.errors import BudgetLoraError
from budgetlora.progress import QUIET, Console
from budgetlora.task import PAIR, global_threshold

from budgetlora.inference import Predictions  # noqa: E402  (part of the API)

Data = Union[str, Path, Sequence[str]]
MAX_LABELS = 100_000  # a classification head wider than this is a typo, and would not fit in memory


def as_path(value: Any, what: str) -> Path:
    """A str or os.PathLike argument as a Path (`~` expanded); anything else is one error."""
    import os

    if isinstance(value, bool) or not isinstance(value, (str, os.PathLike)):
        raise BudgetLoraError(f"{what} must be a path (str or pathlib.Path), not {type(value).__name__}")
    text = os.fspath(value)
    if not isinstance(text, str) or not text.strip() or "\x00" in text:
        raise BudgetLoraError(f"{what} must be a non-empty path, got {text!r}")
    return Path(text).expanduser()


def _flag(value: Any, name: str) -> bool:
    """A yes/no option: only True or False (a truthy string such as "no" must not turn on pickle)."""
    if not isinstance(value, bool):
        raise BudgetLoraError(f"{name} must be True or False, not {value!r}")
    return value


def _read_options(format: Any, text_columns: Any) -> tuple[Optional[str], Optional[list[str]]]:
    import typing

    from budgetlora.config import DataConfig

    formats = typing.get_args(typing.get_type_hints(DataConfig)["format"])
    if format is not None and format not in formats:
        raise BudgetLoraError(f"format must be one of {', '.join(formats)}, not {format!r}")
    if isinstance(text_columns, str):
        text_columns = [text_columns]  # one column, not its characters
    if text_columns is not None and (
        not isinstance(text_columns, (list, tuple))
        or not text_columns
        or not all(isinstance(c, str) and c.strip() for c in text_columns)
    ):
        raise BudgetLoraError(f"text_columns must be a column name or a list of them, not {text_columns!r}")
    return format, list(text_columns) if text_columns is not None else None


def _as_texts(data: Any) -> Data:
    """Texts to predict (a list or tuple of strings) or a data file (str or Path); one error otherwise."""
    import os

    if isinstance(data, (str, os.PathLike)):
        return Path(os.fspath(data)).expanduser() if isinstance(data, os.PathLike) else data
    if isinstance(data, (list, tuple)):

        def is_text(item: Any) -> bool:  # a text, or a (text, pair) for a text-pair model
            return isinstance(item, str) or (
                isinstance(item, (tuple, list)) and len(item) == PAIR and all(isinstance(t, str) for t in item)
            )

        bad = next((t for t in data if not is_text(t)), None)
        if bad is not None or not data:
            raise BudgetLoraError(
                "texts to predict must be a non-empty list of strings (or of (text, pair) tuples)"
                + (f" (found a {type(bad).__name__})" if bad is not None else "")
            )
        return list(data)
    raise BudgetLoraError(
        f"predict() takes a list of strings or a data file path, not a {type(data).__name__} "
        "(materialise a generator with list(...))"
    )


def dotted_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """`train={"lr": 1e-4}` and `**{"train.lr": 1e-4}` both become {"train.lr": 1e-4}."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        if key in SECTIONS and isinstance(value, dict):
            out.update(flatten(value, f"{key}."))
        else:
            out[key] = value
    return out


def make_config(config: Union[str, Path, dict, Config], overrides: Optional[dict[str, Any]] = None) -> Config:
    """A checked Config from a YAML path, a mapping (paths relative to the working directory) or a
    Config, with overrides applied."""
    raw_overrides: dict[str, Any] = {}
    for key, value in dotted_overrides(overrides or {}).items():
        set_dotted(raw_overrides, key, value)
    resolve_paths(raw_overrides, Path.cwd())
    if isinstance(config, Config):
        return config_from_dict(config.to_dict(), flatten(raw_overrides))
    if isinstance(config, dict):
        raw = dict(config)
        resolve_paths(raw, Path.cwd())
        return config_from_dict(raw, flatten(raw_overrides))
    cfg = load_config(as_path(config, "config (a YAML path, a mapping or a Config)"))
    return config_from_dict(cfg.to_dict(), flatten(raw_overrides)) if raw_overrides else cfg


class Run:
    """A trained model on disk (a run directory, a merged export or an ONNX export), loaded on first
    use, with its summary when it is a run."""

    def __init__(self, path: Union[str, Path], device: str = "auto", backend: str = "auto"):
        from budgetlora.artifacts.loading import describe

        if not isinstance(device, str) or not isinstance(backend, str):
            raise BudgetLoraError("device and backend must be strings (e.g. device='cpu', backend='auto')")
        if backend not in ("auto", "torch", "onnxruntime"):
            raise BudgetLoraError(f"backend must be auto, torch or onnxruntime, not {backend!r}")
        self.path = as_path(path, "the run or export path").absolute()
        self.kind = describe(self.path)  # refuses what is neither a run nor an export
        self.device, self.backend = device, backend
        self._trained: Any = None

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, kind={self.kind!r})"

    @property
    def summary(self) -> Optional[RunSummary]:
        """The finished run's summary (None for an export or an unfinished run): a frozen
        `budgetlora.artifacts.summary.RunSummary` with `trainable_params`, `best_val_acc`, `steps`,
        `train_time_s`, ... and `val` / `test` as `SplitMetrics` (`accuracy`, `ci_low`, `ci_high`,
        `n`, `macro_f1`, `per_class`, `confusion_matrix`); `summary.to_json()` is summary.json's dict."""
        from budgetlora.artifacts import run_dir as rd

        return rd.read_summary(self.path) if self.kind == "run" and rd.is_finished(self.path) else None

    @property
    def trained(self) -> Any:
        if self._trained is None:
            from budgetlora.artifacts.loading import load_trained

            self._trained = load_trained(self.path, self.device, self.backend)
        return self._trained

    @property
    def label_names(self) -> list[str]:
        return self.trained.label_names

    @property
    def config(self) -> Config:
        return self.trained.cfg

    def predict(
        self,
        data: Data,
        *,
        trust_pickle: bool = False,
        format: Optional[str] = None,
        text_columns: Optional[Sequence[str]] = None,
        quiet: bool = True,
    ) -> Predictions:
        """Classes and probabilities for texts (a list of strings, or one string) or a data file
        (a Path, or a string naming an existing file)."""
        return self._predict(_as_texts(data), False, trust_pickle, format, text_columns, quiet)[0]

    def _predict(
        self, data: Any, labeled: bool, trust_pickle: Any, format: Any, text_columns: Any, quiet: Any
    ) -> tuple[Predictions, Any]:
        """predict_data on this run with the API's options checked once (predict and evaluate)."""
        from budgetlora.inference import predict_data

        format, text_columns = _read_options(format, text_columns)
        trusted, console = _flag(trust_pickle, "trust_pickle"), QUIET if _flag(quiet, "quiet") else Console()
        return predict_data(
            self.trained,
            data,
            labeled=labeled,
            trust_pickle=trusted,
            fmt=format,
            text_columns=text_columns,
            console=console,
        )

    def evaluate(
        self,
        data: Union[str, Path],
        *,
        trust_pickle: bool = False,
        format: Optional[str] = None,
        text_columns: Optional[Sequence[str]] = None,
        quiet: bool = True,
        threshold: Optional[float] = None,
    ) -> dict[str, Any]:
        """The metrics of a labeled data file, as the run's summary has them for its test split:
        single-label accuracy with n and its 95% CI, macro-F1, per-class metrics and the confusion
        matrix; multi-label micro/macro-F1, subset accuracy, Jaccard and per-label figures at the
        run's thresholds (or one global `threshold`); regression Pearson/Spearman/MAE/RMSE."""
        from budgetlora.evaluate.scoring import score_split

        data = as_path(data, "evaluate()'s data (a labeled data file)")
        predictions, labels = self._predict(data, True, trust_pickle, format, text_columns, quiet)
        decisions = predictions.decisions
        if threshold is not None:
            decisions = global_threshold(decisions, threshold)
        assert labels is not None
        metrics, _ = score_split(predictions.space, decisions, predictions.outputs, labels)
        metrics["data"] = str(Path(data).resolve())
        return metrics

    def export(self, out: Union[str, Path], *, onnx: bool = False, int8: bool = False, overwrite: bool = False) -> Path:
        """A merged Transformers model directory (default) or an ONNX model (`onnx`, `int8` for
        dynamic int8 quantization) that loads without budgetlora."""
        from budgetlora.artifacts.export import check_export_target, export_merged

        out = as_path(out, "the export folder")
        onnx, int8, overwrite = _flag(onnx, "onnx"), _flag(int8, "int8"), _flag(overwrite, "overwrite")
        if self.kind != "run":
            raise BudgetLoraError(f"{self.path} is an export already; export from the run directory")
        if int8 and not onnx:
            raise BudgetLoraError("int8 applies to ONNX exports: export(out, onnx=True, int8=True)")
        check_export_target(Path(out), overwrite, self.path)  # before the model loads (seconds)
        if onnx:
            from budgetlora.artifacts.onnx import export_onnx

            return export_onnx(self.trained, Path(out), int8=int8, overwrite=overwrite)
        return export_merged(self.trained, Path(out), overwrite=overwrite)


def train(
    config: Union[str, Path, dict, Config],
    out: Union[str, Path, None] = None,
    *,
    name: Optional[str] = None,
    overwrite: bool = False,
    trust_pickle: bool = False,
    quiet: bool = False,
    **overrides: Any,
) -> Run:
    """Train a config (a YAML path, a mapping or a Config) with overrides as dotted keys
    (`**{"train.lr": 1e-4}`) or sections (`train={"lr": 1e-4}`); the run lands in
    `out/<name>/` (default `runs/` under the working directory), as with the CLI."""
    from budgetlora.recipe import train_run

    if name is not None:
        overrides["name"] = name
    root = as_path(out, "out") if out is not None else Path("runs")
    cfg = make_config(config, overrides)
    return Run(
        train_run(
            cfg,
            root,
            overwrite=_flag(overwrite, "overwrite"),
            trust_pickle=_flag(trust_pickle, "trust_pickle"),
            verbose=not _flag(quiet, "quiet"),
        )
    )


def resume(
    run: Union[str, Path, Run],
    *,
    extend: bool = False,
    trust_pickle: bool = False,
    quiet: bool = False,
    **overrides: Any,
) -> Run:
    """Continue an interrupted run from its newest checkpoint (`extend` with a new
    `train.max_steps` trains a finished run further)."""
    from budgetlora.resuming import resume_run

    path = run.path if isinstance(run, Run) else as_path(run, "the run to resume")
    items = [f"{k}={v}" for k, v in dotted_overrides(overrides).items()]
    return Run(
        resume_run(
            path,
            extend=_flag(extend, "extend"),
            overrides=items,
            trust_pickle=_flag(trust_pickle, "trust_pickle"),
            verbose=not _flag(quiet, "quiet"),
        )
    )


def load(path: Union[str, Path], device: str = "auto", backend: str = "auto") -> Run:
    """A run directory or an export, for predict / evaluate / export (loaded on first use)."""
    return Run(path, device, backend)


@dataclass
class Plan:
    rank: int  # 0 when no rank fits
    trainable: int
    budget: int
    breakdown: dict[str, int]
    config: Config

    def table(self) -> str:
        width = max([len(k) for k in self.breakdown] + [9])
        return "\n".join(
            [f"{k:<{width}}  {v:>12,}" for k, v in self.breakdown.items()]
            + [f"{'trainable':<{width}}  {self.trainable:>12,}"]
        )


def plan(
    model: Optional[str] = None,
    budget: Optional[int] = None,
    targets: Optional[Sequence[str]] = None,
    num_labels: int = 4,
    config: Union[str, Path, dict, Config, None] = None,
    **overrides: Any,
) -> Plan:
    """The largest uniform LoRA rank whose trainable count fits the budget, with its count and
    breakdown (from the architecture alone: no weights, no data)."""
    from budgetlora.model import build_meta_model, count_trainable, max_rank

    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    if targets is not None and (not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets)):
        raise BudgetLoraError(f"targets must be a list of module names (e.g. ['q', 'v']), not {targets!r}")
    for key, value in (("model", model), ("budget", budget), ("lora.targets", list(targets) if targets else None)):
        if value is not None:
            overrides[key] = value
    cfg = make_config(config if config is not None else {"data": {"train_file": "-"}}, overrides)
    if cfg.budget is None:
        raise BudgetLoraError("plan needs a budget")
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or not MIN_CLASSES <= num_labels <= MAX_LABELS:
        raise BudgetLoraError(f"num_labels must be an integer in [2, {MAX_LABELS:,}], got {num_labels!r}")
    rank, count = max_rank(cfg, num_labels, cfg.budget)
    if rank == 0:
        return Plan(0, count, cfg.budget, {}, cfg)
    planned = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, r=rank))
    report = count_trainable(build_meta_model(planned, num_labels))
    return Plan(rank, report.trainable, cfg.budget, report.breakdown, planned)


def sweep(study: Union[str, Path], out: Union[str, Path, None] = None, *, quiet: bool = False, **options: Any) -> Any:
    """Run (or resume) a study file; options as `budgetlora sweep` takes them (`workers`, `prune`,
    `confirm_top`, `confirm_seeds`, `overrides` as a list of "KEY=VALUE", `seeds`, `report`, ...).
    Returns the outcome: the sweep folder, this process's counts and the printed lines."""
    from budgetlora.sweeps import SweepRequest, run_sweep

    known = {f.name for f in dataclasses.fields(SweepRequest)} - {"study", "out", "console"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise BudgetLoraError(f"sweep() got unknown option(s) {unknown}; valid: {', '.join(sorted(known))}")
    return run_sweep(
        SweepRequest(
            study=as_path(study, "the study file"),
            out=as_path(out, "out") if out is not None else None,
            console=Console(not quiet),
            **options,
        )
    )
