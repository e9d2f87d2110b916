"""``image import``: an archive or layout becomes Layer manifests, an Image, a ref.

Each layer blob is chunked in place (straight out of the tar, by offset) and
only chunks the store lacks are uploaded; its sha256 is computed at the same
time in another worker thread and must match the digest the image names.
Uncompressed layers are chunked as they are, so identical files in different
layers (or image versions) share chunks; compressed layers are stored as-is.
The ref is written last: a failure leaves at most unreferenced chunks, which
``gc`` sweeps.

Each blob is opened once, when the image is read (archive.py: ``O_NOFOLLOW``
relative to the layout's directory descriptor, regular files only), and its
size, sha256 and chunks all come from that descriptor: a blob swapped for a
symlink mid-import cannot make the import read (and upload) another file.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from ..catalog import Catalog, check_ref
from ..errors import BadImage, BadInput, DigestMismatch, single_errors
from ..ids import ChunkId
from ..ingest import Ingested, Ingestor
from ..manifest import Image, ImageLayer, Layer
from . import oci
from .archive import open_archive
from .layout import encode_layout
from .reader import ImageSpec, LayerSpec, read_image
from .stream import file_sha256

if TYPE_CHECKING:
    from ..client import Client


@dataclass(frozen=True, slots=True)
class ImportResult:
    ref: str
    manifest: ChunkId
    digest: str
    """sha256 of the image manifest (the image digest)."""
    layers: int
    bytes: int
    new_bytes: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "manifest": self.manifest,
            "digest": self.digest,
            "layers": self.layers,
            "bytes": self.bytes,
            "new_bytes": self.new_bytes,
            "seconds": round(self.seconds, 3),
        }


async def import_into(
    client: Client,
    src: str,
    ref: str,
    *,
    tag: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ImportResult:
    """``import_image`` through ``client`` under a writer lease (the normal entry)."""
    async with client.writing() as ingestor:
        return await import_image(src, ref, client.catalog, ingestor, tag=tag, progress=progress)


async def import_image(
    src: str,
    ref: str,
    catalog: Catalog,
    ingestor: Ingestor,
    *,
    tag: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ImportResult:
    """Import the image at ``src`` and point ``ref`` at it.

    Raises BadImage (malformed, truncated, unsafe), DigestMismatch, InvalidRef,
    Unavailable.
    """
    started = time.monotonic()
    check_ref(ref)  # refuse a bad name before uploading anything
    archive = await anyio.to_thread.run_sync(open_archive, src)
    with archive:  # every blob is read through the one descriptor the reader opened
        spec = await anyio.to_thread.run_sync(read_image, archive, tag)
        return await _import_spec(spec, ref, catalog, ingestor, progress, started)


async def _import_spec(
    spec: ImageSpec,
    ref: str,
    catalog: Catalog,
    ingestor: Ingestor,
    progress: Callable[[int, int], None] | None,
    started: float,
) -> ImportResult:
    new_before = ingestor.stats.new_bytes
    stored: dict[str, tuple[ChunkId, Layer]] = {}
    layer_rows: list[tuple[str, str, int]] = []
    total = sum(layer.extent.size for layer in spec.layers)
    for i, layer in enumerate(spec.layers):
        if progress is not None:
            progress(sum(row[2] for row in layer_rows), total)
        key = f"{layer.extent.path}:{layer.extent.offset}"
        if key not in stored:
            stored[key] = await _import_layer(i, layer, catalog, ingestor)
        saved = stored[key][1]
        layer_rows.append((layer.media_type, saved.digest, saved.size))
    if progress is not None:
        progress(total, total)
    manifest_json = spec.manifest_json or oci.synthesize_manifest(spec.config_json, layer_rows)
    image = Image(
        manifest_json=manifest_json,
        manifest_media_type=spec.manifest_media_type,
        config_json=spec.config_json,
        layers=tuple(
            ImageLayer(row[1], stored[f"{s.extent.path}:{s.extent.offset}"][0])
            for row, s in zip(layer_rows, spec.layers, strict=True)
        ),
        tags=spec.tags,
        layout=encode_layout(spec.layout) if spec.layout else b"",
    )
    image_id = await catalog.publish(image, ref)  # manifest, then the ref: two PUTs
    return ImportResult(
        ref,
        image_id,
        oci.sha256_digest(manifest_json),
        len(spec.layers),
        sum(row[2] for row in layer_rows),
        ingestor.stats.new_bytes - new_before,
        time.monotonic() - started,
    )


async def _import_layer(
    index: int, layer: LayerSpec, catalog: Catalog, ingestor: Ingestor
) -> tuple[ChunkId, Layer]:
    ext = layer.extent
    result: dict[str, Any] = {}

    async def ingest() -> None:
        result["ingested"] = await ingestor.ingest_file(ext.fd, ext.offset, ext.size)

    async def digest() -> None:
        result["sha256"] = await anyio.to_thread.run_sync(file_sha256, ext.fd, ext.offset, ext.size)

    try:
        with single_errors():
            async with anyio.create_task_group() as tg:
                tg.start_soon(ingest)
                tg.start_soon(digest)
    except (OSError, BadImage) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise BadImage(f"cannot read layer {index} from {ext.path}: {reason}") from exc
    ingested: Ingested = result["ingested"]
    actual: str = result["sha256"]
    if ingested.size != ext.size:
        raise BadInput(f"layer {index} changed size while it was read ({ext.path})")
    if layer.digest is not None and actual != layer.digest:
        raise DigestMismatch(f"layer {index} ({layer.member})", layer.digest, actual)
    manifest = Layer(
        digest=actual,
        media_type=layer.media_type,
        size=ext.size,
        chunker=ingestor.params.info(),
        chunks=ingested.chunks,
    )
    await ingestor.flush()  # the packs and their indexes before the manifest naming them
    return await catalog.save(manifest), manifest
