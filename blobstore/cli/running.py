"""Running a parsed command: logging, the event loop, one error line per failure."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

import anyio

from ..config import Config
from ..errors import BlobstoreError, ConfigError, os_error, single_errors
from ..logs import configure
from .output import silence_stdout
from .registry import Run, WithClient, start_up_done


def run_command(
    args: argparse.Namespace, make_config: Callable[[argparse.Namespace], Config]
) -> int:
    """Run ``args.run``; exit status 0/1 (or the command's), 130 on ^C, 0 when
    stdout's reader went away (``| head``)."""
    try:
        configure(
            level=args.log_level or ("error" if args.quiet else None),
            fmt=args.log_format,
            verbose=args.verbose,
            default=getattr(args, "default_log_level", logging.WARNING),
        )
    except ConfigError as exc:
        print(f"blobstore: error: {exc}", file=sys.stderr)
        return 1
    try:
        with single_errors():  # whatever task group it escaped from: one line
            code: int = anyio.run(_run, args, make_config, backend_options={"use_uvloop": True})
        sys.stdout.flush()  # here, so a closed pipe is caught below
    except BrokenPipeError:
        # ``blobstore ls | head``: the reader has what it wanted; not an error.
        silence_stdout()
        return 0
    except BlobstoreError as exc:
        print(f"blobstore: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a bug: every module should have translated it
        failed = f"{getattr(args, 'command', 'blobstore')} failed"
        print(f"blobstore: error: {os_error(exc, failed)}", file=sys.stderr)
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
    if not isinstance(run, WithClient):  # it resumes once its client is open
        start_up_done()
    return await run(args, config)
