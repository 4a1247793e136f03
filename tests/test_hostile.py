"""The hostile user: bad input, misuse and faults against the CLI, in-process on the tiny model.

Every case must end in exit code 2 with exactly one `budgetlora: error:` line (a multi-line error
indents its continuation lines), no traceback, and a sandbox whose every file and directory
(content hash and mode) is unchanged outside the paths the case may touch, which for a failure is
none: a failed command leaves no run directory, no half-written file, no deleted user file.
"""

from __future__ import annotations

import errno
import json
import re
import hashlib
import os
import shutil
import stat
from pathlib import Path

import pytest
import yaml

from budgetlora.cli import main


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root: (kind, mode, content hash) by relative path."""
    out = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        if stat.S_ISREG(info.st_mode):
            out[str(path.relative_to(root))] = (
                "file",
                stat.S_IMODE(info.st_mode),
                hashlib.sha256(path.read_bytes()).hexdigest(),
            )
        else:
            out[str(path.relative_to(root))] = (
                "dir" if stat.S_ISDIR(info.st_mode) else "other",
                stat.S_IMODE(info.st_mode),
                None,
            )
    return out


@pytest.fixture(scope="module")
def base_sandbox(tmp_path_factory, tiny_model_dir, synthetic_data) -> Path:
    """A user's directory: data, a precious folder, a finished run, a valid config."""
    from budgetlora.config import config_from_dict
    from budgetlora.recipe import train_run

    root = tmp_path_factory.mktemp("sandbox")
    data = root / "data"
    data.mkdir()
    shutil.copy(synthetic_data["train"], data / "train.csv")
    shutil.copy(synthetic_data["test"], data / "test.csv")
    (data / "classes.txt").write_text("World\nSports\nBusiness\nSci/Tech\n")
    (root / "precious" / "sub").mkdir(parents=True)
    (root / "precious" / "notes.txt").write_text("a week of experiments\n")
    (root / "precious" / "sub" / "results.csv").write_text("ID,Label\n1,2\n")
    config = {
        "name": "tiny",
        "model": str(tiny_model_dir),
        "budget": 1_000_000,
        "data": {
            "train_file": str(data / "train.csv"),
            "test_file": str(data / "test.csv"),
            "val_size": 40,
            "max_length": 64,
        },
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q", "v"]},
        "train": {
            "lr": 2e-2,
            "max_steps": 4,
            "batch_size": 16,
            "eval_every": 2,
            "log_every": 2,
            "seed": 0,
            "warmup": 0.0,
            "device": "cpu",
        },
    }
    (root / "cfg.yaml").write_text(yaml.safe_dump(config))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BUDGETLORA_CACHE", str(tmp_path_factory.mktemp("sandbox-cache")))
        train_run(config_from_dict(config), root / "runs", verbose=False)
    return root


@pytest.fixture()
def sandbox(base_sandbox, tmp_path) -> Path:
    root = tmp_path / "sandbox"
    shutil.copytree(base_sandbox, root, symlinks=True)
    # the copied config points at the copied data
    raw = yaml.safe_load((root / "cfg.yaml").read_text())
    raw["data"].update(train_file=str(root / "data" / "train.csv"), test_file=str(root / "data" / "test.csv"))
    (root / "cfg.yaml").write_text(yaml.safe_dump(raw))
    return root


def expect_refusal(sandbox: Path, capsys, argv: list[str], message: str = "", allowed: tuple[str, ...] = ()) -> str:
    before = snapshot(sandbox)
    code = main([a.replace("{sb}", str(sandbox)) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err[-2000:])
    assert "Traceback" not in err
    errors = [line for line in lines if line.startswith("budgetlora: error:")]
    assert len(errors) == 1 and all(line.startswith("  ") for line in lines[lines.index(errors[0]) + 1 :]), err
    assert message.replace("{sb}", str(sandbox)) in err, err
    after = snapshot(sandbox)
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert {k for k in changed if not k.startswith(allowed)} == set() if allowed else not changed, sorted(changed)[:10]
    return err


TRAIN = ["train", "{sb}/cfg.yaml", "--out", "{sb}/runs", "--quiet"]

# ----- 1. every key gets its type and its range, checked before any work --------------------------

CONFIG_CASES = [
    ("train.grad_clip=-1", "'train.grad_clip': got -1.0, must be > 0"),
    ("train.grad_clip=0", "'train.grad_clip': got 0.0, must be > 0"),
    ("train.head_lr=-1", "'train.head_lr': got -1.0"),
    ("train.lr=.inf", "'train.lr': got inf, must be a finite number"),
    ("train.lr=.nan", "must be a finite number"),
    ("train.lr=0", "'train.lr': got 0.0, must be in (0, 10]"),
    ("train.lr=1e6", "'train.lr': got 1000000.0"),
    ("lora.alpha=0", "'lora.alpha': got 0.0"),
    ("lora.alpha=-4", "'lora.alpha': got -4.0"),
    ("train.weight_decay=-0.1", "'train.weight_decay': got -0.1, must be in [0, 1]"),
    ("train.lora_plus_ratio=-2", "'train.lora_plus_ratio': got -2.0"),
    ("train.lora_plus_ratio=0", "'train.lora_plus_ratio': got 0.0"),
    ("train.epochs=-1", "'train.epochs': got -1.0"),
    ("train.epochs=0", "'train.epochs': got 0.0"),
    ("data.max_train_rows=-5", "'data.max_train_rows': got -5, must be >= 1"),
    ("data.max_train_rows=0", "'data.max_train_rows': got 0"),
    ("data.max_test_rows=-1", "'data.max_test_rows': got -1"),
    ("train.warmup=2000", "'train.warmup': 2000 warmup steps is not shorter than the 4 steps"),
    ("train.warmup=4", "'train.warmup': 4 warmup steps is not shorter than the 4 steps"),
    ("train.warmup=1.5", "'train.warmup': got 1.5: a fraction (< 1) or a whole number"),
    ("train.warmup=-1", "'train.warmup': got -1.0, must be >= 0"),
    ("lora.rank_pattern={nope: 4}", "'lora.rank_pattern': 'nope' matches none of the adapted modules"),
    (
        "lora.alpha_pattern={layer.9.attention.self.value: 4}",
        "'lora.alpha_pattern': 'layer.9.attention.self.value' matches none",
    ),
    ("lora.rank_pattern={layer.0.attention.self.value: 0}", "must be in [1, 4096]"),
    ("lora.rank_pattern={layer.0.attention.self.value: -3}", "must be in [1, 4096]"),
    ("lora.rank_pattern={'[': 4}", "is not a valid pattern"),
    ("train.num_threads=-1", "'train.num_threads': got -1"),
    ("train.num_threads=0", "'train.num_threads': got 0"),
    ("train.device=bogus", "'train.device': 'bogus': expected auto, cpu, cuda, cuda:N or mps"),
    ("train.device=cuda:x", "'train.device'"),
    ("train.momentum=-1", "'train.momentum': got -1.0, must be in [0, 1)"),
    ("train.momentum=1", "'train.momentum': got 1.0"),
    ("lora.dropout=1", "'lora.dropout': got 1.0, must be in [0, 1)"),
    ("lora.dropout=-0.1", "'lora.dropout': got -0.1"),
    ("train.label_smoothing=1", "'train.label_smoothing': got 1.0"),
    ("train.batch_size=0", "'train.batch_size': got 0"),
    ("train.batch_size=10000000", "'train.batch_size': got 10000000"),
    ("train.grad_accum=0", "'train.grad_accum': got 0"),
    ("train.eval_every=0", "'train.eval_every': got 0"),
    ("train.log_every=0", "'train.log_every': got 0"),
    ("train.keep_checkpoints=0", "'train.keep_checkpoints': got 0"),
    ("train.save_every=-5", "'train.save_every': got -5"),
    ("train.seed=-1", "'train.seed': got -1"),
    ("train.seed=1.5", "'train.seed': got 1.5, expected an integer"),
    ("train.max_steps=0", "'train.max_steps': got 0"),
    ("train.max_steps=null", "'train.max_steps': set max_steps or epochs"),
    ("train.eval_batch_size=0", "'train.eval_batch_size': got 0"),
    ("train.num_cycles=0", "'train.num_cycles': got 0"),
    ("train.early_stopping_patience=0", "'train.early_stopping_patience': got 0"),
    ("data.max_length=7", "'data.max_length': got 7"),
    ("data.max_length=129", "'data.max_length': 129 is longer than model"),
    ("data.max_length=100000", "is longer than model"),
    ("data.val_size=-1", "'data.val_size': got -1.0"),
    ("data.val_size=1.5", "'data.val_size': got 1.5: a fraction"),
    ("data.val_size=1000000", "'data.val_size': 1e+06 leaves no training rows"),
    ("data.test_size=0.2", "'data.test_size': splits a test set off the training rows; the config already has"),
    ("data.test_size=-1", "'data.test_size': got -1.0"),
    ("budget=0", "'budget': got 0"),
    ("budget=100", "exceed the budget of 100"),
    ("lora.r=0", "'lora.r': got 0"),
    ("lora.r=5000", "'lora.r': got 5000"),
    ("lora.r=four", "'lora.r': got 'four', expected an integer"),
    ("lora.r=true", "'lora.r': got True, expected an integer"),
    ("lora.layers=[-1]", "'lora.layers[0]': got -1"),
    ("lora.layers=[9]", "'lora.layers': [9] outside 0..1"),
    ("lora.layers=[0, 0]", "'lora.layers': lists a value twice"),
    ("lora.layers=[]", "'lora.layers': is empty, which adapts no layer"),
    ("lora.targets=[q", "the value is not valid YAML"),
    ("model=", "config key 'model' is empty"),
    ("model=/nonexistent/model", "model path /nonexistent/model does not exist"),
    ("lora.targets=[]", "'lora.targets': must name at least one module"),
    ("lora.targets=[query]", "unknown target(s) ['query']"),
    ("lora.targets=[q, q]", "'lora.targets': lists a value twice"),
    ("lora.targets=[qkv]", "['qkv'] do not exist in"),
    ("lora.target_modules=[nope.dense]", "'lora.target_modules': 'nope.dense' is not a Linear module"),
    ("lora.target_modules=['']", "'lora.target_modules': holds an empty module path"),
    ("lora.bias=some", "'lora.bias': got 'some'"),
    ("lora.use_dora=maybe", "'lora.use_dora': got 'maybe', expected true/false"),
    ("lora.dropout_position=middle", "'lora.dropout_position'"),
    ("train.optimizer=adam", "'train.optimizer': got 'adam'"),
    ("train.scheduler=step", "'train.scheduler': got 'step'"),
    ("train.precision=fp64", "'train.precision': got 'fp64'"),
    ("train.compile=sometimes", "'train.compile': got 'sometimes'"),
    ("train.report_to=[wandb]", "'train.report_to[0]': got 'wandb'"),
    ("head.type=mlp", "'head.type': got 'mlp'"),
    ("head.pooling=max", "'head.pooling': got 'max'"),
    ("mode=partial", "'mode': got 'partial'"),
    ("model_init=zeros", "'model_init': got 'zeros'"),
    ("data.format=xml", "'data.format': got 'xml'"),
    ("data.text_columns=[]", "'data.text_columns': must name at least one column"),
    ("data.text_columns=[text, text]", "'data.text_columns': lists a value twice"),
    ("data.label_names=[a]", "'data.label_names': needs at least two class names"),
    ("data.label_names=[a, a]", "'data.label_names': lists a class twice"),
    ("data.label_names=['', b]", "class names must be non-empty printable strings"),
    (
        "data.classes_file={sb}/data/classes.txt",
        "'data.classes_file': set data.label_names or data.classes_file, not both",
    ),
    ("data.dataset=ag_news", "set data.train_file or data.dataset, not both"),
    ("train.learning_rate=0.1", "unknown config key 'train.learning_rate' (did you mean"),
    ("lora.rank=4", "unknown config key 'lora.rank' (did you mean r"),
    ("optimizer=adamw", "unknown config key 'optimizer'"),
    ("train=3", "config key 'train' must be a mapping"),
    ("train..lr=1", "empty part in the dotted name"),
    ("lr", "expected KEY=VALUE"),
]


@pytest.mark.parametrize("item, message", CONFIG_CASES, ids=[c[0][:40] for c in CONFIG_CASES])
def test_nonsense_config_values_are_refused_before_any_work(sandbox, capsys, item, message):
    extra = ["--set", "data.label_names=[World, Sports, Business, Sci/Tech]"] if "classes_file" in item else []
    expect_refusal(sandbox, capsys, TRAIN + extra + ["--set", item], message)


# ----- 2. names and places: the run lives under --out and nowhere else ----------------------------

NAME_CASES = [
    ("..", "is not a run name"),
    (".", "is not a run name"),
    ("/abs/dir", "is not a run name"),
    ("../../x", "is not a run name"),
    ("a/b", "is not a run name"),
    ("", "is not a run name"),
    (".hidden", "is not a run name"),
    ("x" * 101, "is not a run name"),
    ("with space", "is not a run name"),
    ("naïve", "is not a run name"),
    ("-dash", "is not a run name"),
]


@pytest.mark.parametrize("name, message", NAME_CASES, ids=[repr(c[0])[:20] for c in NAME_CASES])
def test_a_run_name_is_one_path_component(sandbox, capsys, name, message):
    expect_refusal(sandbox, capsys, TRAIN + [f"--name={name}", "--overwrite"], message)


def test_overwrite_replaces_only_a_run(sandbox, capsys):
    expect_refusal(
        sandbox,
        capsys,
        ["train", "{sb}/cfg.yaml", "--out", "{sb}", "--name", "precious", "--overwrite", "--quiet"],
        "{sb}/precious is not a budgetlora run directory; budgetlora will not --overwrite it",
    )
    (sandbox / "afile").write_text("x")
    expect_refusal(
        sandbox,
        capsys,
        ["train", "{sb}/cfg.yaml", "--out", "{sb}", "--name", "afile", "--overwrite", "--quiet"],
        "afile is not a budgetlora run directory",
    )


def test_a_failing_overwrite_leaves_the_old_run_whole(sandbox, capsys):
    expect_refusal(
        sandbox, capsys, TRAIN + ["--overwrite", "--set", "data.test_file={sb}/data/missing.csv"], "data file not found"
    )


def test_out_under_a_regular_file_is_one_error_naming_the_users_path(sandbox, capsys):
    expect_refusal(
        sandbox,
        capsys,
        ["train", "{sb}/cfg.yaml", "--out", "{sb}/precious/notes.txt/runs", "--quiet"],
        "cannot create the run directory under {sb}/precious/notes.txt/runs",
    )


# ----- 3. unbounded or wrong kinds of input -----------------------------------------------------------


@pytest.fixture()
def fifo(sandbox) -> Path:
    path = sandbox / "data" / "pipe.csv"
    os.mkfifo(path)
    return path


DATA_PATH_CASES = [
    ("/dev/zero", "/dev/zero is not a regular file"),
    ("/dev/urandom", "/dev/urandom is not a regular file"),
    ("{sb}/data", "is a directory, expected a data file"),
    ("{sb}/data/missing.csv", "data file not found"),
    ("{sb}/data/pipe.csv", "is not a regular file (a device, pipe or socket)"),
]


@pytest.mark.parametrize("path, message", DATA_PATH_CASES, ids=[c[0] for c in DATA_PATH_CASES])
@pytest.mark.parametrize("key", ["data.train_file", "data.test_file"])
def test_data_files_must_be_regular_files(sandbox, capsys, fifo, path, message, key):
    expect_refusal(sandbox, capsys, TRAIN + ["--set", f"{key}={path}"], message)


@pytest.mark.parametrize("path, message", DATA_PATH_CASES, ids=[c[0] for c in DATA_PATH_CASES])
@pytest.mark.parametrize("command", ["predict", "eval"])
def test_prediction_data_must_be_regular_files(sandbox, capsys, fifo, path, message, command):
    out = ["--out", "{sb}/p.csv"] if command == "predict" else ["--json", "{sb}/m.json"]
    expect_refusal(sandbox, capsys, [command, "{sb}/runs/tiny", "--data", path, "--quiet"] + out, message)


CLASSES_CASES = [
    ("/dev/zero", "is not a regular file"),
    ("{sb}/data", "is a directory"),
    ("{sb}/data/nope.txt", "classes file not found"),
    ("/etc/passwd", "classes have no training rows"),
    ("{sb}/data/binary.txt", "not a UTF-8 text file"),
    ("{sb}/data/one.txt", "expected two or more distinct class names"),
    ("{sb}/data/dupes.txt", "distinct class names"),
    ("{sb}/data/long.txt", "is not a class name"),
    ("{sb}/data/huge.txt", "over 1 MiB"),
    ("{sb}/data/empty.txt", "the file is empty (0 bytes)"),
]


@pytest.mark.parametrize("path, message", CLASSES_CASES, ids=[c[0] for c in CLASSES_CASES])
def test_a_classes_file_is_a_small_list_of_names(sandbox, capsys, path, message):
    data = sandbox / "data"
    (data / "binary.txt").write_bytes(b"\xff\xfe\x00World\n\x80Sports\n")
    (data / "one.txt").write_text("World\n")
    (data / "dupes.txt").write_text("World\nWorld\n")
    (data / "long.txt").write_text("World\n" + "x" * 300 + "\n")
    (data / "huge.txt").write_text("name\n" * 300_000)
    (data / "empty.txt").write_text("")
    expect_refusal(sandbox, capsys, TRAIN + ["--set", f"data.classes_file={path}"], message)


CONFIG_FILE_CASES = [
    ("/dev/zero", "is not a regular file"),
    ("{sb}/data", "is not a regular file"),
    ("{sb}/missing.yaml", "config file not found"),
    ("{sb}/list.yaml", "the top level must be a mapping"),
    ("{sb}/bad.yaml", "invalid YAML"),
    ("{sb}/binary.yaml", "not a UTF-8 text file"),
    ("{sb}/huge.yaml", "larger than 1 MiB"),
]


@pytest.mark.parametrize("path, message", CONFIG_FILE_CASES, ids=[c[0] for c in CONFIG_FILE_CASES])
def test_config_files_are_small_yaml_mappings(sandbox, capsys, path, message):
    (sandbox / "list.yaml").write_text("- a\n- b\n")
    (sandbox / "bad.yaml").write_text("name: [unclosed\n")
    (sandbox / "binary.yaml").write_bytes(b"name: \xff\xfe\n")
    (sandbox / "huge.yaml").write_text("# " + "x" * (1 << 20) + "\n")
    expect_refusal(sandbox, capsys, ["train", path, "--out", "{sb}/runs", "--quiet"], message)


# ----- 4. labels ----------------------------------------------------------------------------------------

LABEL_FILES = {
    "only3.csv": ("text,label\nmatch goal team,3\nstocks market,3\n", "classes have no training rows (0, 1, 2)"),
    "onerow.csv": ("text,label\nmatch goal team,3\n", "classes have no training rows"),
    "gap.csv": (
        "text,label\n" + "".join(f"row {i},{2 * (i % 2)}\n" for i in range(20)),
        "1 of 3 classes have no training rows",
    ),
    "one.csv": ("text,label\nmatch,0\ngoal,0\n", "only one class"),
    "float.csv": ("text,label\nmatch,1.5\ngoal,0\n", "label '1.5' is not a class index or class name"),
    "mixed.csv": ("text,label\nmatch,1\ngoal,sports\n", "mixes names with integer labels"),
    "negative.csv": ("text,label\nmatch,-1\ngoal,0\n", "negative label"),
    "huge.csv": ("text,label\nmatch,99999999\ngoal,0\n", "too large for a class index"),
    "empty_label.csv": ("text,label\nmatch,\ngoal,0\n", "is not a class index or class name"),
    "no_label.csv": ("text,other\nmatch,1\n", "no label column 'label'"),
    "empty_text.csv": ("text,label\n  ,1\ngoal,0\n", "empty text"),
    "quote.csv": (
        "text,label\n"
        + "".join(f"row {i},{i % 4}\n" for i in range(29))
        + '"unclosed,1\n'
        + "".join(f"row {i},{i % 4}\n" for i in range(29)),
        "line 31: malformed row",
    ),
    "fields.csv": ("text,label\nmatch,1,extra\n", "line 2: expected 2 fields"),
    "nul.csv": ("text,label\nma\x00tch,1\n", "contains a NUL byte"),
    "latin1.csv": (b"text,label\ncaf\xe9,1\ngoal,0\n", "line 2: not valid UTF-8 text"),
}


@pytest.mark.parametrize("name", sorted(LABEL_FILES))
def test_labels_and_rows_that_cannot_train_a_classifier(sandbox, capsys, name):
    content, message = LABEL_FILES[name]
    path = sandbox / "data" / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    expect_refusal(sandbox, capsys, TRAIN + ["--set", f"data.train_file={path}", "--set", "data.val_size=0"], message)


def test_too_many_label_names_for_the_data(sandbox, capsys):
    expect_refusal(
        sandbox,
        capsys,
        TRAIN + ["--set", "data.label_names=[a, b, c, d, e]"],
        "1 of 5 classes have no training rows (e)",
    )


# ----- 5. trust: only the command line lets a pickle load --------------------------------------------


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/budgetlora-pickle-ran",))


@pytest.fixture()
def evil_pickle(sandbox) -> Path:
    import pickle

    Path("/tmp/budgetlora-pickle-ran").unlink(missing_ok=True)
    path = sandbox / "data" / "evil.pkl"
    path.write_bytes(pickle.dumps(_Payload()))
    return path


def _assert_not_run() -> None:
    assert not Path("/tmp/budgetlora-pickle-ran").exists()


def test_a_config_file_cannot_grant_trust(sandbox, capsys, evil_pickle):
    raw = yaml.safe_load((sandbox / "cfg.yaml").read_text())
    raw["data"].update(trust_pickle=True, train_file=str(evil_pickle))
    (sandbox / "evil.yaml").write_text(yaml.safe_dump(raw))
    expect_refusal(
        sandbox,
        capsys,
        ["train", "{sb}/evil.yaml", "--out", "{sb}/runs", "--quiet"],
        "pass --trust-pickle (trust comes from the command line",
    )
    _assert_not_run()


def test_a_runs_saved_config_cannot_grant_trust(sandbox, capsys, evil_pickle):
    config = sandbox / "runs" / "tiny" / "config.yaml"
    raw = yaml.safe_load(config.read_text())
    raw["data"]["trust_pickle"] = True
    config.write_text(yaml.safe_dump(raw))
    for command in (["predict", "--out", "{sb}/p.csv"], ["eval", "--json", "{sb}/m.json"]):
        expect_refusal(
            sandbox, capsys, [command[0], "{sb}/runs/tiny", "--data", str(evil_pickle)] + command[1:], "--trust-pickle"
        )
    _assert_not_run()


@pytest.mark.parametrize("fmt", ["pickle", "auto"])
def test_a_pickle_under_another_name_or_format_is_still_refused(sandbox, capsys, evil_pickle, fmt):
    disguised = sandbox / "data" / "disguised.pkl"
    shutil.copy(evil_pickle, disguised)
    target = disguised if fmt == "auto" else sandbox / "data" / "train.csv"
    expect_refusal(
        sandbox,
        capsys,
        ["predict", "{sb}/runs/tiny", "--data", str(target), "--format", fmt, "--out", "{sb}/p.csv"],
        "--trust-pickle",
    )
    _assert_not_run()


def test_an_adapter_saved_only_as_a_torch_pickle_is_refused(sandbox, capsys):
    adapter = sandbox / "runs" / "tiny" / "adapter"
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    expect_refusal(
        sandbox,
        capsys,
        ["classify", "{sb}/runs/tiny", "match goal"],
        "adapter_model.bin is a torch pickle; budgetlora loads weights only from safetensors",
    )


# ----- 6. damaged artifacts: one line, never a traceback, never a silent half-load ---------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(8, path.stat().st_size // 3)])


def _garble(path: Path) -> None:
    path.write_bytes(b"\x00garbage" * 64)


DAMAGE = {
    "truncated adapter": (
        lambda run: _truncate(run / "adapter" / "adapter_model.safetensors"),
        "not a readable safetensors",
    ),
    "garbage adapter": (
        lambda run: _garble(run / "adapter" / "adapter_model.safetensors"),
        "not a readable safetensors",
    ),
    "no adapter weights": (lambda run: (run / "adapter" / "adapter_model.safetensors").unlink(), "is missing"),
    "labels not json": (lambda run: (run / "labels.json").write_text("{names"), "labels.json: not valid JSON"),
    "labels wrong shape": (lambda run: (run / "labels.json").write_text('{"names": "World"}'), "names is not a list"),
    "labels one name": (lambda run: (run / "labels.json").write_text('{"names": ["a"]}'), "2 or more distinct"),
    "labels duplicate": (
        lambda run: (run / "labels.json").write_text('{"names": ["a", "a", "b", "c"]}'),
        "2 or more distinct",
    ),
    "labels more than the head": (
        lambda run: (run / "labels.json").write_text('{"names": ["a", "b", "c", "d", "e"]}'),
        "decisions for a single_label model with 4 outputs, but the run is single_label with 5",
    ),
    "labels missing": (lambda run: (run / "labels.json").unlink(), "labels.json is missing"),
    "config garbage": (lambda run: (run / "config.yaml").write_text("name: [oops\n"), "invalid YAML"),
    "config wrong values": (
        lambda run: (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("r: 4", "r: -4")),
        "'lora.r': got -4",
    ),
    "config missing": (lambda run: (run / "config.yaml").unlink(), "neither a budgetlora run"),
    "config max_length too long": (
        lambda run: (run / "config.yaml").write_text(
            (run / "config.yaml").read_text().replace("max_length: 64", "max_length: 5000")
        ),
        "is longer than model",
    ),
    "tokenizer garbage": (
        lambda run: (run / "tokenizer" / "tokenizer.json").write_text("{"),
        "cannot load a tokenizer",
    ),
    "adapter of another model": (lambda run: _other_adapter(run), "the weights do not belong to this model"),
    "adapter values NaN": (lambda run: _nan_adapter(run), "holds NaN or infinite values"),
}


def _nan_adapter(run: Path) -> None:
    """Still a valid safetensors file: only its values are damaged."""
    from safetensors.torch import load_file, save_file

    path = run / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    first = sorted(tensors)[0]
    tensors[first] = tensors[first].clone().fill_(float("nan"))
    save_file(tensors, str(path))


def _other_adapter(run: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file(
        {"base_model.model.nothing.lora_A.weight": torch.zeros(2, 2)},
        str(run / "adapter" / "adapter_model.safetensors"),
    )


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("command", ["classify", "predict", "export"])
def test_damaged_runs_are_one_error(sandbox, capsys, damage, command):
    run = sandbox / "runs" / "tiny"
    corrupt, message = DAMAGE[damage]
    corrupt(run)
    argv = {
        "classify": ["classify", str(run), "match goal"],
        "predict": ["predict", str(run), "--data", "{sb}/data/test.csv", "--out", "{sb}/p.csv"],
        "export": ["export", str(run), "--merged", "{sb}/export"],
    }[command]
    expect_refusal(sandbox, capsys, argv, message)


def test_a_full_mode_weights_file_of_another_model_is_refused(sandbox, capsys, tiny_model_dir):
    import torch
    from safetensors.torch import save_file

    from budgetlora.config import config_from_dict
    from budgetlora.recipe import train_run

    raw = yaml.safe_load((sandbox / "cfg.yaml").read_text())
    raw.update(mode="full", budget=None, name="full")
    run = train_run(config_from_dict(raw), sandbox / "runs", verbose=False)
    save_file({"unrelated.weight": torch.zeros(3)}, str(run / "model" / "model.safetensors"))
    expect_refusal(sandbox, capsys, ["classify", str(run), "match goal"], "the weights do not belong to this model")


def test_damaged_checkpoints_and_results_inputs(sandbox, capsys):
    from budgetlora.training.checkpoint import complete_checkpoints

    run = sandbox / "runs" / "tiny"
    for checkpoint in complete_checkpoints(run):
        (checkpoint / "state.json").write_text("{")
    (run / "summary.json").unlink()
    expect_refusal(
        sandbox,
        capsys,
        ["train", "--resume", str(run), "--quiet"],
        "checkpoint(s) loads (each is damaged",
        allowed=("runs/tiny",),
    )
    (run / "summary.json").write_text("{not json")
    expect_refusal(sandbox, capsys, ["results", "{sb}/runs"], "summary.json: not valid JSON")
    expect_refusal(sandbox, capsys, ["report", "{sb}/runs"], "summary.json: not valid JSON")


# ----- 7. exports go into new or empty directories, never into or over a run ---------------------------

EXPORT_TARGETS = [
    (["--merged", "{sb}/runs/tiny"], "is the run, holds it or is inside a run directory"),
    (["--merged", "{sb}/runs/tiny/adapter"], "is the run, holds it or is inside a run directory"),
    (["--merged", "{sb}/runs"], "is the run, holds it or is inside a run directory"),
    (["--merged", "{sb}"], "is the run, holds it or is inside a run directory"),
    (["--merged", "{sb}/precious"], "is not empty and is not a budgetlora export"),
    (["--merged", "{sb}/precious", "--overwrite"], "is not empty and is not a budgetlora export"),
    (["--merged", "{sb}/precious/notes.txt"], "exists and is not a directory"),
    (["--onnx", "{sb}/runs/tiny"], "is the run, holds it or is inside a run directory"),
    (["--onnx", "{sb}/precious"], "is not empty and is not a budgetlora export"),
    (["--int8", "--merged", "{sb}/x"], "--int8 applies to --onnx exports"),
]


@pytest.mark.parametrize("target, message", EXPORT_TARGETS, ids=[" ".join(c[0]) for c in EXPORT_TARGETS])
def test_export_targets(sandbox, capsys, target, message):
    expect_refusal(sandbox, capsys, ["export", "{sb}/runs/tiny"] + target, message)


def test_an_earlier_export_is_replaced_only_with_overwrite(sandbox, capsys):
    assert main(["export", str(sandbox / "runs" / "tiny"), "--merged", str(sandbox / "export")]) == 0
    capsys.readouterr()
    expect_refusal(
        sandbox,
        capsys,
        ["export", "{sb}/runs/tiny", "--merged", "{sb}/export"],
        "holds an earlier export; pass --overwrite",
    )
    assert main(["export", str(sandbox / "runs" / "tiny"), "--merged", str(sandbox / "export"), "--overwrite"]) == 0


def test_a_full_disk_during_export_leaves_nothing(sandbox, capsys, monkeypatch):
    from budgetlora.artifacts import export

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "save_tensors", full)
    monkeypatch.setattr(
        export.AutoModelForSequenceClassification if hasattr(export, "AutoModelForSequenceClassification") else export,
        "__doc__",
        export.__doc__,
    )
    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    expect_refusal(
        sandbox,
        capsys,
        ["export", "{sb}/runs/tiny", "--merged", "{sb}/export"],
        "cannot write {sb}/export: No space left on device",
    )


# ----- 8. one writer per run --------------------------------------------------------------------------


def test_a_second_writer_fails_at_once_naming_the_holder(sandbox, capsys):
    from budgetlora.artifacts.placement import RunLock

    run = sandbox / "runs" / "tiny"
    (run / "summary.json").unlink()  # resumable again
    with RunLock(run, "train into it"):
        expect_refusal(
            sandbox,
            capsys,
            ["train", "--resume", str(run), "--quiet"],
            f"is in use by process {os.getpid()}",
            allowed=("runs/tiny/.lock",),
        )
        expect_refusal(
            sandbox,
            capsys,
            TRAIN + ["--overwrite"],
            f"is in use by process {os.getpid()}",
            allowed=("runs/tiny/.lock",),
        )


# ----- 9. outputs and messages --------------------------------------------------------------------------

OUTPUT_CASES = [
    (["predict", "{sb}/runs/tiny", "--data", "{sb}/data/test.csv", "--out", "{sb}/precious"], "is a directory"),
    (
        ["predict", "{sb}/runs/tiny", "--data", "{sb}/data/test.csv", "--out", "{sb}/precious/notes.txt/p.csv"],
        "cannot write {sb}/precious/notes.txt/p.csv",
    ),
    (
        ["eval", "{sb}/runs/tiny", "--data", "{sb}/data/test.csv", "--json", "{sb}/precious/notes.txt/m.json"],
        "cannot write {sb}/precious/notes.txt/m.json",
    ),
    (
        ["predict", "{sb}/runs/tiny", "--data", "{sb}/data/test.csv", "--out", "{sb}/p.csv", "--format", "xml"],
        "argument --format: invalid choice: 'xml'",
    ),
    (
        ["predict", "{sb}/runs/tiny", "--data", "{sb}/data/test.csv", "--out", "{sb}/p.csv", "--backend", "tf"],
        "argument --backend: invalid choice",
    ),
    (["predict", "{sb}/runs/tiny", "--data", "{sb}/data/test.csv"], "the following arguments are required: --out"),
    (
        ["predict", "{sb}/precious", "--data", "{sb}/data/test.csv", "--out", "{sb}/p.csv"],
        "is neither a budgetlora run",
    ),
    (
        ["predict", "{sb}/runs/tiny", "--data", "{sb}/data/test.csv", "--out", "{sb}/p.csv", "--text-columns", "nope"],
        "no text column 'nope'",
    ),
    (["eval", "{sb}/runs/tiny", "--data", "{sb}/data/unlabeled.csv", "--json", "{sb}/m.json"], "no label column"),
    (["classify", "{sb}/runs/tiny", " "], "empty text"),
    (["bogus"], "argument COMMAND: invalid choice: 'bogus'"),
    (["train"], "train needs a config file"),
    (["train", "{sb}/cfg.yaml", "--resume", "{sb}/runs/tiny"], "not both"),
    (["train", "--resume", "{sb}/nope"], "run directory not found"),
    (["train", "--resume", "{sb}/runs/tiny", "--set", "lora.r=8"], "cannot change on --resume"),
    (["train", "--resume", "{sb}/runs/tiny"], "already finished"),
    (["train", "{sb}/cfg.yaml", "--extend"], "--extend only applies to --resume"),
    (["plan", "--budget", "0"], "'budget': got 0"),
    (["plan", "--num-labels", "1"], "num_labels must be an integer in [2, 100,000]"),
    (["sweep", "{sb}/missing.yaml"], "config file not found"),
    (["sweep", "{sb}/cfg.yaml", "--workers", "0"], "sweep option 'workers': got 0, must be in [1, 1024]"),
    (["results", "{sb}/precious"], "no runs found"),
    (["compare", "{sb}/runs/tiny"], "compare needs at least two run directories"),
    (["bench", "--steps", "0", "--device", "cpu"], "bench needs --warmup >= 1, --steps >= 1"),
    (["bench", "--device", "cpu", "--data", "{sb}/precious"], "no train_sample.csv or test.csv there"),
    (["plan", "--targets", ""], "--targets is empty"),
    (["plan", "--budget", "10"], "no rank fits"),
    (
        ["predict", "{sb}/runs/tiny", "--data", "{sb}/data/test.csv", "--out", "{sb}/runs/tiny/summary.json"],
        "would replace a file of the run",
    ),
    (
        ["predict", "{sb}/runs/tiny", "--data", "{sb}/data/test.csv", "--out", "{sb}/data/test.csv"],
        "is the input data file",
    ),
    (
        ["eval", "{sb}/runs/tiny", "--data", "{sb}/data/test.csv", "--json", "{sb}/runs/tiny/labels.json"],
        "would replace a file of the run",
    ),
    (["compare", "{sb}/runs/tiny", "{sb}/runs/tiny", "--out", "{sb}/runs/tiny"], "is inside the run"),
    (
        ["predict", "{sb}/runs/tiny", "--data", "/proc/self/status", "--format", "csv", "--out", "{sb}/p.csv"],
        "the file is empty (0 bytes)",
    ),
]


@pytest.mark.parametrize("argv, message", OUTPUT_CASES, ids=[" ".join(c[0][:1] + c[0][-2:])[:50] for c in OUTPUT_CASES])
def test_misuse_of_the_commands(sandbox, capsys, argv, message):
    (sandbox / "data" / "unlabeled.csv").write_text("text\nmatch goal\n")
    expect_refusal(sandbox, capsys, argv, message)


def test_an_unreachable_hub_model_fails_fast_and_quietly(sandbox, capsys):
    import time

    start = time.perf_counter()
    err = expect_refusal(
        sandbox,
        capsys,
        TRAIN + ["--set", "model=someone/not-downloaded-model"],
        "model 'someone/not-downloaded-model' is not available offline",
    )
    assert time.perf_counter() - start < 30 and len(err.splitlines()) == 1


def test_a_non_finite_loss_stops_the_run_naming_the_step(sandbox, capsys, monkeypatch):
    import torch

    from budgetlora.training.step import TrainStep

    real, calls = TrainStep.forward, {"n": 0}

    def poisoned(self, input_ids, attention_mask, labels):
        calls["n"] += 1
        loss, logits = real(self, input_ids, attention_mask, labels)
        return (loss * float("nan"), logits) if calls["n"] >= 3 else (loss, logits)

    monkeypatch.setattr(TrainStep, "forward", poisoned)
    expect_refusal(
        sandbox, capsys, TRAIN + ["--name", "diverged"], "the training loss became NaN or infinite at step 3"
    )
    assert torch.isfinite(torch.tensor(1.0))


def test_outputs_are_csv_quoted_and_follow_the_umask(sandbox, capsys):
    import csv

    ids = ["a,b", 'say "hi"', "two\nlines", "plain"]
    path = sandbox / "data" / "odd.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ID", "text"])
        writer.writerows([[i, "match goal team"] for i in ids])
    old = os.umask(0o027)
    try:
        assert (
            main(
                [
                    "predict",
                    str(sandbox / "runs" / "tiny"),
                    "--data",
                    str(path),
                    "--out",
                    str(sandbox / "p.csv"),
                    "--quiet",
                ]
            )
            == 0
        )
    finally:
        os.umask(old)
    with (sandbox / "p.csv").open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["ID", "Label"] and [r[0] for r in rows[1:]] == ids
    assert stat.S_IMODE((sandbox / "p.csv").stat().st_mode) == 0o640
    run = sandbox / "runs" / "tiny"
    assert stat.S_IMODE((run / "summary.json").stat().st_mode) & 0o044 == 0o044  # built under umask 022


def _predict_around_damaged_token_cache(sandbox: Path, monkeypatch, tmp_path: Path, damage) -> None:
    """Predict into a.csv, `damage` every cached token file, predict again into b.csv."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("BUDGETLORA_CACHE", str(cache))
    args = ["predict", str(sandbox / "runs" / "tiny"), "--data", str(sandbox / "data" / "test.csv"), "--out"]
    assert main(args + [str(sandbox / "a.csv"), "--quiet"]) == 0
    for entry in (cache / "tokens").glob("*.npz"):
        damage(entry)
    assert main(args + [str(sandbox / "b.csv"), "--quiet"]) == 0


def test_a_truncated_token_cache_is_rebuilt(sandbox, monkeypatch, tmp_path):
    _predict_around_damaged_token_cache(sandbox, monkeypatch, tmp_path, _truncate)
    assert (sandbox / "a.csv").read_text() == (sandbox / "b.csv").read_text()


def test_every_artifact_follows_the_umask(sandbox, capsys):
    old = os.umask(0o027)
    try:
        assert main([a.replace("{sb}", str(sandbox)) for a in TRAIN] + ["--name", "masked"]) == 0
        run = sandbox / "runs" / "masked"
        assert main(["export", str(run), "--merged", str(sandbox / "export")]) == 0
    finally:
        os.umask(old)
    capsys.readouterr()
    for root in (run, sandbox / "export"):
        for path in [root, *root.rglob("*")]:
            want = 0o750 if path.is_dir() else 0o640
            assert stat.S_IMODE(path.stat().st_mode) == want, path


# ----- 10. what only looks like a run is never replaced, and nothing is written through a link ------------


def test_a_folder_that_only_looks_like_a_run_is_not_overwritten(sandbox, capsys):
    project = sandbox / "myproj"
    (project / "checkpoints").mkdir(parents=True)
    (project / "config.yaml").write_text("x: 1\n")
    (project / "train.py").write_text("print('my code')\n")
    expect_refusal(
        sandbox,
        capsys,
        ["train", "{sb}/cfg.yaml", "--out", "{sb}", "--name", "myproj", "--overwrite", "--quiet"],
        "has no .budgetlora-run marker",
    )


def test_a_symlinked_run_is_not_overwritten(sandbox, capsys):
    (sandbox / "runs" / "link").symlink_to(sandbox / "runs" / "tiny")
    expect_refusal(sandbox, capsys, TRAIN + ["--name", "link", "--overwrite"], "link is a symbolic link")


def test_the_lock_file_is_never_written_through_a_link(sandbox, capsys):
    run = sandbox / "runs" / "tiny"
    (run / "summary.json").unlink()  # resumable again
    (run / ".lock").unlink(missing_ok=True)
    (run / ".lock").symlink_to(sandbox / "precious" / "notes.txt")
    expect_refusal(sandbox, capsys, ["train", "--resume", str(run), "--quiet"], ".lock is a symbolic link")
    assert (sandbox / "precious" / "notes.txt").read_text() == "a week of experiments\n"


def test_a_run_folder_linked_outside_is_refused_on_resume(sandbox, capsys):
    run = sandbox / "runs" / "tiny"
    (run / "summary.json").unlink()
    shutil.move(str(run / "checkpoints"), str(sandbox / "elsewhere"))
    (run / "checkpoints").symlink_to(sandbox / "elsewhere")
    expect_refusal(
        sandbox,
        capsys,
        ["train", "--resume", str(run), "--quiet"],
        "checkpoints is a symbolic link",
        allowed=("runs/tiny/.lock",),
    )


def test_a_staged_overwrite_does_not_replace_what_took_the_runs_place(sandbox):
    from budgetlora.artifacts.placement import place_run
    from budgetlora.errors import BudgetLoraError

    placement = place_run(sandbox / "runs", "tiny", overwrite=True)
    (placement.path / "summary.json").write_text("{}")
    shutil.rmtree(placement.final)  # meanwhile the user put their own folder there
    placement.final.mkdir()
    (placement.final / "thesis.tex").write_text("\\section{}")
    with pytest.raises(BudgetLoraError, match="is not a budgetlora run directory.*the finished run stays in"):
        placement.commit()
    assert (placement.final / "thesis.tex").is_file() and (placement.path / "summary.json").is_file()


def test_export_overwrite_never_deletes_a_run_put_inside(sandbox, capsys):
    assert main(["export", str(sandbox / "runs" / "tiny"), "--merged", str(sandbox / "export")]) == 0
    capsys.readouterr()
    shutil.copytree(sandbox / "runs" / "tiny", sandbox / "export" / "inner")
    expect_refusal(
        sandbox,
        capsys,
        ["export", "{sb}/runs/tiny", "--merged", "{sb}/export", "--overwrite"],
        "holds the run {sb}/export/inner",
    )
    expect_refusal(
        sandbox,
        capsys,
        ["train", "{sb}/cfg.yaml", "--out", "{sb}/export", "--quiet"],
        "is a budgetlora export; put runs in another --out",
    )


def test_integer_labels_do_not_silently_index_names_sorted_from_another_file(sandbox, capsys):
    import csv

    names = ["World", "Sports", "Business", "Sci/Tech"]
    with (sandbox / "data" / "train.csv").open(newline="") as handle:
        rows = list(csv.reader(handle))
    with (sandbox / "data" / "named.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([rows[0]] + [[text, names[int(label)]] for text, label in rows[1:]])
    expect_refusal(
        sandbox,
        capsys,
        TRAIN + ["--set", "data.train_file={sb}/data/named.csv"],
        "integer label 0 where the classes are names",
    )


def test_a_non_finite_validation_loss_stops_the_run(sandbox, capsys, monkeypatch):
    import numpy as np

    from budgetlora.training import loop

    real = loop.predict_logits
    monkeypatch.setattr(loop, "predict_logits", lambda *a, **k: real(*a, **k) * np.inf)
    expect_refusal(
        sandbox, capsys, TRAIN + ["--name", "overflow"], "the validation loss became NaN or infinite at step 2"
    )


def test_an_unreachable_mlflow_store_is_one_error_and_leaves_no_run(sandbox, capsys):
    pytest.importorskip("mlflow")
    expect_refusal(
        sandbox,
        capsys,
        TRAIN
        + [
            "--name",
            "tracked",
            "--set",
            "train.report_to=[mlflow]",
            "--set",
            "train.mlflow_tracking_uri=bogus://nowhere",
        ],
        "MLflow at bogus://nowhere: cannot",
    )


def test_damaged_summaries_and_checkpoint_counters_are_one_error(sandbox, capsys):
    import json

    from budgetlora.errors import BudgetLoraError
    from budgetlora.training.checkpoint import complete_checkpoints, load_checkpoint

    run = sandbox / "runs" / "tiny"
    summary = json.loads((run / "summary.json").read_text())
    summary["test"]["accuracy"] = "high"
    shutil.copytree(run, sandbox / "runs" / "other")
    (run / "summary.json").write_text(json.dumps(summary))
    for command in (
        ["results", "{sb}/runs"],
        ["report", "{sb}/runs/tiny"],
        ["compare", "{sb}/runs/tiny", "{sb}/runs/other", "--out", "{sb}/cmp"],
    ):
        expect_refusal(sandbox, capsys, command, "test.accuracy is not a number in its range")
    checkpoint = complete_checkpoints(run)[-1]
    state = json.loads((checkpoint / "state.json").read_text())
    state["loop_state"]["step"] = "abc"
    (checkpoint / "state.json").write_text(json.dumps(state))
    with pytest.raises(BudgetLoraError, match="damaged checkpoint state.*loop_state.step"):
        load_checkpoint(checkpoint)


def test_a_token_cache_with_ids_outside_the_vocabulary_is_rebuilt(sandbox, monkeypatch, tmp_path):
    import numpy as np

    def ids_past_the_vocabulary(entry: Path) -> None:
        with np.load(entry) as data:
            arrays = dict(data)
        arrays["ids"] = arrays["ids"] + np.int32(10**6)
        with open(entry, "wb") as handle:
            np.savez(handle, **arrays)

    _predict_around_damaged_token_cache(sandbox, monkeypatch, tmp_path, ids_past_the_vocabulary)
    assert (sandbox / "a.csv").read_text() == (sandbox / "b.csv").read_text()


def test_a_sweep_never_deletes_or_reuses_what_it_did_not_make(sandbox, tmp_path):
    from budgetlora.config import config_from_dict
    from budgetlora.errors import BudgetLoraError
    from budgetlora.sweeps.worker import SweepOptions, train_or_reuse

    cfg = config_from_dict(yaml.safe_load((sandbox / "cfg.yaml").read_text()))
    opts = SweepOptions(out=sandbox / "sweep", storage_url="")
    notes = sandbox / "sweep" / "r1" / "notes.txt"
    notes.parent.mkdir(parents=True)
    notes.write_text("mine\n")
    with pytest.raises(BudgetLoraError, match="is not a budgetlora run directory"):
        train_or_reuse(cfg, notes.parent, opts)
    assert notes.read_text() == "mine\n"
    (notes.parent / "summary.json").write_text('{"best_val_acc": 0.99, "trainable_params": 1}')
    with pytest.raises(BudgetLoraError, match="has a summary.json but no config.yaml"):
        train_or_reuse(cfg, notes.parent, opts)
    changed = config_from_dict({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "lr": 0.01}})
    with pytest.raises(BudgetLoraError, match=r"holds a finished run of a different config \(differs in .*train.lr"):
        train_or_reuse(changed, sandbox / "runs" / "tiny", opts)


# ----- 11. faults while a sweep resumes, lock and marker damage, outputs into exports -------------------


def _unfinished_copy(sandbox: Path, name: str) -> Path:
    run = sandbox / "sweep" / name
    shutil.copytree(sandbox / "runs" / "tiny", run)
    (run / "summary.json").unlink()
    return run


def test_a_sweep_keeps_the_checkpoints_of_a_trial_that_fails_for_a_passing_reason(sandbox, monkeypatch):
    from budgetlora import recipe, resuming
    from budgetlora.errors import NotResumable, WriteError
    from budgetlora.artifacts.run_dir import read_run_config
    from budgetlora.sweeps.worker import SweepOptions, train_or_reuse

    run = _unfinished_copy(sandbox, "r1")
    cfg = read_run_config(run)
    opts = SweepOptions(out=sandbox / "sweep", storage_url="")

    def disk_full(*args, **kwargs):
        raise WriteError("cannot write: no space left on device")

    monkeypatch.setattr(resuming, "resume_run", disk_full)
    with pytest.raises(WriteError, match="no space left"):
        train_or_reuse(cfg, run, opts)
    assert (run / "checkpoints").is_dir()  # a full disk is no reason to throw away the trial's progress

    def not_resumable(*args, **kwargs):
        raise NotResumable("none of its 2 checkpoint(s) loads")

    trained = []
    monkeypatch.setattr(resuming, "resume_run", not_resumable)
    monkeypatch.setattr(
        recipe,
        "train_run",
        lambda *a, **k: trained.append(k["run_dir"]) or shutil.copytree(sandbox / "runs" / "tiny", k["run_dir"]),
    )
    train_or_reuse(cfg, run, opts)
    assert trained == [run] and (run / "summary.json").is_file()


def test_a_discard_keeps_a_run_another_worker_finished_meanwhile(sandbox):
    from budgetlora.sweeps.trial_runs import _discard

    run = _unfinished_copy(sandbox, "r2")
    (run / "summary.json").write_text((sandbox / "runs" / "tiny" / "summary.json").read_text())
    _discard(run)
    assert (run / "summary.json").is_file() and (run / "checkpoints").is_dir()


def test_a_damaged_lock_file_still_gives_one_error(sandbox):
    from budgetlora.artifacts.placement import RunLock
    from budgetlora.errors import RunBusy

    run = sandbox / "runs" / "tiny"
    with RunLock(run, "train into it"):
        (run / ".lock").write_bytes(b"\xff\xfe\x00 not text")
        with pytest.raises(RunBusy, match="is in use by another process"):
            RunLock(run, "resume it").acquire()


def test_a_damaged_marker_never_points_a_resume_outside_its_folder(sandbox):
    import json

    from budgetlora.artifacts.placement import reclaim

    run = _unfinished_copy(sandbox, ".x.new-1")
    (run / ".budgetlora-run").write_text(json.dumps({"format": 1, "replaces": ".."}))
    placement = reclaim(run, "resume it")
    try:
        assert placement.final == run
    finally:
        placement.release()


def test_outputs_never_write_into_an_export(sandbox, capsys):
    assert main(["export", str(sandbox / "runs" / "tiny"), "--merged", str(sandbox / "export")]) == 0
    capsys.readouterr()
    expect_refusal(
        sandbox,
        capsys,
        ["predict", "{sb}/runs/tiny", "--data", "{sb}/data/test.csv", "--out", "{sb}/export/budgetlora.json"],
        "would write into the export {sb}/export",
    )


def test_rung_decisions_keep_the_points_an_earlier_pass_pruned(tmp_path):
    import json

    from budgetlora.sweeps.halving import RUNG_DECISIONS, _write_rung_decisions
    from budgetlora.sweeps.worker import SweepOptions

    opts = SweepOptions(out=tmp_path, storage_url=f"sqlite:///{tmp_path}/study.db")
    _write_rung_decisions(opts, 30, [{"point": "a", "pruned": True}, {"point": "b", "pruned": False}])
    _write_rung_decisions(opts, 30, [{"point": "b", "pruned": False, "again": True}])  # a rerun: only b is alive
    lines = json.loads((tmp_path / RUNG_DECISIONS).read_text())["30"]
    assert [(line["point"], line.get("again", False)) for line in lines] == [("a", False), ("b", True)]


def test_failing_a_stale_trial_that_its_worker_just_settled_is_no_error(tmp_path):
    optuna = pytest.importorskip("optuna")

    from budgetlora.sweeps.storage import _fail

    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/s.db")
    trial = study.ask()
    study.tell(trial, 0.5)
    frozen = study.get_trials(deepcopy=False)[0]
    assert _fail(study._storage, frozen) is False


# =====================================================================================================
# Round two: the surfaces added last (exports, the Python API, study files, results, stores), and the
# paths by which code could run from a run, an export or the working directory.
# =====================================================================================================

MARKER_CODE = "import pathlib, os; pathlib.Path(os.environ['BUDGETLORA_TEST_MARKER']).write_text('ran')\n"


@pytest.fixture(scope="module")
def base_exports(base_sandbox, tmp_path_factory) -> dict[str, Path]:
    """A merged and an ONNX export of the sandbox run, and a run with a mean-pooled linear head."""
    from budgetlora.config import config_from_dict
    from budgetlora.recipe import train_run

    root = tmp_path_factory.mktemp("exports")
    run = base_sandbox / "runs" / "tiny"
    assert main(["export", str(run), "--merged", str(root / "merged")]) == 0
    assert main(["export", str(run), "--onnx", str(root / "onnx")]) == 0
    raw = yaml.safe_load((base_sandbox / "cfg.yaml").read_text())
    raw.update(name="pooled", head={"type": "linear", "pooling": "mean"})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BUDGETLORA_CACHE", str(tmp_path_factory.mktemp("pooled-cache")))
        pooled = train_run(config_from_dict(raw), root / "runs", verbose=False)
    assert main(["export", str(pooled), "--merged", str(root / "pooled-merged")]) == 0
    return {"merged": root / "merged", "onnx": root / "onnx", "pooled": pooled, "pooled-merged": root / "pooled-merged"}


@pytest.fixture()
def exports(base_exports, sandbox) -> dict[str, Path]:
    """Copies inside the sandbox, free to damage."""
    out = {}
    for name, path in base_exports.items():
        shutil.copytree(path, sandbox / "exports" / name, symlinks=True)
        out[name] = sandbox / "exports" / name
    return out


@pytest.fixture()
def marker(tmp_path, monkeypatch) -> Path:
    """A file that planted code writes when it runs; the tests assert it never appears."""
    path = tmp_path / "code-ran"
    monkeypatch.setenv("BUDGETLORA_TEST_MARKER", str(path))
    return path


# ----- code execution: nothing from the working directory, a run or an export ever runs -------------


def test_budgetlora_processes_never_import_from_the_working_directory(tmp_path, marker):
    import subprocess
    import sys

    from budgetlora.launch import python_command

    (tmp_path / "yaml.py").write_text(MARKER_CODE)
    (tmp_path / "torch.py").write_text(MARKER_CODE)
    for command in (
        python_command("--version"),
        [sys.executable, "-m", "budgetlora", "plan", "--model", "roberta-base", "--targets", "q,v"],
    ):
        done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=dict(os.environ))
        assert done.returncode == 0, done.stderr[-2000:]
        assert not marker.exists(), command


def test_sweep_workers_start_isolated_from_the_working_directory(sandbox, monkeypatch):
    import subprocess

    from budgetlora.sweeps import run as sweep_run

    started = []
    monkeypatch.setattr(subprocess, "Popen", lambda argv, **kw: started.append(argv))
    request = sweep_run.SweepRequest(study=sandbox / "study.yaml", workers=2)
    sweep_run._spawn_worker(request, sweep_run._options(request, sandbox / "out", "w0"), 1, False)
    argv = started[0]
    assert argv[1] == "-c" and "sys.path[:]" in argv[2] and "-m" not in argv[:3]


@pytest.mark.parametrize("planted", ["auto_map", "model_type", "tokenizer"])
def test_code_shipped_in_a_run_or_an_export_never_runs(sandbox, exports, capsys, marker, monkeypatch, planted):
    import io
    import json

    monkeypatch.setattr("sys.stdin", io.StringIO("y\ny\ny\n"))  # a script that answers every prompt
    if planted == "tokenizer":
        target = sandbox / "runs" / "tiny" / "tokenizer"
        config = json.loads((target / "tokenizer_config.json").read_text())
        config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}
        (target / "tokenizer_config.json").write_text(json.dumps(config))
        (target / "evil.py").write_text(MARKER_CODE)
        where, allowed = "{sb}/runs/tiny", ("runs/tiny",)
    else:
        target = exports["merged"]
        config = json.loads((target / "config.json").read_text())
        if planted == "auto_map":
            config["auto_map"] = {
                "AutoConfig": "evil.EvilConfig",
                "AutoModelForSequenceClassification": "evil.EvilModel",
            }
        else:
            config["model_type"] = "evil-net"
        (target / "config.json").write_text(json.dumps(config))
        (target / "evil.py").write_text(MARKER_CODE)
        where, allowed = "{sb}/exports/merged", ("exports",)
    for command in (
        ["classify", where, "match goal", "--json"],
        ["predict", where, "--data", "{sb}/data/test.csv", "--out", "{sb}/p.csv"],
    ):
        expect_refusal(sandbox, capsys, command, "", allowed=allowed)
        assert not marker.exists()
    assert "[y/N]" not in capsys.readouterr().out


def test_an_edited_modeling_file_in_an_export_never_runs(sandbox, exports, capsys, marker):
    modeling = exports["pooled-merged"] / "modeling_budgetlora.py"
    modeling.write_text(MARKER_CODE + modeling.read_text())
    assert main(["classify", str(exports["pooled-merged"]), "match goal team"]) == 0
    assert not marker.exists()


# ----- data loss: outputs never replace what is not a file, nor files budgetlora did not write ------


def test_outputs_write_through_devices_fifos_and_stdout_links(sandbox, capsys):
    import threading

    run, data = str(sandbox / "runs" / "tiny"), str(sandbox / "data" / "test.csv")
    (sandbox / "to-null").symlink_to("/dev/null")
    (sandbox / "to-stdout").symlink_to("/proc/self/fd/1")
    assert main(["predict", run, "--data", data, "--out", str(sandbox / "to-null"), "--quiet"]) == 0
    assert (sandbox / "to-null").is_symlink() and stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert main(["eval", run, "--data", data, "--json", str(sandbox / "to-null"), "--quiet"]) == 0
    assert main(["predict", run, "--data", data, "--out", str(sandbox / "to-stdout"), "--quiet"]) == 0
    assert (sandbox / "to-stdout").is_symlink()
    fifo = sandbox / "pipe"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()))
    reader.start()
    assert main(["predict", run, "--data", data, "--out", str(fifo), "--quiet"]) == 0
    reader.join(timeout=60)
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and received[0].startswith("ID,Label\n")
    real = sandbox / "precious" / "real.csv"
    real.write_text("old\n")
    (sandbox / "link.csv").symlink_to(real)
    assert main(["predict", run, "--data", data, "--out", str(sandbox / "link.csv"), "--quiet"]) == 0
    assert (sandbox / "link.csv").is_symlink() and real.read_text().startswith("ID,Label")
    (sandbox / "dangling.csv").symlink_to(sandbox / "nowhere" / "x.csv")
    expect_refusal(
        sandbox, capsys, ["predict", run, "--data", data, "--out", "{sb}/dangling.csv"], "symbolic link to nothing"
    )


@pytest.mark.parametrize(
    "command, names",
    [
        (["results", "{sb}/runs"], ["results.md", "results.csv"]),
        (["report", "{sb}/runs"], ["report.md", "report.html", "results.md"]),
        (["compare", "{sb}/runs/tiny", "{sb}/runs/other", "--out", "{sb}/precious"], ["compare.md", "compare.csv"]),
    ],
)
def test_outputs_never_replace_a_users_files_of_the_same_name(sandbox, capsys, command, names):
    shutil.copytree(sandbox / "runs" / "tiny", sandbox / "runs" / "other")
    folder = sandbox / ("precious" if command[0] == "compare" else "runs")
    for name in names:
        (folder / name).write_text("my own notes\n")
    expect_refusal(sandbox, capsys, command, "budgetlora did not write it (or it changed since); pass --overwrite")
    assert main([a.replace("{sb}", str(sandbox)) for a in command]) == 2
    capsys.readouterr()
    assert main([a.replace("{sb}", str(sandbox)) for a in command] + ["--overwrite"]) == 0
    assert all((folder / n).read_text() != "my own notes\n" for n in names)
    assert main([a.replace("{sb}", str(sandbox)) for a in command]) == 0  # its own files: replaced freely
    (folder / names[0]).unlink()
    (folder / names[0]).mkdir()
    expect_refusal(sandbox, capsys, command + ["--overwrite"], "exists and is not a regular file")


@pytest.mark.parametrize("name", ["..", ".", "...", "a/b"])
def test_a_study_cannot_name_its_folder_outside_sweeps(sandbox, capsys, name):
    (sandbox / "study.yaml").write_text(yaml.safe_dump({"name": name, "base": "cfg.yaml", "grid": {"lora.r": [2]}}))
    expect_refusal(sandbox, capsys, ["sweep", "{sb}/study.yaml", "--dry-run"], "study key 'name': must be a plain word")


def test_a_sweep_into_a_folder_with_the_users_results_is_refused_before_training(sandbox, capsys):
    (sandbox / "study.yaml").write_text(yaml.safe_dump({"base": "cfg.yaml", "grid": {"lora.r": [2]}}))
    (sandbox / "precious" / "results.md").write_text("mine\n")
    expect_refusal(
        sandbox,
        capsys,
        ["sweep", "{sb}/study.yaml", "--out", "{sb}/precious"],
        "results.md exists and budgetlora did not write it",
    )


def test_out_paths_expand_the_home_directory(sandbox, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(sandbox / "home"))
    monkeypatch.chdir(sandbox)
    assert main([a.replace("{sb}", str(sandbox)) for a in TRAIN[:3]] + ["~/runs", "--quiet"]) == 0
    assert (sandbox / "home" / "runs" / "tiny" / "summary.json").is_file() and not (sandbox / "~").exists()
    assert main(["predict", "~/runs/tiny", "--data", str(sandbox / "data" / "test.csv"), "--out", "~/p.csv"]) == 0
    assert (sandbox / "home" / "p.csv").is_file() and not (sandbox / "~").exists()


# ----- stores: never inside a run or an export, never into a user's own database or file ------------


def test_optuna_storage_never_joins_a_foreign_file_or_lands_inside_a_run(sandbox, capsys):
    import sqlite3

    (sandbox / "study.yaml").write_text(yaml.safe_dump({"base": "cfg.yaml", "grid": {"lora.r": [2]}}))
    users = sandbox / "precious" / "users.db"
    with sqlite3.connect(users) as db:
        db.execute("CREATE TABLE customers (name TEXT)")
    (sandbox / "precious" / "notes.jsonl").write_text('{"note": "mine"}\n')
    base = ["sweep", "{sb}/study.yaml", "--out", "{sb}/sw"]
    expect_refusal(sandbox, capsys, base + ["--storage", f"sqlite:///{users}"], "a SQLite database of something else")
    expect_refusal(sandbox, capsys, base + ["--storage", "journal:{sb}/precious/notes.txt"], "not an Optuna journal")
    expect_refusal(sandbox, capsys, base + ["--storage", "journal:{sb}/precious/notes.jsonl"], "not an Optuna journal")
    expect_refusal(sandbox, capsys, base + ["--storage", "sqlite:///{sb}/runs/tiny/study.db"], "inside the run")
    expect_refusal(sandbox, capsys, ["sweep", "{sb}/study.yaml", "--out", "{sb}/runs/tiny/sw"], "inside the run")


def test_mlflow_never_writes_into_a_users_database_or_the_working_directory(sandbox, capsys, monkeypatch):
    import sqlite3

    pytest.importorskip("mlflow")
    users = sandbox / "precious" / "users.db"
    with sqlite3.connect(users) as db:
        db.execute("CREATE TABLE customers (name TEXT)")
    expect_refusal(
        sandbox,
        capsys,
        TRAIN + ["--set", "train.report_to=[mlflow]", "--set", f"train.mlflow_tracking_uri=sqlite:///{users}"],
        "a SQLite database of something else",
    )
    monkeypatch.chdir(sandbox / "precious")
    store = sandbox / "stores" / "ml.db"
    assert (
        main(
            [a.replace("{sb}", str(sandbox)) for a in TRAIN]
            + [
                "--set",
                "train.report_to=[mlflow]",
                "--set",
                f"train.mlflow_tracking_uri=sqlite:///{store}",
                "--name",
                "tracked",
            ]
        )
        == 0
    )
    assert not (sandbox / "precious" / "mlruns").exists() and (sandbox / "stores" / "mlruns").is_dir()


# ----- exports held to the rules of runs -------------------------------------------------------------


def _unsealed(export: Path) -> None:
    """Drop the weight hash from budgetlora.json: the export then stands for a foreign or older one,
    whose damage the deeper checks must catch."""
    import json

    meta = json.loads((export / "budgetlora.json").read_text())
    meta.pop("weights_sha256", None)
    (export / "budgetlora.json").write_text(json.dumps(meta))


def _refuse_export(sandbox, capsys, export: Path, message: str) -> None:
    for command in (
        ["classify", str(export), "match goal"],
        ["predict", str(export), "--data", "{sb}/data/test.csv", "--out", "{sb}/p.csv"],
    ):
        expect_refusal(sandbox, capsys, command, message)


def test_damaged_merged_exports_are_one_error(sandbox, exports, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    merged = exports["merged"]
    weights = merged / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    _refuse_export(sandbox, capsys, merged, "is not the file this export wrote (its sha256 differs")
    _unsealed(merged)
    weights.write_bytes(good[: len(good) // 2])
    _refuse_export(sandbox, capsys, merged, "not a loadable export")
    tensors = load_file(str(sandbox / "runs" / "tiny" / "adapter" / "adapter_model.safetensors"))
    weights.write_bytes(good)
    state = load_file(str(weights))
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first] = torch.full_like(state[first], float("nan"))
    save_file(state, str(weights), metadata={"format": "pt"})
    _refuse_export(sandbox, capsys, merged, "holds NaN or infinite values")
    weights.unlink()
    torch.save(tensors, merged / "pytorch_model.bin")
    _refuse_export(
        sandbox, capsys, merged, "pytorch_model.bin is there: budgetlora loads weights only from safetensors"
    )


def test_an_export_without_tokenizer_files_is_refused(sandbox, exports, capsys):
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "vocab.txt"):
        (exports["merged"] / name).unlink(missing_ok=True)
    _refuse_export(sandbox, capsys, exports["merged"], "has no tokenizer files")
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "vocab.txt"):
        (exports["onnx"] / name).unlink(missing_ok=True)
    _refuse_export(sandbox, capsys, exports["onnx"], "has no tokenizer files")


def test_an_edited_pooling_is_refused_in_exports_and_runs(sandbox, exports, capsys):
    import json

    export = exports["pooled-merged"]
    config = json.loads((export / "config.json").read_text())
    config["budgetlora_pooling"] = "cls"
    (export / "config.json").write_text(json.dumps(config))
    _refuse_export(sandbox, capsys, export, "budgetlora_pooling is 'cls' but budgetlora.json records 'mean'")
    run = exports["pooled"]
    raw = yaml.safe_load((run / "config.yaml").read_text())
    raw["head"]["pooling"] = "cls"
    (run / "config.yaml").write_text(yaml.safe_dump(raw))
    expect_refusal(
        sandbox,
        capsys,
        ["classify", str(run), "match goal"],
        "head.pooling is 'cls' but the adapter was trained with 'mean'",
    )


def _onnx_graph(path: Path, module, inputs: tuple, names: list[str]) -> None:
    import torch

    torch.onnx.export(
        module,
        inputs,
        str(path),
        input_names=names,
        output_names=["logits"],
        dynamo=False,
        dynamic_axes={n: {0: "batch", 1: "length"} for n in names},
    )


class _Width(__import__("torch").nn.Module):
    def __init__(self, width: int, value: float = 0.0, rank3: bool = False):
        super().__init__()
        self.width, self.value, self.rank3 = width, value, rank3

    def forward(self, input_ids, attention_mask):
        import torch

        out = (input_ids * attention_mask).float().unsqueeze(-1)[..., :1] * 0 + self.value
        out = out.expand(-1, -1, self.width)
        return out if self.rank3 else out.sum(1) + torch.zeros(1, self.width)


class _ThreeInputs(__import__("torch").nn.Module):
    def forward(self, input_ids, attention_mask, token_type_ids):
        return (input_ids + token_type_ids).float()[:, :4]


class _ShortPositions(__import__("torch").nn.Module):
    def __init__(self):
        import torch

        super().__init__()
        self.positions = torch.nn.Embedding(16, 4)

    def forward(self, input_ids, attention_mask):
        import torch

        positions = torch.cumsum(attention_mask, 1) - 1  # as RoBERTa numbers its positions
        return self.positions(positions).sum(1) + input_ids.float().sum(1, keepdim=True) * 0


def test_foreign_or_damaged_onnx_graphs_are_one_error(sandbox, exports, capsys):
    import onnx
    import torch
    from onnx import TensorProto, helper

    file = exports["onnx"] / "model.onnx"
    ids = torch.ones(2, 8, dtype=torch.long)
    _onnx_graph(file, _Width(4), (ids, ids), ["input_ids", "attention_mask"])  # constant logits, right signature
    _refuse_export(sandbox, capsys, exports["onnx"], "is not the file this export wrote (its sha256 differs")
    _unsealed(exports["onnx"])
    cases = [
        (_Width(7), "expected a 'logits' output of batch x 4 classes"),
        (_Width(4, rank3=True), "expected a 'logits' output of batch x 4 classes"),
        (_Width(4, value=float("nan")), "NaN or infinite logits"),
        (_ShortPositions(), "ONNX Runtime failed on a batch of 1 x 64 tokens"),
    ]
    for module, message in cases:
        _onnx_graph(file, module, (ids, ids), ["input_ids", "attention_mask"])
        _refuse_export(sandbox, capsys, exports["onnx"], message)
    _onnx_graph(file, _ThreeInputs(), (ids, ids, ids), ["input_ids", "attention_mask", "token_type_ids"])
    _refuse_export(sandbox, capsys, exports["onnx"], "expected the inputs input_ids, attention_mask")
    constant = helper.make_node(
        "Constant", [], ["shape"], value=helper.make_tensor("s", TensorProto.INT64, [2], [40_000_000_000, 4])
    )  # 160 GB of float32
    nodes = [
        constant,
        helper.make_node(
            "ConstantOfShape", ["shape"], ["big"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])
        ),
        helper.make_node("ReduceSum", ["big"], ["total"], keepdims=1),
        helper.make_node("Constant", [], ["shape4"], value=helper.make_tensor("s4", TensorProto.INT64, [2], [1, 4])),
        helper.make_node("Expand", ["total", "shape4"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "huge",
        [
            helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "length"])
            for n in ("input_ids", "attention_mask")
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(file))
    _refuse_export(sandbox, capsys, exports["onnx"], "ONNX Runtime")


# ----- the Python API: type misuse is a BudgetLoraError, never a TypeError or AssertionError --------


def test_api_type_misuse_is_one_budgetlora_error(sandbox, exports):
    import budgetlora
    from budgetlora.errors import BudgetLoraError

    run = budgetlora.load(sandbox / "runs" / "tiny")
    cases = [
        lambda: budgetlora.load(None),
        lambda: budgetlora.load(123),
        lambda: budgetlora.load(""),
        lambda: budgetlora.train(str(sandbox / "cfg.yaml"), out=123),
        lambda: budgetlora.train(12.5),
        lambda: budgetlora.resume(None),
        lambda: run.predict(None),
        lambda: run.predict(t for t in ["match goal"]),
        lambda: run.predict([1, 2]),
        lambda: run.predict([]),
        lambda: run.evaluate(["match goal"]),
        lambda: run.evaluate(None),
        lambda: run.export(None),
        lambda: run.export(3),
        lambda: budgetlora.sweep(None),
        lambda: budgetlora.sweep(5),
        lambda: budgetlora.plan("roberta-base", num_labels=10**9),
        lambda: budgetlora.plan("roberta-base", num_labels=1.5),
        lambda: budgetlora.load(sandbox / "runs" / "tiny", device=None),
        lambda: budgetlora.load(sandbox / "runs" / "tiny", backend="tensorflow"),
    ]
    for case in cases:
        with pytest.raises(BudgetLoraError):
            case()


# ----- bounded: hostile study and config files return within seconds --------------------------------

BOMB = 'a: &a ["x","x","x","x","x","x","x","x","x","x"]\n' + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8)
)


def test_yaml_alias_bombs_are_refused_at_once(sandbox, capsys):
    import time

    (sandbox / "bomb.yaml").write_text(BOMB)
    (sandbox / "study.yaml").write_text("base: cfg.yaml\n" + BOMB.replace("a:", "grid_a:", 1))
    start = time.perf_counter()
    expect_refusal(sandbox, capsys, ["train", "{sb}/bomb.yaml"], "expands to more than 100,000 values")
    expect_refusal(sandbox, capsys, ["sweep", "{sb}/study.yaml", "--dry-run"], "expands to more than 100,000 values")
    assert time.perf_counter() - start < 20


def test_a_huge_grid_or_search_is_refused_before_it_expands(sandbox, capsys):
    import time

    grid = {"lora.r": list(range(1, 301)), "train.lr": [1e-4 * (i + 1) for i in range(300)]}
    (sandbox / "study.yaml").write_text(yaml.safe_dump({"base": "cfg.yaml", "grid": grid}))
    start = time.perf_counter()
    expect_refusal(sandbox, capsys, ["sweep", "{sb}/study.yaml", "--dry-run"], "the grid has 90,000 points")
    (sandbox / "study.yaml").write_text(
        yaml.safe_dump({"base": "cfg.yaml", "n_trials": 10**9, "random": {"lora.r": {"low": 1, "high": 8}}})
    )
    expect_refusal(
        sandbox,
        capsys,
        ["sweep", "{sb}/study.yaml", "--dry-run"],
        "study key 'n_trials': got 1000000000, must be in [1, 100,000]",
    )
    expect_refusal(
        sandbox,
        capsys,
        ["plan", "--model", "roberta-base", "--num-labels", "1000000000"],
        "num_labels must be an integer in [2, 100,000]",
    )
    assert time.perf_counter() - start < 20


# ----- silent nonsense -------------------------------------------------------------------------------


def test_prediction_csvs_neutralise_formula_cells(sandbox, capsys):
    import csv

    path = sandbox / "data" / "formulas.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ID", "text"])
        writer.writerows(
            [['=HYPERLINK("http://x")', "match goal"], ["+1+2", "stocks market"], ["-5", "war"], ["@SUM(A1)", "chip"]]
        )
    out = sandbox / "p.csv"
    assert main(["predict", str(sandbox / "runs" / "tiny"), "--data", str(path), "--out", str(out), "--names"]) == 0
    ids = [row[0] for row in csv.reader(out.read_text().splitlines())][1:]
    assert ids == ['\'=HYPERLINK("http://x")', "'+1+2", "-5", "'@SUM(A1)"]  # numbers stay numbers


def test_class_names_that_differ_only_by_normalisation_are_one_name(sandbox, capsys):
    import unicodedata

    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    (sandbox / "data" / "classes2.txt").write_text(f"{nfc}\n{nfd}\n")
    expect_refusal(
        sandbox,
        capsys,
        TRAIN + ["--set", "data.classes_file={sb}/data/classes2.txt"],
        "expected two or more distinct class names",
    )
    expect_refusal(sandbox, capsys, TRAIN + ["--set", f"data.label_names=[{nfc}, {nfd}]"], "lists a class twice")
    from budgetlora.data.dataset import map_labels
    from budgetlora.data.sources import Row

    labels, names = map_labels(
        [Row("a", {"label": nfc}), Row("b", {"label": nfd}), Row("c", {"label": "tea"})], "label", None
    )
    assert names == [nfc, "tea"] and list(labels) == [0, 0, 1]


@pytest.mark.parametrize(
    "field, value", [("accuracy", 5.0), ("accuracy", -1.0), ("ci_high", 2.0), ("n", -3), ("n", 1.5)]
)
def test_summaries_with_absurd_metrics_are_one_error(sandbox, capsys, field, value):
    import json

    path = sandbox / "runs" / "tiny" / "summary.json"
    summary = json.loads(path.read_text())
    summary["test"][field] = value
    path.write_text(json.dumps(summary))
    expect_refusal(sandbox, capsys, ["results", "{sb}/runs"], f"test.{field} is not a")  # number / an integer


@pytest.mark.parametrize("text", ['{"test": NaN}', '{"best_val_acc": 1e999}', "[" * 100_000 + "]" * 100_000])
def test_run_files_with_non_finite_or_deep_json_are_one_error(sandbox, capsys, text):
    (sandbox / "runs" / "tiny" / "summary.json").write_text(text)
    for command in (["results", "{sb}/runs"], ["report", "{sb}/runs/tiny"]):
        expect_refusal(sandbox, capsys, command, "summary.json")


def test_a_lone_surrogate_in_jsonl_is_one_error_naming_the_line(sandbox, capsys):
    (sandbox / "data" / "bad.jsonl").write_text(
        '{"text": "match goal", "label": 0}\n{"text": "a \\ud800 b", "label": 1}\n'
    )
    expect_refusal(
        sandbox,
        capsys,
        ["predict", "{sb}/runs/tiny", "--data", "{sb}/data/bad.jsonl", "--out", "{sb}/p.csv"],
        "bad.jsonl line 2: field 'text' holds a lone surrogate",
    )


def test_a_model_whose_config_cannot_build_the_architecture_is_one_error(sandbox, capsys, tiny_model_dir):
    import json

    model = sandbox / "model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["num_attention_heads"] = 3  # 32 is not a multiple of 3
    (model / "config.json").write_text(json.dumps(config))
    expect_refusal(
        sandbox, capsys, TRAIN + ["--set", f"model={model}"], "is not a multiple of the number of attention heads"
    )  # the cause, kept


def test_a_planted_token_cache_entry_is_rebuilt(sandbox, monkeypatch, tmp_path):
    import numpy as np

    def shift_ids(entry: Path) -> None:
        with np.load(entry) as data:
            arrays = dict(data)
        arrays["ids"] = np.roll(arrays["ids"], 1)  # same shapes, in-vocabulary ids, other tokens
        with open(entry, "wb") as handle:
            np.savez(handle, **arrays)

    _predict_around_damaged_token_cache(sandbox, monkeypatch, tmp_path, shift_ids)
    assert (sandbox / "a.csv").read_text() == (sandbox / "b.csv").read_text()


def test_non_finite_trial_values_rank_nowhere():
    from budgetlora.sweeps.outputs import finite_values

    assert finite_values([0.9, 10.0]) == [0.9, 10.0]
    assert finite_values([float("nan")]) is None and finite_values([float("inf"), 1]) is None
    assert finite_values(None) is None and finite_values([]) is None


# ----- from the round-two hostile pass on a clone ------------------------------------------------------


def test_yes_no_options_of_the_api_take_only_booleans(sandbox, exports, marker):
    import pickle

    import budgetlora
    from budgetlora.errors import BudgetLoraError

    class Payload:
        def __reduce__(self):
            return exec, (MARKER_CODE,)

    evil = sandbox / "data" / "evil.pkl"
    evil.write_bytes(pickle.dumps(Payload()))
    run = budgetlora.load(sandbox / "runs" / "tiny")
    for value in ("no", "false", 1, None):
        with pytest.raises(BudgetLoraError, match="trust_pickle must be True or False"):
            run.predict(evil, trust_pickle=value)
    assert not marker.exists()
    before = snapshot(exports["merged"])
    for kwargs in ({"overwrite": "no"}, {"onnx": "yes"}, {"int8": 1}):
        with pytest.raises(BudgetLoraError, match="must be True or False"):
            run.export(exports["merged"], **kwargs)
    assert snapshot(exports["merged"]) == before
    with pytest.raises(BudgetLoraError, match="sweep option 'prune': got 'no'"):
        budgetlora.sweep(sandbox / "cfg.yaml", prune="no")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"workers": "2"}, "sweep option 'workers': got '2'"),
        ({"storage": 5}, "sweep option 'storage': got 5"),
        ({"confirm_top": "x"}, "sweep option 'confirm_top'"),
        ({"heartbeat": "x"}, "sweep option 'heartbeat'"),
        ({"confirm_top": 1, "confirm_seeds": 10**20}, "sweep option 'confirm_seeds'"),
        ({"confirm_top": 1, "confirm_seeds": -3}, "sweep option 'confirm_seeds'"),
        ({"threads": 0}, "sweep option 'threads'"),
        ({"study_name": 5}, "sweep option 'study_name'"),
        ({"seeds": []}, "give at least one seed"),
        ({"overrides": "train.lr=1"}, "expected a list of"),
        ({"storage": "postgresql+nodriver://x/y"}, "--storage"),
    ],
)
def test_sweep_options_are_checked_once_with_one_wording(sandbox, kwargs, message):
    import budgetlora
    from budgetlora.errors import BudgetLoraError

    with pytest.raises(BudgetLoraError, match=re.escape(message)):
        budgetlora.sweep(sandbox / "cfg.yaml", **kwargs)


def test_more_api_misuse_is_one_budgetlora_error(sandbox):
    import budgetlora
    from budgetlora.errors import BudgetLoraError

    run = budgetlora.load(sandbox / "runs" / "tiny")
    for case in (
        lambda: budgetlora.plan("roberta-base", targets=5),
        lambda: budgetlora.train("x" * 5000),
        lambda: run.predict(["match goal"], format=5),
        lambda: run.predict(["match goal"], text_columns=[3]),
    ):
        with pytest.raises(BudgetLoraError):
            case()
    one_column = run.predict(str(sandbox / "data" / "test.csv"), text_columns="text")  # a name, not its letters
    assert len(one_column) == 120


def test_export_overwrite_never_deletes_what_the_export_did_not_hold(sandbox, exports, capsys):
    (exports["merged"] / "NOTES.txt").write_text("mine\n")
    expect_refusal(
        sandbox,
        capsys,
        ["export", "{sb}/runs/tiny", "--merged", "{sb}/exports/merged", "--overwrite"],
        "holds NOTES.txt, which the earlier export did not write",
    )
    (exports["merged"] / "NOTES.txt").unlink()
    (sandbox / "link").symlink_to(exports["merged"])
    expect_refusal(
        sandbox, capsys, ["export", "{sb}/runs/tiny", "--merged", "{sb}/link", "--overwrite"], "is a symbolic link"
    )
    assert main(["export", str(sandbox / "runs" / "tiny"), "--merged", str(exports["merged"]), "--overwrite"]) == 0


def test_regular_files_outside_descriptor_names_are_replaced_not_appended(sandbox, capsys, tmp_path):
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path
    target = shm / f"budgetlora-test-{os.getpid()}.csv"
    target.write_text("mine\n")
    try:
        (sandbox / "shm.csv").symlink_to(target)
        args = [
            "predict",
            str(sandbox / "runs" / "tiny"),
            "--data",
            str(sandbox / "data" / "test.csv"),
            "--out",
            str(sandbox / "shm.csv"),
            "--quiet",
        ]
        assert main(args) == 0 and main(args) == 0
        text = target.read_text()
        assert text.startswith("ID,Label\n") and text.count("ID,Label") == 1 and "mine" not in text
    finally:
        target.unlink(missing_ok=True)


def test_a_sweep_trains_again_a_point_whose_run_directory_is_gone(sandbox, capsys):
    (sandbox / "study.yaml").write_text(yaml.safe_dump({"base": "cfg.yaml", "grid": {"lora.r": [2, 4]}}))
    command = ["sweep", str(sandbox / "study.yaml"), "--out", str(sandbox / "sw")]
    assert main(command) == 0
    shutil.rmtree(sandbox / "sw" / "r2")
    capsys.readouterr()
    assert main(command) == 0
    out = capsys.readouterr().out
    assert "this process: 1 trained," in out and (sandbox / "sw" / "r2" / "summary.json").is_file()
    assert "r2" in (sandbox / "sw" / "results.md").read_text()


@pytest.mark.parametrize(
    "study, message",
    [
        ({"confirm": {"top": 100_000_000, "seeds": 100_000_000}}, "at most 10,000 configurations and 1,000 seeds"),
        ({"confirm": {"top": 1, "seeds": 10**20}}, "study key 'confirm.seeds'"),
        ({"sampler_seed": "1e999", "n_trials": 2, "random": {"lora.r": [2, 4]}}, "study key 'sampler_seed'"),
        ({"n_trials": 2, "random": {"train.lr": {"low": 0, "high": 1, "log": True}}}, "a log range needs low > 0"),
        ({"n_trials": 2, "random": {"train.lr": {"low": float("nan"), "high": 1}}}, "finite numbers"),
    ],
)
def test_study_values_that_would_explode_later_are_refused_at_once(sandbox, capsys, study, message):
    import time

    raw = {"base": "cfg.yaml", **({} if "random" in study else {"grid": {"lora.r": [2]}}), **study}
    (sandbox / "study.yaml").write_text(yaml.safe_dump(raw))
    start = time.perf_counter()
    expect_refusal(sandbox, capsys, ["sweep", "{sb}/study.yaml", "--dry-run"], message)
    assert time.perf_counter() - start < 10


def test_one_huge_text_field_is_cut_before_it_is_tokenized(sandbox, capsys):
    import resource
    import time

    path = sandbox / "data" / "huge.csv"
    path.write_text("text\n" + "bank " * 2_000_000 + "\nmatch goal\n")
    start = time.perf_counter()
    assert (
        main(
            ["predict", str(sandbox / "runs" / "tiny"), "--data", str(path), "--out", str(sandbox / "p.csv"), "--quiet"]
        )
        == 0
    )
    assert time.perf_counter() - start < 20 and resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 4 * 2**20


def test_a_tokenizer_with_ids_past_the_models_vocabulary_is_one_error(sandbox, capsys):
    import json

    tokenizer = sandbox / "runs" / "tiny" / "tokenizer" / "tokenizer.json"
    data = json.loads(tokenizer.read_text())
    data["model"]["vocab"]["goal"] = 99_999
    tokenizer.write_text(json.dumps(data))
    expect_refusal(
        sandbox, capsys, ["classify", "{sb}/runs/tiny", "match goal"], "gives token id 99,999 but the model embeds only"
    )


def _calibration(count: list, confidence: list, accuracy: list) -> dict:
    bins = {"count": count, "confidence": confidence, "accuracy": accuracy}
    return {"temperature": 1.5, "ece_before": 0.1, "ece_after": 0.05, "bins_before": bins, "bins_after": bins}


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.update(trainable_params=10**400), "not valid JSON (the integer"),
        (lambda s: s["test"].update(accuracy=0.99), "test.accuracy is not correct / n"),
        (
            lambda s: s["test"].update(calibration=_calibration([1, 2], [0.5], [0.5, 0.6])),
            "test.calibration.bins_before.count is not one of three lists (count, confidence, accuracy)",
        ),
        (
            lambda s: s["test"].update(calibration=_calibration([1, 2], [0.5, 0.9], [0.5, 1.5])),
            "test.calibration.bins_before.accuracy[1] is not a number in its range",
        ),
        (
            lambda s: s["test"].update(calibration=_calibration([1, -2], [0.5, 0.9], [0.5, 0.5])),
            "test.calibration.bins_before.count[1] is not an integer in its range",
        ),
    ],
    ids=["huge-int", "accuracy", "bins-lengths", "bins-accuracy", "bins-count"],
)
def test_summaries_with_huge_or_inconsistent_numbers_are_one_error(sandbox, capsys, edit, message):
    import json

    path = sandbox / "runs" / "tiny" / "summary.json"
    summary = json.loads(path.read_text())
    edit(summary)
    path.write_text(json.dumps(summary))
    shutil.copytree(sandbox / "runs" / "tiny", sandbox / "other")
    for command in (["results", "{sb}/runs"], ["compare", "{sb}/runs/tiny", "{sb}/other", "--out", "{sb}/c"]):
        expect_refusal(sandbox, capsys, command, message)


def test_damaged_storage_and_export_records_are_one_error(sandbox, exports, capsys):
    import json

    (sandbox / "study.yaml").write_text(yaml.safe_dump({"base": "cfg.yaml", "grid": {"lora.r": [2]}}))
    journal = sandbox / "precious" / "journal.log"
    journal.write_text('{"op_code": 0, "worker_id": "x"}\n')
    expect_refusal(
        sandbox,
        capsys,
        ["sweep", "{sb}/study.yaml", "--out", "{sb}/sw", "--storage", f"journal:{journal}"],
        "the journal cannot be replayed",
    )
    meta = json.loads((exports["merged"] / "budgetlora.json").read_text())
    meta["config"] = "x"
    (exports["merged"] / "budgetlora.json").write_text(json.dumps(meta))
    _refuse_export(sandbox, capsys, exports["merged"], "the saved config is missing or not a mapping")


def test_an_edited_adapter_setting_in_config_yaml_is_refused(sandbox, capsys):
    run = sandbox / "runs" / "tiny"
    for key, value in (("alpha", 64), ("use_rslora", True)):
        raw = yaml.safe_load((run / "config.yaml").read_text())
        original = raw["lora"][key]
        raw["lora"][key] = value
        (run / "config.yaml").write_text(yaml.safe_dump(raw))
        expect_refusal(
            sandbox,
            capsys,
            ["eval", "{sb}/runs/tiny", "--data", "{sb}/data/test.csv"],
            "but the adapter was trained with",
            allowed=("runs/tiny",),
        )
        raw["lora"][key] = original
        (run / "config.yaml").write_text(yaml.safe_dump(raw))


def test_an_onnx_graph_that_never_ends_is_stopped(sandbox, exports, capsys, monkeypatch):
    import onnx
    from onnx import TensorProto, helper

    from budgetlora.artifacts import onnx as onnx_module

    monkeypatch.setattr(onnx_module, "PROBE_TIMEOUT_S", 2.0)
    body = helper.make_graph(
        [helper.make_node("Add", ["x_in", "one"], ["x_out"]), helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_in", TensorProto.FLOAT, [1, 4]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_out", TensorProto.FLOAT, [1, 4]),
        ],
        [helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])],
    )
    nodes = [
        helper.make_node("Constant", [], ["trip"], value=helper.make_tensor("t", TensorProto.INT64, [], [10**15])),
        helper.make_node("Constant", [], ["cond"], value=helper.make_tensor("c", TensorProto.BOOL, [], [True])),
        helper.make_node("Constant", [], ["x0"], value=helper.make_tensor("x", TensorProto.FLOAT, [1, 4], [0] * 4)),
        helper.make_node("Loop", ["trip", "cond", "x0"], ["logits"], body=body),
    ]
    graph = helper.make_graph(
        nodes,
        "loop",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["b", "l"]) for n in ("input_ids", "attention_mask")],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 4])],
    )
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(exports["onnx"] / "model.onnx")
    )
    _unsealed(exports["onnx"])
    expect_refusal(sandbox, capsys, ["classify", "{sb}/exports/onnx", "match goal"], "after 2 s, and was stopped")


def test_comparing_a_run_with_itself_is_refused(sandbox, capsys):
    expect_refusal(sandbox, capsys, ["compare", "{sb}/runs/tiny", "{sb}/runs/tiny/", "--out", "{sb}/c"], "given twice")


# ----- beyond one label: the task keys, their data, their files (multi-label, regression, pairs) ----

TASK_CONFIG_CASES = [
    ("task=ranking", "'task': got 'ranking'"),
    ("data.label_columns=[a, b]", "'data.label_columns': several label columns are multi-label"),
    ("data.label_columns=[a, a]", "'data.label_columns': lists a column twice"),
    ("data.label_separator=a", "'data.label_separator': 'a': 1-3 printable characters, no letters"),
    ("data.label_separator=''", "'data.label_separator'"),
    ("data.label_separator=' , '", "'data.label_separator'"),
    ("data.text_pair_columns=[text]", "'data.text_pair_columns': names the two columns of a text pair"),
    ("data.text_pair_columns=[text, text]", "'data.text_pair_columns'"),
    ("data.text_pair_columns=[a, b, c]", "'data.text_pair_columns'"),
    ("train.loss=mse", "'train.loss': mse is a regression loss"),
    ("train.loss=hinge", "'train.loss': got 'hinge'"),
    ("train.class_weights=heavy", "'train.class_weights': got 'heavy'"),
    ("train.class_weights={World: -1}", "'train.class_weights.World': got -1.0"),
    ("train.class_weights={World: 0}", "'train.class_weights.World': got 0.0"),
    ("train.class_weights={Moon: 2}", "'train.class_weights': unknown class(es) Moon"),
    ("train.focal_gamma=-1", "'train.focal_gamma': got -1.0"),
    ("train.focal_gamma=.nan", "must be a finite number"),
    ("train.calibrate=sometimes", "'train.calibrate': got 'sometimes'"),
    ("data.val_file={sb}/nope.csv", "not found"),
]


@pytest.mark.parametrize("item, message", TASK_CONFIG_CASES, ids=[c[0][:40] for c in TASK_CONFIG_CASES])
def test_task_keys_are_refused_before_any_work(sandbox, capsys, item, message):
    expect_refusal(sandbox, capsys, TRAIN + ["--set", item], message)


TASK_PAIRS = [  # (task, key=value, message): a key that does not fit the task
    ("regression", "train.loss=focal", "'train.loss': focal is a classification loss"),
    ("regression", "train.class_weights=balanced", "'train.class_weights': weights classes"),
    ("regression", "data.label_names=[a, b]", "'data.label_names': a regression task has targets"),
    ("multi_label", "train.label_smoothing=0.1", "'train.label_smoothing': smooths a softmax"),
    ("multi_label", "data.label_columns=[a]", "needs one column per class (two or more)"),
    ("single_label", "train.label_smoothing=0.1", ""),  # allowed: then the next key refuses
]


@pytest.mark.parametrize("task, item, message", TASK_PAIRS[:-1], ids=[f"{t}-{i}"[:40] for t, i, _ in TASK_PAIRS[:-1]])
def test_keys_that_do_not_fit_the_task(sandbox, capsys, task, item, message):
    expect_refusal(sandbox, capsys, TRAIN + ["--set", f"task={task}", "--set", item], message)


TASK_DATA = {
    # multi-label
    "ml_unknown.csv": (
        "multi_label",
        {"data.label_names": "[a, b]"},
        'text,label\nmatch,"a,b"\ngoal,a\nteam,c\n',
        "line 4: unknown label 'c' (separator ',')",
    ),
    "ml_all_single.csv": (
        "multi_label",
        {},
        "text,label\nmatch,a\ngoal,b\nteam,a\n",
        "every training row has exactly one label: this is single-label data; use task: single_label",
    ),
    "ml_bad_column.csv": (
        "multi_label",
        {"data.label_columns": "[x, y]"},
        "text,x,y\nmatch,1,0\ngoal,2,1\n",
        "line 3: column 'x' holds '2'",
    ),
    "ml_dict_cell.jsonl": (
        "multi_label",
        {},
        '{"text": "match", "label": {"a": 1}}\n{"text": "goal", "label": ["a", "b"]}\n',
        "are not names, ids or a list of them",
    ),
    "ml_mixed.csv": ("multi_label", {}, 'text,label\nmatch,"a,1"\ngoal,b\n', "labels mix class names with integer ids"),
    "ml_no_positive.csv": (
        "multi_label",
        {"data.label_names": "[a, b, c]"},
        'text,label\nmatch,"a,b"\ngoal,a\n',
        "1 of 3 labels have no positive training rows (c)",
    ),
    # single-label data that is another task's
    "sl_joined.csv": (
        "single_label",
        {},
        'text,label\nmatch,a\ngoal,b\nteam,"a,b"\n',
        "looks like several labels joined by ',': for multi-label data set task: multi_label",
    ),
    "sl_float.csv": ("single_label", {}, "text,label\nmatch,2.5\ngoal,1\n", "(a numeric target? set task: regression)"),
    # regression
    "rg_nan.csv": ("regression", {}, "text,label\nmatch,1.5\ngoal,nan\n", "line 3: column 'label' holds 'nan'"),
    "rg_inf.csv": ("regression", {}, "text,label\nmatch,1.5\ngoal,-inf\n", "must be a finite number"),
    "rg_text.csv": ("regression", {}, "text,label\nmatch,1.5\ngoal,high\n", "holds 'high', not a number"),
    "rg_empty.csv": ("regression", {}, "text,label\nmatch,1.5\ngoal,\n", "line 3: column 'label' holds ''"),
    "rg_missing.csv": ("regression", {"data.label_columns": "[y1, y2]"}, "text,y1\nmatch,1\n", "no label column 'y2'"),
    "rg_constant.csv": ("regression", {}, "text,label\nmatch,2\ngoal,2\nteam,2\n", "never vary"),
    "rg_huge.csv": ("regression", {}, "text,label\nmatch,1e300\ngoal,2\n", "too large for float32"),
    # pairs
    "pair_empty.csv": (
        "single_label",
        {"data.text_pair_columns": "[a, b]"},
        "a,b,label\nmatch,goal,0\nteam, ,1\n",
        "line 3: empty text (one side of a text pair)",
    ),
    "pair_missing.csv": (
        "single_label",
        {"data.text_pair_columns": "[a, b]"},
        "a,label\nmatch,0\n",
        "no text column 'b'",
    ),
}


@pytest.mark.parametrize("name", sorted(TASK_DATA))
def test_task_data_that_cannot_train(sandbox, capsys, name):
    task, sets, content, message = TASK_DATA[name]
    path = sandbox / "data" / name
    path.write_text(content)
    argv = TRAIN + ["--set", f"task={task}", "--set", f"data.train_file={path}", "--set", "data.val_size=0"]
    argv += ["--set", "data.test_file=null"]
    for key, value in sets.items():
        argv += ["--set", f"{key}={value}"]
    expect_refusal(sandbox, capsys, argv, message)


@pytest.mark.parametrize("split", ["data.test_file", "data.val_file"])
def test_a_regression_split_whose_targets_never_vary_is_refused_before_training(sandbox, capsys, split):
    """Pearson and Spearman are undefined there: refused before any training, naming the file."""
    train = sandbox / "data" / "rg_train.csv"
    train.write_text("text,label\nmatch,1.5\ngoal,2.5\nteam,0.5\nscore,3\n")
    flat = sandbox / "data" / "rg_flat.csv"
    flat.write_text("text,label\nmatch,2\ngoal,2\n")
    argv = TRAIN + ["--set", "task=regression", "--set", f"data.train_file={train}", "--set", "data.val_size=0"]
    argv += ["--set", "data.test_file=null", "--set", f"{split}={flat}"]
    expect_refusal(sandbox, capsys, argv, "rg_flat.csv: the regression target(s) label have one value in every row")


DECISIONS_DAMAGE = {
    "not_json": ("{", "decisions.json"),
    "width": ('{"task": "single_label", "width": 9, "temperature": 1.0}', "decisions for a single_label model with 9"),
    "task": ('{"task": "regression", "width": 4}', "decisions for a regression model"),
    "temperature": ('{"task": "single_label", "width": 4, "temperature": -2}', "temperature must be a finite positive"),
    "threshold": (
        '{"task": "single_label", "width": 4, "thresholds": [0.5, 0.5, 0.5, 0.5]}',
        "thresholds need one value per label",
    ),
    "list": ("[1, 2]", "decisions.json: not a JSON object"),
}


@pytest.mark.parametrize("damage", sorted(DECISIONS_DAMAGE))
def test_a_damaged_decisions_file_is_one_error(sandbox, capsys, damage):
    content, message = DECISIONS_DAMAGE[damage]
    (sandbox / "runs" / "tiny" / "decisions.json").write_text(content)
    expect_refusal(
        sandbox, capsys, ["classify", "{sb}/runs/tiny", "match goal"], message, allowed=("runs/tiny/decisions.json",)
    )


def test_labels_json_of_another_task_is_refused(sandbox, capsys):
    (sandbox / "runs" / "tiny" / "labels.json").write_text('{"task": "regression", "names": ["y"]}')
    expect_refusal(
        sandbox,
        capsys,
        ["classify", "{sb}/runs/tiny", "match goal"],
        "task is 'single_label' but the run was trained as 'regression'",
        allowed=("runs/tiny/labels.json",),
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["eval", "{sb}/runs/tiny", "--data", "{sb}/data/test.csv", "--threshold", "0.3"],
            "a threshold applies to multi-label",
        ),
        (["classify", "{sb}/runs/tiny", "a", "b", "--pair", "c"], "2 text(s) but 1 --pair"),
        (["classify", "{sb}/runs/tiny", "a", "--pair", "b"], "texts to classify must be strings"),
    ],
    ids=["threshold-single-label", "pair-count", "pair-on-single-text-model"],
)
def test_task_options_that_do_not_fit_the_run(sandbox, capsys, argv, message):
    expect_refusal(sandbox, capsys, argv, message)


def test_an_export_whose_decisions_are_not_baked_is_refused(sandbox, capsys):
    assert main(["export", str(sandbox / "runs" / "tiny"), "--merged", str(sandbox / "exp")]) == 0
    capsys.readouterr()
    meta = json.loads((sandbox / "exp" / "budgetlora.json").read_text())
    meta["decisions"]["baked"] = False
    (sandbox / "exp" / "budgetlora.json").write_text(json.dumps(meta))
    expect_refusal(
        sandbox, capsys, ["classify", "{sb}/exp", "match goal"], "decisions not marked as baked", allowed=("exp",)
    )


def test_a_storage_left_mid_transaction_by_a_killed_sweep_is_still_recognised(tmp_path):
    """kill -9 during a write leaves a hot rollback journal beside study.db; a read-only probe
    cannot read it, and the storage was once refused as 'not a SQLite database' on the rerun."""
    import signal
    import sqlite3
    import subprocess
    import sys

    from budgetlora.stores import OPTUNA_TABLES, check_sqlite_store, sqlite_tables

    db = tmp_path / "study.db"
    with sqlite3.connect(db) as connection:
        connection.execute("CREATE TABLE studies (x)")
        connection.execute("CREATE TABLE trials (x)")
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys, time\n"
            f"c = sqlite3.connect({str(db)!r}, isolation_level=None)\n"
            "c.execute('PRAGMA cache_size=1'); c.execute('BEGIN')\n"
            "for i in range(50000): c.execute('INSERT INTO trials VALUES (?)', ('x' * 100,))\n"
            "print('ready', flush=True); time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout.readline().strip() == "ready"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert (tmp_path / "study.db-journal").is_file()
    assert sqlite_tables(db) == {"studies", "trials"}
    check_sqlite_store(db, "Optuna storage", OPTUNA_TABLES, "--storage")  # accepted, not refused


# scripts/paired_vs_reference.py: the seed table of a study over seeds -------------------------


def _seed_run(folder: Path, rows: list[tuple[str, int, int]], summary: object = None) -> None:
    folder.mkdir(parents=True)
    text = json.dumps(summary if summary is not None else {"trainable_params": 10, "val": {"accuracy": 0.5}})
    (folder / "summary.json").write_text(text)
    (folder / "test_predictions.csv").write_text("ID,label,pred\n" + "".join(f"{i},{a},{b}\n" for i, a, b in rows))


@pytest.mark.parametrize(
    "case, expected",
    [
        ("not a folder", "not a folder"),
        ("no runs", "no finished runs"),
        ("no label column", "not a finished single-label run"),
        ("summary without val", "not a finished single-label run"),
        ("repeated IDs", "repeated row IDs"),
        ("other rows", "scored other test rows"),
    ],
)
def test_the_seed_table_script_refuses_what_it_cannot_pair_in_one_line(
    tmp_path: Path, case: str, expected: str
) -> None:
    import subprocess
    import sys

    root = tmp_path / "sweep"
    good = [("0", 1, 1), ("1", 2, 0)]
    if case != "not a folder":
        root.mkdir()
        _seed_run(root / "full-seed1", good)
    if case == "no runs":
        shutil.rmtree(root / "full-seed1")
        (root / "notes-seedling").mkdir()
    elif case == "no label column":
        _seed_run(root / "lora-seed1", [])
        (root / "lora-seed1" / "test_predictions.csv").write_text("ID,pred\n0,1\n")
    elif case == "summary without val":
        _seed_run(root / "lora-seed1", good, summary={"trainable_params": 10})
    elif case == "repeated IDs":
        _seed_run(root / "lora-seed1", [("0", 1, 1), ("0", 2, 2)])
    elif case == "other rows":
        _seed_run(root / "lora-seed1", [("0", 1, 1), ("7", 2, 2)])
    script = Path(__file__).resolve().parents[1] / "scripts" / "paired_vs_reference.py"
    done = subprocess.run([sys.executable, str(script), str(root)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert expected in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_the_seed_table_script_pairs_each_seed_with_its_reference(tmp_path: Path) -> None:
    import subprocess
    import sys

    root = tmp_path / "sweep"
    rows = [(str(i), i % 4, i % 4) for i in range(40)]
    _seed_run(root / "full-seed1", rows)
    _seed_run(root / "lora-seed1", [(i, a, (b + 1) % 4 if int(i) < 20 else b) for i, a, b in rows])
    script = Path(__file__).resolve().parents[1] / "scripts" / "paired_vs_reference.py"
    done = subprocess.run([sys.executable, str(script), str(root)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "| lora-seed1 | 10 | 50.00 | 50.00 (" in done.stdout  # 20 of 40 rows right
    assert "| lora | 1 | 50.00 ± - | -50.00 | 0.000 |" in done.stdout  # 20 discordant pairs, all one way


@pytest.mark.parametrize("value", ["yes", "bf16", "2", ""])
def test_an_unknown_cpu_bf16_setting_is_one_clear_error(monkeypatch, value: str) -> None:
    from budgetlora.errors import BudgetLoraError
    from budgetlora.runtime import cpu_bf16_pays

    monkeypatch.setenv("BUDGETLORA_CPU_BF16", value)
    cpu_bf16_pays.cache_clear()
    try:
        with pytest.raises(BudgetLoraError, match="BUDGETLORA_CPU_BF16=.*use 0"):
            cpu_bf16_pays()
    finally:
        cpu_bf16_pays.cache_clear()


def test_cpu_bf16_off_keeps_auto_at_fp32(monkeypatch) -> None:
    import torch

    from budgetlora.runtime import cpu_bf16_pays, resolve_precision

    monkeypatch.setenv("BUDGETLORA_CPU_BF16", "0")
    cpu_bf16_pays.cache_clear()
    try:
        assert resolve_precision("auto", torch.device("cpu")) == "fp32"
        assert resolve_precision("bf16", torch.device("cpu")) == "bf16"  # an explicit choice stands
    finally:
        cpu_bf16_pays.cache_clear()
