"""Image-specific members of the blobstore exception hierarchy."""

from __future__ import annotations

from ..errors import BadInput, Corrupt, UnsafePath


class BadImage(BadInput):
    """An image archive or layout is malformed, truncated or refused."""


class UnsafeMember(BadImage, UnsafePath):
    """An archive member name or link would escape the archive."""


class DigestMismatch(BadImage, Corrupt):
    """Bytes do not hash to the sha256 digest they are named by."""

    def __init__(self, what: str, expected: str, actual: str) -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(f"{what}: sha256 mismatch (expected {expected}, got {actual})")
