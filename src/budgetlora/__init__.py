"""budgetlora: LoRA fine-tuning of frozen encoders under a hard trainable-parameter budget."""

__version__ = "0.1.0"
