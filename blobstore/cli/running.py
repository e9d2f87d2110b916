"""Running a parsed command: logging, the event loop, one error line per failure."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

import anyio

from ..config import Config
from ..errors import BlobstoreError, single_errors
from .registry import Run


def run_command(
    args: argparse.Namespace, make_config: Callable[[argparse.Namespace], Config]
) -> int:
    """Run ``args.run``; exit status 0/1 (or the command's), 130 on ^C."""
    level = logging.WARNING - 10 * min(getattr(args, "verbose", 0) or 0, 2)
    logging.basicConfig(level=level, format="blobstore: %(levelname)s: %(message)s")
    try:
        with single_errors():  # whatever task group it escaped from: one line
            code: int = anyio.run(_run, args, make_config, backend_options={"use_uvloop": True})
    except BlobstoreError as exc:
        print(f"blobstore: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"blobstore: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("blobstore: interrupted", file=sys.stderr)
        return 130
    return code


async def _run(
    args: argparse.Namespace, make_config: Callable[[argparse.Namespace], Config]
) -> int:
    config = make_config(args)
    run: Run = args.run
    return await run(args, config)
