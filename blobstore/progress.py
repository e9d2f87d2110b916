"""Terminal progress: a live line on stderr when it is a TTY, silence otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from typing import TextIO


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class ProgressLine:
    """Callable ``(done, total)`` that redraws one status line, ~10 times a second."""

    def __init__(
        self,
        label: str,
        stream: TextIO | None = None,
        enabled: bool | None = None,
        tiers: Callable[[], Mapping[str, int]] | None = None,
    ):
        self.label = label
        self.tiers = tiers
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.started = time.monotonic()
        self._last = 0.0
        self._drawn = False

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and done < total:
            return
        self._last = now
        elapsed = max(now - self.started, 1e-6)
        pct = 100.0 * done / total if total else 100.0
        width = 30
        filled = int(width * pct / 100)
        bar = "█" * filled + "░" * (width - filled)
        self.stream.write(
            f"\r{self.label} {bar} {pct:5.1f}%  {human_bytes(done)}/{human_bytes(total)}"
            f"  {human_bytes(done / elapsed)}/s"
            + (
                "  [" + " ".join(f"{k} {human_bytes(v)}" for k, v in self.tiers().items()) + "]"
                if self.tiers
                else ""
            )
            + " \x1b[K"
        )
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
