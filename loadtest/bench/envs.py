"""Per-peer virtual environments under .cache/bench/<name>, installed from PyPI.

Each peer runs in its own venv so that nothing it needs leaks into the
project's environment.  A venv is (re)built when its requirement list
changes; a stamp file holds the list it was built from.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "bench"

#: Pinned so that a later run measures the same code.
REQUIREMENTS: dict[str, list[str]] = {
    "limit": ["uvloop==0.23.0", "orjson==3.13.0"],
    "socketio": [
        "python-socketio==5.18.1",
        "uvicorn[standard]==0.54.0",
        "uvloop==0.23.0",
        "orjson==3.13.0",
        "redis==8.1.0",
    ],
    "channels": [
        "Django==5.2.19",
        "channels==4.3.2",
        "channels-redis==4.3.0",
        "uvicorn[standard]==0.54.0",
        "uvloop==0.23.0",
        "orjson==3.13.0",
    ],
    "broadcaster": [
        "broadcaster[redis]==0.3.1",
        "starlette==1.10.0",
        "uvicorn[standard]==0.54.0",
        "uvloop==0.23.0",
        "orjson==3.13.0",
    ],
    "tools": ["py-spy==0.4.3"],
}


def python(name: str) -> Path:
    return CACHE / name / "bin" / "python"


def ensure(name: str, *, quiet: bool = True) -> Path:
    """Create or update the venv ``name``; return its python."""
    reqs = REQUIREMENTS[name]
    venv = CACHE / name
    stamp = venv / ".bench-requirements"
    wanted = "\n".join(reqs) + "\n"
    if stamp.exists() and stamp.read_text() == wanted and python(name).exists():
        return python(name)
    CACHE.mkdir(parents=True, exist_ok=True)
    print(f"[bench] installing {name}: {' '.join(reqs)}", file=sys.stderr, flush=True)
    if not python(name).exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    cmd = [str(python(name)), "-m", "pip", "install", "--disable-pip-version-check"]
    if quiet:
        cmd.append("-q")
    subprocess.run([*cmd, *reqs], check=True)
    stamp.write_text(wanted)
    return python(name)


if __name__ == "__main__":
    for env in sys.argv[1:] or list(REQUIREMENTS):
        print(ensure(env, quiet=False))
