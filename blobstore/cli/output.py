"""What commands print: one JSON document with ``--json``, else a line of text.

Every command's ``--json`` output goes through :func:`document` (result
dataclasses by their fields, or their own ``to_json``) and :func:`emit`, so
the documents follow one contract: keys are field names, tuples are lists,
paths are strings, durations are seconds rounded to milliseconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..progress import ProgressLine


def document(value: Any, **extra: Any) -> Any:
    """``value`` as JSON-ready data; ``extra`` keys are added to a dataclass's fields."""
    to_json = getattr(value, "to_json", None)
    if callable(to_json):
        doc = to_json()
        return {**doc, **extra} if extra else doc
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: document(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {**fields, **{k: document(v) for k, v in extra.items()}}
    if isinstance(value, Mapping):
        return {str(k): document(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [document(v) for v in value]
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, float):
        return round(value, 3)
    return value


def wants_json(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False))


def quiet(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "quiet", False))


def emit(args: argparse.Namespace, doc: Any, text: str) -> None:
    """The JSON document with --json, else ``text`` (nothing with --quiet)."""
    sys.stdout.write(emitted(args, doc, text))


def emitted(args: argparse.Namespace, doc: Any, text: str) -> str:
    """What ``emit`` prints."""
    if wants_json(args):
        return json.dumps(doc, indent=2) + "\n"
    if text and not quiet(args):
        return text + "\n"
    return ""


def fail(args: argparse.Namespace, doc: Any, message: str) -> int:
    """The JSON document (with --json) on stdout, one error line on stderr; exit status 1."""
    if wants_json(args):
        print(json.dumps(doc, indent=2))
    return error(message)


def error(message: str) -> int:
    """One error line on stderr; exit status 1."""
    print(f"blobstore: error: {message}", file=sys.stderr)
    return 1


def progress_line(
    args: argparse.Namespace, label: str, tiers: Callable[[], Mapping[str, int]] | None = None
) -> ProgressLine:
    """The status line on stderr when it is a terminal; never with --quiet."""
    from ..progress import ProgressLine

    return ProgressLine(label, enabled=False if quiet(args) else None, tiers=tiers)


def silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again
    (after a BrokenPipeError: ``blobstore ls | head`` is not an error)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
