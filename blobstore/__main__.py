"""The ``blobstore`` console script: a pull goes to this node's daemon when one
runs on its node store (agent.py: the interpreter's start and one round trip),
everything else to the CLI (blobstore.cli), imported only then."""

from __future__ import annotations

import sys


def run() -> None:
    argv = sys.argv[1:]
    if "pull" not in argv:  # (not even agent.py's imports for other commands)
        from .cli import run as run_cli

        run_cli()  # (exits)
        return
    from . import agent

    try:
        done = agent.run_pull(argv)
        if isinstance(done, int):
            sys.stdout.flush()  # (here, so a closed pipe is caught below)
    except KeyboardInterrupt:  # (the daemon saw the socket close and stopped)
        print("blobstore: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # the reader has what it wanted
        from .cli.output import silence_stdout

        silence_stdout()
        sys.exit(0)
    if isinstance(done, int):
        sys.exit(done)
    from .cli import run as run_cli

    run_cli(declined=done)


if __name__ == "__main__":
    run()
