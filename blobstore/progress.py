"""Progress of a transfer, and the two ways blobstore shows it.

The data path reports bytes as they land — ``progress(done, total)``, called on
the event loop after each chunk (pull) or batch of chunks (push) — and, when the
callback also has a ``files(done, total)`` method (``FileProgress``), how many
files are finished. ``Meter`` turns those reports into a smoothed speed and an
ETA; ``ProgressLine`` draws them as one line on a terminal; ``TqdmProgress``
forwards them to a tqdm-compatible class (huggingface_hub's ``tqdm_class``).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TextIO, runtime_checkable


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    """``0:07``, ``12:34``, ``1:02:03``."""
    s = int(seconds + 0.5)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@runtime_checkable
class FileProgress(Protocol):
    """A byte-progress callback that also wants file counts."""

    def __call__(self, done: int, total: int) -> None: ...

    def files(self, done: int, total: int) -> None: ...


SAMPLE_SECONDS = 0.25
"""Reports closer together than this are folded into one speed sample."""
HALF_LIFE_SECONDS = 3.0
"""A speed sample's weight halves every this many seconds: a stall shows
within a few seconds, one slow chunk does not swing the ETA."""


class Meter:
    """Bytes and files done and to do, a smoothed speed and an ETA.

    The speed is an exponential moving average of the rate between samples,
    weighted by the time each sample covers (so the average does not depend on
    how often progress is reported). Until the first sample it is the average
    since the start. ``clock`` is injectable for tests.
    """

    __slots__ = (
        "_clock",
        "_rate",
        "_sample_at",
        "_sample_done",
        "bytes_done",
        "bytes_total",
        "files_done",
        "files_total",
        "started",
    )

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.started = clock()
        self.bytes_done = 0
        self.bytes_total = 0
        self.files_done = 0
        self.files_total: int | None = None
        self._rate: float | None = None
        self._sample_at = self.started
        self._sample_done = 0

    def update(self, done: int, total: int) -> None:
        self.bytes_done = done
        self.bytes_total = total
        now = self._clock()
        dt = now - self._sample_at
        if dt < SAMPLE_SECONDS:
            return
        rate = max(done - self._sample_done, 0) / dt
        if self._rate is None:
            self._rate = rate
        else:
            self._rate += (1.0 - 0.5 ** (dt / HALF_LIFE_SECONDS)) * (rate - self._rate)
        self._sample_at, self._sample_done = now, done

    def update_files(self, done: int, total: int) -> None:
        self.files_done = done
        self.files_total = total

    @property
    def elapsed(self) -> float:
        return self._clock() - self.started

    @property
    def rate(self) -> float:
        """Bytes per second, smoothed."""
        return self._rate if self._rate is not None else self.average

    @property
    def average(self) -> float:
        """Bytes per second since the start (what a finished transfer shows)."""
        elapsed = self.elapsed
        return self.bytes_done / elapsed if elapsed > 0 else 0.0

    @property
    def fraction(self) -> float:
        return min(self.bytes_done / self.bytes_total, 1.0) if self.bytes_total else 1.0

    @property
    def eta(self) -> float | None:
        """Seconds left at the smoothed speed; None while the speed is unknown."""
        left = self.bytes_total - self.bytes_done
        if left <= 0:
            return 0.0
        rate = self.rate
        return left / rate if rate > 0 else None


def _redraw_interval() -> float:
    """Seconds between redraws: ``BLOBSTORE_PROGRESS_INTERVAL`` (default 0.1; 0
    draws every report, e.g. for a test or a recording)."""
    try:
        return max(float(os.environ.get("BLOBSTORE_PROGRESS_INTERVAL", "0.1")), 0.0)
    except ValueError:
        return 0.1


class ProgressLine:
    """A ``FileProgress`` that redraws one status line on ``stream`` (stderr)
    when it is a terminal, at most every ``BLOBSTORE_PROGRESS_INTERVAL`` s:

    ``push ████░░░░  42.0%  420.0 MiB/1.0 GiB  3/10 files  85.2 MiB/s  ETA 0:07``

    ``tiers`` (optional) adds bytes per tier. The line is cut to the terminal's
    width (a wrapped line could not be redrawn in place)."""

    def __init__(
        self,
        label: str,
        stream: TextIO | None = None,
        enabled: bool | None = None,
        tiers: Callable[[], Mapping[str, int]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.label = label
        self.tiers = tiers
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.meter = Meter(clock)
        self.interval = _redraw_interval()
        self._clock = clock
        self._last = float("-inf")
        self._drawn = False
        self._stale = False
        self._reported = False

    def __call__(self, done: int, total: int) -> None:
        self.meter.update(done, total)
        self._reported = True
        self._maybe_draw(final=done >= total)

    def files(self, done: int, total: int) -> None:
        self.meter.update_files(done, total)
        if self._reported:  # bytes say how far; a count alone would draw 0 of 0 as 100%
            self._maybe_draw(final=False)

    def _maybe_draw(self, final: bool) -> None:
        if not self.enabled:
            return
        now = self._clock()
        if now - self._last < self.interval and not final:
            self._stale = True
            return
        self._last = now
        self._draw()

    def _width(self) -> int:
        """Columns of the terminal the line is drawn on (stderr's, even when
        stdout is piped); ``COLUMNS`` wins, as for shutil."""
        try:
            return int(os.environ["COLUMNS"])
        except (KeyError, ValueError):
            pass
        try:
            return os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, ValueError, OSError):  # no fd, or not a terminal
            return 100

    def _draw(self) -> None:
        width = self._width() - 1
        self.stream.write("\r" + self.render(width) + "\x1b[K")
        self.stream.flush()
        self._drawn = True
        self._stale = False

    def render(self, width: int = 100) -> str:
        """The status line, at most ``width`` characters."""
        m = self.meter
        parts = [
            f"{100.0 * m.fraction:5.1f}%",
            f"{human_bytes(m.bytes_done)}/{human_bytes(m.bytes_total)}",
        ]
        if m.files_total is not None:
            parts.append(f"{m.files_done}/{m.files_total} files")
        if m.bytes_total and m.bytes_done >= m.bytes_total:  # done: the whole run's speed
            parts.append(f"{human_bytes(m.average)}/s")
        else:
            eta = m.eta
            parts.append(f"{human_bytes(m.rate)}/s")
            parts.append("ETA " + ("?" if eta is None else human_duration(eta)))
        if self.tiers is not None:
            tiers = self.tiers()
            parts.append("[" + " ".join(f"{k} {human_bytes(v)}" for k, v in tiers.items()) + "]")
        text = "  ".join(parts)
        room = width - len(self.label) - len(text) - 3
        if room >= 10:
            filled = int(min(room, 30) * m.fraction)
            bar = "█" * filled + "░" * (min(room, 30) - filled)
            return f"{self.label} {bar} {text}"
        return f"{self.label}  {text}"[:width]

    def close(self) -> None:
        """Draw the last state (if a redraw was skipped) and end the line."""
        if self._drawn:
            if self._stale:
                self._draw()
            self.stream.write("\n")
            self.stream.flush()


class TqdmProgress:
    """A ``FileProgress`` that drives a tqdm-compatible class, huggingface_hub's
    ``tqdm_class`` convention: the bar is made on the first report as
    ``tqdm_class(total=bytes, unit="B", unit_scale=True, desc=desc)``, then
    ``update(n)`` with each report's new bytes, and ``close()``. File counts go
    to the postfix (``set_postfix_str``) when the class has one."""

    def __init__(self, tqdm_class: Callable[..., Any], desc: str) -> None:
        self.tqdm_class = tqdm_class
        self.desc = desc
        self.bar: Any = None
        self._done = 0

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = self.tqdm_class(total=total, unit="B", unit_scale=True, desc=self.desc)
        elif getattr(self.bar, "total", total) != total:
            self.bar.total = total
        if done > self._done:
            self.bar.update(done - self._done)
            self._done = done

    def files(self, done: int, total: int) -> None:
        postfix = getattr(self.bar, "set_postfix_str", None)
        if postfix is not None:
            postfix(f"{done}/{total} files", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


__all__ = [
    "FileProgress",
    "Meter",
    "ProgressLine",
    "TqdmProgress",
    "human_bytes",
    "human_duration",
]
