import sys

from budgetlora.cli import main

sys.exit(main())
