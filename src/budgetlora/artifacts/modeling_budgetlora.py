"""A budgetlora pooled classifier for plain Transformers: an encoder, mean or first-token pooling
and one linear layer. budgetlora saves this file beside the weights of an export (and of an
adapter), so that

    AutoModelForSequenceClassification.from_pretrained(OUT, trust_remote_code=True)
    pipeline("text-classification", model=OUT, trust_remote_code=True)

load it without budgetlora. The config is the encoder's own (BertConfig, RobertaConfig, ...) with
`budgetlora_pooling` ("mean" or "cls"), `problem_type`, and an `auto_map` entry pointing here.
The run's decisions (a temperature, per-label thresholds, the regression targets' scale) are
already folded into `classifier`'s weights; `budgetlora_decisions` records what was folded in.
"""

import torch
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class BudgetLoraPooledForSequenceClassification(PreTrainedModel):
    base_model_prefix = "encoder"  # a plain encoder checkpoint loads into .encoder
    _keys_to_ignore_on_load_unexpected = [r"pooler\."]  # base checkpoints ship a pooler this head never uses
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.pooling = getattr(config, "budgetlora_pooling", "mean")
        encoder = AutoModel.from_config(config)
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None
        self.encoder = encoder
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        segments = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **segments).last_hidden_state
        if self.pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        else:
            pooled = hidden[:, 0]
        logits = self.classifier(pooled)
        loss = None
        if labels is not None:
            problem = getattr(self.config, "problem_type", None)
            if problem == "multi_label_classification":
                loss = nn.functional.binary_cross_entropy_with_logits(logits, labels.float())
            elif problem == "regression":
                loss = nn.functional.mse_loss(
                    logits.view(-1, self.num_labels), labels.float().view(-1, self.num_labels)
                )
            else:
                loss = nn.functional.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits)
