"""The model: backbone + head + LoRA (build), what each architecture calls its modules
(architectures), and the exact trainable count against the budget (budget)."""

from budgetlora.model.budget import (
    COUNTS,
    BudgetReport,
    check_budget,
    count_trainable,
    known_num_labels,
    max_rank,
    no_rank_fits,
    precheck_budget,
)
from budgetlora.model.build import (
    MINILM_ALIAS,
    PooledClassifier,
    build_base_model,
    build_meta_model,
    build_model,
    forward_logits,
    head_module_names,
    load_model_config,
    load_tokenizer,
    pad_token_id,
    resolve_model_path,
    takes_segments,
    target_module_paths,
    wrap_with_lora,
)

__all__ = [
    "COUNTS",
    "MINILM_ALIAS",
    "BudgetReport",
    "PooledClassifier",
    "build_base_model",
    "build_meta_model",
    "build_model",
    "check_budget",
    "count_trainable",
    "forward_logits",
    "head_module_names",
    "known_num_labels",
    "load_model_config",
    "load_tokenizer",
    "max_rank",
    "no_rank_fits",
    "pad_token_id",
    "precheck_budget",
    "resolve_model_path",
    "takes_segments",
    "target_module_paths",
    "wrap_with_lora",
]
