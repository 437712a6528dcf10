"""CPU time, read from /proc: where each event's CPU goes, and how busy the two cores were.

Rates alone cannot say whether a gap is the machine: these figures can. A run
whose processes use both cores is bound by the CPU each event costs, summed
over the load generator, the publisher and the subscriber.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def main_thread(pid: int) -> float:
    """CPU seconds (user + system) of the main thread of ``pid``: the publisher's event loop."""
    return _seconds(Path(f"/proc/{pid}/task/{pid}/stat"))


def python_threads(pid: int) -> float:
    """CPU seconds of the threads of ``pid`` that Python started, the main thread aside.

    In the publisher on SQLite, the store's thread and grpc.aio's completion-queue
    poller; in a bare relay, the poller alone. A thread keeps the process's name unless
    it sets one: gRPC's core and libuv's do ("event_engine", "libuv-worker"), Python's do
    not. A thread that ends between the listing and the reading counts for nothing.
    """
    task = Path(f"/proc/{pid}/task")
    name = Path(f"/proc/{pid}/comm").read_text()
    spent = 0.0
    for thread in task.iterdir():
        if thread.name == str(pid):
            continue
        with contextlib.suppress(OSError):
            if (thread / "comm").read_text() == name:
                spent += _seconds(thread / "stat")
    return spent


def process(pid: int) -> float:
    """CPU seconds (user + system) of the whole process, its ended threads included."""
    return _seconds(Path(f"/proc/{pid}/stat"))


def children(pid: int) -> float:
    """CPU seconds of the running child processes of ``pid``: a publisher's delivery workers."""
    spent = 0.0
    for thread in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for child in (thread / "children").read_text().split():
                with contextlib.suppress(OSError):
                    spent += _seconds(Path(f"/proc/{child}/stat"))
    return spent


def _seconds(stat: Path) -> float:
    # The name before the fields is in parentheses and may hold spaces or parentheses.
    fields = stat.read_text().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of stat(5): 12 and 13 after the name.
    return (int(fields[11]) + int(fields[12])) / _TICK


@dataclass(frozen=True)
class Machine:
    busy: float
    total: float

    @staticmethod
    def read() -> Machine:
        """Jiffies the machine's CPUs spent busy, and in all, since boot."""
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        # idle and iowait are the 4th and 5th values of the "cpu" line.
        idle = values[3] + values[4]
        return Machine(busy=sum(values) - idle, total=sum(values))

    def cores_busy_since(self, earlier: Machine) -> float:
        """How many of the machine's cores were busy on average between the two readings."""
        spent = self.total - earlier.total
        cpus = os.cpu_count() or 1
        return cpus * (self.busy - earlier.busy) / spent if spent else 0.0
