"""How budgetlora starts Python: never importing from the working directory.

`python -m pkg` and `python -c` put the working directory first on sys.path, so a `yaml.py` or
`torch.py` beside a study file would be imported instead of the library (and run). Child processes
start through `python_command`, which drops that entry before anything is imported; `python -m
budgetlora` drops it on entry too (budgetlora's own package is already imported by then, from
wherever it is installed, but nothing else is)."""

from __future__ import annotations

import os
import sys

_BOOTSTRAP = (
    "import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
    "import runpy; runpy.run_module('budgetlora', run_name='__main__', alter_sys=True)"
)


def drop_working_directory() -> None:
    """Remove the working-directory entries Python put on sys.path for `-m` / `-c`."""
    cwd = os.getcwd()
    sys.path[:] = [p for p in sys.path if p not in ("", ".", cwd)]


def python_command(*args: str) -> list[str]:
    """argv for `python -m budgetlora ARGS...` that cannot import from the working directory."""
    return [sys.executable, "-c", _BOOTSTRAP, *args]


def python_call(target: str, *args: str) -> list[str]:
    """argv for a Python process that runs `module:function(args)` (its exit code the return
    value), isolated from the working directory like `python_command`."""
    module, function = target.split(":")
    code = (
        "import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
        f"from {module} import {function}; sys.exit({function}(sys.argv[1:]))"
    )
    return [sys.executable, "-c", code, *args]
