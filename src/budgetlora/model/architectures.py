"""What budgetlora knows about each encoder architecture: where its layers live, which module
each short target name means, how long an input it can take, and the hub models whose shapes are
known without a download (so `plan` and the budget check work offline).

Short names map to *exact* module paths. Passing PEFT a suffix like "output.dense" would also
match the feed-forward output of every layer (`layer.N.output.dense`); exact paths avoid that.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class Family:
    layer_pattern: str  # regex of a layer's module path prefix; group 1 is the layer index
    targets: dict[str, str]  # short name -> module path inside a layer
    position_offset: int = 0  # positions reserved by the embedding (RoBERTa: padding_idx + 1)


BERT = Family(
    r"(?:^|.*\.)encoder\.layer\.(\d+)\.",
    {
        "q": "attention.self.query",
        "k": "attention.self.key",
        "v": "attention.self.value",
        "o": "attention.output.dense",
        "ffn_in": "intermediate.dense",
        "ffn_out": "output.dense",
    },
)
ROBERTA = Family(BERT.layer_pattern, BERT.targets, position_offset=2)
DISTILBERT = Family(
    r"(?:^|.*\.)transformer\.layer\.(\d+)\.",
    {
        "q": "attention.q_lin",
        "k": "attention.k_lin",
        "v": "attention.v_lin",
        "o": "attention.out_lin",
        "ffn_in": "ffn.lin1",
        "ffn_out": "ffn.lin2",
    },
)
DEBERTA_V2 = Family(
    BERT.layer_pattern,
    {
        "q": "attention.self.query_proj",
        "k": "attention.self.key_proj",
        "v": "attention.self.value_proj",
        "o": "attention.output.dense",
        "ffn_in": "intermediate.dense",
        "ffn_out": "output.dense",
    },
)
MODERNBERT = Family(
    r"(?:^|.*\.)layers\.(\d+)\.", {"qkv": "attn.Wqkv", "o": "attn.Wo", "ffn_in": "mlp.Wi", "ffn_out": "mlp.Wo"}
)

FAMILIES: dict[str, Family] = {
    "bert": BERT,
    "electra": BERT,
    "roberta": ROBERTA,
    "xlm-roberta": ROBERTA,
    "camembert": ROBERTA,
    "distilbert": DISTILBERT,
    "deberta-v2": DEBERTA_V2,
    "modernbert": MODERNBERT,
}
# fused projections: the short names a fused module stands for (all of them, or none)
FUSED = {"qkv": ("q", "k", "v")}

# architectures known without the hub: (model_type, config overrides of CONFIG_MAPPING[model_type]())
KNOWN_ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "roberta-base": (
        "roberta",
        dict(
            max_position_embeddings=514,
            type_vocab_size=1,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            layer_norm_eps=1e-5,
            vocab_size=50265,
        ),
    ),
    "roberta-large": (
        "roberta",
        dict(
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=4096,
            max_position_embeddings=514,
            vocab_size=50265,
            type_vocab_size=1,
            pad_token_id=1,
            layer_norm_eps=1e-5,
        ),
    ),
    "bert-base-uncased": ("bert", {}),
    "distilbert-base-uncased": ("distilbert", {}),
    "microsoft/deberta-v3-base": (
        "deberta-v2",
        dict(
            vocab_size=128100,
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            max_position_embeddings=512,
            relative_attention=True,
            position_buckets=256,
            norm_rel_ebd="layer_norm",
            share_att_key=True,
            pos_att_type=["p2c", "c2p"],
            layer_norm_eps=1e-7,
            max_relative_positions=-1,
            position_biased_input=False,
            type_vocab_size=0,
            pad_token_id=0,
        ),
    ),
    "answerdotai/ModernBERT-base": (
        "modernbert",
        dict(
            vocab_size=50368,
            hidden_size=768,
            num_hidden_layers=22,
            num_attention_heads=12,
            intermediate_size=1152,
            max_position_embeddings=8192,
            global_attn_every_n_layers=3,
            local_attention=128,
            pad_token_id=50283,
            bos_token_id=50281,
            eos_token_id=50282,
            cls_token_id=50281,
            sep_token_id=50282,
        ),
    ),
}
for _alias, _name in (
    ("FacebookAI/roberta-base", "roberta-base"),
    ("FacebookAI/roberta-large", "roberta-large"),
    ("google-bert/bert-base-uncased", "bert-base-uncased"),
    ("distilbert/distilbert-base-uncased", "distilbert-base-uncased"),
    ("deberta-v3-base", "microsoft/deberta-v3-base"),
    ("modernbert-base", "answerdotai/ModernBERT-base"),
):
    KNOWN_ARCHITECTURES[_alias] = KNOWN_ARCHITECTURES[_name]


def family_of(model_type: str) -> Optional[Family]:
    return FAMILIES.get(model_type)


def short_names(model_type: str) -> list[str]:
    family = FAMILIES.get(model_type)
    return (list(family.targets) if family else []) + ["head"]


def position_limit(config: Any) -> Optional[int]:
    """The longest input (in tokens) the model can embed; None when positions are relative only."""
    if getattr(config, "model_type", "") == "deberta-v2" and not getattr(config, "position_biased_input", True):
        return None
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None:
        return None
    family = FAMILIES.get(config.model_type)
    return int(limit) - (family.position_offset if family else 0)


def target_kind(name: str, model_type: str) -> Optional[str]:
    """The short name of the adapted module a parameter belongs to (for the budget breakdown)."""
    family = FAMILIES.get(model_type)
    if family is None:
        return None
    for short, suffix in family.targets.items():
        if re.match(family.layer_pattern + re.escape(suffix) + r"(\.|$)", name):
            return short
    return None
