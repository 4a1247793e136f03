"""Metric sinks: every record the training loop logs goes to each sink of a run. metrics.jsonl
(artifacts.run_dir.MetricsFile) and the display (progress.TrainingDisplay) are always there;
`train.report_to` adds TensorBoard event files and an MLflow run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

from budgetlora import atomic
from budgetlora.artifacts import run_dir as rd
from budgetlora.artifacts.summary import RunSummary
from budgetlora.config import Config, flatten
from budgetlora.errors import BudgetLoraError
from budgetlora.stores import MLFLOW_TABLES, check_sqlite_store


class MetricSink(Protocol):
    """Where a run's records go (torchtune's metric-logger protocol): `log_config` once, `log`
    every record, `close` when the loop is over, `finish` once the run is complete (its summary
    written; after close)."""

    def log_config(self, cfg: Config) -> None: ...

    def log(self, record: dict) -> None: ...

    def finish(self, run_dir: Path, summary: RunSummary) -> None: ...

    def close(self) -> None: ...


class FanOut:
    """One callable for the loop; each record reaches every sink."""

    def __init__(self, sinks: Sequence[MetricSink]):
        self.sinks = list(sinks)

    def __call__(self, record: dict) -> None:
        for sink in self.sinks:
            sink.log(record)

    def log_config(self, cfg: Config) -> None:
        for sink in self.sinks:
            sink.log_config(cfg)

    def finish(self, run_dir: Path, summary: RunSummary, warn: Any = print) -> None:
        """Every sink's `finish`; a tracker that fails here only warns: the run itself is complete."""
        for sink in self.sinks:
            try:
                sink.finish(run_dir, summary)
            except BudgetLoraError as exc:
                warn(f"warning: {exc}")

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
            raise BudgetLoraError(
                f"config key 'train.report_to': {name} needs the {module} package: "
                f"pip install 'budgetlora[{extra}]' (or remove it from train.report_to)"
            ) from None


def _tag(key: str) -> str:
    """train_loss -> train/loss, eval_acc -> eval/acc: TensorBoard groups by the part before '/'."""
    for split in ("train_", "eval_"):
        if key.startswith(split):
            return f"{split[:-1]}/{key[len(split) :]}"
    return key


class TensorBoardSink:
    """Every number of a record as a scalar; `resume_step` drops the events from that step on, as
    metrics.jsonl is cut back on resume."""

    def __init__(self, log_dir: Path, resume_step: Optional[int] = None):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(log_dir), purge_step=resume_step)

    def log_config(self, cfg: Config) -> None:
        from budgetlora.config import config_yaml

        self._writer.add_text("config", "```yaml\n" + config_yaml(cfg) + "```")

    def finish(self, run_dir: Path, summary: RunSummary) -> None:
        pass

    def log(self, record: dict) -> None:
        step = int(record["step"])
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self._writer.add_scalar(_tag(key), value, step)

    def close(self) -> None:
        self._writer.close()


def mlflow_uri(cfg: Config, out_root: Path) -> str:
    return (
        cfg.train.mlflow_tracking_uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or f"sqlite:///{(Path(out_root) / 'mlflow.db').resolve()}"
    )


MLFLOW_BATCH = 100  # params per log_batch call (MLflow's own limit per request)


def _sqlite_file(uri: str) -> Optional[Path]:
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return None
    return Path(uri[len("sqlite:///") :].split("?", 1)[0]).expanduser()


def _quiet_mlflow() -> None:
    """An unreachable server fails in seconds rather than minutes of retries (the user's own
    MLFLOW_HTTP_* settings win), and the store's migration chatter stays off the terminal."""
    import logging

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    for name in ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent", "mlflow.store"):
        logging.getLogger(name).setLevel(logging.WARNING)


class MLflowSink:
    """One MLflow run per budgetlora run: the flattened config as params, every record as metrics
    at its step; `finish` adds the summary numbers and the run directory (without checkpoints) as
    artifacts. A resumed run continues the same MLflow run."""

    def __init__(self, cfg: Config, run_dir: Path, out_root: Path, resume_step: Optional[int] = None):
        _quiet_mlflow()
        import mlflow

        self._mlflow, self.uri = mlflow, mlflow_uri(cfg, out_root)
        database = _sqlite_file(self.uri)
        if database is not None:
            check_sqlite_store(database, "MLflow store", MLFLOW_TABLES, "train.mlflow_tracking_uri")
        self._client = self._call("open the tracking store", lambda: mlflow.MlflowClient(tracking_uri=self.uri))
        name = cfg.train.mlflow_experiment
        experiment = self._call("find the experiment", lambda: self._client.get_experiment_by_name(name))
        # a SQLite store keeps its artifacts beside it, never in whatever the working directory is
        location = (database.absolute().parent / "mlruns").as_uri() if database is not None else None
        experiment_id = (
            experiment.experiment_id
            if experiment
            else self._call(
                "create the experiment", lambda: self._client.create_experiment(name, artifact_location=location)
            )
        )
        marker = Path(run_dir) / rd.MLFLOW_RUN_ID
        run_id = marker.read_text().strip() if resume_step is not None and marker.is_file() else ""
        self.resumed = bool(run_id)
        if not run_id:
            run = self._call(
                "create the run",
                lambda: self._client.create_run(
                    experiment_id,
                    run_name=Path(run_dir).name,
                    tags={"budgetlora.run_dir": str(Path(run_dir).resolve())},
                ),
            )
            run_id = run.info.run_id
            atomic.write_text(marker, run_id + "\n")
        self.run_id = run_id

    def log_config(self, cfg: Config) -> None:
        if self.resumed:  # a resumed run continues its MLflow run, whose params are logged already
            return
        params = [self._mlflow.entities.Param(k, str(v)[:6000]) for k, v in flatten(cfg.to_dict()).items()]
        for start in range(0, len(params), MLFLOW_BATCH):
            chunk = params[start : start + MLFLOW_BATCH]
            self._call("log the config", lambda chunk=chunk: self._client.log_batch(self.run_id, params=chunk))

    def _call(self, what: str, action: Any) -> Any:
        """MLflow's many error types (a bad URI, a server that does not answer) as one error line."""
        try:
            return action()
        except BudgetLoraError:
            raise
        except Exception as exc:  # noqa: BLE001 - MLflow's many error types
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise BudgetLoraError(
                f"MLflow at {self.uri}: cannot {what} ({type(exc).__name__}: {detail}); check "
                "train.mlflow_tracking_uri, or remove mlflow from train.report_to"
            ) from None

    def log(self, record: dict) -> None:
        step = int(record["step"])
        metrics = [
            self._mlflow.entities.Metric(k, float(v), 0, step)
            for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and v is not None
        ]
        self._call("log metrics", lambda: self._client.log_batch(self.run_id, metrics=metrics))

    def finish(self, run_dir: Path, summary: RunSummary) -> None:
        numbers = {
            k: v
            for k, v in flatten(summary.to_json()).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and "per_class" not in k
        }
        metrics = [self._mlflow.entities.Metric(k, float(v), 0, 0) for k, v in numbers.items()]
        self._call("log the summary", lambda: self._client.log_batch(self.run_id, metrics=metrics))
        self._call(
            "tag the run", lambda: self._client.set_tag(self.run_id, "budgetlora.run_dir", str(Path(run_dir).resolve()))
        )
        for item in sorted(Path(run_dir).iterdir()):
            if item.name.startswith(".") or item.name == rd.CHECKPOINTS:
                continue
            if item.is_dir():
                self._call(
                    "upload artifacts",
                    lambda item=item: self._client.log_artifacts(self.run_id, str(item), artifact_path=item.name),
                )
            else:
                self._call("upload artifacts", lambda item=item: self._client.log_artifact(self.run_id, str(item)))
        self._call("finish the run", lambda: self._client.set_terminated(self.run_id, "FINISHED"))

    def close(self) -> None:
        pass


def open_sinks(
    cfg: Config, run_dir: Path, out_root: Path, console: Any, total_steps: int, start_step: int, resumed: bool
) -> FanOut:
    """Every sink of a run, its config logged: metrics.jsonl, the display, and `train.report_to`'s
    trackers (a resumed run's trackers drop what was logged after its checkpoint)."""
    from budgetlora.progress import TrainingDisplay

    resume_step = start_step + 1 if resumed else None
    sinks: list[Any] = [rd.MetricsFile(run_dir), TrainingDisplay(console, total_steps, start_step)]
    try:
        if "tensorboard" in cfg.train.report_to:
            sinks.append(TensorBoardSink(run_dir / rd.TENSORBOARD, resume_step))
        if "mlflow" in cfg.train.report_to:
            sinks.append(MLflowSink(cfg, run_dir, out_root, resume_step))
        fan_out = FanOut(sinks)
        fan_out.log_config(cfg)
    except BaseException:
        FanOut(sinks).close()  # the files opened so far, before the error leaves
        raise
    return fan_out
