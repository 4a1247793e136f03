"""`budgetlora bench`: training and prediction throughput of the reference stack against
budgetlora's fast path, on the same model, adapters and data, in one process.

(a) reference: Transformers `Trainer` + PEFT LoRA r=2 on query,value + a fully trained head,
    fp32, batch 16, `DataCollatorWithPadding` (pad to the longest row of a random batch).
(b) budgetlora: the same model and adapters through `build_model`, `prepare_for_training`,
    `train_loop` and `predict_logits`, exactly as `budgetlora train` runs them on that device.

Throughput is measured after warm-up steps (and, on the compiled path, after every padded width
has been compiled). With `--repeats` > 1 the stacks alternate (a, b, a, b, ...) and the best
repeat of each counts, which keeps a busy shared machine from deciding the ratio.
The last line printed is `train_speedup=<x> predict_speedup=<y>` (b over a).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch

from budgetlora.bench.data import (
    DEFAULT_DATA,
    NUM_LABELS,
    BenchData,
    forward_flops_per_row,
    load_bench_data,
    recipe_bench_data,
)
from budgetlora.bench.stacks import (
    REF_BATCH,
    BenchSpec,
    Measured,
    _free,
    matmul_peak_tflops,
    measure_fast,
    measure_reference,
)
from budgetlora.config import Config, load_config
from budgetlora.errors import BudgetLoraError
from budgetlora.model import MINILM_ALIAS, load_model_config
from budgetlora.runtime import quiet_transformers
from budgetlora.speedups import keep_freed_memory


def _defaults(device: torch.device) -> dict:
    if device.type == "cuda":
        return {
            "model": "roberta-base",
            "steps": 100,
            "warmup": 10,
            "predict_rows": 7600,
            "fast_batch": 256,
            "repeats": 1,
        }
    return {"model": "minilm", "steps": 40, "warmup": 2, "predict_rows": 768, "fast_batch": REF_BATCH, "repeats": 2}


PERCENT = 100.0
MIN_LENGTH, MAX_LENGTH = 8, 512  # --max-length: the bench's models embed 512 positions


def format_table(
    ref: Measured, fast: dict[int, Measured], flops_train: float, flops_predict: float, peaks: dict[str, float]
) -> tuple[str, bool]:
    """The table, each row's TFLOP/s against the measured peak of the dtype it computes in; a share
    above 100% would mean the peak was under-measured, so it is left out (the bool says so)."""
    over = False

    def share(tflops: float, precision: str) -> str:
        nonlocal over
        value = 100 * tflops / peaks[precision]
        over |= value > PERCENT
        return f"{value:>7.1f}%" if value <= PERCENT else f"{'-':>8}"

    def row(name: str, m: Measured) -> str:
        t_tflops = m.train_samples_per_s * flops_train / 1e12
        p_tflops = m.predict_samples_per_s * flops_predict / 1e12
        return (
            f"{name:<18}{m.train_samples_per_s:>11.1f}{m.predict_samples_per_s:>11.1f}"
            f"{t_tflops:>9.3f}{share(t_tflops, m.precision)}"
            f"{p_tflops:>9.3f}{share(p_tflops, m.precision)}"
            f"{m.train_peak_mb:>10.0f}{m.predict_peak_mb:>10.0f}"
        )

    head = (
        f"{'':<18}{'train/s':>11}{'predict/s':>11}{'train TF':>9}{'%peak':>8}{'pred TF':>9}{'%peak':>8}"
        f"{'train MB':>10}{'pred MB':>10}"
    )
    lines = [head, row("(a) reference", ref)]
    for batch, m in fast.items():
        lines.append(row(f"(b) bs {batch}" if len(fast) > 1 else "(b) budgetlora", m))
    for batch, m in fast.items():
        lines.append(
            f"{'ratio b/a' + (f' bs {batch}' if len(fast) > 1 else ''):<18}"
            f"{m.train_samples_per_s / ref.train_samples_per_s:>10.2f}x"
            f"{m.predict_samples_per_s / ref.predict_samples_per_s:>10.2f}x"
        )
    return "\n".join(lines), over


@dataclass
class BenchOptions:
    device: str = "auto"
    model: Optional[str] = None
    data: Optional[Path] = None  # default: DEFAULT_DATA
    synthetic: bool = False
    steps: Optional[int] = None
    warmup: Optional[int] = None
    predict_rows: Optional[int] = None
    fast_batches: Optional[list[int]] = None
    lora_dropout: float = 0.1
    max_length: int = 128
    repeats: Optional[int] = None
    threads: Optional[int] = None
    onnx: bool = False
    config: Optional[Path] = None  # measure this recipe (its model, data, adapters, batch) against the reference


def _recipe(options: BenchOptions) -> Optional[Config]:
    if options.config is None:
        return None
    clashing = [
        flag
        for flag, value in (("--model", options.model), ("--data", options.data), ("--synthetic", options.synthetic))
        if value
    ]
    if clashing or options.lora_dropout != BenchOptions.lora_dropout or options.max_length != BenchOptions.max_length:
        flag = (
            clashing[0]
            if clashing
            else ("--lora-dropout" if options.lora_dropout != BenchOptions.lora_dropout else "--max-length")
        )
        raise BudgetLoraError(
            f"{flag} cannot be combined with --config: the config gives the model, data, adapters "
            "and max_length; change them in the config (or a copy of it)"
        )
    return load_config(options.config)


def _spec(options: BenchOptions, device: torch.device) -> tuple[BenchSpec, int, list[int]]:
    d = _defaults(device)

    def pick(value: Optional[int], key: str) -> int:
        return d[key] if value is None else value

    recipe = _recipe(options)
    model = recipe.model if recipe is not None else options.model or d["model"]
    weights = (
        recipe.model_init == "pretrained"
        if recipe is not None
        else model == MINILM_ALIAS or Path(model).expanduser().exists()
    )
    batches = options.fast_batches or [recipe.train.batch_size if recipe is not None else d["fast_batch"]]
    spec = BenchSpec(
        model=model,
        device=device,
        weights=weights,
        steps=pick(options.steps, "steps"),
        warmup=pick(options.warmup, "warmup"),
        predict_rows=pick(options.predict_rows, "predict_rows"),
        fast_batch=batches[0],
        lora_dropout=recipe.lora.dropout if recipe else options.lora_dropout,
        max_length=recipe.data.max_length if recipe else options.max_length,
        recipe=recipe,
    )
    repeats = pick(options.repeats, "repeats")
    if spec.warmup < 1 or spec.steps < 1 or repeats < 1 or spec.predict_rows < 1 or any(b < 1 for b in batches):
        raise BudgetLoraError(
            "bench needs --warmup >= 1, --steps >= 1, --repeats >= 1, --predict-rows >= 1 and batch sizes >= 1"
        )
    if not 0 <= spec.lora_dropout < 1 or not MIN_LENGTH <= spec.max_length <= MAX_LENGTH:
        raise BudgetLoraError("bench needs --lora-dropout in [0, 1) and --max-length in [8, 512]")
    if options.threads is not None and options.threads < 1:
        raise BudgetLoraError("--threads must be >= 1")
    if options.data is not None and not options.synthetic:
        missing = [f for f in ("train_sample.csv", "test.csv") if not (Path(options.data) / f).is_file()]
        if missing:  # a typo must not quietly turn the bench into one on synthetic ids
            raise BudgetLoraError(
                f"--data {options.data}: no {' or '.join(missing)} there; give the AG News "
                "directory, or pass --synthetic"
            )
    return spec, repeats, batches


def _measure_batch(spec: BenchSpec, data: BenchData, batch: int) -> Optional[Measured]:
    """budgetlora at one training batch size; None when it does not fit in memory."""
    try:
        return measure_fast(replace(spec, fast_batch=batch), data)
    except torch.OutOfMemoryError:
        _free(spec.device)
        return None


def _onnx(spec: BenchSpec, data: BenchData, ours: float, say: Any) -> dict[str, float]:
    from budgetlora.artifacts.onnx import require_onnx
    from budgetlora.bench.onnx import measure_onnx

    require_onnx()
    numbers = measure_onnx(spec, data)
    numbers["fp32_speedup"] = numbers["fp32_predict_samples_per_s"] / ours
    numbers["int8_speedup"] = numbers["int8_predict_samples_per_s"] / ours
    say(
        f"(c) ONNX Runtime fp32 predict {numbers['fp32_predict_samples_per_s']:.1f}/s ({numbers['fp32_speedup']:.2f}x "
        f"budgetlora's PyTorch predict); (d) int8 {numbers['int8_predict_samples_per_s']:.1f}/s "
        f"({numbers['int8_speedup']:.2f}x; argmax agrees with fp32 on "
        f"{100 * numbers['int8_argmax_agreement_with_fp32']:.1f}% of rows)"
    )
    return numbers


def _bench_data(options: BenchOptions, spec: BenchSpec) -> tuple[Any, BenchData]:
    """The model's config and the rows to train and predict on: the recipe's own data with
    --config, else AG News (or synthetic ids with its lengths)."""
    if spec.recipe is not None:
        data = recipe_bench_data(spec.recipe)
        return load_model_config(spec.model, data.num_labels), data
    config = load_model_config(spec.model, NUM_LABELS)
    data_dir = None if options.synthetic else Path(options.data or DEFAULT_DATA).expanduser()
    return config, load_bench_data(
        spec.model, data_dir, config.vocab_size, spec.max_length, synthetic=options.synthetic
    )


def _measure(
    spec: BenchSpec, data: BenchData, batches: list[int], repeats: int
) -> tuple[Measured, dict[int, Measured]]:
    """The stacks, alternating (a, b, a, b, ...), the best repeat of each kept."""
    ref, fast = Measured(), {b: Measured() for b in batches}
    for _ in range(repeats):
        ref.merge(measure_reference(spec, data))
        print(f"  (a) {ref.runs[-1][0]:.1f} train/s, {ref.runs[-1][1]:.1f} predict/s", file=sys.stderr, flush=True)
        for batch in batches:
            measured = _measure_batch(spec, data, batch)
            if measured is None:
                print(f"  (b) batch {batch}: out of memory", file=sys.stderr, flush=True)
                continue
            fast[batch].merge(measured)
            print(
                f"  (b) batch {batch}: {measured.train_samples_per_s:.1f} train/s, "
                f"{measured.predict_samples_per_s:.1f} predict/s",
                file=sys.stderr,
                flush=True,
            )
    return ref, fast


def run_bench(options: BenchOptions, say: Any = print) -> dict[str, Any]:
    """Measure (a) the reference stack and (b) budgetlora (at each batch size) in this process;
    `say` gets the lines to print, the returned dict the numbers."""
    from budgetlora.runtime import resolve_device

    quiet_transformers()
    device = resolve_device(options.device)
    spec, repeats, batches = _spec(options, device)
    if options.threads:
        torch.set_num_threads(options.threads)
    # budgetlora sets glibc's malloc thresholds for CPU runs, process-wide: set them before either
    # stack runs, so both are measured under the same allocator (the reference gains from it too)
    kept = device.type == "cpu" and keep_freed_memory()
    config, data = _bench_data(options, spec)
    where = f"{device}" + (
        f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f" ({torch.get_num_threads()} threads)"
    )
    say(
        f"device {where}; model {spec.model} ({'pretrained' if spec.weights else 'random weights, same FLOPs'}); "
        f"torch {torch.__version__}"
    )
    say(
        f"data: {data.note}; train {len(data.train):,} rows, mean {data.train.lengths.mean():.1f} tokens; "
        f"predict {min(spec.predict_rows, len(data.test)):,} rows"
    )
    say(
        f"measuring {spec.steps} train steps after {spec.warmup} warm-up steps, {repeats} repeat(s) alternating "
        "(a) and (b), best of each" + ("; both under budgetlora's glibc malloc thresholds" if kept else "")
    )
    ref, fast = _measure(spec, data, batches, repeats)
    fitted = {b: m for b, m in fast.items() if m.runs}
    if not fitted:
        raise BudgetLoraError(f"no budgetlora batch size of {batches} fits on {device}")
    flops_predict = forward_flops_per_row(config, data.test.lengths)
    # frozen base: the backward pass computes input gradients only, about one more forward
    flops_train = 2 * forward_flops_per_row(config, data.train.lengths)
    peaks = {
        name: matmul_peak_tflops(device, name) for name in sorted({"fp32"} | {m.precision for m in fitted.values()})
    }
    say(f"(a) {ref.detail}; {ref.trainable:,} trainable")
    for m in fitted.values():
        say(f"(b) {m.detail}; {m.trainable:,} trainable")
    say(
        "samples/s; TFLOP/s = model FLOPs of the real tokens (train = 2x forward: frozen base; every layer at "
        "every token, though budgetlora's last layer computes the head's position only); %peak = of the measured "
        "matmul peak in the row's own precision (F.linear: "
        + ", ".join(f"{name} {value:.3f} TFLOP/s" for name, value in peaks.items())
        + f"); memory = {'CUDA max allocated' if device.type == 'cuda' else 'peak RSS'} (MB)"
    )
    table, over_peak = format_table(ref, fitted, flops_train, flops_predict, peaks)
    say(table)
    if over_peak:
        say(
            "a share above 100% of the measured peak is left out ('-'): the peak measurement fell short of what "
            "the path reached on this machine"
        )
    best = max(fitted.values(), key=lambda m: m.train_samples_per_s)
    train_x = best.train_samples_per_s / ref.train_samples_per_s
    ours = max(m.predict_samples_per_s for m in fitted.values())
    predict_x = ours / ref.predict_samples_per_s
    onnx = _onnx(spec, data, ours, say) if options.onnx else None
    return {
        "onnx": onnx,
        "device": where,
        "model": spec.model,
        "data": data.note,
        "spec": {k: str(v) for k, v in asdict(spec).items()},
        "reference": asdict(ref),
        "fast": {str(b): asdict(m) for b, m in fitted.items()},
        "peak_tflops": peaks,
        "recipe": str(options.config) if options.config else None,
        "train_flops_per_sample": flops_train,
        "predict_flops_per_sample": flops_predict,
        "train_speedup": train_x,
        "predict_speedup": predict_x,
    }
