"""Shared fixtures: a tiny random RoBERTa with a tokenizer trained on the fly (no download),
synthetic 4-class data whose words predict the label, and paths to the local AG News files."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
from pathlib import Path

import pytest
import yaml

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


ENCODER_DEFAULTS = {
    "bert": {},
    "deberta-v2": {"relative_attention": True, "position_buckets": 8, "max_relative_positions": -1,
                   "pos_att_type": ["p2c", "c2p"], "position_biased_input": False, "type_vocab_size": 0,
                   "share_att_key": True, "norm_rel_ebd": "layer_norm"},
    "modernbert": {"global_attn_every_n_layers": 2, "local_attention": 4, "bos_token_id": 2, "eos_token_id": 3,
                   "cls_token_id": 2, "sep_token_id": 3, "num_hidden_layers": 3},
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
    tokenizer.train_from_iterator([t for t, _ in synthetic_rows(400, seed=123)],
                                  trainers.WordLevelTrainer(special_tokens=specials))
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                             special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    kwargs = dict(vocab_size=len(fast), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=130, pad_token_id=0, initializer_range=0.2)
    kwargs.update(ENCODER_DEFAULTS.get(model_type, {}))
    kwargs.update(overrides)
    torch.manual_seed(seed)
    AutoModel.from_config(CONFIG_MAPPING[model_type](**kwargs)).save_pretrained(str(path))
    fast.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return build_tiny_encoder(tmp_path_factory.mktemp("tiny-bert"), "bert")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-roberta"))


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synthetic")
    return {"train": write_csv(root / "train.csv", synthetic_rows(320, seed=1)),
            "test": write_csv(root / "test.csv", synthetic_rows(120, seed=2))}


def tiny_dict(model_dir, data) -> dict:
    """60 steps of the tiny model on the synthetic data: a run that learns (test accuracy ~1)."""
    return {"name": "tiny", "model": str(model_dir), "budget": 1_000_000,
            "data": {"train_file": str(data["train"]), "test_file": str(data["test"]), "val_size": 40,
                     "max_length": 64},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q", "v"]},
            "train": {"lr": 2e-2, "max_steps": 60, "batch_size": 16, "eval_every": 10, "log_every": 5,
                      "seed": 0, "warmup": 0.0}}


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_model_dir, synthetic_data) -> Path:
    """One finished run shared by the tests that only read it (or write beside it)."""
    from budgetlora.config import config_from_dict
    from budgetlora.recipe import train_run

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BUDGETLORA_CACHE", str(tmp_path_factory.mktemp("trained-run-cache")))
        return train_run(config_from_dict(tiny_dict(tiny_model_dir, synthetic_data)), tmp_path_factory.mktemp("runs"),
                         verbose=False)


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


# ----- the resume harness shared by the checkpoint, optimizer and hardening tests

MAX_STEPS = 120


@pytest.fixture(scope="module")
def _restore_threads():
    import torch

    # the runs set torch's thread count (train.num_threads: 1, for a bit-exact comparison between
    # processes); give the rest of the session its own setting back
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run_config(tiny_model_dir, synthetic_data, tmp_path_factory) -> Path:
    """Dropout on (LoRA and the encoder), so a resume that lost the torch RNG state would diverge;
    a log line per step and a checkpoint every 5 steps; 35 batches per epoch, so most steps are
    mid-epoch."""
    cfg = {
        "name": "tiny", "model": str(tiny_model_dir), "budget": 1_000_000,
        "data": {"train_file": str(synthetic_data["train"]), "test_file": str(synthetic_data["test"]),
                 "val_size": 40, "max_length": 64},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "targets": ["q", "v"]},
        "train": {"lr": 5e-3, "max_steps": MAX_STEPS, "batch_size": 8, "eval_every": 20, "log_every": 1,
                  "seed": 0, "warmup": 0.1, "save_every": 5, "keep_checkpoints": 2, "num_threads": 1,
                  "device": "cpu", "precision": "fp32"},
    }
    path = tmp_path_factory.mktemp("resume-config") / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reference(run_config, tmp_path_factory) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        from budgetlora.config import load_config
        from budgetlora.recipe import train_run

        mp.setenv("BUDGETLORA_CACHE", str(tmp_path_factory.mktemp("ref-cache")))
        return train_run(load_config(run_config), tmp_path_factory.mktemp("ref"), verbose=False)


def metrics(run: Path) -> list[dict]:
    # samples_per_s is wall-clock throughput, the one field that legitimately differs
    return [{k: v for k, v in json.loads(line).items() if k != "samples_per_s"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


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
