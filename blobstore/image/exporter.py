"""``image export`` / ``image layer``: rebuild archives and layouts from the store.

Everything is written under a temporary name beside ``OUT`` and renamed at the
very end; any failure (a digest mismatch included) removes the temporary and
leaves nothing behind.

docker-archive: when the image came from a docker-archive tar, the original
tar is replayed member by member (raw headers kept at import), so the export
is byte-identical to what was imported. Otherwise a skopeo-style archive is
synthesized (``<diffid>.tar`` layers, gzip layers decompressed and checked
against the config's diff_ids).

oci: an image layout directory; ``index.json`` and ``oci-layout`` are the
imported ones when they describe just this image, synthesized otherwise.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import BinaryIO

import anyio

from ..atomic import areplacing
from ..catalog import Catalog
from ..errors import BadImage, BadInput, NotFound, os_errors
from ..manifest import Layer
from ..source import ChunkSource
from . import oci
from .blobs import (
    StoredImage,
    check_bytes,
    load_image,
    write_bytes,
    write_layer,
    write_layer_gunzipped,
)
from .stream import MeteredSource

Progress = Callable[[int, int], None]
"""Called with (bytes done, bytes total)."""

FORMATS = ("docker-archive", "oci")
_BLOCK = 512


@asynccontextmanager
async def _staged(out: Path, directory: bool) -> AsyncIterator[Path]:
    """A temp path beside ``out`` (``atomic.areplacing``): renamed to ``out``
    on success, removed on failure. Raises BadInput if ``out`` exists or
    cannot be written (DiskFull on a full disk)."""
    if await anyio.Path(out).exists() or await anyio.Path(out).is_symlink():
        raise BadInput(f"{out} already exists")
    with os_errors(f"cannot write {out}", user_path=True):
        async with areplacing(out, directory=directory) as tmp:
            yield tmp


def _metered(source: ChunkSource, total: int, progress: Progress) -> ChunkSource:
    done = 0

    def report(n: int) -> None:
        nonlocal done
        done += n
        progress(done, total)

    return MeteredSource(source, report)


async def export_image(
    catalog: Catalog,
    source: ChunkSource,
    ref: str,
    out: Path,
    fmt: str,
    progress: Progress | None = None,
) -> StoredImage:
    """Write image ``ref`` to ``out`` as ``fmt``. Raises NotFound, BadInput,
    DigestMismatch, Unavailable; on any error ``out`` is not created."""
    if fmt not in FORMATS:
        raise BadInput(f"unknown image format {fmt!r} (use {' or '.join(FORMATS)})")
    stored = await load_image(catalog, ref)
    if progress is not None:
        source = _metered(source, sum(layer.size for layer in stored.layers), progress)
    if fmt == "oci":
        async with _staged(out, directory=True) as tmp:
            await _write_oci(stored, source, tmp)
        return stored
    async with _staged(out, directory=False) as tmp:
        with tmp.open("wb") as f:
            layout = stored.layout
            if layout is not None and layout.replayable and layout.source == "docker-archive":
                await _replay_tar(stored, source, f)
            else:
                await _write_docker_archive(stored, source, f)
            await anyio.to_thread.run_sync(os.fsync, f.fileno())
    return stored


async def export_layer(
    catalog: Catalog, source: ChunkSource, ref: str, digest: str, out: Path
) -> int:
    """Write one layer blob of image ``ref`` to ``out``. Returns its size."""
    stored = await load_image(catalog, ref)
    for layer in stored.layers:
        if layer.digest == digest or layer.digest.removeprefix("sha256:") == digest:
            async with _staged(out, directory=False) as tmp:
                with tmp.open("wb") as f:
                    await write_layer(source, layer, f)
            return layer.size
    raise NotFound(f"image {ref} has no layer {digest}")


async def _replay_tar(stored: StoredImage, source: ChunkSource, f: BinaryIO) -> None:
    layout = stored.layout
    assert layout is not None
    image = stored.image
    for member in layout.members:
        await anyio.to_thread.run_sync(f.write, member.header)
        kind, index = member.data
        if kind == "layer":
            if index >= len(stored.layers) or stored.layers[index].size != member.size:
                raise BadImage("stored archive layout does not match the image layers")
            await write_layer(source, stored.layers[index], f)
        elif kind == "config":
            _check_size(member.size, image.config_json)
            await write_bytes(f, "image config", image.config_json, stored.manifest.config.digest)
        elif kind == "manifest":
            _check_size(member.size, image.manifest_json)
            await anyio.to_thread.run_sync(f.write, image.manifest_json)
        elif kind == "file":
            await anyio.to_thread.run_sync(f.write, layout.files[member.file_name])
        await anyio.to_thread.run_sync(f.write, bytes(-member.size % _BLOCK))
    await anyio.to_thread.run_sync(f.write, bytes(layout.trailer))


def _check_size(size: int, data: bytes) -> None:
    if size != len(data):
        raise BadImage("stored archive layout does not match the image")


async def _write_docker_archive(stored: StoredImage, source: ChunkSource, f: BinaryIO) -> None:
    image = stored.image
    config_digest = stored.manifest.config.digest
    check_bytes("image config", image.config_json, config_digest)
    diff_ids = oci.config_diff_ids(image.config_json)
    if len(diff_ids) != len(stored.layers):
        raise BadImage("image config and manifest disagree on the layer count")
    config_name = oci.blob_path(config_digest).rsplit("/", 1)[1] + ".json"
    await _tar_file(f, config_name, image.config_json)
    names: list[str] = []
    for layer, diff_id in zip(stored.layers, diff_ids, strict=True):
        name = diff_id.split(":", 1)[1] + ".tar"
        if name not in names:
            await _tar_layer(f, name, layer, diff_id, source)
        names.append(name)
    tags = tuple(t for t in image.tags if ":" in t.rsplit("/", 1)[-1])
    await _tar_file(f, "manifest.json", oci.synthesize_docker_manifest(config_name, tags, names))
    await anyio.to_thread.run_sync(f.write, bytes(2 * _BLOCK))


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o444
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


async def _tar_file(f: BinaryIO, name: str, data: bytes) -> None:
    await anyio.to_thread.run_sync(
        f.write, _header(name, len(data)) + data + bytes(-len(data) % _BLOCK)
    )


async def _tar_layer(
    f: BinaryIO, name: str, layer: Layer, diff_id: str, source: ChunkSource
) -> None:
    # By digest first: skopeo labels some plain tars "+gzip".
    compression = "none" if layer.digest == diff_id else oci.compression(layer.media_type)
    if compression == "none":
        if layer.digest != diff_id:
            raise BadImage(f"layer {layer.digest} does not match diff_id {diff_id}")
        await anyio.to_thread.run_sync(f.write, _header(name, layer.size))
        await write_layer(source, layer, f)
        size = layer.size
    elif compression == "gzip":
        start = f.tell()
        await anyio.to_thread.run_sync(f.write, _header(name, 0))  # size patched below
        size = await write_layer_gunzipped(source, layer, diff_id, f)
        end = f.tell()
        f.seek(start)
        await anyio.to_thread.run_sync(f.write, _header(name, size))
        f.seek(end)
    else:
        raise BadInput(f"cannot export {compression} layer {layer.digest} as docker-archive")
    await anyio.to_thread.run_sync(f.write, bytes(-size % _BLOCK))


async def _write_oci(stored: StoredImage, source: ChunkSource, root: Path) -> None:
    image = stored.image
    blobs = root / "blobs" / "sha256"
    await anyio.to_thread.run_sync(lambda: blobs.mkdir(parents=True))
    kept = stored.layout.files if stored.layout else {}
    layout_marker = kept.get(oci.OCI_LAYOUT, oci.OCI_LAYOUT_BYTES)
    await anyio.to_thread.run_sync((root / oci.OCI_LAYOUT).write_bytes, layout_marker)
    written: set[str] = set()

    async def small(what: str, data: bytes, digest: str) -> None:
        with (blobs / digest.split(":", 1)[1]).open("wb") as f:
            await write_bytes(f, what, data, digest)
        written.add(digest)

    await small("image manifest", image.manifest_json, stored.digest)
    await small("image config", image.config_json, stored.manifest.config.digest)
    for layer in stored.layers:
        if layer.digest not in written:
            with (blobs / layer.digest.split(":", 1)[1]).open("wb") as f:
                await write_layer(source, layer, f)
            written.add(layer.digest)
    manifest_desc = oci.Descriptor(
        image.manifest_media_type, stored.digest, len(image.manifest_json)
    )
    index = kept.get("index.json")
    if index is None or not _describes_only(index, stored.digest):
        index = oci.synthesize_index(manifest_desc, image.tags)
    await anyio.to_thread.run_sync((root / "index.json").write_bytes, index)


def _describes_only(index: bytes, digest: str) -> bool:
    try:
        return all(d.digest == digest for d in oci.parse_index(index))
    except BadImage:
        return False
