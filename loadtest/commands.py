"""The command line a generated report records: one a reader can run.

A report written by a tool (``docs/reliability.md``, ``docs/benchmarks.md``)
says which command produced it.  Options that only say where files go on
the machine that ran it (a work folder, a JSON file, a database of its own)
change nothing measured, and a reader's machine has none of those paths:
they are left out.
"""

from __future__ import annotations

import shlex
from collections.abc import Collection, Sequence


def repeatable_command(prog: str, argv: Sequence[str], local_options: Collection[str]) -> str:
    """``prog`` and ``argv`` as a shell command, without ``local_options``
    (options that take a value, given as ``--name``; written ``--name VALUE``
    or ``--name=VALUE``)."""
    kept: list[str] = []
    args = iter(argv)
    for arg in args:
        name, eq, _ = arg.partition("=")
        if name in local_options:
            if not eq:
                next(args, None)  # its value
            continue
        kept.append(arg)
    return " ".join([prog, *(shlex.quote(arg) for arg in kept)])
