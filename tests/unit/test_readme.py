"""The README stays in step with the code it documents."""

from __future__ import annotations

from pathlib import Path

from hub.config import markdown_table
from hub.errors import CloseCode

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_configuration_table_is_generated_from_the_options() -> None:
    assert markdown_table() in README, "run `python -m hub.config` and paste the table"


def test_every_close_code_is_documented() -> None:
    for code in CloseCode:
        assert f"| {code.value} |" in README, code


def test_the_two_commands_open_the_readme() -> None:
    head = README.split("## Configuration")[0]
    assert "hub serve" in head and "./scripts/test" in head
