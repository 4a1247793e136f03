"""Shared fixtures: a tiny random RoBERTa with a tokenizer trained on the fly (no download),
synthetic 4-class data whose words predict the label, and paths to the local AG News files."""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>", cls_token="<s>",
                                   sep_token="</s>", mask_token="<mask>")
    torch.manual_seed(seed)
    config = RobertaConfig(vocab_size=len(fast), hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64, max_position_embeddings=130,
                           pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1,
                           initializer_range=0.2, hidden_dropout_prob=dropout,
                           attention_probs_dropout_prob=dropout)  # larger than 0.02 so the CLS token carries the input
    AutoModelForMaskedLM.from_config(config).save_pretrained(str(path))
    fast.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-roberta"))


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synthetic")
    return {"train": write_csv(root / "train.csv", synthetic_rows(320, seed=1)),
            "test": write_csv(root / "test.csv", synthetic_rows(120, seed=2))}


@pytest.fixture()
def tiny_config(tiny_model_dir, synthetic_data, tmp_path):
    """A config dict that trains the tiny model for a few steps in seconds."""
    return {
        "name": "tiny", "model": str(tiny_model_dir), "budget": 1_000_000,
        "data": {"train_file": str(synthetic_data["train"]), "test_file": str(synthetic_data["test"]),
                 "val_size": 40, "max_length": 64},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q", "v"]},
        "train": {"lr": 2e-2, "max_steps": 30, "batch_size": 16, "eval_every": 10, "log_every": 5,
                  "seed": 0, "warmup": 0.0},
    }


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Token caches go to the test's tmp dir, never the user's home."""
    monkeypatch.setenv("BUDGETLORA_CACHE", str(tmp_path / "cache"))
