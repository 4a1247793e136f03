"""The two stacks a benchmark measures on the same model, adapters and data: (a) Transformers
`Trainer` + PEFT, fp32, batch 16, padded to the longest row of a random batch, and (b) budgetlora's
own training loop and prediction, exactly as `budgetlora train` runs them on the device."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from budgetlora.bench.data import BenchData
from budgetlora.config import Config, config_from_dict
from budgetlora.data import TokenizedSet
from budgetlora.evaluate.predict import predict_logits
from budgetlora.model import build_model, count_trainable, load_model_config, resolve_model_path, target_module_paths
from budgetlora.runtime import Runtime, peak_memory_mb, quiet_transformers, reset_peak_memory, resolve_precision
from budgetlora.speedups import prepare_for_training
from budgetlora.training import train_loop
from budgetlora.training.step import step_runner

REF_BATCH = 16
LORA_R, LORA_ALPHA = 2, 16


def sqrt_scaled_lr(lr: float, batch_size: int, base_batch: int = REF_BATCH) -> float:
    """Learning rate for a larger batch: square-root scaling from the batch the LR was tuned at,
    the usual rule for Adam-type optimizers (linear scaling overshoots at large ratios)."""
    return lr * math.sqrt(batch_size / base_batch)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_tflops(device: torch.device, precision: str = "fp32", seconds: float = 2.0) -> float:
    """Measured dense matmul throughput in the dtype a path computes in, through the op its linear
    layers use: `F.linear`, under autocast for bf16/fp16 (on CPU a plain bf16 `a @ b` may miss
    the AMX/AVX512-BF16 kernels that autocast's linear reaches, and under-state the peak)."""
    n = 8192 if device.type == "cuda" else 1536
    x = torch.randn(n, n, device=device)
    w = torch.randn(n, n, device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def linear() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            torch.nn.functional.linear(x, w)

    for _ in range(2):
        linear()
    _sync(device)
    iters, start = 0, time.perf_counter()
    while True:
        for _ in range(5 if device.type == "cpu" else 50):
            linear()
            iters += 1
        _sync(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
    return 2 * n**3 * iters / elapsed / 1e12


@dataclass
class Measured:
    train_samples_per_s: float = 0.0
    predict_samples_per_s: float = 0.0
    train_peak_mb: float = 0.0
    predict_peak_mb: float = 0.0
    trainable: int = 0
    train_batch: int = 0
    precision: str = "fp32"
    detail: str = ""
    runs: list = field(default_factory=list)

    def merge(self, other: Measured) -> None:
        """Keep the best repeat's throughput and the largest memory."""
        self.runs.append((round(other.train_samples_per_s, 2), round(other.predict_samples_per_s, 2)))
        self.train_samples_per_s = max(self.train_samples_per_s, other.train_samples_per_s)
        self.predict_samples_per_s = max(self.predict_samples_per_s, other.predict_samples_per_s)
        self.train_peak_mb = max(self.train_peak_mb, other.train_peak_mb)
        self.predict_peak_mb = max(self.predict_peak_mb, other.predict_peak_mb)
        self.trainable, self.train_batch, self.precision = other.trainable, other.train_batch, other.precision
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
    recipe: Optional[Config] = None  # bench --config: the user's recipe instead of r=2 on q,v


def _reference_lora(spec: BenchSpec, model: torch.nn.Module) -> Any:
    """PEFT's LoraConfig of the reference: r=2 on query,value, or the recipe's adapters on the same
    exact module paths of the model's own classification model."""
    from peft import LoraConfig

    if spec.recipe is None:
        return LoraConfig(
            task_type="SEQ_CLS",
            r=LORA_R,
            lora_alpha=LORA_ALPHA,
            lora_dropout=spec.lora_dropout,
            target_modules=["query", "value"],
        )
    lora = spec.recipe.lora
    auto_head = dataclasses.replace(spec.recipe, head=dataclasses.replace(spec.recipe.head, type="auto"))
    return LoraConfig(
        task_type="SEQ_CLS",
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=sorted(target_module_paths(model, auto_head)),
        bias=lora.bias,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
    )


def _reference_model(spec: BenchSpec, num_labels: int):
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    config = load_model_config(spec.model, num_labels)
    torch.manual_seed(spec.seed)
    if spec.weights:
        model = AutoModelForSequenceClassification.from_pretrained(resolve_model_path(spec.model), config=config)
    else:
        model = AutoModelForSequenceClassification.from_config(config)
    return get_peft_model(model, _reference_lora(spec, model))


class _Rows:
    """Pre-tokenized rows as dicts of Python lists: what DataCollatorWithPadding pads."""

    def __init__(self, data: TokenizedSet, labels: bool):
        self.data, self.labels = data, labels

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        ids = self.data.ids[self.data.offsets[i] : self.data.offsets[i + 1]].tolist()
        row = {"input_ids": ids, "attention_mask": [1] * len(ids)}
        if self.labels:
            row["labels"] = int(self.data.labels[i])
        return row


def measure_reference(spec: BenchSpec, data: BenchData) -> Measured:
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

    quiet_transformers()
    device = spec.device
    model = _reference_model(spec, data.num_labels).to(device)
    trainable = count_trainable(model).trainable
    collator = DataCollatorWithPadding(data.tokenizer) if data.tokenizer is not None else _PadCollator(data.pad_id)
    marks: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (spec.warmup, spec.warmup + spec.steps):
                _sync(device)
                marks[state.global_step] = time.perf_counter()

    adapters = f"r={LORA_R} q,v" if spec.recipe is None else f"the config's adapters (r={spec.recipe.lora.r})"
    out = Measured(
        trainable=trainable,
        train_batch=REF_BATCH,
        detail=f"Trainer+PEFT {adapters}+head, fp32, batch {REF_BATCH}, pad to longest",
    )
    with tempfile.TemporaryDirectory(prefix="budgetlora-bench-") as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=REF_BATCH,
            per_device_eval_batch_size=REF_BATCH,
            max_steps=spec.warmup + spec.steps,
            learning_rate=spec.lr,
            weight_decay=0.01,
            warmup_steps=max(1, round(0.06 * (spec.warmup + spec.steps))),
            logging_strategy="no",
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=device.type == "cpu",
            dataloader_num_workers=0,
            seed=spec.seed,
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=_Rows(data.train, True), data_collator=collator, callbacks=[Clock()]
        )
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
            ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            mask[i, : len(r["input_ids"])] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if "labels" in rows[0]:
            batch["labels"] = torch.tensor([r["labels"] for r in rows])
        return batch


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fast_config(spec: BenchSpec) -> Config:
    """The budgetlora config measured: with `spec.recipe`, that recipe as `budgetlora train` runs
    it, cut to the measured steps; otherwise the one that matches the reference (same model, rank,
    targets, dropout, head), with precision, compile and dropout position at their device defaults."""
    length = {
        "max_steps": spec.warmup + spec.steps,
        "log_every": max(1, spec.warmup),
        "eval_every": None,
        "device": spec.device.type,
    }
    if spec.recipe is not None:
        train = dataclasses.replace(
            spec.recipe.train,
            batch_size=spec.fast_batch,
            eval_at=[],
            save_every=None,
            early_stopping_patience=None,
            report_to=[],
            **length,
        )
        return dataclasses.replace(spec.recipe, train=train)
    return config_from_dict(
        {
            "name": "bench",
            "model": spec.model,
            "budget": None,
            "model_init": "pretrained" if spec.weights else "random",
            "data": {"train_file": "-", "max_length": spec.max_length},
            "head": {"type": "auto"},
            "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": spec.lora_dropout, "targets": ["q", "v"]},
            "train": {
                "lr": sqrt_scaled_lr(spec.lr, spec.fast_batch, REF_BATCH),
                "batch_size": spec.fast_batch,
                "seed": spec.seed,
                **length,
            },
        }
    )


def measure_fast(spec: BenchSpec, data: BenchData) -> Measured:
    device = spec.device
    cfg = fast_config(spec)
    precision = resolve_precision(cfg.train.precision, device)
    rt = Runtime(device, precision)
    torch.manual_seed(spec.seed)
    model = build_model(cfg, data.num_labels, weights=True).to(device)
    trainable = count_trainable(model).trainable
    reset_peak_memory(device)
    fast = prepare_for_training(model, cfg, device, precision, data.pad_id)
    runner = step_runner(model, cfg.train, rt, data.train, data.pad_id, fast.pad_to if fast.compiled else None)
    marks: dict[int, float] = {}

    def log(record: dict) -> None:  # train_loop syncs (float of the loss) before each log call
        if record.get("step") in (spec.warmup, spec.warmup + spec.steps):
            marks[record["step"]] = time.perf_counter()

    train_loop(model, data.train, None, cfg.train, rt, data.pad_id, log, runner=runner)
    out = Measured(
        trainable=trainable,
        train_batch=cfg.train.batch_size,
        precision=precision,
        detail=f"budgetlora {precision}, batch {cfg.train.batch_size}, bucketed, {fast.describe()}",
    )
    out.train_peak_mb = peak_memory_mb(device)
    out.train_samples_per_s = spec.steps * cfg.train.batch_size / (marks[spec.warmup + spec.steps] - marks[spec.warmup])

    rows = data.test.first(spec.predict_rows)
    predict_logits(model, rows.first(64), rt, data.pad_id, cfg.prediction_batch)  # warm-up
    reset_peak_memory(device)
    _sync(device)
    start = time.perf_counter()
    predict_logits(model, rows, rt, data.pad_id, cfg.prediction_batch)
    _sync(device)
    out.predict_samples_per_s = len(rows) / (time.perf_counter() - start)
    out.predict_peak_mb = peak_memory_mb(device)
    del model
    _free(device)
    return out
