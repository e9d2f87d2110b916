"""Images made by umoci and skopeo round-trip through the store byte-identically."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import pytest
from imagetools import (
    Umoci,
    check_layout_blobs,
    random_bytes,
    sha256_file,
    skopeo_copy,
    skopeo_inspect,
    write_tree,
)

from blobstore.client import Client
from blobstore.image import export_image, export_layer, import_into, oci
from blobstore.image.blobs import load_image

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("umoci", "skopeo")]


@pytest.fixture
def oci_layout(tmp_path: Path) -> Path:
    """An umoci image ``app:v1`` with two gzip layers."""
    img = Umoci(tmp_path / "layout")
    img.new("v1")
    img.insert(
        "v1",
        write_tree(
            tmp_path / "l1", {"etc/hello": b"hello\n", "bin/tool": random_bytes(3 << 20, 1)}
        ),
    )
    img.insert("v1", write_tree(tmp_path / "l2", {"app/data.bin": random_bytes(2 << 20, 2)}))
    return img.layout


async def test_docker_archive_round_trip_is_byte_identical(
    client: Client, oci_layout: Path, tmp_path: Path
) -> None:
    src = tmp_path / "app.tar"
    skopeo_copy(f"oci:{oci_layout}:v1", f"docker-archive:{src}:example.com/app:v1")
    result = await import_into(client, str(src), "images/app:v1")
    assert result.layers == 2

    out = tmp_path / "out.tar"
    await export_image(client.catalog, client.source, "images/app:v1", out, "docker-archive")
    assert out.read_bytes() == src.read_bytes()  # the whole archive, not only its blobs
    info = skopeo_inspect(f"docker-archive:{out}")
    assert len(info["Layers"]) == 2  # type: ignore[arg-type]
    assert (await load_image(client.catalog, "images/app:v1")).image.tags == ("example.com/app:v1",)

    oci_out = tmp_path / "out-oci"
    await export_image(client.catalog, client.source, "images/app:v1", oci_out, "oci")
    assert check_layout_blobs(oci_out) == 4  # manifest, config, two layers
    assert skopeo_inspect(f"oci:{oci_out}:v1")["Layers"] == info["Layers"]


async def test_oci_layout_round_trip(client: Client, oci_layout: Path, tmp_path: Path) -> None:
    result = await import_into(client, str(oci_layout), "images/app:v1")
    source_index = (oci_layout / "index.json").read_bytes()

    out = tmp_path / "out-oci"
    await export_image(client.catalog, client.source, "images/app:v1", out, "oci")
    assert check_layout_blobs(out) == 4
    for blob in (out / "blobs" / "sha256").iterdir():
        assert blob.read_bytes() == (oci_layout / "blobs" / "sha256" / blob.name).read_bytes()
    assert (out / "index.json").read_bytes() == source_index
    assert (out / "oci-layout").read_bytes() == (oci_layout / "oci-layout").read_bytes()
    assert skopeo_inspect(f"oci:{out}:v1")["Digest"] == result.digest

    # gzip layers become plain tars checked against the config's diff_ids
    docker = tmp_path / "out.tar"
    await export_image(client.catalog, client.source, "images/app:v1", docker, "docker-archive")
    info = skopeo_inspect(f"docker-archive:{docker}")
    assert len(info["Layers"]) == 2  # type: ignore[arg-type]
    with tarfile.open(docker) as tf:
        for member in tf.getmembers():
            if member.name.endswith(".tar"):
                f = tf.extractfile(member)
                assert f is not None
                tf_layer = tmp_path / "layer.tar"
                tf_layer.write_bytes(f.read())
                assert sha256_file(tf_layer) == "sha256:" + member.name[: -len(".tar")]


async def test_oci_archive_and_uncompressed_layers(
    client: Client, oci_layout: Path, tmp_path: Path
) -> None:
    docker = tmp_path / "src.tar"
    skopeo_copy(f"oci:{oci_layout}:v1", f"docker-archive:{docker}")
    plain = tmp_path / "plain"
    skopeo_copy(
        f"docker-archive:{docker}", f"oci:{plain}:v1", "--dest-oci-accept-uncompressed-layers"
    )
    archive = tmp_path / "app-oci.tar"
    skopeo_copy(f"oci:{oci_layout}:v1", f"oci-archive:{archive}:v1")
    await import_into(client, str(archive), "images/a")
    await import_into(client, str(plain), "images/p")
    stored = await load_image(client.catalog, "images/p")
    diff_ids = oci.config_diff_ids(stored.image.config_json)
    assert [layer.digest for layer in stored.layers] == list(diff_ids)  # plain tars
    for ref in ("images/a", "images/p"):
        out = tmp_path / ref.replace("/", "-")
        await export_image(client.catalog, client.source, ref, out, "oci")
        check_layout_blobs(out)
        skopeo_inspect(f"oci:{out}:v1")
        docker = tmp_path / (ref.replace("/", "-") + ".tar")
        await export_image(client.catalog, client.source, ref, docker, "docker-archive")
        skopeo_inspect(f"docker-archive:{docker}")


async def test_export_single_layer(client: Client, oci_layout: Path, tmp_path: Path) -> None:
    await import_into(client, str(oci_layout), "images/app")
    stored = await load_image(client.catalog, "images/app")
    digest = stored.layers[0].digest
    out = tmp_path / "layer.blob"
    size = await export_layer(client.catalog, client.source, "images/app", digest, out)
    assert size == out.stat().st_size
    assert sha256_file(out) == digest
    assert out.read_bytes() == (oci_layout / "blobs" / "sha256" / digest[7:]).read_bytes()


def docker25_archive(layout: Path, out: Path) -> Path:
    """What ``docker save`` 25+ writes: an OCI layout plus manifest.json, in a tar."""
    index = json.loads((layout / "index.json").read_bytes())
    digest = index["manifests"][0]["digest"]
    manifest = json.loads((layout / "blobs" / "sha256" / digest[7:]).read_bytes())
    doc = [
        {
            "Config": "blobs/sha256/" + manifest["config"]["digest"][7:],
            "RepoTags": ["demo:v1"],
            "Layers": ["blobs/sha256/" + d["digest"][7:] for d in manifest["layers"]],
        }
    ]
    (layout / "manifest.json").write_text(json.dumps(doc))
    with tarfile.open(out, "w") as tf:
        tf.add(layout, arcname=".")
    return out


async def test_docker25_archive_round_trip(
    client: Client, oci_layout: Path, tmp_path: Path
) -> None:
    plain = tmp_path / "plain"
    skopeo_copy(f"oci:{oci_layout}:v1", f"docker-archive:{tmp_path / 'd.tar'}")
    skopeo_copy(
        f"docker-archive:{tmp_path / 'd.tar'}",
        f"oci:{plain}:v1",
        "--dest-oci-accept-uncompressed-layers",
    )
    src = docker25_archive(plain, tmp_path / "docker25.tar")
    result = await import_into(client, str(src), "images/d25")
    assert (
        result.digest == json.loads((plain / "index.json").read_bytes())["manifests"][0]["digest"]
    )

    out = tmp_path / "out.tar"
    await export_image(client.catalog, client.source, "images/d25", out, "docker-archive")
    assert sha256_file(out) == sha256_file(src)
    assert len(skopeo_inspect(f"docker-archive:{out}")["Layers"]) == 2  # type: ignore[arg-type]
    oci_out = tmp_path / "oci"
    await export_image(client.catalog, client.source, "images/d25", oci_out, "oci")
    assert (oci_out / "index.json").read_bytes() == (plain / "index.json").read_bytes()
    assert skopeo_inspect(f"oci:{oci_out}:v1")["Digest"] == result.digest


def wrap_in_index(layout: Path) -> str:
    """Point index.json at an image index holding the image and an attestation manifest,
    as BuildKit / Docker 25 with the containerd store write it."""
    blobs = layout / "blobs" / "sha256"
    top = json.loads((layout / "index.json").read_bytes())["manifests"][-1]
    top.pop("annotations", None)
    attestation = b'{"schemaVersion":2,"config":{},"layers":[]}'
    att_digest = "sha256:" + hashlib.sha256(attestation).hexdigest()
    (blobs / att_digest[7:]).write_bytes(attestation)
    inner = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            top,
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": att_digest,
                "size": len(attestation),
                "annotations": {"vnd.docker.reference.type": "attestation-manifest"},
            },
        ],
    }
    raw = json.dumps(inner).encode()
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    (blobs / digest[7:]).write_bytes(raw)
    outer = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "digest": digest,
                "size": len(raw),
                "annotations": {"org.opencontainers.image.ref.name": "v1"},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(outer))
    return str(top["digest"])


async def test_index_with_attestation_manifest(
    client: Client, oci_layout: Path, tmp_path: Path
) -> None:
    image_digest = wrap_in_index(oci_layout)
    archive = tmp_path / "nested.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(oci_layout, arcname=".")
    result = await import_into(client, str(archive), "images/n")
    assert result.digest == image_digest
    out = tmp_path / "out"
    await export_image(client.catalog, client.source, "images/n", out, "oci")
    check_layout_blobs(out)
    assert skopeo_inspect(f"oci:{out}:v1")["Digest"] == image_digest
