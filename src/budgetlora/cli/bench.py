"""`bench`: training and prediction throughput of the reference stack against budgetlora."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from budgetlora.errors import BudgetLoraError


def _batches(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("batch sizes must be >= 1")
    return values


DESCRIPTION = """\
Training and prediction throughput, in one process, of (a) the reference stack users copy
(Transformers Trainer + PEFT LoRA r=2 on query,value + head, fp32, batch 16, padded to the longest
row of a random batch) and (b) budgetlora's own training and prediction on the same model, adapters
and AG News texts: samples/s, TFLOP/s, % of the measured matmul peak, peak memory and the ratios.
With --config, (b) is that config as `budgetlora train` runs it, on its own data, and (a) trains
the same adapters (rank, alpha, dropout, modules) with Trainer + PEFT.
The last line is `train_speedup=<x> predict_speedup=<y>` (b over a)."""


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="throughput: Trainer+PEFT reference vs budgetlora's fast path",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    p.add_argument(
        "--model",
        help="roberta-base (random weights; default on cuda), minilm (default on cpu) or a local model directory",
    )
    p.add_argument(
        "--data",
        help="AG News directory with train_sample.csv and test.csv (default: ../shared/data/"
        "ag_news of this checkout, or $BUDGETLORA_AGNEWS)",
    )
    p.add_argument("--synthetic", action="store_true", help="synthetic ids with AG News' length distribution")
    p.add_argument("--steps", type=int, help="measured training steps per stack (cpu 40, cuda 100)")
    p.add_argument("--warmup", type=int, help="untimed steps first (cpu 2, cuda 10)")
    p.add_argument("--predict-rows", type=int, help="test rows to predict (cpu 768, cuda 7600)")
    p.add_argument(
        "--fast-batch-size",
        type=_batches,
        metavar="B[,B...]",
        help="budgetlora's training batch(es) (cpu 16, cuda 256; LR scaled by sqrt(batch/16))",
    )
    p.add_argument("--lora-dropout", type=float, default=0.1, help="LoRA dropout of both stacks (default 0.1)")
    p.add_argument("--max-length", type=int, default=128, help="truncation in tokens (default 128)")
    p.add_argument("--repeats", type=int, help="alternating repeats, best of each (cpu 2, cuda 1)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--onnx", action="store_true", help="also measure prediction through ONNX Runtime (fp32 and int8)")
    p.add_argument(
        "--config",
        help="measure this training config (its model, data, adapters, batch, precision, "
        "compile) against Trainer+PEFT with the same adapters; instead of --model, "
        "--data, --synthetic, --lora-dropout, --max-length",
    )
    p.add_argument("--json", help="also write the numbers to this JSON file")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from budgetlora import atomic
    from budgetlora.bench import BenchOptions, run_bench

    if args.json and (
        Path(args.json).is_dir() or (Path(args.json).parent.exists() and not Path(args.json).parent.is_dir())
    ):
        raise BudgetLoraError(f"--json {args.json}: not a file path that can be written")
    if args.json:
        atomic.output_target(Path(args.json).expanduser())  # a dangling link is refused before minutes of measuring
    options = BenchOptions(
        device=args.device,
        model=args.model,
        data=Path(args.data) if args.data else None,
        synthetic=args.synthetic,
        steps=args.steps,
        warmup=args.warmup,
        predict_rows=args.predict_rows,
        fast_batches=args.fast_batch_size,
        lora_dropout=args.lora_dropout,
        max_length=args.max_length,
        repeats=args.repeats,
        threads=args.threads,
        onnx=args.onnx,
        config=Path(args.config) if args.config else None,
    )
    result = run_bench(options, say=lambda line: print(line, flush=True))
    if args.json:
        atomic.write_output(Path(args.json).expanduser(), json.dumps(result, indent=2, allow_nan=False) + "\n")
    print(
        f"train_speedup={result['train_speedup']:.2f} predict_speedup={result['predict_speedup']:.2f}"
        + (f" onnx_int8_speedup={result['onnx']['int8_speedup']:.2f}" if result.get("onnx") else ""),
        flush=True,
    )
    return 0
