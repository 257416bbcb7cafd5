"""What other processes did to the machine while a benchmark ran (benchmarks share this module; run them as scripts)."""

from __future__ import annotations

import os
import time

import psutil


class ForeignLoad:
    """CPU time other processes took while the block ran, in % of all cores: a shared machine's noise, recorded.

    This process and its finished children are never foreign; `live_children`: neither are its running children
    (a pipeline's stage workers).
    """

    def __init__(self, *, live_children: bool = False) -> None:
        self.live_children = live_children
        self.percent = 0.0

    def __enter__(self) -> ForeignLoad:
        self.process = psutil.Process()
        self.start = (time.perf_counter(), self._busy(), self._own())
        return self

    def __exit__(self, *exc: object) -> None:
        wall, busy, own = (now - then for now, then in zip((time.perf_counter(), self._busy(), self._own()), self.start))
        self.percent = max(0.0, (busy - own) / (wall * (os.cpu_count() or 1)) * 100)

    @staticmethod
    def _busy() -> float:
        times = psutil.cpu_times()
        return sum(getattr(times, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq", "steal"))

    def _own(self) -> float:
        times = self.process.cpu_times()
        total = times.user + times.system + times.children_user + times.children_system
        if self.live_children:
            for child in self.process.children(recursive=True):
                try:
                    total += sum(child.cpu_times()[:2])
                except psutil.Error:  # it ended meanwhile: counted in children_* from now on
                    pass
        return total
