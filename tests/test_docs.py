"""The README stays true to the code it describes: its config table is the one the config's own
fields make, and every file it links exists."""

from __future__ import annotations

import re
from pathlib import Path

from budgetlora.config import reference_markdown

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_readme_config_table_is_made_from_the_config_fields():
    table = README.split("<!-- config-table -->\n", 1)[1].split("<!-- /config-table -->", 1)[0]
    assert table == reference_markdown(), (
        "README's config table is out of date; regenerate it with: python3 -c \"from budgetlora.config import "
        "reference_markdown; print(reference_markdown(), end='')\""
    )


def test_every_linked_file_exists():
    for target in re.findall(r"\]\(((?:docs|studies|configs|scripts)/[^)#\s]+)", README):
        assert (ROOT / target).exists(), target


def test_every_command_in_the_readme_exists():
    from budgetlora.cli import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)
    for command in re.findall(r"`budgetlora ([a-z]+)", README):
        assert command in commands, command
