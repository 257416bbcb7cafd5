"""Per-stage wall-clock timings of the engine; a no-op unless enabled."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch


class StageTimer:
    """`with timer.measure("denoise"):` adds the block's seconds to that stage.

    When enabled on an accelerator it synchronises at stage boundaries (so the numbers are real); when disabled it
    does nothing at all, so the hot path carries no syncs.
    """

    def __init__(self, enabled: bool, device: torch.device) -> None:
        self.enabled = enabled
        self._sync = torch.cuda.synchronize if enabled and device.type == "cuda" else None
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def measure(self, stage: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        if self._sync:
            self._sync()
        start = time.perf_counter()
        yield
        if self._sync:
            self._sync()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def take(self) -> dict[str, float]:
        """The stage times since the last take()."""
        seconds, self.seconds = self.seconds, {}
        return seconds
