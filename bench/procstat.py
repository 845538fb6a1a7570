"""CPU time of processes, and the machine's CPU time a hypervisor took, read from /proc, for
the benchmarks' CPU-per-message figures and for reading their latencies."""

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


def _steal_and_total() -> tuple[int, int]:
    """Ticks of all the machine's CPUs: stolen, and in all (the ``cpu`` line of /proc/stat:
    user, nice, system, idle, iowait, irq, softirq, steal)."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return fields[7], sum(fields)


class StealMeter:
    """The share of the machine's CPU time that the hypervisor gave to other guests while
    this one had work to run (steal time), between start and stop.

    On a shared virtual machine it is what no code of ours can shorten: a process that
    is ready waits for the host, and every figure of latency taken meanwhile includes
    that wait. A bare-metal machine reads 0."""

    def __init__(self) -> None:
        self._start = (0, 0)
        self.share = 0.0

    def start(self) -> None:
        self._start = _steal_and_total()

    def stop(self) -> None:
        steal, total = _steal_and_total()
        self.share = (steal - self._start[0]) / max(total - self._start[1], 1)
