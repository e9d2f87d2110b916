"""The record that lets export rebuild an imported archive byte for byte.

Stored in ``Image.layout`` (msgpack). It holds:

- ``source``: ``docker-archive`` (a tar with manifest.json), ``oci-archive``
  (a tar with only an OCI layout) or ``oci`` (a layout directory);
- ``files``: small metadata files kept verbatim by name (``index.json``,
  ``oci-layout``, ``manifest.json``, ``repositories``, ``<id>/json`` …);
- ``members`` (tars only): every member in archive order as its raw header
  bytes (pax/GNU extension blocks included) plus what its data is: a layer
  (by position), the config, the image manifest, a kept file, or nothing;
- ``trailer``: how many zero bytes end the archive.

Layer bytes are never in here: they come from the layers' chunks. Pure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from ..errors import BadImage

MAX_LAYOUT_BYTES = 16 << 20
"""Cap on the whole record (kept files + headers)."""
MAX_KEPT_FILE = 4 << 20
MAX_TRAILER = 1 << 20

DATA_NONE = ("none", 0)
DATA_CONFIG = ("config", 0)
DATA_MANIFEST = ("manifest", 0)


@dataclass(frozen=True, slots=True)
class Member:
    header: bytes
    """Raw header block(s), a multiple of 512 bytes."""
    size: int
    data: tuple[str, int]
    """(``none``|``layer``|``config``|``manifest``|``file``, layer index or 0);
    for ``file`` the data is ``files[name]`` where name is in ``file_name``."""
    file_name: str = ""


@dataclass(frozen=True, slots=True)
class SourceLayout:
    source: str
    files: dict[str, bytes]
    members: tuple[Member, ...] = ()
    trailer: int = 0

    @property
    def replayable(self) -> bool:
        """True if the original tar can be rebuilt byte for byte."""
        return bool(self.members)


def encode_layout(layout: SourceLayout) -> bytes:
    body = {
        "source": layout.source,
        "files": dict(sorted(layout.files.items())),
        "members": [[m.header, m.size, m.data[0], m.data[1], m.file_name] for m in layout.members],
        "trailer": layout.trailer,
    }
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    if len(packed) > MAX_LAYOUT_BYTES:
        raise BadImage(f"archive metadata too large to keep ({len(packed)} bytes)")
    return packed


def decode_layout(data: bytes) -> SourceLayout:
    """Decode and validate; raises BadImage on anything unexpected."""
    if len(data) > MAX_LAYOUT_BYTES:
        raise BadImage("image layout record too large")
    try:
        obj: Any = msgpack.unpackb(data, raw=False, strict_map_key=True)
        files = obj["files"]
        if not isinstance(obj["source"], str) or not isinstance(files, dict):
            raise _malformed("source/files")
        if not all(isinstance(k, str) and isinstance(v, bytes) for k, v in files.items()):
            raise _malformed("files")
        members = tuple(_member(item, files) for item in obj["members"])
        trailer = obj["trailer"]
        if not isinstance(trailer, int) or not 0 <= trailer <= MAX_TRAILER:
            raise _malformed("trailer")
    except (KeyError, TypeError, ValueError, msgpack.UnpackException) as exc:
        # msgpack's own errors, a missing key, a member of the wrong shape
        raise _malformed(f"{type(exc).__name__}: {exc}") from exc
    return SourceLayout(obj["source"], files, members, trailer)


def _member(item: Any, files: dict[str, bytes]) -> Member:
    if not isinstance(item, list) or len(item) != 5:
        raise _malformed("member")
    header, size, kind, index, file_name = item
    if not isinstance(header, bytes) or not header or len(header) % 512:
        raise _malformed("member header")
    if not isinstance(size, int) or size < 0 or not isinstance(index, int) or index < 0:
        raise _malformed("member size")
    if kind not in ("none", "layer", "config", "manifest", "file"):
        raise _malformed("member data kind")
    if kind == "file" and (file_name not in files or len(files[file_name]) != size):
        raise _malformed("member file")
    if kind == "none" and size:
        raise _malformed("member without data has a size")
    return Member(header, size, (kind, index), file_name)


def _malformed(what: str) -> BadImage:
    return BadImage(f"image layout record is malformed ({what})")
