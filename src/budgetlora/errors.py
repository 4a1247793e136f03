class BudgetLoraError(Exception):
    """An error caused by user input: the CLI prints it as one line and exits 2."""


class OverBudgetError(BudgetLoraError):
    """The configured model has more trainable parameters than the budget allows."""
