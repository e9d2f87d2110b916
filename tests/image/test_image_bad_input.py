"""Bad archives are refused with one clear line, and the store is left unchanged."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from imagetools import Umoci, random_bytes, skopeo_copy, write_tree

from blobstore.client import Client
from blobstore.config import Config
from blobstore.dedup import as_tree
from blobstore.errors import BadInput, InvalidManifest, NotFound, UnsafePath
from blobstore.image import (
    BadImage,
    DigestMismatch,
    UnsafeMember,
    export_image,
    image_sharing,
    import_into,
    oci,
)
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
    await import_into(client, str(src), "images/ok", progress=lambda *a: seen.append(a))
    assert seen[-1] == (1024, 1024)
    out = tmp_path / "out.tar"
    seen.clear()
    await export_image(
        client.catalog, client.source, "images/ok", out, "docker-archive", lambda *a: seen.append(a)
    )
    assert seen[-1] == (1024, 1024)
    assert out.read_bytes() == src.read_bytes()
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()  # an ordinary file, not 0600
    layout = tmp_path / "layout"
    await export_image(client.catalog, client.source, "images/ok", layout, "oci")
    assert layout.stat().st_mode & 0o777 == 0o777 & ~_umask()
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no temp left


async def test_export_into_a_missing_directory_is_one_line(client: Client, tmp_path: Path) -> None:
    await import_into(client, str(make_tar(tmp_path / "ok.tar", classic())), "images/ok")
    out = tmp_path / "no-such-dir" / "out.tar"
    with pytest.raises(BadInput, match=r"cannot write .*out.tar: No such file or directory"):
        await export_image(client.catalog, client.source, "images/ok", out, "docker-archive")
    assert not (tmp_path / "no-such-dir").exists()


def _umask() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    raise AssertionError("no Umask line in /proc/self/status")


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


async def test_wrong_manifest_kinds_are_one_error(client: Client, tmp_path: Path) -> None:
    """A ref to a layer where an image is expected, and an image whose layer
    entry names an image, fail the same way in export, sharing and dedup."""
    src = make_tar(tmp_path / "ok.tar", classic())
    await import_into(client, str(src), "images/ok")
    stored = await load_image(client.catalog, "images/ok")
    await client.catalog.set_ref("images/layer", stored.image.layers[0].manifest)
    out = tmp_path / "out.tar"
    with pytest.raises(InvalidManifest, match=r"^images/layer is a layer, not an image$"):
        await export_image(client.catalog, client.source, "images/layer", out, "docker-archive")
    with pytest.raises(InvalidManifest, match=r"^images/layer is a layer, not an image$"):
        await image_sharing(client.catalog, "images/layer")
    entry = stored.image.layers[0]
    bad = replace(stored.image, layers=(type(entry)(entry.digest, stored.id),))
    await client.catalog.set_ref("images/bad", await client.catalog.save(bad))
    kind = rf"layer {entry.digest} is an image, not a layer$"
    with pytest.raises(InvalidManifest, match=kind):
        await export_image(client.catalog, client.source, "images/bad", out, "docker-archive")
    with pytest.raises(InvalidManifest, match=kind):
        await image_sharing(client.catalog, "images/bad")
    with pytest.raises(InvalidManifest, match=kind):
        await as_tree(bad, client.catalog)
    sharing = await image_sharing(client.catalog, "images/ok")  # other refs: skipped
    assert sharing.layers[0].shared_with == ()
    assert not out.exists()


async def test_export_refuses_existing_out_and_unknown_ref(client: Client, tmp_path: Path) -> None:
    src = make_tar(tmp_path / "ok.tar", classic())
    await import_into(client, str(src), "images/ok")
    with pytest.raises(BadInput, match="already exists"):
        await export_image(client.catalog, client.source, "images/ok", src, "docker-archive")
    with pytest.raises(NotFound):
        await export_image(client.catalog, client.source, "images/nope", tmp_path / "x", "oci")


# --- blobs swapped while an import runs (issue 10 item 9) -------------------------------------


def sha256_hex(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def oci_layout(root: Path, layer: bytes) -> Path:
    """A minimal OCI layout directory holding one image with one uncompressed layer."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes, media_type: str) -> dict[str, object]:
        (blobs / sha256_hex(data)).write_bytes(data)
        return {"mediaType": media_type, "digest": "sha256:" + sha256_hex(data), "size": len(data)}

    layer_desc = put(layer, oci.OCI_LAYER)
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]}})
    manifest = {
        "schemaVersion": 2,
        "mediaType": oci.OCI_MANIFEST,
        "config": put(config.encode(), oci.OCI_CONFIG),
        "layers": [layer_desc],
    }
    top = put(json.dumps(manifest).encode(), oci.OCI_MANIFEST)
    top["annotations"] = {oci.REF_NAME: "v1"}
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [top]}))
    (root / "oci-layout").write_bytes(oci.OCI_LAYOUT_BYTES)
    return root


def store_holds(store: Path, secret: bytes) -> bool:
    """True if any object in a file:// store contains a piece of ``secret``."""
    probes = [secret[i : i + 64] for i in range(0, len(secret) - 64, 64 << 10)]
    for path in store.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if any(p in data for p in probes):
                return True
    return False


def swap_once(action: Callable[[], object]) -> Callable[[int, int], None]:
    """A progress callback that runs ``action`` on its first call: after the image was
    read and checked, before the first layer is chunked."""
    done: list[bool] = []

    def progress(sent: int, total: int) -> None:
        if not done:
            done.append(True)
            action()

    return progress


def replace_with_symlink(path: Path, target: Path) -> None:
    link = path.with_name(path.name + ".swap")
    link.symlink_to(target)
    os.replace(link, path)


@pytest.mark.parametrize("size", [MiB, 17 * MiB], ids=["whole", "streamed"])
async def test_blob_swapped_for_symlink_during_import(
    client: Client, config: Config, tmp_path: Path, size: int
) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(random_bytes(size, 7))
    secret.chmod(0o600)
    layer = random_bytes(size, 8)
    layout = oci_layout(tmp_path / "layout", layer)
    blob = layout / "blobs" / "sha256" / sha256_hex(layer)
    swap = swap_once(lambda: replace_with_symlink(blob, secret))
    result = await import_into(client, str(layout), "images/x", progress=swap)
    assert blob.is_symlink()  # the swap did happen, mid-import
    assert result.digest != ""
    stored = await load_image(client.catalog, "images/x")
    assert stored.layers[0].digest == "sha256:" + sha256_hex(layer)  # the blob that was opened
    assert not store_holds(Path(config.store_url.removeprefix("file://")), secret.read_bytes())


async def test_archive_replaced_during_import(
    client: Client, config: Config, tmp_path: Path
) -> None:
    layer = random_bytes(MiB, 9)
    src = make_tar(tmp_path / "ok.tar", classic(layer))
    secret = tmp_path / "secret"
    secret.write_bytes(random_bytes(src.stat().st_size, 10))
    secret.chmod(0o600)
    swap = swap_once(lambda: os.replace(secret, src))
    await import_into(client, str(src), "images/x", progress=swap)
    stored = await load_image(client.catalog, "images/x")
    assert stored.layers[0].digest == "sha256:" + sha256_hex(layer)
    assert not store_holds(Path(config.store_url.removeprefix("file://")), src.read_bytes())


async def test_blob_rewritten_in_place_during_import_publishes_nothing(
    client: Client, tmp_path: Path
) -> None:
    layer = random_bytes(MiB, 11)
    layout = oci_layout(tmp_path / "layout", layer)
    blob = layout / "blobs" / "sha256" / sha256_hex(layer)
    swap = swap_once(lambda: blob.write_bytes(random_bytes(MiB, 12)))  # same inode, new bytes
    with pytest.raises(DigestMismatch, match="layer 0"):
        await import_into(client, str(layout), "images/x", progress=swap)
    assert await client.catalog.list_refs() == []


async def test_layout_blob_that_is_a_symlink(client: Client, tmp_path: Path) -> None:
    layer = random_bytes(MiB, 13)
    layout = oci_layout(tmp_path / "layout", layer)
    secret = tmp_path / "secret"
    secret.write_bytes(layer)  # even the right bytes: a link is never followed
    replace_with_symlink(layout / "blobs" / "sha256" / sha256_hex(layer), secret)
    await assert_refused(client, layout, UnsafeMember, "symlink")


async def test_layout_directory_that_is_a_symlink(client: Client, tmp_path: Path) -> None:
    layout = oci_layout(tmp_path / "layout", random_bytes(MiB, 14))
    os.rename(layout / "blobs", tmp_path / "elsewhere")
    (layout / "blobs").symlink_to(tmp_path / "elsewhere")
    await assert_refused(client, layout, UnsafeMember, "symlink")


async def test_layout_blob_that_is_a_fifo(client: Client, tmp_path: Path) -> None:
    layer = random_bytes(MiB, 15)
    layout = oci_layout(tmp_path / "layout", layer)
    blob = layout / "blobs" / "sha256" / sha256_hex(layer)
    blob.unlink()
    os.mkfifo(blob)  # opening it for reading would block forever
    await assert_refused(client, layout, BadImage, "not a regular file")
