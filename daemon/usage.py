"""RSS and CPU of the daemon and its workers for status, from psutil. A
Process handle is kept per pid because cpu_percent() measures since the
previous call on the same handle; handles of processes no longer listed are
dropped (they would pile up across upgrades)."""

from __future__ import annotations


class ProcessUsage:
    def __init__(self):
        self._processes: dict = {}

    def __call__(self, pid: int) -> tuple[int, float]:
        """(rss_bytes, cpu_percent) of `pid`; (0, 0.0) when it is gone."""
        import psutil
        process = self._processes.get(pid)
        try:
            if process is None:
                process = self._processes[pid] = psutil.Process(pid)
                process.cpu_percent(None)
            return process.memory_info().rss, process.cpu_percent(None)
        except psutil.Error:
            return 0, 0.0

    def forget(self, pid: int) -> None:
        self._processes.pop(pid, None)

    def keep_only(self, pids: set[int]) -> None:
        for pid in set(self._processes) - pids:
            del self._processes[pid]
