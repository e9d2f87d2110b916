"""What an image shares with the other images in the store.

Two levels: whole layers (same sha256 digest: stored once, named by several
images) and chunks (a new image version whose layer differs by one file still
shares most of that layer's chunks). ``image_sharing`` is the async shell
that loads manifests; ``compute_sharing`` is pure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..catalog import Catalog
from ..errors import InvalidManifest, NotFound
from ..ids import ChunkId
from ..manifest import Image, Layer, expect_kind
from . import oci


@dataclass(frozen=True, slots=True)
class LayerShare:
    digest: str
    media_type: str
    size: int
    shared_with: tuple[str, ...]
    """Other image refs that use this very layer."""


@dataclass(frozen=True, slots=True)
class ImageSharing:
    ref: str
    manifest: ChunkId
    digest: str
    layers: tuple[LayerShare, ...]
    bytes: int
    """Sum of the image's distinct layer sizes."""
    shared_layer_bytes: int
    """Bytes of distinct layers some other image also uses."""
    stored_bytes: int
    """Bytes of the image's distinct chunks."""
    shared_chunk_bytes: int
    """Bytes of those chunks some other image also uses."""
    tags: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "manifest": self.manifest,
            "digest": self.digest,
            "tags": list(self.tags),
            "bytes": self.bytes,
            "shared_layer_bytes": self.shared_layer_bytes,
            "stored_bytes": self.stored_bytes,
            "shared_chunk_bytes": self.shared_chunk_bytes,
            "layers": [
                {
                    "digest": s.digest,
                    "media_type": s.media_type,
                    "size": s.size,
                    "shared_with": list(s.shared_with),
                }
                for s in self.layers
            ],
        }


@dataclass(frozen=True, slots=True)
class _Loaded:
    manifest: ChunkId
    image: Image
    layers: tuple[Layer, ...]


def compute_sharing(ref: str, images: dict[str, _Loaded]) -> ImageSharing:
    """Sharing of ``images[ref]`` with every other entry of ``images``."""
    me = images[ref]
    others = {name: img for name, img in images.items() if name != ref}
    users: dict[str, list[str]] = {}
    other_chunks: set[ChunkId] = set()
    for name, img in sorted(others.items()):
        for layer in img.layers:
            users.setdefault(layer.digest, [])
            if name not in users[layer.digest]:
                users[layer.digest].append(name)
            other_chunks.update(c.id for c in layer.chunks)
    shares: list[LayerShare] = []
    my_chunks: dict[ChunkId, int] = {}
    for layer in me.layers:
        shares.append(
            LayerShare(
                layer.digest, layer.media_type, layer.size, tuple(users.get(layer.digest, ()))
            )
        )
        my_chunks.update((c.id, c.size) for c in layer.chunks)
    distinct = {s.digest: s for s in shares}.values()
    return ImageSharing(
        ref=ref,
        manifest=me.manifest,
        digest=oci.sha256_digest(me.image.manifest_json),
        layers=tuple(shares),
        bytes=sum(s.size for s in distinct),
        shared_layer_bytes=sum(s.size for s in distinct if s.shared_with),
        stored_bytes=sum(my_chunks.values()),
        shared_chunk_bytes=sum(size for cid, size in my_chunks.items() if cid in other_chunks),
        tags=me.image.tags,
    )


async def image_sharing(catalog: Catalog, ref: str, prefix: str = "") -> ImageSharing:
    """What image ``ref`` shares with the images under ref ``prefix`` (all by default).

    Raises NotFound (unknown ref), InvalidManifest (``ref`` is not an image). Other
    refs that are not images, or that cannot be loaded, are ignored.
    """
    layer_cache: dict[ChunkId, Layer] = {}
    images = {ref: await _load(catalog, ref, layer_cache)}
    for name in await catalog.list_refs(prefix):
        if name == ref:
            continue
        try:
            loaded = await _load(catalog, name, layer_cache)
        except (NotFound, InvalidManifest):  # not an image, or a broken one
            continue
        images[name] = loaded
    return compute_sharing(ref, images)


async def _load(catalog: Catalog, ref: str, cache: dict[ChunkId, Layer]) -> _Loaded:
    """Raises NotFound, InvalidManifest (not an image, or a layer that is not one)."""
    manifest_id = await catalog.resolve_or_id(ref)
    image = expect_kind(await catalog.load(manifest_id), Image, ref)
    layers = []
    for entry in image.layers:
        if entry.manifest not in cache:
            layer = await catalog.load(entry.manifest)
            cache[entry.manifest] = expect_kind(layer, Layer, f"image {ref}: layer {entry.digest}")
        layers.append(cache[entry.manifest])
    return _Loaded(manifest_id, image, tuple(layers))
