"""The `budgetlora` command: one file per command group, each adding its parsers and importing
the library only when its command runs, so `budgetlora --help` starts without torch or pandas."""

from __future__ import annotations

import argparse
import sys
import typing
from typing import Optional, Sequence

from budgetlora import __version__
from budgetlora.cli import bench, results, run, sweep
from budgetlora.errors import run_reporting_errors

DESCRIPTION = """\
Fine-tune a frozen transformer encoder for text classification with LoRA under a hard budget of
trainable parameters, and evaluate, predict, export, sweep and compare the results.

  budgetlora train configs/agnews-minilm-offline.yaml     train (runs/<name>/)
  budgetlora predict runs/agnews-minilm --data test.csv --out predictions.csv
  budgetlora sweep studies/targets-rank-alpha-offline.yaml --prune
"""


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other budgetlora error (exit 2)."""

    def error(self, message: str) -> "typing.NoReturn":
        self.exit(2, f"budgetlora: error: {message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="budgetlora", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"budgetlora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (run, sweep, results, bench):
        group.add_parsers(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed as one line
        return int(exc.code or 0)
    return run_reporting_errors(lambda: int(args.func(args) or 0))


if __name__ == "__main__":
    sys.exit(main())
