"""Starting and stopping the processes a scenario needs, and talking to them.

Every process is started through a ``Group``, which stops all of them when it
is left, also on failure: SIGTERM first, SIGKILL after a grace period. On
Linux each child also gets SIGKILL if the bench itself dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

PYTHON = sys.executable
# py-spy installed next to this Python, else from PATH.
PY_SPY = (
    str(Path(PYTHON).with_name("py-spy")) if Path(PYTHON).with_name("py-spy").exists() else "py-spy"
)
READY_TIMEOUT = 30.0
STOP_GRACE = 10.0
_PR_SET_PDEATHSIG = 1
# Numbers the log files of all groups in the order their processes started.
_numbers = itertools.count(1)


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class ProcessFailed(RuntimeError):
    """A bench process exited early, did not get ready, or answered with an error."""


class Process:
    def __init__(self, name: str, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.name = name
        self.proc = proc
        self.log = log
        self.started_at = time.time()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def failed(self, what: str) -> ProcessFailed:
        return ProcessFailed(f"{self.name} (pid {self.pid}) {what}; its log ends:\n{self.tail()}")

    async def read_json(self, within: float) -> dict[str, Any]:
        """The next JSON line the process writes on stdout."""
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), within)
        except TimeoutError:
            raise self.failed(f"said nothing within {within:g}s") from None
        if not line:
            await self.proc.wait()
            raise self.failed(f"exited with status {self.proc.returncode}")
        message: dict[str, Any] = json.loads(line)
        if "error" in message:
            raise self.failed(f"answered {message['error']}")
        return message

    async def request(self, command: dict[str, Any], within: float) -> dict[str, Any]:
        """Sends one control command (tests.bench.runtime) and returns the answer."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command).encode() + b"\n")
        await self.proc.stdin.drain()
        return await self.read_json(within)

    async def finish(self, within: float) -> dict[str, Any]:
        """Waits for a one-shot process to print its result and exit with status 0."""
        result = await self.read_json(within)
        await self.exited(10.0)
        return result

    async def exited(self, within: float) -> None:
        """Waits for the process to exit with status 0."""
        try:
            code = await asyncio.wait_for(self.proc.wait(), within)
        except TimeoutError:
            raise self.failed(f"did not exit within {within:g}s") from None
        if code != 0:
            raise self.failed(f"exited with status {code}")

    def peak_rss_bytes(self) -> int:
        """VmHWM: the most resident memory the process has had."""
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise self.failed("has no VmHWM in /proc")

    async def stop(self, grace: float = STOP_GRACE, sig: int = signal.SIGTERM) -> None:
        if self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()


class Group:
    """The processes of one scenario run; leaving the group stops them all, newest first."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._processes: list[Process] = []
        self._closers: list[Callable[[], Awaitable[None]]] = []

    async def __aenter__(self) -> Group:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        await self.stop_all()

    def defer(self, close: Callable[[], Awaitable[None]]) -> None:
        """Has ``close`` called on leaving, before the processes are stopped."""
        self._closers.append(close)

    async def stop_all(self) -> None:
        # Shielded: a cancelled bench still closes and stops what it started.
        while self._closers:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._closers.pop()())
        while self._processes:
            await asyncio.shield(self._processes.pop().stop())

    async def start(
        self, name: str, args: Sequence[str], *, env: dict[str, str] | None = None
    ) -> Process:
        """Starts ``args`` with stdin/stdout piped and stderr in a log file under the workdir."""
        log = self.workdir / f"{next(_numbers):03d}-{name}.log"
        with log.open("wb") as stderr:
            proc = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                env={**os.environ, **(env or {})},
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                limit=64 * 1024 * 1024,
            )
        process = Process(name, proc, log)
        self._processes.append(process)
        return process

    async def helper(self, module: str, *args: str) -> tuple[Process, dict[str, Any]]:
        """Starts ``python -m tests.bench.<module>`` and waits for its ready line."""
        process = await self.start(module, [PYTHON, "-m", f"tests.bench.{module}", *args])
        return process, await process.read_json(READY_TIMEOUT)

    async def wait_log(
        self, process: Process, match: Callable[[dict[str, Any]], bool], within: float
    ) -> dict[str, Any]:
        """The first JSON log line of ``process`` (stderr) that ``match`` accepts."""
        deadline = time.monotonic() + within
        offset = 0
        pending = b""
        while time.monotonic() < deadline:
            with process.log.open("rb") as log:
                log.seek(offset)
                chunk = log.read()
            offset += len(chunk)
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if isinstance(record, dict) and match(record):
                        return record
            if process.proc.returncode is not None:
                raise process.failed(f"exited with status {process.proc.returncode}")
            await asyncio.sleep(0.02)
        raise process.failed(f"did not log what was awaited within {within:g}s")
