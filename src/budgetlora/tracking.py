"""Metric sinks: every record the training loop logs goes to each sink of a run. metrics.jsonl
(artifacts.run_dir.MetricsFile) and the display (progress.TrainingDisplay) are always there;
`train.report_to` adds TensorBoard event files and an MLflow run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

from budgetlora import atomic
from budgetlora.artifacts import run_dir as rd
from budgetlora.config import Config, flatten
from budgetlora.errors import BudgetLoraError


class MetricSink(Protocol):
    def log(self, record: dict) -> None: ...

    def close(self) -> None: ...


class FanOut:
    """One callable for the loop; each record reaches every sink."""

    def __init__(self, sinks: Sequence[MetricSink]):
        self.sinks = list(sinks)

    def __call__(self, record: dict) -> None:
        for sink in self.sinks:
            sink.log(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def require_trackers(cfg: Config) -> None:
    """Fail before any work when a tracker in `train.report_to` is not installed."""
    packages = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow")}
    for name in cfg.train.report_to:
        module, extra = packages[name]
        try:
            __import__(module)
        except ImportError:
            raise BudgetLoraError(f"config key 'train.report_to': {name} needs the {module} package: "
                                  f"pip install 'budgetlora[{extra}]' (or remove it from train.report_to)") from None


def _tag(key: str) -> str:
    """train_loss -> train/loss, eval_acc -> eval/acc: TensorBoard groups by the part before '/'."""
    for split in ("train_", "eval_"):
        if key.startswith(split):
            return f"{split[:-1]}/{key[len(split):]}"
    return key


class TensorBoardSink:
    """Every number of a record as a scalar; `resume_step` drops the events from that step on, as
    metrics.jsonl is cut back on resume."""

    def __init__(self, log_dir: Path, resume_step: Optional[int] = None):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(log_dir), purge_step=resume_step)

    def log(self, record: dict) -> None:
        step = int(record["step"])
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self._writer.add_scalar(_tag(key), value, step)

    def close(self) -> None:
        self._writer.close()


def mlflow_uri(cfg: Config, out_root: Path) -> str:
    return (cfg.train.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{(Path(out_root) / 'mlflow.db').resolve()}")


class MLflowSink:
    """One MLflow run per budgetlora run: the flattened config as params, every record as metrics
    at its step; `finish` adds the summary numbers and the run directory (without checkpoints) as
    artifacts. A resumed run continues the same MLflow run."""

    def __init__(self, cfg: Config, run_dir: Path, out_root: Path, resume_step: Optional[int] = None):
        import mlflow

        self._mlflow = mlflow
        self._client = mlflow.MlflowClient(tracking_uri=mlflow_uri(cfg, out_root))
        experiment = self._client.get_experiment_by_name(cfg.train.mlflow_experiment)
        experiment_id = experiment.experiment_id if experiment else \
            self._client.create_experiment(cfg.train.mlflow_experiment)
        marker = Path(run_dir) / ".mlflow-run-id"
        run_id = marker.read_text().strip() if resume_step is not None and marker.is_file() else ""
        if not run_id:
            run = self._client.create_run(experiment_id, run_name=Path(run_dir).name,
                                          tags={"budgetlora.run_dir": str(Path(run_dir).resolve())})
            run_id = run.info.run_id
            atomic.write_text(marker, run_id + "\n")
            params = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in flatten(cfg.to_dict()).items()]
            for start in range(0, len(params), 100):
                self._client.log_batch(run_id, params=params[start:start + 100])
        self.run_id = run_id

    def log(self, record: dict) -> None:
        step = int(record["step"])
        metrics = [self._mlflow.entities.Metric(k, float(v), 0, step) for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float))]
        self._client.log_batch(self.run_id, metrics=metrics)

    def finish(self, run_dir: Path, summary: dict[str, Any]) -> None:
        numbers = {k: v for k, v in flatten(summary).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and "per_class" not in k}
        self._client.log_batch(self.run_id, metrics=[self._mlflow.entities.Metric(k, float(v), 0, 0)
                                                     for k, v in numbers.items()])
        for item in sorted(Path(run_dir).iterdir()):
            if item.name.startswith(".") or item.name == rd.CHECKPOINTS:
                continue
            if item.is_dir():
                self._client.log_artifacts(self.run_id, str(item), artifact_path=item.name)
            else:
                self._client.log_artifact(self.run_id, str(item))
        self._client.set_terminated(self.run_id, "FINISHED")

    def close(self) -> None:
        pass
