"""``python -m p2p`` is ``blobstore`` (the daemon and peers commands live there)."""

from blobstore.cli import run

run()
