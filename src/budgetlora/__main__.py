import sys

from budgetlora.launch import drop_working_directory

drop_working_directory()  # before the CLI imports yaml, torch, ... (see launch.py)

from budgetlora.cli import main  # noqa: E402

sys.exit(main())
