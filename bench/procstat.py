"""CPU time of processes, read from /proc, for the benchmarks' CPU-per-message figures."""

from __future__ import annotations

import os
from pathlib import Path


def cpu_seconds(pid: int) -> float:
    """User and system CPU time ``pid`` has used (utime and stime of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CPUMeter:
    """CPU seconds each of ``pids`` (process id by name) spends between start and stop."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.used: dict[str, float] = {}

    def start(self) -> None:
        self.used = {name: -cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self) -> None:
        for name, pid in self.pids.items():
            self.used[name] += cpu_seconds(pid)

    def per(self, count: int) -> dict[str, float]:
        """CPU seconds of each process per one of ``count`` things done meanwhile."""
        return {name: seconds / max(count, 1) for name, seconds in self.used.items()}
