"""What a sweep worker is told (its folder, storage, heartbeat, console) and what it counts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from budgetlora.progress import Console


@dataclass
class SweepOptions:
    out: Path
    storage_url: str
    study_name: Optional[str] = None
    heartbeat: Optional[int] = 10
    verbose: bool = False
    poll_s: float = 2.0
    worker: str = ""
    trust_pickle: bool = False
    console: Console = field(default_factory=Console)
    pause_at: Optional[int] = None  # a synchronous rung: train each run to this step and pause it there
    keep_going: bool = False  # go on after a trial's unexpected error (a bug) instead of stopping the sweep

    def say(self, message: str) -> None:
        self.console.say(f"[{self.worker}] {message}" if self.worker else message)


@dataclass
class WorkerStats:
    trained: int = 0
    reused: int = 0
    failed: int = 0
    skipped: int = 0
    pruned: int = 0

    def add(self, other: "WorkerStats") -> None:
        for key in ("trained", "reused", "failed", "skipped", "pruned"):
            setattr(self, key, getattr(self, key) + getattr(other, key))
