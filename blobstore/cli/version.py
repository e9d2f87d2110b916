"""``blobstore --version``: the installed distribution's version, read only when asked
(importlib.metadata costs ~10 ms, which no other command pays)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any


def version() -> str:
    """The installed blobstore's version, ``unknown`` when run from a bare source tree."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("blobstore")
    except PackageNotFoundError:
        return "unknown"


class VersionAction(argparse.Action):
    """Print ``blobstore VERSION (Python X.Y.Z)`` and exit 0, like argparse's own
    ``version`` action but without computing the version for every command."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.setdefault("help", "print the version and exit")
        super().__init__(option_strings, dest=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        import platform

        sys.stdout.write(f"blobstore {version()} (Python {platform.python_version()})\n")
        parser.exit()
