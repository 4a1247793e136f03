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

import argparse
import contextlib
import gc
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

# torch, transformers and budgetlora's data modules are imported inside the functions:
# `budgetlora --help` builds this parser and should not pay for importing torch
if TYPE_CHECKING:
    import torch

    from budgetlora.data.tokens import TokenizedSet

DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "ag_news"
NUM_LABELS = 4
REF_BATCH = 16
LORA_R, LORA_ALPHA = 2, 16


# ---------------------------------------------------------------------------------------- data

@dataclass
class BenchData:
    train: TokenizedSet
    test: TokenizedSet
    pad_id: int
    tokenizer: object  # for DataCollatorWithPadding
    note: str


def _minilm_tokenizer():
    from budgetlora.model import load_tokenizer

    return load_tokenizer("minilm")


def _bench_tokenizer(model: str) -> tuple[object, str]:
    """The model's own tokenizer, else the packaged MiniLM one (roberta-base has none offline)."""
    from budgetlora.errors import BudgetLoraError
    from budgetlora.model import load_tokenizer

    try:
        return load_tokenizer(model), "the model's tokenizer"
    except BudgetLoraError:
        return _minilm_tokenizer(), (f"{model} has no tokenizer offline: MiniLM WordPiece ids and lengths "
                                     "(ids modulo the model's vocabulary)")


def synthetic_lengths(n: int, seed: int, max_length: int) -> np.ndarray:
    """Token lengths shaped like AG News under a WordPiece tokenizer (mean ~51-53, long right
    tail): a gamma distribution, clipped to [8, max_length]."""
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.gamma(11.5, 4.6, size=n)), 8, max_length).astype(np.int64)


def synthetic_set(n: int, seed: int, max_length: int, vocab: int) -> TokenizedSet:
    from budgetlora.data.tokens import TokenizedSet
    lengths = synthetic_lengths(n, seed, max_length)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    rng = np.random.default_rng(seed + 1)
    ids = rng.integers(5, vocab, size=int(offsets[-1]), dtype=np.int64).astype(np.int32)
    labels = rng.integers(0, NUM_LABELS, size=n)
    return TokenizedSet(ids, offsets, labels)


def load_bench_data(model: str, data_dir: Path | None, vocab: int, max_length: int,
                    synthetic: bool = False, seed: int = 0) -> BenchData:
    """AG News token ids for `model` (its tokenizer, else MiniLM's), or synthetic ids with AG
    News' length distribution when there is no data or no tokenizer at all."""
    from budgetlora.config import DataConfig
    from budgetlora.data.dataset import load_text_set
    from budgetlora.data.tokens import TokenizedSet, tokenize
    from budgetlora.errors import BudgetLoraError
    from budgetlora.model import pad_token_id

    tokenizer, how = None, ""
    try:
        tokenizer, how = _bench_tokenizer(model)
    except BudgetLoraError:
        synthetic = True
    train_file = data_dir / "train_sample.csv" if data_dir else None
    test_file = data_dir / "test.csv" if data_dir else None
    if not synthetic and (not train_file or not train_file.is_file() or not test_file.is_file()):
        synthetic = True
    if synthetic:
        note = ("synthetic ids with AG News' length distribution"
                + ("" if tokenizer else " (no tokenizer available)"))
        return BenchData(synthetic_set(5000, seed, max_length, vocab), synthetic_set(7600, seed + 7, max_length, vocab),
                         pad_token_id(tokenizer) if tokenizer else 0, tokenizer, note)
    cfg = DataConfig(train_file=str(train_file), max_length=max_length)
    names = ["World", "Sports", "Business", "Sci/Tech"]
    sets = []
    for path in (train_file, test_file):
        texts, _ = load_text_set(str(path), cfg, names, True)
        tokens = tokenize(tokenizer, texts.texts, texts.labels, max_length)
        if int(tokens.ids.max(initial=0)) >= vocab:
            tokens = TokenizedSet(tokens.ids % vocab, tokens.offsets, tokens.labels)
        sets.append(tokens)
    note = f"AG News {train_file.name} / {test_file.name}, {how}"
    return BenchData(sets[0], sets[1], pad_token_id(tokenizer), tokenizer, note)


def subset(data: TokenizedSet, n: int) -> TokenizedSet:
    """The first `n` rows (all when n >= len)."""
    from budgetlora.data.tokens import TokenizedSet
    n = min(n, len(data))
    end = int(data.offsets[n])
    return TokenizedSet(data.ids[:end], data.offsets[:n + 1], None if data.labels is None else data.labels[:n])


# ------------------------------------------------------------------------------- measurement

def _sync(device: torch.device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 to clear_refs resets VmHWM, the peak resident set size
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: max allocated since the last reset; CPU: peak RSS of this process (since the reset
    where the kernel allows it, else since start)."""
    import torch
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        match = re.search(r"VmHWM:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
        if match:
            return int(match.group(1)) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def forward_flops_per_row(config, lengths: np.ndarray) -> float:
    """Mean forward FLOPs of one row (real tokens only, no padding): the encoder's linear layers
    (2 FLOPs per weight per token) plus attention scores and mixing (4 * T^2 * hidden per layer)."""
    d, layers = config.hidden_size, config.num_hidden_layers
    ff = getattr(config, "intermediate_size", 4 * d)
    t = lengths.astype(np.float64)
    per_layer = 2 * (4 * d * d + 2 * d * ff) * t + 4 * t * t * d
    return float((layers * per_layer).mean())


def matmul_peak_tflops(device: torch.device, seconds: float = 2.0) -> tuple[float, str]:
    """Measured dense matmul throughput: bf16 on CUDA; on CPU bf16 only where the CPU has native
    bf16 (AVX512-BF16/AMX), else fp32, which is what the CPU path computes in."""
    import torch
    if device.type == "cuda":
        dtype, n = torch.bfloat16, 8192
    else:
        native = False
        try:
            native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # older torch: treat as no native bf16
            native = False
        dtype, n = (torch.bfloat16 if native else torch.float32), 1536
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    iters, start = 0, time.perf_counter()
    while True:
        for _ in range(5 if device.type == "cpu" else 50):
            a @ b
            iters += 1
        _sync(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
    name = "bf16" if dtype == torch.bfloat16 else "fp32"
    return 2 * n ** 3 * iters / elapsed / 1e12, name


@dataclass
class Measured:
    train_samples_per_s: float = 0.0
    predict_samples_per_s: float = 0.0
    train_peak_mb: float = 0.0
    predict_peak_mb: float = 0.0
    trainable: int = 0
    train_batch: int = 0
    detail: str = ""
    runs: list = field(default_factory=list)

    def merge(self, other: Measured) -> None:
        """Keep the best repeat's throughput and the largest memory."""
        self.runs.append((round(other.train_samples_per_s, 2), round(other.predict_samples_per_s, 2)))
        self.train_samples_per_s = max(self.train_samples_per_s, other.train_samples_per_s)
        self.predict_samples_per_s = max(self.predict_samples_per_s, other.predict_samples_per_s)
        self.train_peak_mb = max(self.train_peak_mb, other.train_peak_mb)
        self.predict_peak_mb = max(self.predict_peak_mb, other.predict_peak_mb)
        self.trainable, self.train_batch = other.trainable, other.train_batch
        self.detail = other.detail


@dataclass
class BenchSpec:
    model: str
    device: object  # torch.device
    weights: bool  # pretrained weights (minilm, local dirs) or random init (roberta-base: same FLOPs)
    steps: int
    warmup: int
    predict_rows: int
    fast_batch: int
    lr: float = 5e-4
    lora_dropout: float = 0.1
    max_length: int = 128
    seed: int = 0


# ------------------------------------------------------------------------------- (a) reference

def _reference_model(spec: BenchSpec):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from budgetlora.model import load_model_config, resolve_model_path

    config = load_model_config(spec.model, NUM_LABELS)
    torch.manual_seed(spec.seed)
    if spec.weights:
        model = AutoModelForSequenceClassification.from_pretrained(resolve_model_path(spec.model), config=config)
    else:
        model = AutoModelForSequenceClassification.from_config(config)
    lora = LoraConfig(task_type="SEQ_CLS", r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=spec.lora_dropout,
                      target_modules=["query", "value"])
    return get_peft_model(model, lora)


class _Rows:
    """Pre-tokenized rows as dicts of Python lists: what DataCollatorWithPadding pads."""

    def __init__(self, data: TokenizedSet, labels: bool):
        self.data, self.labels = data, labels

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        ids = self.data.ids[self.data.offsets[i]:self.data.offsets[i + 1]].tolist()
        row = {"input_ids": ids, "attention_mask": [1] * len(ids)}
        if self.labels:
            row["labels"] = int(self.data.labels[i])
        return row


def measure_reference(spec: BenchSpec, data: BenchData) -> Measured:
    from transformers import (
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from budgetlora.budget import count_trainable
    from budgetlora.model import quiet_transformers

    quiet_transformers()
    device = spec.device
    model = _reference_model(spec).to(device)
    trainable = count_trainable(model).trainable
    collator = DataCollatorWithPadding(data.tokenizer) if data.tokenizer is not None else _PadCollator(data.pad_id)
    marks: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (spec.warmup, spec.warmup + spec.steps):
                _sync(device)
                marks[state.global_step] = time.perf_counter()

    out = Measured(trainable=trainable, train_batch=REF_BATCH,
                   detail=f"Trainer+PEFT r={LORA_R} q,v+head, fp32, batch {REF_BATCH}, pad to longest")
    with tempfile.TemporaryDirectory(prefix="budgetlora-bench-") as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=REF_BATCH, per_device_eval_batch_size=REF_BATCH,
            max_steps=spec.warmup + spec.steps, learning_rate=spec.lr, weight_decay=0.01,
            warmup_steps=max(1, round(0.06 * (spec.warmup + spec.steps))),
            logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none",
            disable_tqdm=True, use_cpu=device.type == "cpu", dataloader_num_workers=0, seed=spec.seed)
        trainer = Trainer(model=model, args=args, train_dataset=_Rows(data.train, True),
                          data_collator=collator, callbacks=[Clock()])
        reset_peak_memory(device)
        with contextlib.redirect_stdout(sys.stderr):  # Trainer prints its own summary dict
            trainer.train()
        out.train_peak_mb = peak_memory_mb(device)
        out.train_samples_per_s = spec.steps * REF_BATCH / (marks[spec.warmup + spec.steps] - marks[spec.warmup])

        rows = subset(data.test, spec.predict_rows)
        trainer.predict(_Rows(subset(rows, 4 * REF_BATCH), False))  # warm-up
        reset_peak_memory(device)
        _sync(device)
        start = time.perf_counter()
        trainer.predict(_Rows(rows, False))
        _sync(device)
        out.predict_samples_per_s = len(rows) / (time.perf_counter() - start)
        out.predict_peak_mb = peak_memory_mb(device)
    del trainer, model
    _free(device)
    return out


class _PadCollator:
    """Pad-to-longest without a tokenizer (synthetic data only)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict:
        import torch
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
            mask[i, :len(r["input_ids"])] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if "labels" in rows[0]:
            batch["labels"] = torch.tensor([r["labels"] for r in rows])
        return batch


def _free(device: torch.device) -> None:
    import torch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------ (b) budgetlora

def fast_config(spec: BenchSpec):
    """The budgetlora config that matches the reference: same model, rank, targets, dropout, head;
    everything else (precision, compile, dropout position) at its default for the device."""
    from budgetlora.config import config_from_dict
    from budgetlora.fast import sqrt_scaled_lr

    return config_from_dict({
        "name": "bench", "model": spec.model, "budget": None,
        "model_init": "pretrained" if spec.weights else "random",
        "data": {"train_file": "-", "max_length": spec.max_length},
        "head": {"type": "auto"},
        "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": spec.lora_dropout, "targets": ["q", "v"]},
        "train": {"lr": sqrt_scaled_lr(spec.lr, spec.fast_batch, REF_BATCH), "batch_size": spec.fast_batch,
                  "max_steps": spec.warmup + spec.steps, "log_every": max(1, spec.warmup),
                  "eval_every": None, "seed": spec.seed, "device": spec.device.type},
    })


def measure_fast(spec: BenchSpec, data: BenchData) -> Measured:
    import torch

    from budgetlora.budget import count_trainable
    from budgetlora.evaluate import predict_logits
    from budgetlora.fast import prepare_for_training
    from budgetlora.model import build_model
    from budgetlora.recipe import resolve_precision
    from budgetlora.train import train_loop

    device = spec.device
    cfg = fast_config(spec)
    precision = resolve_precision(cfg.train.precision, device)
    torch.manual_seed(spec.seed)
    model = build_model(cfg, NUM_LABELS, weights=True).to(device)
    trainable = count_trainable(model).trainable
    reset_peak_memory(device)
    fast = prepare_for_training(model, cfg, device, precision, data.pad_id, NUM_LABELS)
    marks: dict[int, float] = {}

    def log(record: dict) -> None:  # train_loop syncs (float of the loss) before each log call
        if record.get("step") in (spec.warmup, spec.warmup + spec.steps):
            marks[record["step"]] = time.perf_counter()

    train_loop(model, data.train, None, cfg.train, device, data.pad_id, precision, log, pad_to=fast.pad_to)
    out = Measured(trainable=trainable, train_batch=cfg.train.batch_size,
                   detail=f"budgetlora {precision}, batch {cfg.train.batch_size}, bucketed, {fast.describe()}")
    out.train_peak_mb = peak_memory_mb(device)
    out.train_samples_per_s = spec.steps * cfg.train.batch_size / (marks[spec.warmup + spec.steps] - marks[spec.warmup])

    rows = subset(data.test, spec.predict_rows)
    batch_tokens = cfg.train.eval_batch_size * cfg.data.max_length
    predict_logits(model, subset(rows, 64), device, data.pad_id, precision, batch_tokens=batch_tokens)  # warm-up
    reset_peak_memory(device)
    _sync(device)
    start = time.perf_counter()
    predict_logits(model, rows, device, data.pad_id, precision, batch_tokens=batch_tokens)
    _sync(device)
    out.predict_samples_per_s = len(rows) / (time.perf_counter() - start)
    out.predict_peak_mb = peak_memory_mb(device)
    del model
    _free(device)
    return out


# ---------------------------------------------------------------------------------- the command

def _defaults(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"model": "roberta-base", "steps": 100, "warmup": 10, "predict_rows": 7600, "fast_batch": 256,
                "repeats": 1}
    return {"model": "minilm", "steps": 40, "warmup": 2, "predict_rows": 768, "fast_batch": REF_BATCH,
            "repeats": 2}


def format_table(ref: Measured, fast: Measured, flops_train: float, flops_predict: float,
                 peak_tflops: float, peak_name: str) -> str:
    def row(name: str, m: Measured) -> str:
        t_tflops = m.train_samples_per_s * flops_train / 1e12
        p_tflops = m.predict_samples_per_s * flops_predict / 1e12
        return (f"{name:<14}{m.train_samples_per_s:>11.1f}{m.predict_samples_per_s:>11.1f}"
                f"{t_tflops:>9.3f}{100 * t_tflops / peak_tflops:>7.1f}%"
                f"{p_tflops:>9.3f}{100 * p_tflops / peak_tflops:>7.1f}%"
                f"{m.train_peak_mb:>10.0f}{m.predict_peak_mb:>10.0f}")

    head = (f"{'':<14}{'train/s':>11}{'predict/s':>11}{'train TF':>9}{'%peak':>8}{'pred TF':>9}{'%peak':>8}"
            f"{'train MB':>10}{'pred MB':>10}")
    ratio = (f"{'ratio b/a':<14}{fast.train_samples_per_s / ref.train_samples_per_s:>10.2f}x"
             f"{fast.predict_samples_per_s / ref.predict_samples_per_s:>10.2f}x")
    return "\n".join([head, row("(a) reference", ref), row("(b) budgetlora", fast), ratio])


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from budgetlora.allocator import keep_freed_memory
    from budgetlora.errors import BudgetLoraError
    from budgetlora.model import MINILM_ALIAS, load_model_config, quiet_transformers
    from budgetlora.recipe import resolve_device

    quiet_transformers()
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    # budgetlora sets glibc's malloc thresholds for CPU runs, process-wide: set them before either
    # stack runs, so both are measured under the same allocator (the reference gains from it too)
    kept = device.type == "cpu" and keep_freed_memory()
    d = _defaults(device)
    model = args.model or d["model"]
    weights = model == MINILM_ALIAS or Path(model).expanduser().exists()
    spec = BenchSpec(model=model, device=device, weights=weights, steps=args.steps or d["steps"],
                     warmup=args.warmup if args.warmup is not None else d["warmup"],
                     predict_rows=args.predict_rows or d["predict_rows"],
                     fast_batch=args.fast_batch_size or d["fast_batch"], lora_dropout=args.lora_dropout,
                     max_length=args.max_length)
    if spec.warmup < 1 or spec.steps < 1:
        raise BudgetLoraError("bench needs --warmup >= 1 and --steps >= 1")
    repeats = args.repeats or d["repeats"]
    config = load_model_config(model, NUM_LABELS)
    data_dir = None if args.synthetic else Path(args.data).expanduser()
    data = load_bench_data(model, data_dir, config.vocab_size, spec.max_length, synthetic=args.synthetic)

    where = f"{device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda"
                           else f" ({torch.get_num_threads()} threads)")
    print(f"device {where}; model {model} ({'pretrained' if weights else 'random weights, same FLOPs'}); "
          f"torch {torch.__version__}", flush=True)
    print(f"data: {data.note}; train {len(data.train):,} rows, mean {data.train.lengths.mean():.1f} tokens; "
          f"predict {min(spec.predict_rows, len(data.test)):,} rows", flush=True)
    print(f"measuring {spec.steps} train steps after {spec.warmup} warm-up steps, {repeats} repeat(s) "
          "alternating (a) and (b), best of each"
          + ("; both under budgetlora's glibc malloc thresholds (budgetlora.allocator)" if kept else ""), flush=True)

    ref, fast = Measured(), Measured()
    for _ in range(repeats):
        ref.merge(measure_reference(spec, data))
        print(f"  (a) {ref.runs[-1][0]:.1f} train/s, {ref.runs[-1][1]:.1f} predict/s", file=sys.stderr, flush=True)
        fast.merge(measure_fast(spec, data))
        print(f"  (b) {fast.runs[-1][0]:.1f} train/s, {fast.runs[-1][1]:.1f} predict/s", file=sys.stderr, flush=True)

    flops_predict = forward_flops_per_row(config, data.test.lengths)
    # frozen base: the backward pass computes input gradients only, about one more forward
    flops_train = 2 * forward_flops_per_row(config, data.train.lengths)
    peak, peak_name = matmul_peak_tflops(device)
    print(f"(a) {ref.detail}; {ref.trainable:,} trainable")
    print(f"(b) {fast.detail}; {fast.trainable:,} trainable")
    print(f"samples/s; TFLOP/s = model FLOPs of the real tokens (train = 2x forward: frozen base; every layer "
          f"at every token, though budgetlora's last layer computes the head's position only); "
          f"peak = measured {peak_name} matmul {peak:.3f} TFLOP/s; "
          f"memory = {'CUDA max allocated' if device.type == 'cuda' else 'peak RSS'} (MB)")
    print(format_table(ref, fast, flops_train, flops_predict, peak, peak_name))
    train_x = fast.train_samples_per_s / ref.train_samples_per_s
    predict_x = fast.predict_samples_per_s / ref.predict_samples_per_s
    if args.json:
        from budgetlora.artifacts import write_json

        write_json(Path(args.json), {
            "device": where, "model": model, "data": data.note, "spec": {k: str(v) for k, v in asdict(spec).items()},
            "reference": asdict(ref), "fast": asdict(fast), "peak_tflops": peak, "peak_dtype": peak_name,
            "train_flops_per_sample": flops_train, "predict_flops_per_sample": flops_predict,
            "train_speedup": train_x, "predict_speedup": predict_x})
    print(f"train_speedup={train_x:.2f} predict_speedup={predict_x:.2f}", flush=True)
    return 0


def add_subcommands(subparsers) -> None:
    p = subparsers.add_parser("bench", help="throughput: Trainer+PEFT reference vs budgetlora's fast path",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    p.add_argument("--model", help="roberta-base (random weights; default on cuda), minilm (default on cpu) "
                                   "or a local model directory")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="AG News directory with train_sample.csv and test.csv")
    p.add_argument("--synthetic", action="store_true", help="synthetic ids with AG News' length distribution")
    p.add_argument("--steps", type=int, help="measured training steps per stack (cpu 40, cuda 100)")
    p.add_argument("--warmup", type=int, help="untimed steps first (cpu 2, cuda 10)")
    p.add_argument("--predict-rows", type=int, help="test rows to predict (cpu 768, cuda 7600)")
    p.add_argument("--fast-batch-size", type=int,
                   help="budgetlora's training batch (cpu 16, cuda 256; LR scaled by sqrt(batch/16))")
    p.add_argument("--lora-dropout", type=float, default=0.1, help="LoRA dropout of both stacks (default 0.1)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--repeats", type=int, help="alternating repeats, best of each (cpu 2, cuda 1)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    p.set_defaults(func=cmd_bench)
