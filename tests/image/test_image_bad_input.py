"""Bad archives are refused with one clear line, and the store is left unchanged."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from imagetools import Umoci, random_bytes, skopeo_copy, write_tree

from blobstore.client import Client
from blobstore.errors import BadInput, NotFound, UnsafePath
from blobstore.image import BadImage, DigestMismatch, UnsafeMember, export_image, import_into
from blobstore.image.blobs import load_image
from blobstore.image.oci import MAX_JSON_BYTES
from blobstore.manifest import Image, Layer

pytestmark = pytest.mark.anyio
MiB = 1 << 20


def make_tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tf.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tf.addfile(info, io.BytesIO(m[1]))
    return path


def symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    return info


def classic(layer: bytes = b"x" * 1024, manifest: bytes | None = None) -> list:  # type: ignore[type-arg]
    """A minimal classic docker-archive: config, one layer, manifest.json."""
    import hashlib

    diff = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [diff]}}).encode()
    doc = [{"Config": "config.json", "RepoTags": ["t:1"], "Layers": ["l/layer.tar"]}]
    return [
        ("config.json", config),
        ("l/layer.tar", layer),
        ("manifest.json", manifest if manifest is not None else json.dumps(doc).encode()),
    ]


async def assert_refused(client: Client, src: Path, kind: type[Exception], match: str) -> str:
    with pytest.raises(kind, match=match) as info:
        await import_into(client, str(src), "images/bad")
    message = str(info.value)
    assert "\n" not in message
    assert await client.catalog.list_refs() == []  # ref last: nothing points anywhere
    return message


async def test_minimal_classic_archive_imports(client: Client, tmp_path: Path) -> None:
    src = make_tar(tmp_path / "ok.tar", classic())
    seen: list[tuple[int, int]] = []
    await import_into(client,
        str(src), "images/ok", progress=lambda *a: seen.append(a)
    )
    assert seen[-1] == (1024, 1024)
    out = tmp_path / "out.tar"
    seen.clear()
    await export_image(
        client.catalog, client.source, "images/ok", out, "docker-archive", lambda *a: seen.append(a)
    )
    assert seen[-1] == (1024, 1024)
    assert out.read_bytes() == src.read_bytes()


@pytest.mark.parametrize("name", ["../x", "/etc/x", "a/../../x", "./../x"])
async def test_traversal_member_names(client: Client, tmp_path: Path, name: str) -> None:
    src = make_tar(tmp_path / "t.tar", [*classic(), (name, b"evil")])
    await assert_refused(client, src, UnsafePath, "unsafe archive member name")


@pytest.mark.parametrize("target", ["/etc/passwd", "../../etc/passwd", "../../../x"])
async def test_symlinked_member_pointing_out(client: Client, tmp_path: Path, target: str) -> None:
    members = classic()
    members[1] = symlink("l/layer.tar", target)
    src = make_tar(tmp_path / "s.tar", members)
    await assert_refused(client, src, UnsafeMember, "outside the archive")


async def test_symlinked_member_to_nothing(client: Client, tmp_path: Path) -> None:
    members = classic()
    members[1] = symlink("l/layer.tar", "missing.tar")
    src = make_tar(tmp_path / "s.tar", members)
    await assert_refused(client, src, BadImage, "missing member")


async def test_symlink_inside_layout_dir(client: Client, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    (layout / "blobs").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (layout / "index.json").symlink_to("/etc/hostname")
    await assert_refused(client, layout, UnsafeMember, "symlink")


async def test_oversized_json_is_refused_before_parsing(client: Client, tmp_path: Path) -> None:
    huge = b"[" + b"1," * (MAX_JSON_BYTES // 2) + b"1]"
    src = make_tar(tmp_path / "big.tar", classic(manifest=huge))
    await assert_refused(client, src, BadImage, "too large")


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        (b"{not json", "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        (b"{}", "non-empty list"),
        (b'[{"Config": 5, "Layers": []}]', "Config"),
        (b'[{"Config": "config.json", "Layers": ["nope.tar"]}]', "missing member"),
        (b'[{"Config": "config.json", "Layers": []}]', "config has 1 layers"),
    ],
)
async def test_malformed_manifest_json(
    client: Client, tmp_path: Path, doc: bytes, match: str
) -> None:
    src = make_tar(tmp_path / "m.tar", classic(manifest=doc))
    await assert_refused(client, src, BadImage, match)


async def test_not_an_archive(client: Client, tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(random_bytes(10_000, 1))
    await assert_refused(client, junk, BadImage, "tar archive")
    empty = make_tar(tmp_path / "e.tar", [("hello", b"x")])
    await assert_refused(client, empty, BadImage, "no index.json or manifest.json")
    with pytest.raises(BadImage, match="cannot open"):
        await import_into(client, str(tmp_path / "nope"), "r")


@pytest.fixture
def skopeo_archive(tmp_path: Path, umoci: str, skopeo: str) -> Path:
    img = Umoci(tmp_path / "layout")
    img.new("v1")
    img.insert("v1", write_tree(tmp_path / "t", {"data": random_bytes(2 * MiB, 5)}))
    src = tmp_path / "src.tar"
    skopeo_copy(f"oci:{img.layout}:v1", f"docker-archive:{src}")
    return src


def truncated_copies(src: Path, tmp_path: Path) -> list[Path]:
    data = src.read_bytes()
    out = []
    for cut in (len(data) // 2, 700, len(data) - 1500):
        short = tmp_path / f"short{cut}.tar"
        short.write_bytes(data[:cut])
        out.append(short)
    return out


def flip_layer_byte(src: Path, out: Path) -> Path:
    data = bytearray(src.read_bytes())
    with tarfile.open(src) as tf:
        layer = next(m for m in tf.getmembers() if m.isreg() and m.size > MiB)
    data[layer.offset_data + layer.size // 2] ^= 0xFF
    out.write_bytes(bytes(data))
    return out


async def test_truncated_archive(client: Client, skopeo_archive: Path, tmp_path: Path) -> None:
    for short in truncated_copies(skopeo_archive, tmp_path):
        await assert_refused(client, short, BadImage, "truncated|not a readable tar|missing")


async def test_corrupt_layer_byte(client: Client, skopeo_archive: Path, tmp_path: Path) -> None:
    bad = flip_layer_byte(skopeo_archive, tmp_path / "bad.tar")
    message = await assert_refused(client, bad, DigestMismatch, "sha256 mismatch")
    assert "layer 0" in message


async def test_corrupt_oci_manifest_blob(client: Client, tmp_path: Path, umoci: str) -> None:
    img = Umoci(tmp_path / "layout")
    img.new("v1")
    index = json.loads((img.layout / "index.json").read_text())
    blob = img.layout / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]
    blob.write_bytes(blob.read_bytes().replace(b'"schemaVersion":2', b'"schemaVersion":3'))
    await assert_refused(client, img.layout, DigestMismatch, "image manifest")


async def test_export_digest_mismatch_leaves_nothing(client: Client, tmp_path: Path) -> None:
    src = make_tar(tmp_path / "ok.tar", classic())
    await import_into(client, str(src), "images/ok")
    stored = await load_image(client.catalog, "images/ok")
    # A layer manifest that lies about its digest (a bug or a tampered store).
    wrong = "sha256:" + "0" * 64
    forged = await client.catalog.save(
        Layer(
            wrong,
            stored.layers[0].media_type,
            stored.layers[0].size,
            stored.layers[0].chunker,
            stored.layers[0].chunks,
        )
    )
    manifest = stored.image.manifest_json.replace(stored.layers[0].digest.encode(), wrong.encode())
    image = Image(
        manifest,
        stored.image.manifest_media_type,
        stored.image.config_json,
        (type(stored.image.layers[0])(wrong, forged),),
        layout=stored.image.layout,
    )
    await client.catalog.set_ref("images/forged", await client.catalog.save(image))
    for fmt, out in (("docker-archive", tmp_path / "o.tar"), ("oci", tmp_path / "o-dir")):
        before = set(os.listdir(tmp_path))
        with pytest.raises(DigestMismatch, match="sha256 mismatch"):
            await export_image(client.catalog, client.source, "images/forged", out, fmt)
        assert set(os.listdir(tmp_path)) == before  # no OUT, no temp left behind


async def test_export_refuses_existing_out_and_unknown_ref(client: Client, tmp_path: Path) -> None:
    src = make_tar(tmp_path / "ok.tar", classic())
    await import_into(client, str(src), "images/ok")
    with pytest.raises(BadInput, match="already exists"):
        await export_image(client.catalog, client.source, "images/ok", src, "docker-archive")
    with pytest.raises(NotFound):
        await export_image(client.catalog, client.source, "images/nope", tmp_path / "x", "oci")
