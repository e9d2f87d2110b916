"""``blobstore --version``: the release this package is, from ``blobstore.__version__``
(importlib.metadata would cost ~10 ms: the email parser, zipfile, csv)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any


def version() -> str:
    """The blobstore release (tests/test_startup.py checks it is the installed one)."""
    from .. import __version__

    return __version__


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
        python = ".".join(map(str, sys.version_info[:3]))  # platform.python_version()
        sys.stdout.write(f"blobstore {version()} (Python {python})\n")
        parser.exit()
