"""Sweeps: many trainings from one study file (spec), checked against the budget (plan), on a
shared Optuna storage (storage) worked by any number of processes (worker), with statistically
safe pruning (prune), confirmation of the best, and the verdict and outputs (run, outputs)."""

from budgetlora.sweeps.plan import Planned, build_config, check_point, plan
from budgetlora.sweeps.run import SweepOutcome, SweepRequest, run_sweep, run_worker
from budgetlora.sweeps.spec import StudySpec, load_study
from budgetlora.sweeps.storage import open_storage

__all__ = [
    "Planned",
    "StudySpec",
    "SweepOutcome",
    "SweepRequest",
    "build_config",
    "check_point",
    "load_study",
    "open_storage",
    "plan",
    "run_sweep",
    "run_worker",
]
