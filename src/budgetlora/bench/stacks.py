"""The two stacks a benchmark measures on the same model, adapters and data: (a) Transformers
`Trainer` + PEFT, fp32, batch 16, padded to the longest row of a random batch, and (b) budgetlora's
own training loop and prediction, exactly as `budgetlora train` runs them on the device."""

from __future__ import annotations

import contextlib
import gc
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

from budgetlora.bench.data import NUM_LABELS, BenchData
from budgetlora.config import config_from_dict
from budgetlora.data import TokenizedSet
from budgetlora.evaluate.predict import predict_logits
from budgetlora.model import build_model, count_trainable, load_model_config, resolve_model_path
from budgetlora.runtime import Runtime, peak_memory_mb, quiet_transformers, reset_peak_memory, resolve_precision
from budgetlora.speedups import prepare_for_training
from budgetlora.training import train_loop

REF_BATCH = 16
LORA_R, LORA_ALPHA = 2, 16


def sqrt_scaled_lr(lr: float, batch_size: int, base_batch: int = REF_BATCH) -> float:
    """Learning rate for a larger batch: square-root scaling from the batch the LR was tuned at,
    the usual rule for Adam-type optimizers (linear scaling overshoots at large ratios)."""
    return lr * math.sqrt(batch_size / base_batch)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_tflops(device: torch.device, seconds: float = 2.0) -> tuple[float, str]:
    """Measured dense matmul throughput: bf16 on CUDA; on CPU bf16 only where the CPU has native
    bf16 (AVX512-BF16/AMX), else fp32, which is what the CPU path computes in."""
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


def _reference_model(spec: BenchSpec):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

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
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

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

        rows = data.test.first(spec.predict_rows)
        trainer.predict(_Rows(rows.first(4 * REF_BATCH), False))  # warm-up
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
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fast_config(spec: BenchSpec):
    """The budgetlora config that matches the reference: same model, rank, targets, dropout, head;
    everything else (precision, compile, dropout position) at its default for the device."""
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
    device = spec.device
    cfg = fast_config(spec)
    precision = resolve_precision(cfg.train.precision, device)
    rt = Runtime(device, precision)
    torch.manual_seed(spec.seed)
    model = build_model(cfg, NUM_LABELS, weights=True).to(device)
    trainable = count_trainable(model).trainable
    reset_peak_memory(device)
    fast = prepare_for_training(model, cfg, device, precision, data.pad_id, NUM_LABELS)
    marks: dict[int, float] = {}

    def log(record: dict) -> None:  # train_loop syncs (float of the loss) before each log call
        if record.get("step") in (spec.warmup, spec.warmup + spec.steps):
            marks[record["step"]] = time.perf_counter()

    train_loop(model, data.train, None, cfg.train, rt, data.pad_id, log, pad_to=fast.pad_to)
    out = Measured(trainable=trainable, train_batch=cfg.train.batch_size,
                   detail=f"budgetlora {precision}, batch {cfg.train.batch_size}, bucketed, {fast.describe()}")
    out.train_peak_mb = peak_memory_mb(device)
    out.train_samples_per_s = spec.steps * cfg.train.batch_size / (marks[spec.warmup + spec.steps] - marks[spec.warmup])

    rows = data.test.first(spec.predict_rows)
    batch_tokens = cfg.train.eval_batch_size * cfg.data.max_length
    predict_logits(model, rows.first(64), rt, data.pad_id, batch_tokens=batch_tokens)  # warm-up
    reset_peak_memory(device)
    _sync(device)
    start = time.perf_counter()
    predict_logits(model, rows, rt, data.pad_id, batch_tokens=batch_tokens)
    _sync(device)
    out.predict_samples_per_s = len(rows) / (time.perf_counter() - start)
    out.predict_peak_mb = peak_memory_mb(device)
    del model
    _free(device)
    return out
