"""What a user sees and the conveniences they reach for: progress with rate and ETA (plain lines
off a terminal, nothing with --quiet), the truncation report, a test split off one file,
--version, full class names in tables, classify echoing its texts, the pickle refusal before
any model loads."""

from __future__ import annotations

import io
import json
import re

import numpy as np

from budgetlora import __version__
from budgetlora.cli import main
from budgetlora.progress import Console, TrainingDisplay


def test_a_task_off_a_terminal_prints_periodic_status_lines_with_rate_and_eta():
    stream = io.StringIO()
    console = Console(stream=stream, interactive=False, every_s=0.0, quiet_below_s=0.0)
    with console.task("tokenizing train", 100) as task:
        for _ in range(4):
            task.advance(25)
    lines = stream.getvalue().splitlines()
    assert re.fullmatch(r"tokenizing train: 25/100 rows \(25%\), [\d,.]+ rows/s, ETA \d+s", lines[0])
    assert lines[-1].startswith("tokenizing train: 100 rows in ")
    quiet = io.StringIO()
    with Console(enabled=False, stream=quiet).task("x", 10) as task:
        task.advance(10)
    assert quiet.getvalue() == ""


def test_the_training_display_shows_loss_accuracy_lr_rate_and_eta():
    stream = io.StringIO()
    display = TrainingDisplay(Console(stream=stream, interactive=False), total_steps=40)
    display.log({"step": 20, "train_loss": 0.5, "train_acc": 0.8, "lr": 1e-3, "samples_per_s": 31.5})
    display.log({"step": 20, "eval_loss": 0.4, "eval_acc": 0.85})
    first, second = stream.getvalue().splitlines()
    assert re.fullmatch(r"step 20/40  loss 0\.5000  acc 80\.0%  lr 1\.00e-03  samples/s 31\.5  \d+s  ETA \d+s", first)
    assert second == "step 20/40  eval loss 0.4000  eval acc 85.00%"


def test_training_output_off_a_terminal_and_with_quiet(tiny_config, tmp_path, capsys):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    assert main(["train", str(path), "--out", str(tmp_path / "runs")]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(tmp_path / "runs" / "tiny")  # stdout holds the result only
    err = captured.err
    assert "trainable parameters:" in err and re.search(r"step 5/30  loss [\d.]+  acc [\d.]+%  lr ", err)
    assert "ETA" in err and "eval acc" in err and re.search(r"test accuracy [\d.]+% \(95% CI", err)
    assert main(["train", str(path), "--out", str(tmp_path / "runs"), "--quiet", "--name", "q"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.strip().endswith("q")


def test_truncation_is_reported_in_the_log_and_the_summary(tiny_config, tmp_path, capsys):
    from budgetlora.config import config_from_dict
    from budgetlora.recipe import train_run

    tiny_config["data"]["max_length"] = 8
    tiny_config["train"].update(max_steps=2, eval_every=None)
    run = train_run(config_from_dict(tiny_config), tmp_path)
    cut = json.loads((run / "summary.json").read_text())["truncation"]
    assert cut["train"]["max_length"] == 8 and cut["train"]["truncated"] > 0
    assert cut["train"]["p99"] >= cut["train"]["p50"] > 8 and cut["train"]["max"] > 8
    assert re.search(
        r"train: [\d,]+ of 280 rows \([\d.]+%\) cut at data.max_length 8 \(token lengths p50 \d+",
        capsys.readouterr().err,
    )


def test_a_test_split_off_the_training_file_is_seeded_and_stratified(tiny_config, tmp_path):
    from budgetlora.config import config_from_dict
    from budgetlora.data import load_splits

    tiny_config["data"].update(test_file=None, test_size=0.25, val_size=0.1)
    cfg = config_from_dict(tiny_config)
    a, b = load_splits(cfg.data, 0), load_splits(cfg.data, 0)
    assert len(a.test) == 80 and a.test.ids == b.test.ids and len(a.train) + len(a.val) == 240
    assert np.bincount(a.test.labels).tolist() == [20, 20, 20, 20]
    assert not set(a.test.ids) & (set(a.train.ids) | set(a.val.ids))
    assert load_splits(cfg.data, 1).test.ids != a.test.ids  # another seed, another split
    tiny_config["data"]["test_size"] = 30
    assert len(load_splits(config_from_dict(tiny_config).data, 0).test) == 30


def test_version_help_full_class_names_and_classify_echo(trained_run, synthetic_data, tmp_path, capsys):
    assert main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"budgetlora {__version__}"
    assert main(["--help"]) == 0
    assert "Fine-tune a frozen transformer encoder" in capsys.readouterr().out
    assert main(["classify", str(trained_run), "stocks market shares", "match goal team coach"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("\tstocks market shares") and lines[1].endswith("\tmatch goal team coach")
    from budgetlora.evaluate.metrics import classification_metrics, format_metrics

    names = ["World", "Sports", "Business", "Sci/Tech"]
    text = format_metrics(classification_metrics(np.array([0, 1, 2, 3]), np.array([0, 1, 2, 2]), names), names)
    header = text.splitlines()[-5]
    assert "Business" in header and "Sci/Tech" in header


def test_an_untrusted_pickle_is_refused_before_the_model_loads(trained_run, tmp_path, capsys, monkeypatch):
    import pickle

    from budgetlora.artifacts import loading

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the pickle was refused")

    monkeypatch.setattr(loading, "load_trained", never)
    data = tmp_path / "x.pkl"
    data.write_bytes(pickle.dumps({"text": ["a"]}))
    assert main(["predict", str(trained_run), "--data", str(data), "--out", str(tmp_path / "p.csv")]) == 2
    assert "--trust-pickle" in capsys.readouterr().err


def test_old_config_keys_are_read_as_their_new_form():
    from budgetlora.config import config_from_dict

    cfg = config_from_dict({"data": {"train_file": "x", "trust_pickle": True}, "train": {"tensorboard": True}})
    assert cfg.train.report_to == ["tensorboard"] and not hasattr(cfg.data, "trust_pickle")
