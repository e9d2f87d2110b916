"""Logging set-up for the CLI and the daemon: stdlib logging, text or JSON lines.

``--log-level`` names the level; without it each command has its default
(WARNING for everyday commands, INFO for the daemon, whose start and stop an
operator wants to see), and ``-v`` means at least INFO, ``-vv`` DEBUG. ``--log-format json``
writes one JSON object per line (``ts``, ``level``, ``logger``, ``msg``, and
``exc`` for a traceback, plus any ``extra=`` fields) for log shippers.
Both also come from ``BLOBSTORE_LOG_LEVEL``/``BLOBSTORE_LOG_FORMAT``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from typing import Any, Literal, TextIO

from .errors import ConfigError

LogFormat = Literal["text", "json"]
FORMATS: tuple[LogFormat, ...] = ("text", "json")
LEVELS = ("debug", "info", "warning", "error", "critical")
TEXT_FORMAT = "blobstore: %(levelname)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line; times in UTC."""

    converter = staticmethod(time.gmtime)

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        standard = _standard_attributes()
        for key, value in record.__dict__.items():
            if key not in standard and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


@functools.cache
def _standard_attributes() -> frozenset[str]:
    """LogRecord's own attributes; anything else on a record came in through ``extra=``."""
    plain = logging.LogRecord("", 0, "", 0, "", None, None)
    return frozenset(plain.__dict__) | {"message", "asctime"}


def parse_level(text: str) -> int:
    """``info``, ``DEBUG``, ``20`` -> a logging level. Raises ConfigError."""
    name = text.strip().lower()
    if name in LEVELS:
        level: int = getattr(logging, name.upper())
        return level
    if name.isdigit():
        return int(name)
    raise ConfigError(f"unknown log level {text!r} (use {', '.join(LEVELS)})")


def parse_format(text: str) -> LogFormat:
    """``text`` or ``json``. Raises ConfigError."""
    name = text.strip().lower()
    for fmt in FORMATS:
        if name == fmt:
            return fmt
    raise ConfigError(f"unknown log format {text!r} (use text or json)")


def configure(
    *,
    level: str | None = None,
    fmt: str | None = None,
    verbose: int = 0,
    default: int = logging.WARNING,
    stream: TextIO | None = None,
) -> int:
    """Send the root logger's records to ``stream`` (stderr) at the level chosen:
    ``level`` (else BLOBSTORE_LOG_LEVEL) if given, else ``default``, lowered to
    INFO by one ``verbose`` and DEBUG by two. Replaces the handler an earlier
    call installed. Returns the level. Raises ConfigError for an unknown level
    or format."""
    level_text = level or os.environ.get("BLOBSTORE_LOG_LEVEL")
    if level_text:
        chosen = parse_level(level_text)
    elif verbose:
        chosen = min(default, max(logging.WARNING - 10 * verbose, logging.DEBUG))
    else:
        chosen = default
    log_format = parse_format(fmt or os.environ.get("BLOBSTORE_LOG_FORMAT") or "text")
    handler = _Handler(stream or sys.stderr)
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    root = logging.getLogger()
    for old in root.handlers[:]:
        if isinstance(old, _Handler):  # ours, from an earlier call; others' stay
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(chosen)
    return chosen


class _Handler(logging.StreamHandler[TextIO]):
    """The handler ``configure`` installs (so a second call replaces it)."""
