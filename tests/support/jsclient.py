"""Helpers for the supabase-js end-to-end tests: install the real client,
run ``js/driver.mjs`` under node, and wait for what it reports.

The client is installed with npm into ``.cache/js`` (git-ignored) the first
time it is needed.  The driver scripts are copied next to it
(``.cache/js/scenarios/``) because ES module imports ignore ``NODE_PATH``:
node resolves ``@supabase/supabase-js`` from the script's own directory
upwards, which then finds ``.cache/js/node_modules``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

ROOT: Final = Path(__file__).resolve().parents[2]
JS_SOURCES: Final = Path(__file__).resolve().parent / "js"
JS_CACHE: Final = ROOT / ".cache" / "js"
PACKAGES: Final = ("@supabase/supabase-js", "ws")
#: Major versions pinned, so a future client release cannot break CI unseen.
SPECS: Final = ("@supabase/supabase-js@^2", "ws@^8")
#: Oldest node the client supports; node 20 is what CI has.
MIN_NODE_MAJOR: Final = 18
NPM_TIMEOUT: Final = 300.0

Event = dict[str, Any]
Predicate = Callable[[Event], bool]


class JsClientUnavailable(RuntimeError):
    """node or npm is missing, too old, or the install failed."""


def _installed(cache: Path) -> bool:
    return all((cache / "node_modules" / name / "package.json").is_file() for name in PACKAGES)


def install_js_client(cache: Path = JS_CACHE) -> Path:
    """Make sure node, supabase-js and ws are there; return the directory
    holding copies of the driver scripts.  Raises JsClientUnavailable."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        raise JsClientUnavailable(
            "node and npm are required for the supabase-js end-to-end tests "
            f"(node: {node}, npm: {npm}); install Node.js 20"
        )
    version = subprocess.run(
        [node, "--version"], capture_output=True, text=True, timeout=30, check=True
    ).stdout.strip()
    major = int(version.lstrip("v").split(".")[0])
    if major < MIN_NODE_MAJOR:
        raise JsClientUnavailable(f"node {version} is too old, need >= {MIN_NODE_MAJOR}")
    cache.mkdir(parents=True, exist_ok=True)
    # A lock, so parallel test processes do not run npm into one directory.
    with (cache.parent / "js.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _installed(cache):
            result = subprocess.run(
                [npm, "install", "--no-audit", "--no-fund", "--prefix", str(cache), *SPECS],
                capture_output=True,
                text=True,
                timeout=NPM_TIMEOUT,
                cwd=cache,
            )
            if result.returncode != 0 or not _installed(cache):
                raise JsClientUnavailable(
                    f"npm install failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
                )
        scripts = cache / "scenarios"
        scripts.mkdir(exist_ok=True)
        for source in JS_SOURCES.glob("*.mjs"):
            shutil.copyfile(source, scripts / source.name)
    return scripts


def package_version(name: str, cache: Path = JS_CACHE) -> str:
    manifest = json.loads((cache / "node_modules" / name / "package.json").read_text())
    return str(manifest["version"])


def kind3_refs(hex_frame: str) -> tuple[str, str, str, str]:
    """``(join_ref, ref, topic, event)`` of a binary kind-3 frame (hex)."""
    data = bytes.fromhex(hex_frame)
    assert data[0] == 3, data[:1]
    lengths = data[1:5]
    fields, at = [], 7
    for length in lengths:
        fields.append(data[at : at + length].decode())
        at += length
    return fields[0], fields[1], fields[2], fields[3]


class JsDriver:
    """One ``node driver.mjs`` process: send it commands, read its events.

    Every event it prints is kept in :attr:`events`, in order.
    """

    def __init__(self, process: asyncio.subprocess.Process, name: str) -> None:
        self.process = process
        self.name = name
        self.events: list[Event] = []
        self.stderr = bytearray()
        self._changed = asyncio.Event()
        self._eof = False
        self._next_id = 0
        self._tasks = [
            asyncio.create_task(self._read_stdout()),
            asyncio.create_task(self._read_stderr()),
        ]

    @classmethod
    async def start(cls, scripts: Path, name: str = "js", max_seconds: float = 80) -> JsDriver:
        process = await asyncio.create_subprocess_exec(
            shutil.which("node") or "node",
            str(scripts / "driver.mjs"),
            json.dumps({"maxSeconds": max_seconds}),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=scripts,
            env={**os.environ, "NODE_NO_WARNINGS": "1"},
        )
        driver = cls(process, name)
        await driver.wait_for(lambda e: e["ev"] == "ready", 15, "the driver to start")
        return driver

    # -- reading -------------------------------------------------------------

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"ev": "garbage", "line": line.decode(errors="replace")}
            event["wall"] = time.time()
            self.events.append(event)
            self._wake()
        self._eof = True
        self._wake()

    async def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        async for line in self.process.stderr:
            self.stderr += line

    def describe(self, last: int = 40) -> str:
        """The last events and stderr, for assertion messages."""
        lines = []
        for event in self.events[-last:]:
            shown = {k: v for k, v in event.items() if k != "wall"}
            text = json.dumps(shown)
            lines.append(text if len(text) < 400 else text[:400] + "...")
        err = self.stderr.decode(errors="replace")[-3000:]
        return (
            f"--- {self.name}: last {last} of {len(self.events)} events ---\n"
            + "\n".join(lines)
            + (f"\n--- {self.name} stderr ---\n{err}" if err else "")
        )

    def mark(self) -> int:
        """A position in :attr:`events`; pass it as ``since`` to look only
        at what came after."""
        return len(self.events)

    def select(self, since: int = 0, **fields: Any) -> list[Event]:
        """Events whose fields equal ``fields``."""
        return [
            e
            for e in self.events[since:]
            if all(e.get(key) == value for key, value in fields.items())
        ]

    def frames(self, client: str, direction: str, since: int = 0) -> list[Event]:
        return self.select(since, ev="wire", client=client, dir=direction)

    async def wait_for(
        self, predicate: Predicate, within: float, what: str, since: int = 0
    ) -> Event:
        """The first event from ``since`` on that satisfies ``predicate``;
        fail the test if none arrives ``within`` seconds."""
        deadline = time.monotonic() + within
        checked = since
        while True:
            while checked < len(self.events):
                event = self.events[checked]
                checked += 1
                if predicate(event):
                    return event
            remaining = deadline - time.monotonic()
            if self._eof or remaining <= 0:
                why = "the driver exited" if self._eof else f"{within} s passed"
                raise AssertionError(f"waited for {what}, but {why}\n{self.describe()}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def wait_event(self, within: float = 10, since: int = 0, **fields: Any) -> Event:
        return await self.wait_for(
            lambda e: all(e.get(key) == value for key, value in fields.items()),
            within,
            f"an event with {fields}",
            since,
        )

    # -- commands ------------------------------------------------------------

    async def command(self, op: str, within: float = 15, **fields: Any) -> Any:
        """Run one driver command and return its result."""
        self._next_id += 1
        ident = self._next_id
        since = self.mark()
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"id": ident, "op": op, **fields}).encode() + b"\n")
        await self.process.stdin.drain()
        answer = await self.wait_for(
            lambda e: e.get("id") == ident and e["ev"] in ("done", "failed"),
            within,
            f"the answer to {op} {fields}",
            since,
        )
        if answer["ev"] == "failed":
            raise AssertionError(f"{op} failed in the driver: {answer['error']}")
        return answer["result"]

    async def client(self, client: str, url: str, key: str, **options: Any) -> None:
        """``createClient(url, key, {realtime: {transport, timeout, params}})``;
        ``accessToken=`` sets supabase-js's accessToken callback."""
        await self.command("client", client=client, url=url, key=key, **options)

    async def subscribe(
        self,
        client: str,
        chan: str,
        topic: str,
        config: dict[str, Any] | None = None,
        *,
        presence: bool = False,
        expect: str | None = "SUBSCRIBED",
        within: float = 10,
    ) -> Event:
        """Create a channel with broadcast (and optionally presence)
        listeners, subscribe, and return the first subscribe status."""
        since = self.mark()
        await self.command(
            "channel", client=client, chan=chan, topic=topic, config=config or {}, presence=presence
        )
        status = await self.wait_event(within, since, ev="status", client=client, chan=chan)
        if expect is not None:
            assert status["status"] == expect, f"{status}\n{self.describe()}"
        return status

    async def close(self) -> None:
        """Stop the driver (politely, then by force) and its readers."""
        if self.process.returncode is None:
            try:
                assert self.process.stdin is not None
                self.process.stdin.write(b'{"op": "exit"}\n')
                await self.process.stdin.drain()
                self.process.stdin.close()
            except (BrokenPipeError, ConnectionResetError):
                pass
            try:
                await asyncio.wait_for(self.process.wait(), 5)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, 5)
