"""`sweep`: a study file trained end to end (docs/sweeps.md)."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from budgetlora.errors import RunInterrupted


def _seed_list(text: str) -> list[int]:
    """Comma-separated integers (their range is the request's to check)."""
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="run a study file: grid/zip or Optuna search, pruning, confirmation, a winner",
        description="Train every point of a study file (see docs/sweeps.md) into OUT/<point>/, then "
        "write OUT/results.csv/.md with the verdict and OUT/best.yaml. Rerun the same command to "
        "resume; start more processes with the same --out/--storage to add workers.",
    )
    p.add_argument("study", help="study YAML (see studies/)")
    p.add_argument("--out", metavar="DIR", help="sweep folder (default: sweeps/<study name>)")
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default 1)")
    p.add_argument(
        "--storage",
        metavar="URL",
        help="Optuna storage: a SQLAlchemy URL (default: sqlite:///OUT/study.db) or journal:PATH for a journal file",
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key in every trial")
    p.add_argument("--seeds", type=_seed_list, metavar="1,2,3", help="replace the study's seeds")
    p.add_argument("--study-name", help="Optuna study name (default: the study file's name)")
    p.add_argument(
        "--heartbeat",
        type=int,
        default=10,
        metavar="S",
        help="seconds between heartbeats (0: off); a trial silent for 3x this (and, on the default SQLite "
        "storage, at least 130 s) is re-queued",
    )
    p.add_argument("--threads", type=int, help="CPU threads per worker (default: cores / workers)")
    prune = p.add_mutually_exclusive_group()
    prune.add_argument(
        "--prune",
        action="store_true",
        default=None,
        help="stop trials significantly behind the leader at the rungs (the study's prune: section, "
        "else every evaluation step)",
    )
    prune.add_argument("--no-prune", dest="prune", action="store_false", help="ignore the study's prune: section")
    p.add_argument("--confirm-top", type=int, metavar="K", help="rerun the K best configurations with more seeds")
    p.add_argument("--confirm-seeds", type=int, metavar="S", help="seeds per confirmed configuration (default 3)")
    p.add_argument("--report", action="store_true", help="also write the report (plots, report.html)")
    p.add_argument(
        "--dry-run", action="store_true", help="list the points, their ranks and budget checks; train nothing"
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show each trial's training progress, and the traceback of a trial's unexpected error",
    )
    p.add_argument(
        "--keep-going",
        action="store_true",
        help="go on after a trial fails with an unexpected error (a bug); by default the sweep stops there",
    )
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow pickle data files: unpickling runs code, so only for files you trust",
    )
    p.set_defaults(func=cmd_sweep)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _request(args: argparse.Namespace):
    from budgetlora.progress import Console
    from budgetlora.sweeps import SweepRequest

    return SweepRequest(
        study=args.study,
        out=Path(args.out) if args.out else None,
        overrides=list(args.set or []),
        seeds=args.seeds,
        workers=args.workers,
        storage=args.storage,
        heartbeat=args.heartbeat,
        verbose=args.verbose,
        report=args.report,
        threads=args.threads,
        study_name=args.study_name,
        trust_pickle=args.trust_pickle,
        prune=args.prune,
        confirm_top=args.confirm_top,
        confirm_seeds=args.confirm_seeds,
        keep_going=args.keep_going,
        console=Console(),
    )


def cmd_sweep(args: argparse.Namespace) -> int:
    # `kill` (SIGTERM) marks the running trial failed at once instead of waiting for its heartbeat to go stale.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupt)
    request = _request(args)
    if args.dry_run:
        return _dry_run(request)
    from budgetlora.sweeps import run_sweep

    try:
        outcome = run_sweep(request)
    except (KeyboardInterrupt, RunInterrupted):
        print("budgetlora: sweep interrupted; rerun the same command to resume it")
        return 130
    print("\n".join(outcome.lines))
    s = outcome.stats
    print(
        f"this process: {s.trained} trained, {s.reused} already finished, {s.pruned} pruned, {s.failed} failed, "
        f"{s.skipped} skipped"
    )
    return 0


def _dry_run(request) -> int:
    from budgetlora.model.budget import known_num_labels
    from budgetlora.sweeps.plan import plan
    from budgetlora.sweeps.run import load_request

    spec = load_request(request)
    if spec.sampler is not None:
        print(f"{spec.sampler} search over {', '.join(p.key for p in spec.search)}; {spec.n_trials} trials")
        return 0
    planned, skipped = plan(spec)
    for p in planned:
        if p.cfg.mode == "full":
            print(f"{p.point.name}: mode full, every parameter trainable (the budget does not apply)")
            continue
        print(
            f"{p.point.name}: r={p.cfg.lora.r} alpha={p.cfg.lora.alpha:g} targets={','.join(p.cfg.lora.targets)} "
            f"trainable {p.trainable:,}"
        )
    for record in skipped:
        print(f"skip {record['name']}: {record['reason']}")
    if any(known_num_labels(p.cfg) is None for p in planned):
        print(
            "(class count not known from the config: counts assume a 2-class head; set data.label_names for exact ones)"
        )
    if spec.prune is not None:
        print(
            f"pruning at steps {spec.prune.rungs} ({spec.prune.test}, alpha {spec.prune.alpha:g} over "
            f"{spec.prune.comparisons} comparisons)"
        )
    print(f"{len(planned)} point(s) to run, {len(skipped)} skipped")
    return 0
