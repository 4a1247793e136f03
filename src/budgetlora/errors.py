class BudgetLoraError(Exception):
    """An error caused by user input: the CLI prints it as one line and exits 2."""


class OverBudgetError(BudgetLoraError):
    """The configured model has more trainable parameters than the budget allows."""


class RunInterrupted(Exception):
    """Training stopped on a signal after writing a checkpoint; the CLI prints the message (which
    includes the resume command) and exits with `exit_code` (128 + the signal number)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
