"""The experiment configuration: one dataclass per YAML section, each field with its default,
its help text and its allowed range. This is the one place a key is described: validation
errors, `--help` texts and the README's config table are all made from these fields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

MIN_CLASSES = 2  # a classifier needs two classes at least
MAX_CLASS_NAME = 200  # characters of a class name

TARGET_NAMES = ("q", "k", "v", "qkv", "o", "ffn_in", "ffn_out", "head")
RUN_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"
REPORT_TO = ("tensorboard", "mlflow")
TASKS = ("single_label", "multi_label", "regression")
MAX_TARGETS = 1000  # regression targets (output columns) of one model
DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?|mps"


@dataclass(frozen=True)
class Range:
    """Allowed numeric values (for a list or mapping: of each element)."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False  # low itself is excluded
    high_open: bool = False

    def allows(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))

    def describe(self) -> str:
        def num(x: float) -> str:
            return f"{int(x):,}" if float(x).is_integer() and abs(x) >= GROUPED_FROM else f"{x:g}"

        if self.low is not None and self.high is not None:
            return (
                f"in {'(' if self.low_open else '['}{num(self.low)}, {num(self.high)}{')' if self.high_open else ']'}"
            )
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {num(self.low)}"
        return f"{'<' if self.high_open else '<='} {num(self.high)}" if self.high is not None else "any number"


GROUPED_FROM = 10_000  # numbers from here on are shown with thousands separators in messages
POSITIVE = Range(0, low_open=True)
PROBABILITY = Range(0, 1, high_open=True)
COUNT = Range(1)


def opt(default: Any = None, help: str = "", *, range: Optional[Range] = None, factory: Any = None) -> Any:
    metadata = {"help": help, "range": range}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class PredictionBatch:
    """Length-sorted prediction batches: at most `rows` rows and `tokens` padded tokens each."""

    tokens: int
    rows: int


@dataclass
class DataConfig:
    dataset: Optional[str] = opt(
        None, "hub dataset id (e.g. `ag_news`), with `dataset_config`, `train_split`, `test_split`"
    )
    dataset_config: Optional[str] = opt(None, "hub dataset configuration name")
    train_split: str = opt("train", "hub split to train on")
    test_split: Optional[str] = opt("test", "hub split to test on (`null`: none)")
    train_file: Optional[str] = opt(
        None,
        "local training file: original AG News CSV (no header; class 1-4, title, "
        "description), CSV, TSV, JSONL, parquet, pickle (with `--trust-pickle`)",
    )
    test_file: Optional[str] = opt(None, "local test file, same formats")
    val_file: Optional[str] = opt(
        None, "local validation file (instead of `val_size` rows split off the training rows), same formats"
    )
    format: Literal["auto", "agnews", "csv", "tsv", "jsonl", "parquet", "pickle"] = opt(
        "auto", "file format; auto: from the suffix (a headerless 3-field CSV with classes 1-4 is AG News)"
    )
    text_columns: list[str] = opt(help="text columns, joined with a space", factory=lambda: ["text"])
    text_pair_columns: Optional[list[str]] = opt(
        None,
        "two columns `[a, b]` encoded as the tokenizer's text pair (separator, segment ids where the model "
        "has them; the longer side is cut first), instead of `text_columns`",
    )
    label_column: str = opt(
        "label",
        "label column: class indices 0..C-1 or class names; multi-label: names or ids joined by "
        "`label_separator` (or a JSON list); regression: a number",
    )
    label_columns: list[str] = opt(
        help="several label columns instead of `label_column`: multi-label 0/1 columns (one per class, "
        "named by the column) or regression targets",
        factory=list,
    )
    label_separator: str = opt(",", "multi-label: what joins several labels in one `label_column` cell")
    standardize_targets: bool = opt(
        True, "regression: train on standardised targets (predictions come back in the original units)"
    )
    label_names: Optional[list[str]] = opt(
        None, "class names in index order (else from `classes_file`, the data or the hub features)"
    )
    classes_file: Optional[str] = opt(None, "text file with one class name per line (instead of `label_names`)")
    val_size: float = opt(
        0.1, "seeded stratified validation split off the training rows: fraction (< 1) or row count", range=Range(0)
    )
    test_size: Optional[float] = opt(
        None,
        "seeded stratified test split off the training rows when there is no test file: fraction (< 1) or row count",
        range=Range(0, low_open=True),
    )
    max_length: int = opt(128, "truncation in tokens (at most the model's position limit)", range=Range(8, 1_000_000))
    clean_text: bool = opt(True, "undo AG News artefacts (`#39;`, `&lt;`, `\\$`, backslash line breaks)")
    max_train_rows: Optional[int] = opt(None, "use only the first N training rows (quick runs)", range=COUNT)
    max_test_rows: Optional[int] = opt(None, "use only the first N test rows", range=COUNT)


@dataclass
class HeadConfig:
    type: Literal["auto", "linear"] = opt(
        "auto",
        "`auto`: the model's own classification head (RoBERTa: dense "
        "768→768 + out 768→C); `linear`: pooling + one linear layer",
    )
    pooling: Literal["cls", "mean"] = opt(
        "cls", "for `type: linear`: `cls` or `mean` (attention-masked; right for sentence-embedding models like MiniLM)"
    )
    trainable: bool = opt(True, "train the head fully; with `head` in `lora.targets` it gets LoRA instead")


@dataclass
class LoraSettings:
    r: int = opt(8, "LoRA rank", range=Range(1, 4096))
    alpha: float = opt(
        16.0, "LoRA scaling alpha (the update is scaled by alpha / r)", range=Range(0, 1e6, low_open=True)
    )
    dropout: float = opt(0.1, "LoRA dropout", range=PROBABILITY)
    targets: list[str] = opt(
        help="short names `q, k, v, o, ffn_in, ffn_out, head` (`qkv` where q, k, v are one "
        "fused projection), mapped to exact module "
        "paths per architecture (see the encoder table)",
        factory=lambda: ["q", "v"],
    )
    target_modules: list[str] = opt(
        help="exact module paths to adapt besides `targets` (set `targets: []` to "
        "use only these); any encoder, e.g. one budgetlora has no short names for",
        factory=list,
    )
    layers: Optional[list[int]] = opt(None, "layer indices to adapt (default: all)", range=Range(0))
    bias: Literal["none", "lora_only", "all"] = opt("none", "train biases: none, those of adapted layers, all")
    rank_pattern: dict[str, int] = opt(
        help="per-module rank overrides, PEFT syntax (e.g. "
        '`{"layer.11.attention.self.value": 16}`); every key must match a '
        "target module",
        range=Range(1, 4096),
        factory=dict,
    )
    alpha_pattern: dict[str, float] = opt(
        help="per-module alpha overrides, like `rank_pattern`", range=Range(0, 1e6, low_open=True), factory=dict
    )
    use_rslora: bool = opt(False, "rank-stabilised scaling (alpha / sqrt(r))")
    use_dora: bool = opt(False, "weight-decomposed LoRA (DoRA)")
    dropout_position: Literal["auto", "input", "lowrank"] = opt(
        "auto",
        "`input` (PEFT: dropout on the adapted layer's input) or `lowrank` (dropout on the r features: "
        "no dropped copy of every input kept for backward); auto = lowrank on CUDA, input on CPU",
    )


@dataclass
class TrainConfig:
    lr: float = opt(5e-4, "learning rate", range=Range(0, 10, low_open=True))
    head_lr: Optional[float] = opt(None, "learning rate of the head (default: `lr`)", range=Range(0, 10, low_open=True))
    lora_plus_ratio: Optional[float] = opt(
        None, "LoRA+: learning rate of B = ratio × that of A", range=Range(0, 1000, low_open=True)
    )
    max_steps: Optional[int] = opt(1000, "optimizer steps (`null`: use `epochs`)", range=Range(1, 10**9))
    epochs: Optional[float] = opt(None, "epochs, used when `max_steps` is null", range=Range(0, 10_000, low_open=True))
    batch_size: int = opt(
        16, "global batch size (rows per optimizer step, divided among processes)", range=Range(1, 65536)
    )
    grad_accum: int = opt(1, "micro-batches per optimizer step", range=Range(1, 1024))
    optimizer: Literal["adamw", "rmsprop", "adagrad", "sgd", "muon"] = opt(
        "adamw",
        "`adamw`, `rmsprop`, `adagrad`, `sgd`, `muon` (Muon on the LoRA matrices, AdamW on the rest; "
        "AdamW-matched step size, so AdamW learning rates carry over)",
    )
    momentum: float = opt(0.9, "momentum of sgd, rmsprop and muon", range=PROBABILITY)
    weight_decay: float = opt(0.01, "weight decay (not on biases, norms, DoRA magnitudes)", range=Range(0, 1))
    scheduler: Literal["linear", "cosine", "cosine_with_restarts", "constant"] = opt(
        "linear", "learning-rate schedule after warmup"
    )
    warmup: float = opt(0.06, "warmup: fraction of the steps (< 1) or a step count", range=Range(0))
    num_cycles: int = opt(1, "cycles of `cosine_with_restarts`", range=Range(1, 1000))
    grad_clip: Optional[float] = opt(1.0, "clip the gradient norm to this (`null`: no clipping)", range=POSITIVE)
    label_smoothing: float = opt(0.0, "label smoothing of the cross-entropy loss", range=PROBABILITY)
    loss: Literal["auto", "cross_entropy", "focal", "mse", "huber"] = opt(
        "auto",
        "auto: cross-entropy (single-label), per-label binary cross-entropy (multi-label), mse "
        "(regression); `focal` for imbalanced classes; `huber` for regression with outliers",
    )
    focal_gamma: float = opt(2.0, "`loss: focal`: the focusing exponent (0 is cross-entropy)", range=Range(0, 10))
    class_weights: Union[Literal["none", "balanced"], dict[str, float]] = opt(
        "none",
        "`balanced` (inverse class frequency; multi-label: positives weighted by negatives/positives), or "
        "`{class: weight}` (classes left out weigh 1)",
        range=Range(0, 1e6, low_open=True),
    )
    calibrate: bool = opt(
        True,
        "after training, on the validation split: a temperature for single-label probabilities, per-label "
        "decision thresholds for multi-label (stored in the run and its exports)",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = opt(
        "auto", "auto: bf16 on CUDA when supported and on CPUs where a measured bf16 matmul pays, else fp32"
    )
    device: str = opt("auto", "`auto` (CUDA when available), `cpu`, `cuda`, `cuda:N`, `mps`")
    seed: int = opt(42, "seed of initialisation, data order, dropout and splits", range=Range(0, 2**32 - 1))
    eval_every: Optional[int] = opt(200, "evaluate on the validation split every N steps (and at the end)", range=COUNT)
    eval_at: list[int] = opt(help="further steps to evaluate at (a sweep's pruning rungs)", range=COUNT, factory=list)
    log_every: int = opt(20, "log training loss and accuracy every N steps", range=COUNT)
    early_stopping_patience: Optional[int] = opt(None, "stop after N evaluations without a gain", range=COUNT)
    restore_best: bool = opt(True, "end with the adapter of the best evaluation")
    eval_batch_size: int = opt(
        128, "rows per prediction batch (a token budget of this × max_length)", range=Range(1, 65536)
    )
    save_every: Optional[int] = opt(
        None, "checkpoint every N steps (checkpoints are also written at evaluations)", range=COUNT
    )
    keep_checkpoints: int = opt(2, "newest checkpoints to keep (plus the best)", range=Range(1, 1000))
    num_threads: Optional[int] = opt(None, "CPU threads (default: torch's)", range=Range(1, 4096))
    compile: Union[bool, Literal["auto"]] = opt(
        "auto", "`torch.compile` the backbone with a few fixed padded widths; auto = on CUDA only"
    )
    report_to: list[Literal["tensorboard", "mlflow"]] = opt(
        help="experiment trackers: `tensorboard` (event files in `RUN/tensorboard/`), `mlflow` (params, metrics, "
        "the run directory as artifacts)",
        factory=list,
    )
    mlflow_tracking_uri: Optional[str] = opt(
        None, "MLflow store (default: `$MLFLOW_TRACKING_URI`, else `sqlite:///<out>/mlflow.db`)"
    )
    mlflow_experiment: str = opt("budgetlora", "MLflow experiment name")


@dataclass
class Config:
    name: str = opt("run", "run directory name: letters, digits, `.`, `_`, `-` (one path component)")
    model: str = opt(
        "roberta-base",
        "hub id, local model directory, or `minilm` (the packaged all-MiniLM-L6-v2, `budgetlora[offline]`)",
    )
    model_init: Literal["pretrained", "random"] = opt(
        "pretrained", "`random`: same architecture, random weights (benchmarks)"
    )
    task: Literal["single_label", "multi_label", "regression"] = opt(
        "single_label",
        "`single_label` (one class per text), `multi_label` (any number of classes per text), `regression` "
        "(one or more numbers per text)",
    )
    mode: Literal["lora", "full"] = opt(
        "lora", "`full`: train every parameter with the same loop (the baseline; budget not enforced)"
    )
    budget: Optional[int] = opt(1_000_000, "maximum trainable parameters (`null`: no limit)", range=COUNT)
    data: DataConfig = field(default_factory=DataConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def prediction_batch(self) -> "PredictionBatch":
        """Rows per prediction batch and its token budget (`train.eval_batch_size` x
        `data.max_length`): what evaluation, validation inside the loop and prediction all use."""
        return PredictionBatch(
            tokens=self.train.eval_batch_size * self.data.max_length, rows=self.train.eval_batch_size
        )


SECTIONS = {"data": DataConfig, "head": HeadConfig, "lora": LoraSettings, "train": TrainConfig}


def fields_by_key() -> dict[str, dataclasses.Field]:
    """Every leaf key in dotted form (`train.lr`) with its field, in declaration order."""
    out: dict[str, dataclasses.Field] = {}
    for f in dataclasses.fields(Config):
        if f.name in SECTIONS:
            out.update({f"{f.name}.{sub.name}": sub for sub in dataclasses.fields(SECTIONS[f.name])})
        else:
            out[f.name] = f
    return out


def help_for(key: str) -> str:
    return fields_by_key()[key].metadata.get("help", "")
