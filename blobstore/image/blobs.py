"""Writing one image's blobs out of the store, each checked against its sha256.

``StoredImage`` is an Image manifest with its Layer manifests loaded and
cross-checked; ``write_layer`` streams one layer through the tiers into a file
(optionally gunzipped, for docker-archive); ``write_bytes`` writes a small
blob (config, manifest) after checking it. Everything raises DigestMismatch on
a mismatch, so a caller writing to a temp name simply never renames it.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import BinaryIO

import anyio

from blobstore.source import ChunkData

from ..catalog import Catalog
from ..errors import BadImage, DigestMismatch
from ..ids import ChunkId
from ..manifest import Image, Layer, expect_kind
from ..source import ChunkSource
from . import oci
from .layout import SourceLayout, decode_layout
from .stream import HashingWriter, copy_chunks

_OUT_STEP = 1 << 20


@dataclass(frozen=True, slots=True)
class StoredImage:
    id: ChunkId
    image: Image
    manifest: oci.ImageManifest
    layers: tuple[Layer, ...]
    layout: SourceLayout | None

    @property
    def digest(self) -> str:
        return oci.sha256_digest(self.image.manifest_json)


async def load_image(catalog: Catalog, ref: str) -> StoredImage:
    """Resolve ``ref`` to an Image and load its layers. Raises NotFound,
    InvalidManifest (``ref`` or one of its layers is of another kind), BadImage."""
    image_id = await catalog.resolve_or_id(ref)
    image = expect_kind(await catalog.load(image_id), Image, ref)
    manifest = oci.parse_manifest(image.manifest_json, image.manifest_media_type)
    layers = []
    for entry in image.layers:
        stored = await catalog.load(entry.manifest)
        layer = expect_kind(stored, Layer, f"{ref}: layer {entry.digest}")
        if layer.digest != entry.digest:
            raise BadImage(f"{ref}: layer {entry.digest} does not match its layer manifest")
        layers.append(layer)
    if [d.digest for d in manifest.layers] != [layer.digest for layer in layers]:
        raise BadImage(f"{ref}: the image manifest and the stored layers disagree")
    layout = decode_layout(image.layout) if image.layout else None
    return StoredImage(image_id, image, manifest, tuple(layers), layout)


def check_bytes(what: str, data: bytes, digest: str) -> None:
    actual = oci.sha256_digest(data)
    if actual != digest:
        raise DigestMismatch(what, digest, actual)


async def write_bytes(out: BinaryIO, what: str, data: bytes, digest: str) -> None:
    check_bytes(what, data, digest)
    await anyio.to_thread.run_sync(out.write, data)


async def write_layer(source: ChunkSource, layer: Layer, out: BinaryIO) -> None:
    """Stream ``layer`` into ``out``, verifying its sha256 and size."""
    writer = HashingWriter(out)
    await copy_chunks(source, layer.chunks, writer)
    writer.check(f"layer {layer.digest}", layer.digest, layer.size)


async def write_layer_gunzipped(
    source: ChunkSource, layer: Layer, diff_id: str, out: BinaryIO
) -> int:
    """Stream a gzip layer into ``out`` uncompressed; check both digests. Returns bytes written."""
    raw = HashingWriter(None)
    plain = HashingWriter(out)
    gunzip = _Gunzip(plain)

    def sink(data: ChunkData) -> None:
        raw(data)
        gunzip.feed(data)

    await copy_chunks(source, layer.chunks, sink)
    raw.check(f"layer {layer.digest}", layer.digest, layer.size)
    await anyio.to_thread.run_sync(gunzip.finish)  # writes the last block: off the loop
    plain.check(f"layer {layer.digest} uncompressed", diff_id)
    return plain.size


class _Gunzip:
    """Incremental gzip (multi-member) decoder with bounded output per step."""

    def __init__(self, sink: HashingWriter) -> None:
        self.sink = sink
        self.dec = zlib.decompressobj(16 + zlib.MAX_WBITS)

    def feed(self, data: ChunkData) -> None:
        try:
            while data:
                out = self.dec.decompress(data, _OUT_STEP)
                self.sink(out)
                data = self.dec.unconsumed_tail
                if self.dec.eof:
                    data = self.dec.unused_data + data
                    self.dec = zlib.decompressobj(16 + zlib.MAX_WBITS)
        except zlib.error as exc:
            raise BadImage(f"gzip layer cannot be decompressed ({exc})") from exc

    def finish(self) -> None:
        self.sink(self.dec.flush())
