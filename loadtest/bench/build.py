"""The benchmark's native programs: built from source, and Bun, installed.

* :func:`native` compiles ``loadtest/bench/native/<name>.c`` (the load
  client and the floor server) with the machine's ``cc`` into
  ``.cache/bench/native/`` (git-ignored).  The binary's name carries a hash
  of the source and the flags, so an edited source is rebuilt on next use
  and an unchanged one never is.
* :func:`bun` installs the ``bun`` binary from its npm package (pinned)
  into ``.cache/bench/bun`` with ``npm install --prefix``, once.

    python -m loadtest.bench.build      # build and install everything now
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from loadtest.bench import envs

SOURCES = Path(__file__).resolve().parent / "native"
OUT = envs.CACHE / "native"
CFLAGS = ["-O2", "-Wall", "-Wextra"]
#: Pinned so that a later run measures the same code.
BUN_VERSION = "1.4.5"
BUN_PREFIX = envs.CACHE / "bun"


def native(name: str) -> Path:
    """The binary of ``native/<name>.c``, compiled if this source (and these
    flags) were not compiled before."""
    src = SOURCES / f"{name}.c"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc) on PATH: the native client and floor need one")
    digest = hashlib.sha256(src.read_bytes() + " ".join([cc, *CFLAGS]).encode()).hexdigest()
    binary = OUT / f"{name}-{digest[:16]}"
    if binary.exists():
        return binary
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"[bench] building {src.name} with {cc}", file=sys.stderr, flush=True)
    # Into a temporary name first: a concurrent run never sees half a binary.
    tmp = binary.with_suffix(f".tmp{os.getpid()}")
    subprocess.run([cc, *CFLAGS, "-o", str(tmp), str(src)], check=True)
    tmp.replace(binary)
    for old in OUT.glob(f"{name}-*"):
        if old != binary and not old.name.startswith(f"{name}-{digest[:16]}"):
            old.unlink(missing_ok=True)
    return binary


def bun() -> Path:
    """The ``bun`` binary of npm package ``bun@BUN_VERSION``, installed on first use."""
    binary = BUN_PREFIX / "node_modules" / ".bin" / "bun"
    stamp = BUN_PREFIX / ".bench-version"
    if binary.exists() and stamp.exists() and stamp.read_text() == BUN_VERSION:
        return binary
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not on PATH: the Bun peer is installed from its npm package")
    BUN_PREFIX.mkdir(parents=True, exist_ok=True)
    print(f"[bench] installing bun@{BUN_VERSION} from npm", file=sys.stderr, flush=True)
    subprocess.run(
        [
            npm,
            "install",
            "--prefix",
            str(BUN_PREFIX),
            "--no-audit",
            "--no-fund",
            f"bun@{BUN_VERSION}",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    subprocess.run([str(binary), "--version"], check=True, stdout=subprocess.DEVNULL)
    stamp.write_text(BUN_VERSION)
    return binary


if __name__ == "__main__":
    for what in sys.argv[1:] or ["client", "floor", "bun"]:
        print(bun() if what == "bun" else native(what))
