"""What the tests share besides fixtures (conftest.py holds those): a tiny random RoBERTa or other
encoder with a tokenizer trained on the fly (no download), synthetic 4-class data whose words
predict the label, the one tiny-config builder, and the resume harness. Imported as `helpers`
(pytest puts tests/ on sys.path)."""

from __future__ import annotations

import copy
import csv
import json
import os
import random
import signal
from pathlib import Path
from typing import Any

import pytest

AG_NEWS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ag_news"

TOPIC_WORDS = {
    0: "war election president minister government treaty troops embassy".split(),
    1: "match goal team season coach player league championship".split(),
    2: "stocks market shares profit earnings investors bank economy".split(),
    3: "software internet computer chip researchers space nasa technology".split(),
}
FILLER = "the a of in on today said new after report week more over".split()


def synthetic_rows(n: int, seed: int = 0) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 4
        words = [rng.choice(TOPIC_WORDS[label]) for _ in range(rng.randint(4, 8))]
        words += [rng.choice(FILLER) for _ in range(rng.randint(1, 12))]
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_csv(path: Path, rows: list[tuple[str, int]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def build_tiny_model(path: Path, seed: int = 0, dropout: float = 0.1) -> Path:
    """A 2-layer, 32-wide RoBERTa and a word-level tokenizer, saved like a hub model directory."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import AutoModelForMaskedLM, PreTrainedTokenizerFast, RobertaConfig

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = [t for t, _ in synthetic_rows(400, seed=123)]
    tokenizer.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=specials))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        cls_token="<s>",
        sep_token="</s>",
        mask_token="<mask>",
    )
    torch.manual_seed(seed)
    config = RobertaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=130,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        type_vocab_size=1,
        initializer_range=0.2,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )  # larger than 0.02 so the CLS token carries the input
    AutoModelForMaskedLM.from_config(config).save_pretrained(str(path))
    fast.save_pretrained(str(path))
    return path


ENCODER_DEFAULTS = {
    "bert": {},
    "deberta-v2": {
        "relative_attention": True,
        "position_buckets": 8,
        "max_relative_positions": -1,
        "pos_att_type": ["p2c", "c2p"],
        "position_biased_input": False,
        "type_vocab_size": 0,
        "share_att_key": True,
        "norm_rel_ebd": "layer_norm",
    },
    "modernbert": {
        "global_attn_every_n_layers": 2,
        "local_attention": 4,
        "bos_token_id": 2,
        "eos_token_id": 3,
        "cls_token_id": 2,
        "sep_token_id": 3,
        "num_hidden_layers": 3,
    },
    "albert": {"embedding_size": 16},
}


def build_tiny_encoder(path: Path, model_type: str, seed: int = 0, **overrides) -> Path:
    """A tiny random encoder of `model_type` (hidden 32, 2 layers) with a word-level tokenizer
    ([PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3), saved like a hub model directory."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import CONFIG_MAPPING, AutoModel, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(
        [t for t, _ in synthetic_rows(400, seed=123)], trainers.WordLevelTrainer(special_tokens=specials)
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    kwargs = dict(
        vocab_size=len(fast),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=130,
        pad_token_id=0,
        initializer_range=0.2,
    )
    kwargs.update(ENCODER_DEFAULTS.get(model_type, {}))
    kwargs.update(overrides)
    torch.manual_seed(seed)
    AutoModel.from_config(CONFIG_MAPPING[model_type](**kwargs)).save_pretrained(str(path))
    fast.save_pretrained(str(path))
    return path


TINY_BASE = {
    "name": "tiny",
    "budget": 1_000_000,
    "data": {"val_size": 40, "max_length": 64},
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q", "v"]},
    "train": {
        "lr": 2e-2,
        "max_steps": 60,
        "batch_size": 16,
        "eval_every": 10,
        "log_every": 5,
        "seed": 0,
        "warmup": 0.0,
    },
}


def tiny_config(model_dir: Path, data: dict[str, Path], **sections: Any) -> dict[str, Any]:
    """The one tiny config: the tiny model on the synthetic data, 60 steps that learn the task
    (test accuracy ~1 with the defaults). `sections` update it per section, e.g.
    `train={"max_steps": 30}`, `lora={"dropout": 0.1}`, `name="x"`."""
    cfg = copy.deepcopy(TINY_BASE)
    cfg["model"] = str(model_dir)
    cfg["data"].update(train_file=str(data["train"]), test_file=str(data["test"]))
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    return cfg


MAX_STEPS = 120  # the resume harness's run length


def metrics(run: Path) -> list[dict]:
    # samples_per_s is wall-clock throughput, the one field that legitimately differs
    return [
        {k: v for k, v in json.loads(line).items() if k != "samples_per_s"}
        for line in (run / "metrics.jsonl").read_text().splitlines()
    ]


def adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def assert_same_run(run: Path, ref: Path) -> None:
    import torch

    got, want = metrics(run), metrics(ref)
    assert [r["step"] for r in got] == [r["step"] for r in want]  # no duplicated or missing lines
    assert got == want  # per-step train loss/acc/lr and every eval: exact float equality
    a, b = adapter(run), adapter(ref)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit-for-bit
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (run, ref))
    for key in ("steps", "best_step", "best_val_acc", "final_train_loss", "final_eval_loss"):
        assert sa[key] == sb[key], key
    assert sa["test"]["correct"] == sb["test"]["correct"]
    assert not list(run.glob(".checkpoint-*")) and not list((run / "checkpoints").glob(".checkpoint-*"))


def interrupt_at(monkeypatch: pytest.MonkeyPatch, step: int, signum: int = signal.SIGINT) -> None:
    """Deliver a real signal to this process from the training display (a metric sink) at `step`."""
    from budgetlora.progress import TrainingDisplay

    real = TrainingDisplay.log

    def log(self, record):
        real(self, record)
        if record["step"] == step and "train_loss" in record:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(TrainingDisplay, "log", log)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----- data of the other tasks: multi-label sets, regression targets, text pairs -----------------

TOPIC_NAMES = ["world", "sports", "business", "tech"]


def multi_label_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Texts whose topic words name their labels (0-3 of the four), labels joined by ','."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        labels = sorted(rng.sample(range(4), rng.choice([0, 1, 1, 2, 2, 3])))
        words = [rng.choice(TOPIC_WORDS[label]) for label in labels for _ in range(3)]
        words += [rng.choice(FILLER) for _ in range(4)]
        rng.shuffle(words)
        rows.append((" ".join(words), ",".join(TOPIC_NAMES[label] for label in labels)))
    return rows


def regression_rows(n: int, seed: int = 0) -> list[tuple[str, float, float]]:
    """Texts scored by how many sports words (target 1) and how many business words (target 2) they hold."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        sports, business = rng.randint(0, 4), rng.randint(0, 4)
        words = [rng.choice(TOPIC_WORDS[1]) for _ in range(sports)] + [
            rng.choice(TOPIC_WORDS[2]) for _ in range(business)
        ]
        words += [rng.choice(FILLER) for _ in range(10 - sports - business)]
        rng.shuffle(words)
        rows.append((" ".join(words), 1.0 + 0.5 * sports, 10.0 - business))
    return rows


def pair_rows(n: int, seed: int = 0) -> list[tuple[str, str, int]]:
    """Two short texts (the first never about sports) and whether the second is about sports (1)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a = rng.choice([0, 2, 3])
        b = 1 if rng.random() < 0.5 else rng.choice([0, 2, 3])
        first = " ".join(rng.choice(TOPIC_WORDS[a]) for _ in range(4))
        second = " ".join(rng.choice(TOPIC_WORDS[b]) for _ in range(4))
        rows.append((first, second, int(b == 1)))
    return rows


def write_rows(path: Path, header: list[str], rows: list) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def task_config(model_dir: Path, train_file: Path, test_file: Path, /, **sections: Any) -> dict[str, Any]:
    """The tiny config on other data: a linear mean-pooled head, 60 steps."""
    cfg = tiny_config(model_dir, {"train": train_file, "test": test_file}, head={"type": "linear", "pooling": "mean"})
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    return cfg
