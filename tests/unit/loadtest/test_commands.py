"""Generated reports record a command a reader can run: no local paths."""

from __future__ import annotations

from loadtest.commands import repeatable_command


def test_local_path_options_are_left_out_in_both_forms() -> None:
    argv = ["--duration", "600", "--workdir", "/root/dbg/soak", "--report=/tmp/r.md", "--keep"]
    command = repeatable_command("python -m loadtest.soak", argv, ("--workdir", "--report"))
    assert command == "python -m loadtest.soak --duration 600 --keep"


def test_what_changes_the_run_is_kept_and_quoted() -> None:
    argv = ["--runs", "3", "--json", "/tmp/full.json", "--servers", "hub,limit", "--x", "a b"]
    command = repeatable_command("python -m loadtest.bench", argv, ("--json",))
    assert command == "python -m loadtest.bench --runs 3 --servers hub,limit --x 'a b'"
