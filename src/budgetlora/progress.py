"""What a person watching sees: progress bars with rate and ETA (tqdm) on a terminal, periodic
plain lines elsewhere (CI logs, files), nothing with `quiet`. Messages go to stderr, so stdout
stays free for results (a run directory, a table, JSON)."""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Optional, TextIO


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else (f"{minutes}m{secs:02d}s" if minutes else f"{secs}s")


class Task:
    """One measured piece of work (rows tokenized, steps trained, trials run)."""

    def __init__(self, console: "Console", description: str, total: int, unit: str, start: int = 0):
        self.console, self.description, self.total, self.unit = console, description, max(total, 0), unit
        self.done = self.first = start
        self.started = self.last_line = time.perf_counter()
        self.postfix = ""
        self._bar: Any = None
        if console.enabled and console.interactive:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total,
                initial=start,
                desc=description,
                unit=f" {unit}",
                file=console.stream,
                dynamic_ncols=True,
                leave=True,
                smoothing=0.1,
            )

    def rate(self) -> float:
        return (self.done - self.first) / max(time.perf_counter() - self.started, 1e-9)

    def eta(self) -> Optional[float]:
        rate = self.rate()
        return (self.total - self.done) / rate if rate > 0 and self.total else None

    def advance(self, n: int = 1, **postfix: Any) -> None:
        self.done = min(self.done + n, self.total) if self.total else self.done + n
        if postfix:
            self.postfix = "  ".join(f"{k} {v}" for k, v in postfix.items())
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix_str(self.postfix, refresh=False)
            self._bar.update(n)
        elif self.console.enabled and time.perf_counter() - self.last_line >= self.console.every_s:
            self.console.say(self.status())
            self.last_line = time.perf_counter()

    def status(self) -> str:
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        eta = self.eta()
        return (
            f"{self.description}: {self.done:,}/{self.total:,} {self.unit}{share}, {self.rate():,.1f} {self.unit}/s"
            + (f", ETA {_duration(eta)}" if eta is not None else "")
            + (f"  {self.postfix}" if self.postfix else "")
        )

    def close(self) -> None:
        elapsed = time.perf_counter() - self.started
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.console.enabled and elapsed >= self.console.quiet_below_s:
            self.console.say(
                f"{self.description}: {self.done:,} {self.unit} in {_duration(elapsed)} "
                f"({self.rate():,.1f} {self.unit}/s)"
            )

    def __enter__(self) -> "Task":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Console:
    """`say` prints a line; `task` measures a piece of work. `interactive` defaults to whether the
    stream is a terminal; off a terminal a task prints a status line every `every_s` seconds."""

    def __init__(
        self,
        enabled: bool = True,
        stream: Optional[TextIO] = None,
        interactive: Optional[bool] = None,
        every_s: float = 30.0,
        quiet_below_s: float = 2.0,
    ):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.every_s, self.quiet_below_s = every_s, quiet_below_s

    def say(self, text: str) -> None:
        if not self.enabled:
            return
        if self.interactive:
            from tqdm import tqdm

            tqdm.write(text, file=self.stream)  # above any bar in progress
        else:
            print(text, file=self.stream, flush=True)

    def task(self, description: str, total: int, unit: str = "rows", start: int = 0) -> Task:
        return Task(self, description, total, unit, start)


QUIET = Console(enabled=False)


class TrainingDisplay:
    """The metric sink a person watches: a bar over the steps with loss, accuracy, learning rate
    and samples/s (a line per log record off a terminal), and a line per evaluation."""

    def __init__(self, console: Console, total_steps: int, start_step: int = 0):
        self.console, self.total = console, total_steps
        self.task = console.task("training", total_steps, "steps", start=start_step)
        self.step = start_step

    def log(self, record: dict) -> None:
        step = int(record["step"])
        if "eval_loss" in record:
            figure = (
                f"eval acc {100 * record['eval_acc']:.2f}%"
                if "eval_acc" in record
                else f"eval score {record.get('eval_score', math.nan):.4f}"
            )
            self.console.say(f"step {step}/{self.total}  eval loss {record['eval_loss']:.4f}  {figure}")
            return
        postfix = {"loss": f"{record['train_loss']:.4f}"}
        for key, label in (("train_acc", "acc"), ("train_subset_acc", "exact")):
            if key in record:
                postfix[label] = f"{100 * record[key]:.1f}%"
        postfix.update(lr=f"{record['lr']:.2e}", **{"samples/s": f"{record['samples_per_s']:.1f}"})
        if self.console.interactive:
            self.task.advance(step - self.step, **postfix)
        else:
            self.task.done = step
            eta = self.task.eta()
            self.console.say(
                f"step {step}/{self.total}  "
                + "  ".join(f"{k} {v}" for k, v in postfix.items())
                + f"  {_duration(time.perf_counter() - self.task.started)}"
                + (f"  ETA {_duration(eta)}" if eta is not None else "")
            )
        self.step = step

    def log_config(self, cfg: Any) -> None:
        pass  # the run's description is printed by the recipe before training

    def close(self) -> None:
        if self.console.interactive:
            self.task.close()

    def finish(self, run_dir: Any, summary: Any) -> None:
        """The result line of a finished run (its test split, if it has one)."""
        test = summary.test
        if test is not None:
            self.console.say(f"test {test.headline()}")
