"""train, predict, eval, export and bench need neither Optuna, pandas, matplotlib nor MLflow (a GPU
machine may have only torch, transformers and peft): those load only where sweeps, results,
reports and trackers need them. Checked in a process where importing them fails."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # subprocesses and minutes of CPU: the full suite runs it

SRC = Path(__file__).resolve().parents[1] / "src"
BLOCKED = ("optuna", "pandas", "matplotlib", "mlflow", "sqlalchemy", "scipy")

SCRIPT = textwrap.dedent("""
    import sys
    for name in {blocked!r}:
        sys.modules[name] = None  # `import name` fails; importlib.util.find_spec(name) says: not installed
    from budgetlora.cli import main
    code = 0
    for argv in {commands!r}:
        code = code or main(argv)
    leaked = sorted(n for n in sys.modules if n.split(".")[0] in {blocked!r} and sys.modules[n] is not None)
    print("leaked", leaked)
    sys.exit(code)
""")


def test_the_core_commands_run_without_the_sweep_and_report_libraries(tiny_config, tiny_model_dir, tmp_path):
    tiny_config["train"].update(max_steps=4, eval_every=2)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_config))
    run = tmp_path / "runs" / "tiny"
    test = tiny_config["data"]["test_file"]
    commands = [
        ["train", str(config), "--out", str(tmp_path / "runs"), "--quiet"],
        ["eval", str(run), "--data", test, "--json", str(tmp_path / "m.json"), "--quiet"],
        ["predict", str(run), "--data", test, "--out", str(tmp_path / "p.csv"), "--quiet"],
        ["classify", str(run), "stocks market"],
        ["export", str(run), "--merged", str(tmp_path / "merged")],
        [
            "bench",
            "--device",
            "cpu",
            "--model",
            str(tiny_model_dir),
            "--synthetic",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--predict-rows",
            "16",
            "--repeats",
            "1",
            "--max-length",
            "32",
        ],
    ]
    env = dict(os.environ, PYTHONPATH=str(SRC), BUDGETLORA_CACHE=str(tmp_path / "cache"))
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(blocked=BLOCKED, commands=commands)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "leaked []" in result.stdout
    assert (tmp_path / "p.csv").is_file() and (tmp_path / "merged" / "model.safetensors").is_file()
