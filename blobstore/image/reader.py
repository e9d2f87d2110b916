"""What an image archive holds: find the image, check its JSON, locate its layers.

Understands an OCI layout (``index.json`` + ``blobs/sha256/…``, as a directory
or inside a tar, which is also what Docker 25+ ``docker save`` writes) and the
classic ``docker save`` layout (``manifest.json`` + ``<id>/layer.tar``).

A classic archive has no image manifest, so one is synthesized after the
layers are hashed (``oci.synthesize_manifest``, deterministic); the original
``manifest.json``, ``repositories`` and every other small member are kept in
the layout record (layout.py) so a docker-archive export is byte-identical.

Synchronous (runs in a worker thread); raises ``BadImage`` subclasses.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import BadImage, DigestMismatch
from . import oci
from .archive import DirArchive, Extent, ImageArchive, TarArchive, pread_exact, read_member
from .layout import (
    DATA_CONFIG,
    DATA_MANIFEST,
    DATA_NONE,
    MAX_KEPT_FILE,
    MAX_LAYOUT_BYTES,
    MAX_TRAILER,
    Member,
    SourceLayout,
)


@dataclass(frozen=True, slots=True)
class LayerSpec:
    media_type: str
    digest: str | None
    """Expected sha256; None when only hashing can tell (compressed classic layers)."""
    extent: Extent
    member: str


@dataclass(frozen=True, slots=True)
class ImageSpec:
    manifest_json: bytes | None
    """None for a classic archive: synthesize once the layer digests are known."""
    manifest_media_type: str
    config_json: bytes
    layers: tuple[LayerSpec, ...]
    tags: tuple[str, ...]
    layout: SourceLayout | None


def read_image(archive: ImageArchive, tag: str | None = None) -> ImageSpec:
    """Find the one image in ``archive`` (or the one tagged ``tag``)."""
    if archive.has("index.json"):
        spec = _read_oci(archive, tag)
    elif archive.has("manifest.json"):
        spec = _read_classic(archive, tag)
    else:
        raise BadImage(f"{archive.path}: no index.json or manifest.json (not an image archive)")
    return spec


def _read_oci(archive: ImageArchive, tag: str | None) -> ImageSpec:
    index_bytes = read_member(archive, "index.json", oci.MAX_JSON_BYTES)
    chosen, tags = _choose(oci.parse_index(index_bytes), tag, archive.path)
    manifest_bytes = _read_blob(archive, chosen, "image manifest")
    if chosen.media_type in oci.INDEX_TYPES:
        inner = oci.parse_index(manifest_bytes)
        images = [
            d
            for d in inner
            if d.media_type in oci.MANIFEST_TYPES and oci.ATTESTATION not in d.annotations
        ]
        if len(images) != 1:
            raise BadImage(f"{archive.path}: a multi-platform index is not supported")
        chosen = images[0]
        manifest_bytes = _read_blob(archive, chosen, "image manifest")
    manifest = oci.parse_manifest(manifest_bytes, chosen.media_type)
    config = _read_blob(archive, manifest.config, "image config")
    layers = []
    for i, desc in enumerate(manifest.layers):
        name = oci.blob_path(desc.digest)
        ext = archive.extent(name)
        if ext.size != desc.size:
            raise BadImage(f"layer {i} ({desc.digest}): size {ext.size} != {desc.size} declared")
        layers.append(LayerSpec(desc.media_type or oci.OCI_LAYER, desc.digest, ext, name))
    if archive.has("manifest.json"):  # Docker 25+: tags live in manifest.json too
        tags = tags or _docker_tags(archive, oci.blob_path(manifest.config.digest))
    roles = {
        oci.blob_path(chosen.digest): DATA_MANIFEST,
        oci.blob_path(manifest.config.digest): DATA_CONFIG,
    }
    layout = _layout(archive, layers, roles, keep=("index.json", "oci-layout"))
    return ImageSpec(manifest_bytes, manifest.media_type, config, tuple(layers), tags, layout)


def _choose(
    descs: tuple[oci.Descriptor, ...], tag: str | None, path: str
) -> tuple[oci.Descriptor, tuple[str, ...]]:
    def names(d: oci.Descriptor) -> list[str]:
        return [d.annotations[k] for k in (oci.REF_NAME, oci.CONTAINERD_NAME) if k in d.annotations]

    candidates = [
        d for d in descs if d.media_type in oci.MANIFEST_TYPES + oci.INDEX_TYPES or not d.media_type
    ]
    if tag is not None:
        candidates = [
            d for d in candidates if tag in names(d) or any(n.endswith(":" + tag) for n in names(d))
        ]
    digests = sorted({d.digest for d in candidates})
    if len(digests) != 1:
        known = sorted({n for d in descs for n in names(d)})
        what = "no image" if not digests else f"{len(digests)} images"
        raise BadImage(
            f"{path} holds {what}{' tagged ' + tag if tag else ''}; tags: {known or 'none'}"
        )
    chosen = next(d for d in candidates if d.digest == digests[0])
    tags = tuple(dict.fromkeys(n for d in descs if d.digest == chosen.digest for n in names(d)))
    return chosen, tags


def _read_blob(archive: ImageArchive, desc: oci.Descriptor, what: str) -> bytes:
    if desc.size > oci.MAX_JSON_BYTES:
        raise BadImage(f"{what} is too large ({desc.size} bytes, limit {oci.MAX_JSON_BYTES})")
    data = read_member(archive, oci.blob_path(desc.digest), oci.MAX_JSON_BYTES)
    if len(data) != desc.size:
        raise BadImage(f"{what} {desc.digest}: size {len(data)} != {desc.size} declared")
    actual = oci.sha256_digest(data)
    if actual != desc.digest:
        raise DigestMismatch(what, desc.digest, actual)
    return data


def _docker_tags(archive: ImageArchive, config_name: str) -> tuple[str, ...]:
    entries = oci.parse_docker_manifest(read_member(archive, "manifest.json", oci.MAX_JSON_BYTES))
    return tuple(t for e in entries if e.config == config_name for t in e.repo_tags)


def _read_classic(archive: ImageArchive, tag: str | None) -> ImageSpec:
    entries = oci.parse_docker_manifest(read_member(archive, "manifest.json", oci.MAX_JSON_BYTES))
    if tag is not None:
        entries = tuple(
            e for e in entries if any(t == tag or t.endswith(":" + tag) for t in e.repo_tags)
        )
    if len(entries) != 1:
        raise BadImage(f"{archive.path} holds {len(entries)} images; pick one with --tag")
    entry = entries[0]
    config = read_member(archive, entry.config, oci.MAX_JSON_BYTES)
    diff_ids = oci.config_diff_ids(config)
    if len(diff_ids) != len(entry.layers):
        raise BadImage(
            f"{archive.path}: config has {len(diff_ids)} layers, manifest.json {len(entry.layers)}"
        )
    layers = []
    for name, diff_id in zip(entry.layers, diff_ids, strict=True):
        ext = archive.extent(name)
        media_type = oci.sniff_layer_type(pread_exact(ext, 0, min(ext.size, 4)))
        expected = diff_id if media_type == oci.OCI_LAYER else None
        layers.append(LayerSpec(media_type, expected, ext, name))
    roles = {entry.config: DATA_CONFIG}
    layout = _layout(archive, layers, roles, keep=("manifest.json", "repositories"))
    return ImageSpec(None, oci.OCI_MANIFEST, config, tuple(layers), entry.repo_tags, layout)


def _layout(
    archive: ImageArchive,
    layers: list[LayerSpec],
    roles: dict[str, tuple[str, int]],
    keep: tuple[str, ...],
) -> SourceLayout | None:
    """The layout record; for a tar, every member so it can be rebuilt exactly."""
    if isinstance(archive, DirArchive):
        return SourceLayout(
            "oci", {n: read_member(archive, n, MAX_KEPT_FILE) for n in keep if archive.has(n)}
        )
    if not isinstance(archive, TarArchive):
        return None
    source = "docker-archive" if archive.has("manifest.json") else "oci-archive"
    roles = {archive.resolve(n): r for n, r in roles.items() if archive.has(n)}
    for i, layer in enumerate(layers):
        roles.setdefault(archive.resolve(layer.member), ("layer", i))
    files: dict[str, bytes] = {}
    members: list[Member] = []
    kept = 0
    for entry in archive.entries:
        header = archive.read_raw(entry.header_offset, entry.data_offset)
        role = roles.get(entry.name, DATA_NONE) if entry.regular else DATA_NONE
        if entry.regular and entry.size and role == DATA_NONE:
            kept += entry.size
            if entry.size > MAX_KEPT_FILE or kept > MAX_LAYOUT_BYTES // 2:
                return SourceLayout(source, {})  # too much unrelated data to keep: synthesize
            files[entry.name] = pread_exact(
                Extent(archive.path, entry.data_offset, entry.size, archive.fd), 0, entry.size
            )
            members.append(Member(header, entry.size, ("file", 0), entry.name))
        else:
            members.append(Member(header, entry.size if role != DATA_NONE else 0, role))
    trailer = archive.file_size - archive.end_offset
    if not 0 <= trailer <= MAX_TRAILER or archive.read_raw(
        archive.end_offset, archive.file_size
    ).strip(b"\0"):
        return SourceLayout(source, {n: files[n] for n in keep if n in files})
    return SourceLayout(source, files, tuple(members), trailer)
