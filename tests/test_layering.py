"""The layout's rules, checked on the source (after torchtune's tests/test_import_recipes.py):
stage packages never reach up into the thin layers, results and the run-directory schema load
without torch, `budgetlora --help` loads neither torch nor pandas, no import cycles, and no module
or function grows past a screenful or two."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "budgetlora"
THIN_LAYERS = ("budgetlora.cli", "budgetlora.sweeps", "budgetlora.results", "budgetlora.bench", "budgetlora.api")
STAGES = (
    "budgetlora.config",
    "budgetlora.data",
    "budgetlora.model",
    "budgetlora.speedups",
    "budgetlora.training",
    "budgetlora.evaluate",
    "budgetlora.artifacts",
    "budgetlora.recipe",
    "budgetlora.resuming",
    "budgetlora.jsonfile",
    "budgetlora.launch",
    "budgetlora.stores",
    "budgetlora.runtime",
    "budgetlora.atomic",
    "budgetlora.distributed",
    "budgetlora.hub",
    "budgetlora.errors",
    "budgetlora.progress",
    "budgetlora.tracking",
)
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 450, 80


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """Every budgetlora module `name` imports, at the top or inside a function."""
    path, found = MODULES[name], set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in MODULES}
    return found - {name}


def in_package(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_stage_packages_never_import_the_thin_layers():
    offenders = {
        name: sorted(i for i in imports_of(name) if in_package(i, THIN_LAYERS))
        for name in MODULES
        if in_package(name, STAGES)
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_no_import_cycles():
    graph = {name: imports_of(name) for name in MODULES}
    # a package's __init__ re-exporting its modules is not a cycle with them
    for name in graph:
        graph[name] = {i for i in graph[name] if not (MODULES[i].name == "__init__.py" and name.startswith(i + "."))}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                component.append(item)
                if item == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in graph:
        if name not in index:
            visit(name)
    assert not cycles


def _loaded(code: str) -> set[str]:
    marker = "@@modules@@"
    result = subprocess.run(
        [sys.executable, "-c", code + f"\nimport sys; print({marker!r}, *sys.modules)"],
        capture_output=True,
        text=True,
        cwd=SRC.parent,
        env={"PYTHONPATH": str(SRC), "PATH": ""},
    )
    assert result.returncode == 0, result.stderr
    return set(result.stdout.rsplit(marker, 1)[1].split())


def test_results_and_the_run_directory_schema_load_without_torch():
    loaded = _loaded(
        "import budgetlora.results, budgetlora.results.verdict, budgetlora.artifacts.run_dir, "
        "budgetlora.artifacts.placement, budgetlora.artifacts.model_card, budgetlora.evaluate.stats, "
        "budgetlora.config"
    )
    assert "torch" not in loaded


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["sweep", "--help"], ["bench", "--help"]])
def test_help_loads_neither_torch_nor_pandas(argv):
    loaded = _loaded(f"from budgetlora.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass")
    assert "torch" not in loaded and "pandas" not in loaded


def test_import_budgetlora_is_cheap_and_its_api_is_lazy():
    loaded = _loaded("import budgetlora\nassert callable(budgetlora.train) and budgetlora.BudgetLoraError")
    assert "torch" not in loaded


def test_no_module_or_function_grows_past_its_limit():
    too_long = []
    for name, path in MODULES.items():
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}.{node.name}: {length} lines")
    assert not too_long


def test_library_modules_know_nothing_of_argparse():
    users = [
        name
        for name in MODULES
        if not in_package(name, ("budgetlora.cli",)) and "argparse" in MODULES[name].read_text(encoding="utf-8")
    ]
    assert not users


def test_no_submodule_shadows_a_public_name():
    """Importing `budgetlora.X` binds X on the package, so a module named like an API function
    (`budgetlora.resume`) would replace that function once anything imported the module."""
    import budgetlora

    submodules = {name.split(".")[1] for name in MODULES if name.count(".") >= 1}
    assert submodules.isdisjoint(budgetlora.__all__), submodules & set(budgetlora.__all__)
