"""The GPU check: everything the CUDA path must show on a real GPU, in one command, written as a
report (report.md + report.json) into the folder given. Runs from the source tree
(PYTHONPATH=src) on a machine with torch, transformers and peft, and no network, no Optuna and no
packaged MiniLM: the MiniLM weights and the AG News files come from folders given on the line.

    PYTHONPATH=src python3 scripts/gpu_check.py OUT --minilm .gpu/minilm --agnews .gpu/ag_news

(a) `pytest -m cuda tests/test_gpu_recipe.py` (the GPU recipe's tests on the GPU: fullgraph capture
per encoder family, a forced-recipe run with zero recompiles after warm-up, precisions against fp32,
merged bf16 prediction, kill -9 + resume); (b) `budgetlora bench --device cuda` at the hub preset's batch size and
at larger ones; (c) the offline preset end to end; (d) one epoch of 120,000 synthetic rows of AG
News' lengths on the roberta-base architecture. `--smoke` runs every part tiny, on the CPU, to
test this script without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPU_RESULT = "90.09% (95% CI 89.40-90.74), 15m52s on 2 CPU cores"


def run(command: list[str], out: Path, name: str, timeout: int) -> dict:
    """A step as a subprocess: its exit code, wall time and output tail (also saved as NAME.log)."""
    start = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        code, output = 124, f"{exc.stdout or ''}{exc.stderr or ''}\ntimed out after {timeout} s"
    (out / f"{name}.log").write_text(output if isinstance(output, str) else output.decode(errors="replace"))
    return {
        "exit_code": code,
        "wall_s": round(time.perf_counter() - start, 1),
        "tail": "\n".join(str(output).splitlines()[-25:]),
    }


def cuda_tests(out: Path, args: argparse.Namespace) -> dict:
    select = ["-k", "captured_whole and cpu and roberta"] if args.smoke else ["-m", "cuda"]
    junit = out / "cuda-tests.xml"
    result = run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            *select,
            "tests/test_gpu_recipe.py",
            f"--junitxml={junit}",
        ],
        out,
        "a-cuda-tests",
        900,
    )
    result["tests"] = junit_outcomes(junit)
    return result


def junit_outcomes(path: Path) -> dict[str, str]:
    """test id -> passed / failed / skipped, from pytest's junit XML."""
    import xml.etree.ElementTree as ET

    if not path.is_file():
        return {}
    outcomes = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        outcomes[case.get("name", "?")] = (
            "failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed"
        )
    return outcomes


def bench(out: Path, args: argparse.Namespace) -> dict:
    if args.smoke:
        extra = [
            "--device",
            "cpu",
            "--model",
            str(args.tiny),
            "--synthetic",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--predict-rows",
            "32",
            "--repeats",
            "1",
            "--fast-batch-size",
            "8,16",
            "--max-length",
            "32",
        ]
    else:
        extra = ["--device", "cuda", "--fast-batch-size", ",".join(map(str, args.batches))]
    result = run(
        [sys.executable, "-m", "budgetlora", "bench", *extra, "--json", str(out / "bench.json")], out, "b-bench", 1200
    )
    if (out / "bench.json").is_file():
        result["numbers"] = json.loads((out / "bench.json").read_text())
    return result


def offline_preset(out: Path, args: argparse.Namespace) -> dict:
    agnews = Path(args.agnews).resolve()
    overrides = [
        f"model={Path(args.minilm).resolve()}",
        f"data.train_file={agnews / 'train_sample.csv'}",
        f"data.test_file={agnews / 'test.csv'}",
        f"data.classes_file={agnews / 'classes.txt'}",
    ]
    if args.smoke:
        overrides[0] = f"model={args.tiny}"
        overrides += [
            "train.max_steps=4",
            "train.eval_every=2",
            "data.max_test_rows=64",
            "data.max_length=64",
            "head.pooling=cls",
            "train.device=cpu",
        ]
    command = [
        sys.executable,
        "-m",
        "budgetlora",
        "train",
        "configs/agnews-minilm-offline.yaml",
        "--out",
        str(out / "runs"),
        "--quiet",
        "--overwrite",
    ]
    result = run(command + [x for o in overrides for x in ("--set", o)], out, "c-offline-preset", 1200)
    summary = out / "runs" / "agnews-minilm" / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        result["summary"] = {
            k: s.get(k)
            for k in (
                "trainable_params",
                "steps",
                "train_time_s",
                "wall_time_s",
                "samples_per_s",
                "peak_memory_mb",
                "device",
                "precision",
                "compile",
            )
        }
        result["summary"]["test"] = {k: s["test"][k] for k in ("accuracy", "ci_low", "ci_high", "n", "macro_f1")}
    return result


def one_epoch(out: Path, args: argparse.Namespace) -> dict:
    code = f"""
import json, math, time, torch
from budgetlora.bench.data import synthetic_set
from budgetlora.bench.stacks import BenchSpec, fast_config
from budgetlora.model import build_model, load_model_config
from budgetlora.runtime import Runtime, resolve_precision
from budgetlora.speedups import prepare_for_training
from budgetlora.training import train_loop
from budgetlora.training.step import step_runner
smoke = {bool(args.smoke)}
device = torch.device("cpu" if smoke else "cuda")
model_name, rows, batch = ({str(args.tiny)!r}, 256, 32) if smoke else ("roberta-base", 120_000, {args.epoch_batch})
spec = BenchSpec(model=model_name, device=device, weights=smoke, steps=math.ceil(rows / batch), warmup=0,
                 predict_rows=1, fast_batch=batch, max_length=128 if not smoke else 32)
cfg = fast_config(spec)
cfg.train.max_steps, cfg.train.log_every = math.ceil(rows / batch), 10**9
rt = Runtime(device, resolve_precision(cfg.train.precision, device))
vocab = load_model_config(model_name, 4).vocab_size
data = synthetic_set(rows, 0, cfg.data.max_length, vocab)
model = build_model(cfg, 4, weights=True).to(device)
start = time.perf_counter()
fast = prepare_for_training(model, cfg, device, rt.precision, 1)
runner = step_runner(model, cfg.train, rt, data, 1, fast.pad_to if fast.compiled else None)
compiled = time.perf_counter()
train_loop(model, data, None, cfg.train, rt, 1, lambda record: None, runner=runner)
if device.type == "cuda":
    torch.cuda.synchronize()
end = time.perf_counter()
print(json.dumps({{"rows": rows, "batch": batch, "steps": cfg.train.max_steps, "warm_up_s": compiled - start,
                  "epoch_s": end - compiled, "samples_per_s": rows / (end - compiled), "fast_path": fast.describe(),
                  "compile": runner.report.as_dict() if runner.report else None}}))
"""
    result = run([sys.executable, "-c", code], out, "d-one-epoch", 900)
    try:
        result["numbers"] = json.loads(result["tail"].splitlines()[-1])
    except (ValueError, IndexError):
        pass
    return result


def report_markdown(report: dict) -> str:
    lines = [f"# budgetlora GPU check ({report['date']})", "", f"GPU: {report['gpu']}; torch {report['torch']}", ""]
    for key, title in (
        ("a", "(a) CUDA tests"),
        ("b", "(b) bench"),
        ("c", "(c) offline preset"),
        ("d", "(d) one epoch"),
    ):
        part = report.get(key, {})
        lines += [f"## {title}: exit {part.get('exit_code')}, {part.get('wall_s')} s", ""]
        if key == "a" and part.get("tests"):
            capture = {name: outcome for name, outcome in part["tests"].items() if "captured_whole" in name}
            lines.append(
                f"fullgraph capture per family: {sum(o == 'passed' for o in capture.values())} of "
                f"{len(capture)} passed" + "".join(f"\n- {n}: {o}" for n, o in capture.items() if o != "passed")
            )
            lines.append(
                f"all: {sum(o == 'passed' for o in part['tests'].values())} passed, "
                f"{sum(o == 'failed' for o in part['tests'].values())} failed"
            )
        if key == "c" and part.get("summary", {}).get("compile"):
            c = part["summary"]["compile"]
            lines.append(
                f"compile: {c['graphs']} graph(s) for widths {c['widths']} in {c['seconds']:.0f} s, "
                f"{c['recompiles']} recompile(s) after warm-up" + (f", failure: {c['failure']}" if c["failure"] else "")
            )
        if key == "c" and "summary" in part:
            t = part["summary"]["test"]
            lines.append(
                f"test accuracy {100 * t['accuracy']:.2f}% (95% CI {100 * t['ci_low']:.2f}-"
                f"{100 * t['ci_high']:.2f}, n={t['n']}); CPU: {CPU_RESULT}; wall "
                f"{part['summary']['wall_time_s']:.0f} s"
            )
        if key == "d" and "numbers" in part:
            n = part["numbers"]
            lines.append(
                f"{n['rows']:,} rows, batch {n['batch']}: epoch {n['epoch_s']:.1f} s "
                f"({n['samples_per_s']:,.0f} samples/s) after {n['warm_up_s']:.0f} s of compile warm-up"
            )
            if n.get("compile"):
                lines.append(
                    f"compile: {n['compile']['graphs']} graph(s), {n['compile']['recompiles']} recompile(s) "
                    "after warm-up"
                )
        lines += ["```", part.get("tail", ""), "```", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for report.md, report.json and the logs")
    parser.add_argument("--minilm", default="minilm", help="MiniLM model directory (default: the packaged one)")
    parser.add_argument("--agnews", default=str(ROOT.parent / "shared" / "data" / "ag_news"), help="AG News folder")
    parser.add_argument(
        "--batches",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[32, 1024],
        help="budgetlora's training batches in the bench (default 32 = the hub preset's, 1024)",
    )
    parser.add_argument("--epoch-batch", type=int, default=1024, help="batch of the one-epoch timing (d)")
    parser.add_argument("--parts", default="abcd", help="which parts to run (default abcd)")
    parser.add_argument("--smoke", action="store_true", help="every part tiny, on the CPU (tests this script)")
    parser.add_argument("--tiny", help="with --smoke: a tiny model directory")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    report = {
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)",
    }
    for key, step in (("a", cuda_tests), ("b", bench), ("c", offline_preset), ("d", one_epoch)):
        if key in args.parts:
            report[key] = step(args.out, args)
            (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
            (args.out / "report.md").write_text(report_markdown(report))
            print(f"part {key}: exit {report[key]['exit_code']} in {report[key]['wall_s']} s", flush=True)
    return max(int(report[k]["exit_code"] != 0) for k in args.parts if k in report)


if __name__ == "__main__":
    sys.exit(main())
