"""A real `hub serve` process on a free port, and tokens signed for it."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hub.auth.tokens import issue_token

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class HubProcess:
    """A running `hub serve`.  ``token()`` signs with its secret."""

    port: int
    secret: str
    process: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/realtime/v1/websocket"

    def token(
        self,
        sub: str | None = "user-1",
        orgs: list[str] | dict[str, str] | None = None,
        role: str = "authenticated",
        ttl: float = 3600,
        **extra: Any,
    ) -> str:
        return issue_token(self.secret, sub=sub, orgs=orgs, role=role, ttl=ttl, extra=extra)

    def admin_token(self, ttl: float = 3600) -> str:
        return self.token(sub="admin", role="service_role", ttl=ttl)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str) -> float:
        """The value of ``name`` (summed over its labels) on ``/metrics``."""
        with urllib.request.urlopen(f"{self.http_url}/metrics", timeout=5) as response:
            text = response.read().decode()
        values = [
            float(line.rpartition(" ")[2])
            for line in text.splitlines()
            if line.startswith((name + " ", name + "{"))
        ]
        if not values:
            raise KeyError(f"{name} is not on /metrics")
        return sum(values)


def start_hub(
    tmp_path: Path,
    env: dict[str, str] | None = None,
    secret: str | None = None,
    port: int | None = None,
) -> HubProcess:
    """Start `hub serve` and wait until /healthz answers."""
    port = port or free_port()
    secret = secret or secrets.token_urlsafe(32)
    full_env = {**os.environ, "HUB_JWT_SECRET": secret, "HUB_LOG_LEVEL": "info"}
    full_env.update(env or {})
    log_path = tmp_path / f"hub-{port}-{time.monotonic_ns()}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "hub", "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    hub = HubProcess(port, secret, process, log_path, full_env)
    deadline = time.monotonic() + 15
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"hub serve exited with {process.returncode}:\n{hub.log()}")
        try:
            with urllib.request.urlopen(f"{hub.http_url}/healthz", timeout=1) as response:
                if response.status == 200:
                    return hub
        except OSError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"hub serve did not become healthy:\n{hub.log()}")
        time.sleep(0.1)


def stop_hub(hub: HubProcess) -> None:
    if hub.process.poll() is None:
        hub.process.terminate()
        try:
            hub.process.wait(10)
        except subprocess.TimeoutExpired:
            hub.process.kill()
            hub.process.wait()


async def run_cli(*args: str, env: dict[str, str], within: float = 30) -> tuple[int, str, str]:
    """Run ``hub ARGS``; return (exit code, stdout, stderr)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    full_env.update(env)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hub",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=full_env,
        cwd=ROOT,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), within)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"hub {' '.join(args)} ran for more than {within} s") from None
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()
