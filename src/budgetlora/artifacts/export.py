"""Merged exports: the adapters folded into the base weights, saved as a Transformers model
directory that loads without budgetlora, with the tokenizer, real class names and a model card.

- `head.type: auto`: the model's own `*ForSequenceClassification` (plain `from_pretrained`).
- `head.type: linear` (mean / CLS pooling): the encoder's config with an `auto_map` to
  `modeling_budgetlora.py`, saved beside the weights: `from_pretrained(OUT, trust_remote_code=True)`
  and `pipeline(..., trust_remote_code=True)` load it (the Hub's way for a custom head).

Every export is loaded back the way a plain user would, before it is renamed into place, and
refused with one line if its predictions differ: never a silent random head.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from budgetlora import atomic, jsonfile
from budgetlora.artifacts import run_dir as rd
from budgetlora.artifacts.export_meta import decisions_of, export_config, read_export_meta, space_of
from budgetlora.artifacts.run_dir import EXPORT_FORMAT, EXPORT_META
from budgetlora.artifacts.model_card import write_export_card
from budgetlora.artifacts.trained import MODEL_WEIGHTS, MODELING_FILE, POOLED_CLASS, TrainedModel, save_tensors, untie
from budgetlora.errors import BudgetLoraError, first_line
from budgetlora.task import Decisions, LabelSpace, logit

# the worst logit difference a plain reload may show against budgetlora's own model (fp32 round-off)
RELOAD_TOLERANCE = 1e-3


def check_export_target(out: Path, overwrite: bool, source: Path) -> None:
    """OUT is new, empty, or an earlier budgetlora export (with `overwrite`); never a run, never
    inside one, never a directory that holds the source run."""
    if Path(out).is_symlink():
        raise BudgetLoraError(f"export target {out} is a symbolic link; give the folder itself")
    out, source = Path(out).resolve(), Path(source).resolve()
    if out == source or source.is_relative_to(out) or rd.inside_run(out) is not None:
        raise BudgetLoraError(
            f"export target {out} is the run, holds it or is inside a run directory; "
            "export into a new or empty directory"
        )
    if out.exists():
        if not out.is_dir():
            raise BudgetLoraError(f"export target {out} exists and is not a directory")
        if any(out.iterdir()):
            if not (out / EXPORT_META).is_file():
                raise BudgetLoraError(
                    f"export target {out} is not empty and is not a budgetlora export; "
                    "export into a new or empty directory"
                )
            if not overwrite:
                raise BudgetLoraError(f"export target {out} holds an earlier export; pass --overwrite to replace it")
            inner = next((m.parent for m in out.rglob(rd.MARKER)), None) or next(
                (d for d in out.rglob("*") if d.is_dir() and rd.is_run_dir(d)), None
            )
            if inner is not None:
                raise BudgetLoraError(
                    f"export target {out} holds the run {inner}; --overwrite replaces only the "
                    "export: move the run out first"
                )
            foreign = foreign_files(out)
            if foreign:
                raise BudgetLoraError(
                    f"export target {out} holds {foreign[0]}, which the earlier export did not "
                    f"write ({len(foreign)} such file(s)); --overwrite replaces only the export: "
                    "move them out first"
                )


def foreign_files(export: Path) -> list[str]:
    """Files in an export folder that its budgetlora.json does not list (an export made before the
    list existed counts every file as its own)."""
    try:
        listed = read_export_meta(export).get("files")
    except BudgetLoraError:
        return []
    if not isinstance(listed, list):
        return []
    present = {p.relative_to(export).as_posix() for p in export.rglob("*") if not p.is_dir()}
    return sorted(present - set(map(str, listed)) - {EXPORT_META})


def seal(tmp: Path, meta: dict[str, Any], weights: str) -> None:
    """budgetlora.json, written last: the export's files (what --overwrite may replace) and the
    sha256 of its weights (a swapped weight file is refused on load)."""
    files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if not p.is_dir())
    atomic.write_json(tmp / EXPORT_META, {**meta, "files": files, "weights_sha256": file_sha256(tmp / weights)})


def file_sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_weights(path: Path, meta: dict[str, Any], weights: str) -> None:
    expected = meta.get("weights_sha256")
    if isinstance(expected, str) and (Path(path) / weights).is_file() and file_sha256(Path(path) / weights) != expected:
        raise BudgetLoraError(
            f"{Path(path) / weights} is not the file this export wrote (its sha256 differs from "
            f"{EXPORT_META}'s); export the run again"
        )


def merged_model(trained: TrainedModel) -> nn.Module:
    """A CPU, fp32, eval-mode copy with the adapters folded in (or the fully trained model) and the
    run's decisions baked into its last layer."""
    model = copy.deepcopy(trained.model).to("cpu").float().eval()
    if callable(getattr(model, "merge_and_unload", None)):
        with torch.no_grad():
            model = model.merge_and_unload()
    assert trained.decisions is not None
    bake_decisions(model, trained.decisions)
    return model.eval()


def output_layer(model: nn.Module) -> nn.Linear:
    """The linear layer that gives the logits: `classifier` (BERT, DistilBERT, DeBERTa, ModernBERT,
    budgetlora's pooled head) or `classifier.out_proj` (RoBERTa's head)."""
    head = getattr(model, "classifier", None)
    layer = head if isinstance(head, nn.Linear) else getattr(head, "out_proj", None)
    if not isinstance(layer, nn.Linear) or layer.bias is None:
        raise BudgetLoraError(
            f"{type(model).__name__}: no linear output layer with a bias (classifier / classifier.out_proj) "
            "to carry the run's decisions; use head.type: linear"
        )
    return layer


def bake_decisions(model: nn.Module, decisions: Decisions) -> None:
    """Fold the decisions into the last layer, so plain Transformers and ONNX Runtime answer as the
    run does: weights and bias / temperature (single-label: same argmax, calibrated softmax), bias
    - logit(threshold) (multi-label: a label is on where its output is > 0, sigmoid > 0.5), and
    weights x std, bias x std + mean (regression: outputs in the targets' units)."""
    if decisions.baked:
        return
    layer = output_layer(model)
    weight, bias = layer.weight.detach().double(), layer.bias.detach().double()
    if decisions.task == "single_label":
        weight, bias = weight / decisions.temperature, bias / decisions.temperature
    elif decisions.task == "multi_label":
        bias = bias - torch.from_numpy(logit(decisions.label_thresholds))
    elif decisions.scale:
        scale, shift = (
            torch.tensor(decisions.scale, dtype=torch.float64),
            torch.tensor(decisions.shift, dtype=torch.float64),
        )
        weight, bias = weight * scale[:, None], bias * scale + shift
    with torch.no_grad():
        layer.weight.copy_(weight.float())
        layer.bias.copy_(bias.float())


PROBE_TEXTS = (
    "Stocks rally as the central bank holds interest rates",
    "The team won the final in extra time",
    "A new chip doubles battery life",
    "Talks resume after the ceasefire",
    "short",
)


def probe_batch(tokenizer: Any, pairs: bool = False, segments: bool = False) -> dict[str, torch.Tensor]:
    """A few rows to compare the run and its export on (text pairs for a pair-trained run, with
    their segment ids when its model has them)."""
    from budgetlora.data.tokens import uses_segments

    second = list(reversed(PROBE_TEXTS)) if pairs else None
    return dict(
        tokenizer(
            list(PROBE_TEXTS),
            second,
            padding=True,
            truncation=True,
            max_length=64,
            return_tensors="pt",
            return_token_type_ids=pairs and segments and uses_segments(tokenizer),
        )
    )


def describe_outputs(config: Any, trained: TrainedModel) -> None:
    """config.json as Transformers reads it: problem_type, the output names, and (for people and
    other tools) the decisions baked into the last layer."""
    from budgetlora.task import PROBLEM_TYPES

    assert trained.space is not None and trained.decisions is not None
    names = list(trained.space.names)
    config.num_labels = len(names)
    config.problem_type = PROBLEM_TYPES[trained.space.task]
    config.id2label, config.label2id = dict(enumerate(names)), {n: i for i, n in enumerate(names)}
    config.budgetlora_decisions = trained.decisions.as_baked().to_json()


def _save_pooled(model: nn.Module, tmp: Path, trained: TrainedModel) -> None:
    config = copy.deepcopy(model.config)
    config.architectures = [POOLED_CLASS]
    config.auto_map = {"AutoModelForSequenceClassification": f"modeling_budgetlora.{POOLED_CLASS}"}
    config.budgetlora_pooling = model.pooling
    describe_outputs(config, trained)
    config.save_pretrained(str(tmp))
    save_tensors(untie(model.state_dict()), tmp / MODEL_WEIGHTS, metadata={"format": "pt"})
    shutil.copyfile(MODELING_FILE, tmp / MODELING_FILE.name)


def _save_auto(model: nn.Module, tmp: Path, trained: TrainedModel) -> None:
    describe_outputs(model.config, trained)
    model.save_pretrained(str(tmp), safe_serialization=True)


def load_plain(path: Path, pooled: bool) -> nn.Module:
    """The export as plain Transformers loads it (for a pooled head: the class the auto_map names,
    from the same file, so nothing is copied into the Hugging Face modules cache), strictly."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    weights = Path(path) / MODEL_WEIGHTS
    if not weights.is_file():
        pickled = [p.name for p in Path(path).glob("*.bin")]
        raise BudgetLoraError(
            f"{weights} is missing"
            + (
                f" ({', '.join(pickled)} is there: budgetlora loads weights "
                "only from safetensors, because unpickling can run code)"
                if pickled
                else "; the export is incomplete"
            )
        )
    try:
        if pooled:
            from budgetlora.artifacts.modeling_budgetlora import BudgetLoraPooledForSequenceClassification

            model, info = BudgetLoraPooledForSequenceClassification.from_pretrained(
                str(path),
                config=AutoConfig.from_pretrained(str(path), trust_remote_code=False),
                output_loading_info=True,
                use_safetensors=True,
                trust_remote_code=False,
            )
        else:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                str(path), output_loading_info=True, use_safetensors=True, trust_remote_code=False
            )
    except Exception as exc:  # noqa: BLE001 - a damaged export: safetensors', Transformers' and torch's many types
        code = "trust_remote_code" in str(exc) or "custom code" in str(exc)
        raise BudgetLoraError(
            f"{path}: "
            + (
                "its config.json asks to run code shipped with it; budgetlora never runs code from an export"
                if code
                else f"not a loadable export ({type(exc).__name__}: {first_line(exc, 160)})"
            )
        ) from None
    problems = {
        k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")
    }
    if problems:
        raise BudgetLoraError(f"{path}: the weights do not load completely into the model ({problems})")
    bad = next(
        (n for n, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()), None
    )
    if bad is not None:
        raise BudgetLoraError(f"{weights}: tensor {bad} holds NaN or infinite values; the export is damaged")
    return model.eval()


def run_logits(trained: TrainedModel, batch: dict[str, torch.Tensor]) -> np.ndarray:
    """The trained model's own (unmerged) logits for `batch` in fp32: what an export must reproduce,
    so an error in merging shows as well as one in saving."""
    model = trained.model
    first = next(model.parameters())
    if (
        first.device.type != "cpu" or first.dtype != torch.float32
    ):  # the reload runs on CPU in fp32: compare like with like
        model = copy.deepcopy(model).to("cpu").float().eval()
    with torch.inference_mode():
        return model(**batch).logits.float().numpy()


def expected_outputs(trained: TrainedModel, batch: dict[str, torch.Tensor]) -> np.ndarray:
    """What the export must output for `batch`: the run's own outputs with its decisions applied
    as the export's last layer applies them."""
    assert trained.decisions is not None
    return trained.decisions.baked_outputs(run_logits(trained, batch))


def output_tolerance(trained: TrainedModel) -> float:
    """RELOAD_TOLERANCE in the export's units (regression outputs are scaled by the targets' std)."""
    assert trained.decisions is not None
    return RELOAD_TOLERANCE * max([1.0, *map(abs, trained.decisions.scale)])


def _verify(tmp: Path, trained: TrainedModel, pooled: bool) -> float:
    batch = probe_batch(trained.tokenizer, bool(trained.cfg.data.text_pair_columns), trained.segments)
    expected = torch.from_numpy(expected_outputs(trained, batch)).float()
    with torch.inference_mode():
        got = load_plain(tmp, pooled)(**batch).logits
    diff = float((expected - got).abs().max())
    same_answers = trained.cfg.task != "single_label" or torch.equal(expected.argmax(-1), got.argmax(-1))
    if not diff <= output_tolerance(trained) or not same_answers:
        raise BudgetLoraError(
            f"the export would not predict like the run when loaded with plain Transformers "
            f"(max logit difference {diff:.3g}); nothing was written"
        )
    return diff


def export_space(trained: TrainedModel) -> LabelSpace:
    """An export's outputs: the run's, with regression scaling already in the last layer."""
    assert trained.space is not None
    return LabelSpace(trained.space.task, trained.space.names)


def export_meta(trained: TrainedModel, kind: str, **extra: Any) -> dict[str, Any]:
    cfg = trained.cfg
    return {
        "format": EXPORT_FORMAT,
        "kind": kind,
        "source": str(trained.source.resolve()),
        "head": {"type": cfg.head.type, "pooling": cfg.head.pooling},
        "label_names": trained.label_names,
        "label_space": export_space(trained).to_json(),
        "decisions": trained.decisions.as_baked().to_json() if trained.decisions is not None else None,
        "config": cfg.to_dict(),
        **extra,
    }


def export_merged(trained: TrainedModel, out: Path, overwrite: bool = False) -> Path:
    """Write the merged export to `out` (built in a temp directory, checked, then renamed)."""
    check_export_target(out, overwrite, trained.source)
    model = merged_model(trained)
    pooled = trained.cfg.head.type == "linear"
    with atomic.atomic_dir(out, replace=True) as tmp:
        (_save_pooled if pooled else _save_auto)(model, tmp, trained)
        trained.tokenizer.save_pretrained(str(tmp))
        diff = _verify(tmp, trained, pooled)
        write_export_card(tmp, trained, "merged")
        seal(tmp, export_meta(trained, "merged", reload_max_logit_diff=diff), MODEL_WEIGHTS)
    return out


def check_export_head(path: Path, meta: dict[str, Any], cfg: Any) -> None:
    """The head the export's config.json describes must be the one budgetlora.json recorded (an edited
    pooling would silently change every prediction)."""
    recorded = meta.get("head") if isinstance(meta.get("head"), dict) else {}
    if recorded.get("type") != cfg.head.type or (
        cfg.head.type == "linear" and recorded.get("pooling") != cfg.head.pooling
    ):
        raise BudgetLoraError(
            f"{Path(path) / EXPORT_META}: its head ({recorded}) and its saved config "
            f"(type {cfg.head.type}, pooling {cfg.head.pooling}) disagree; the export was edited"
        )
    try:
        config = jsonfile.read(Path(path) / "config.json", max_bytes=2**20)
    except (OSError, BudgetLoraError):
        config = None
    ours = (
        {"AutoModelForSequenceClassification": f"modeling_budgetlora.{POOLED_CLASS}"}
        if cfg.head.type == "linear"
        else None
    )
    if isinstance(config, dict) and config.get("auto_map") != ours:
        raise BudgetLoraError(
            f"{Path(path) / 'config.json'}: its auto_map ({config.get('auto_map')}) names code that "
            "budgetlora did not write; budgetlora never runs code from an export"
        )
    if cfg.head.type != "linear":
        return
    pooling = config.get("budgetlora_pooling") if isinstance(config, dict) else None
    if pooling != cfg.head.pooling:
        raise BudgetLoraError(
            f"{Path(path) / 'config.json'}: budgetlora_pooling is {pooling!r} but {EXPORT_META} "
            f"records {cfg.head.pooling!r}; the export was edited: export the run again"
        )


def load_merged(path: Path, device: torch.device) -> TrainedModel:
    """budgetlora reading its own merged export (no code from the directory runs)."""
    from budgetlora.model import load_tokenizer

    meta = read_export_meta(path)
    cfg = export_config(meta, path)
    space = space_of(meta, path)
    decisions = decisions_of(meta, path, space)
    names = list(space.names)
    check_export_head(path, meta, cfg)
    check_weights(path, meta, MODEL_WEIGHTS)
    model = load_plain(path, cfg.head.type == "linear")
    if model.config.num_labels != len(names):
        raise BudgetLoraError(
            f"{path}: the head has {model.config.num_labels} outputs but {EXPORT_META} lists {len(names)} classes"
        )
    cfg = dataclasses.replace(cfg, model=str(path))
    tokenizer = load_tokenizer(str(path))
    return TrainedModel(cfg, model.to(device).eval(), tokenizer, names, Path(path), "merged", space, decisions)
