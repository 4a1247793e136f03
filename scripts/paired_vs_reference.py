#!/usr/bin/env python3
"""The seed table of a sweep whose points are `<method>-seed<N>` runs scored on the same test rows:
each run's test accuracy with its 95% Wilson interval and an exact McNemar test against the
reference method's run of the same seed; per method the mean ± sd over seeds and a McNemar test
over the stacked (seed, row) pairs. Single-label runs only.

    python scripts/paired_vs_reference.py SWEEP_DIR [REFERENCE_METHOD (default: full)]
"""

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from budgetlora.evaluate.stats import mcnemar_pvalue, wilson_interval


def _read_run(folder: Path) -> tuple[pd.Series, dict]:
    """The run's per-row right/wrong on the test split, indexed by row ID, and its summary."""
    try:
        summary = json.loads((folder / "summary.json").read_text())
        rows = pd.read_csv(folder / "test_predictions.csv", dtype=str)
        right = pd.Series((rows["label"] == rows["pred"]).to_numpy(), index=rows["ID"]).sort_index()
        _ = summary["trainable_params"], summary["val"]["accuracy"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"{folder}: not a finished single-label run with test predictions ({exc!r})") from None
    if not right.index.is_unique or not len(right):
        raise SystemExit(f"{folder / 'test_predictions.csv'}: no rows, or repeated row IDs")
    return right, summary


def main(root: Path, reference: str) -> None:
    if not root.is_dir():
        raise SystemExit(f"{root}: not a folder (give a sweep's --out folder)")
    runs: dict = {}
    for folder in sorted(root.iterdir()):
        method, _, seed = folder.name.rpartition("-seed")
        if not (folder / "summary.json").is_file() or not method or not seed.isdigit():
            continue
        runs[(method, int(seed))] = _read_run(folder)
    if not runs:
        raise SystemExit(f"{root}: no finished runs named <method>-seed<N>")
    rows = next(iter(runs.values()))[0].index
    other = next((k for k, (right, _) in runs.items() if not right.index.equals(rows)), None)
    if other is not None:
        raise SystemExit(f"{root}: {other[0]}-seed{other[1]} scored other test rows; paired tests need the same rows")
    runs = {k: (right.to_numpy(bool), summary) for k, (right, summary) in runs.items()}
    methods = sorted({m for m, _ in runs}, key=lambda m: (m == reference, m))
    seeds = sorted({s for _, s in runs})
    print("| run | trainable | val acc % | test acc % (95% CI) | McNemar p vs the same seed's reference |")
    print("|---|---|---|---|---|")
    for method in methods:
        for seed in seeds:
            if (method, seed) not in runs:
                continue
            right, summary = runs[(method, seed)]
            low, high = wilson_interval(int(right.sum()), len(right))
            ref = runs.get((reference, seed))
            p = f"{mcnemar_pvalue(right, ref[0]):.3f}" if ref is not None and method != reference else ""
            print(
                f"| {method}-seed{seed} | {summary['trainable_params']:,} | {100 * summary['val']['accuracy']:.2f} | "
                f"{100 * right.mean():.2f} ({100 * low:.2f}-{100 * high:.2f}) | {p} |"
            )
    print()
    print(f"| method | seeds | mean test acc % ± sd | mean − {reference} | McNemar p over (seed, row) pairs |")
    print("|---|---|---|---|---|")
    for method in methods:
        own = [s for s in seeds if (method, s) in runs]
        accs = np.array([100 * runs[(method, s)][0].mean() for s in own])
        both = [s for s in own if (reference, s) in runs]
        diff = pooled = ""
        if method != reference and both:
            a = np.concatenate([runs[(method, s)][0] for s in both])
            b = np.concatenate([runs[(reference, s)][0] for s in both])
            diff, pooled = f"{100 * (a.mean() - b.mean()):+.2f}", f"{mcnemar_pvalue(a, b):.3f}"
        spread = f"{accs.std(ddof=1):.2f}" if len(accs) > 1 else "-"
        print(f"| {method} | {', '.join(map(str, own))} | {accs.mean():.2f} ± {spread} | {diff} | {pooled} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "full")
