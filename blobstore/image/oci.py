"""OCI / Docker image JSON documents: parse (size-capped, validated) and synthesize.

Pure: takes bytes, returns values. Every refusal is a one-line ``BadImage``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import BadImage

MAX_JSON_BYTES = 4 << 20
"""Cap on any JSON document read from an archive (manifest, config, index)."""
MAX_LAYERS = 1024
MAX_BLOB_BYTES = 1 << 45

OCI_LAYOUT = "oci-layout"
OCI_LAYOUT_BYTES = b'{"imageLayoutVersion":"1.0.0"}'
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
ATTESTATION = "vnd.docker.reference.type"
"""Annotation of BuildKit attestation manifests beside the image in an index."""

INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ImageManifest:
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True, slots=True)
class DockerEntry:
    """One image of a classic ``docker save`` manifest.json."""

    config: str
    repo_tags: tuple[str, ...]
    layers: tuple[str, ...]


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob_path(digest: str) -> str:
    """``blobs/sha256/<hex>`` for a validated digest."""
    return "blobs/sha256/" + check_digest(digest, "digest")[len("sha256:") :]


def check_digest(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _DIGEST_RE.fullmatch(value):
        raise BadImage(f"{where}: bad or unsupported digest {str(value)[:80]!r} (need sha256)")
    return value


def compression(media_type: str) -> str:
    """``gzip``, ``zstd`` or ``none``, as the layer media type says."""
    if media_type.endswith("+gzip") or media_type.endswith(".gzip"):
        return "gzip"
    if media_type.endswith("+zstd"):
        return "zstd"
    return "none"


def sniff_layer_type(head: bytes) -> str:
    """OCI media type for a docker-archive layer blob, judged by its magic bytes."""
    if head.startswith(GZIP_MAGIC):
        return OCI_LAYER + "+gzip"
    if head.startswith(ZSTD_MAGIC):
        return OCI_LAYER + "+zstd"
    return OCI_LAYER


def load_json(data: bytes, what: str) -> Any:
    """Parse a JSON document, refusing it before parsing when it is too large."""
    if len(data) > MAX_JSON_BYTES:
        raise BadImage(f"{what} is too large ({len(data)} bytes, limit {MAX_JSON_BYTES})")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise BadImage(f"{what} is not valid JSON") from exc


def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadImage(f"{where}: expected a JSON object")
    return value


def _str(obj: dict[str, Any], key: str, where: str, optional: bool = False) -> str:
    value = obj.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str) or len(value) > 4096:
        raise BadImage(f"{where}: missing or bad {key!r}")
    return value


def _descriptor(value: Any, where: str) -> Descriptor:
    obj = _obj(value, where)
    size = obj.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_BLOB_BYTES:
        raise BadImage(f"{where}: missing or bad 'size'")
    raw = obj.get("annotations") or {}
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
    ):
        raise BadImage(f"{where}: bad 'annotations'")
    return Descriptor(
        _str(obj, "mediaType", where, optional=True),
        check_digest(obj.get("digest"), where),
        size,
        dict(raw),
    )


def _list(obj: dict[str, Any], key: str, where: str, limit: int = MAX_LAYERS) -> list[Any]:
    value = obj.get(key)
    if not isinstance(value, list) or len(value) > limit:
        raise BadImage(f"{where}: missing or bad {key!r}")
    return value


def parse_index(data: bytes) -> tuple[Descriptor, ...]:
    """The ``manifests`` of an OCI index (``index.json``)."""
    obj = _obj(load_json(data, "index.json"), "index.json")
    if obj.get("schemaVersion") != 2:
        raise BadImage("index.json: unsupported schemaVersion")
    return tuple(
        _descriptor(d, f"index.json manifests[{i}]")
        for i, d in enumerate(_list(obj, "manifests", "index.json"))
    )


def parse_manifest(data: bytes, media_type: str = "") -> ImageManifest:
    """An OCI or Docker schema 2 image manifest."""
    obj = _obj(load_json(data, "image manifest"), "image manifest")
    if obj.get("schemaVersion") != 2:
        raise BadImage("image manifest: unsupported schemaVersion")
    declared = obj.get("mediaType")
    kind = declared if isinstance(declared, str) and declared else media_type or OCI_MANIFEST
    if kind not in MANIFEST_TYPES:
        raise BadImage(f"image manifest: unsupported media type {kind[:80]!r}")
    config = _descriptor(obj.get("config"), "image manifest config")
    layers = tuple(
        _descriptor(d, f"image manifest layers[{i}]")
        for i, d in enumerate(_list(obj, "layers", "image manifest"))
    )
    return ImageManifest(kind, config, layers)


def parse_docker_manifest(data: bytes) -> tuple[DockerEntry, ...]:
    """The classic ``docker save`` manifest.json: one entry per image."""
    items = load_json(data, "manifest.json")
    if not isinstance(items, list) or not items or len(items) > MAX_LAYERS:
        raise BadImage("manifest.json: expected a non-empty list of images")
    entries = []
    for i, item in enumerate(items):
        where = f"manifest.json[{i}]"
        obj = _obj(item, where)
        tags = obj.get("RepoTags") or []
        layers = _list(obj, "Layers", where)
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise BadImage(f"{where}: bad 'RepoTags'")
        if not all(isinstance(layer, str) for layer in layers):
            raise BadImage(f"{where}: bad 'Layers'")
        entries.append(DockerEntry(_str(obj, "Config", where), tuple(tags), tuple(layers)))
    return tuple(entries)


def config_diff_ids(data: bytes) -> tuple[str, ...]:
    """``rootfs.diff_ids`` of an image config (sha256 of each uncompressed layer)."""
    obj = _obj(load_json(data, "image config"), "image config")
    rootfs = _obj(obj.get("rootfs"), "image config rootfs")
    return tuple(
        check_digest(d, "image config rootfs.diff_ids")
        for d in _list(rootfs, "diff_ids", "image config rootfs")
    )


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def synthesize_manifest(config: bytes, layers: list[tuple[str, str, int]]) -> bytes:
    """A deterministic OCI manifest for a classic docker-archive image.

    ``layers`` holds (media type, digest, size). Same input, same bytes, same digest.
    """
    return _dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": OCI_CONFIG,
                "digest": sha256_digest(config),
                "size": len(config),
            },
            "layers": [{"mediaType": m, "digest": d, "size": s} for m, d, s in layers],
        }
    )


def synthesize_index(manifest: Descriptor, tags: tuple[str, ...]) -> bytes:
    """index.json for one image, one descriptor per tag (at least one)."""
    base = {"mediaType": manifest.media_type, "digest": manifest.digest, "size": manifest.size}
    entries = [{**base, "annotations": {REF_NAME: _tag_of(t)}} for t in tags] or [base]
    return _dumps({"schemaVersion": 2, "manifests": entries})


def synthesize_docker_manifest(config_name: str, tags: tuple[str, ...], layers: list[str]) -> bytes:
    return _dumps([{"Config": config_name, "RepoTags": list(tags), "Layers": layers}])


def _tag_of(name: str) -> str:
    """``docker.io/foo/bar:v1`` -> ``v1``; a bare tag stays as it is."""
    last = name.rsplit("/", 1)[-1]
    return last.rsplit(":", 1)[1] if ":" in last else name
