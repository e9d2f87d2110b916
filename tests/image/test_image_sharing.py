"""Layer sharing between images, and chunk dedup between image versions."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from imagetools import Umoci, random_bytes, skopeo_copy, write_tree

from blobstore.client import Client
from blobstore.image import image_sharing, import_into
from blobstore.image.blobs import load_image
from blobstore.objectstore import CHUNKS, INDEX_SUFFIX, PACKS

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("umoci", "skopeo")]
MiB = 1 << 20


async def stored_chunk_bytes(client: Client) -> int:
    """Bytes of chunk data in the store: loose chunks and packs (not pack indexes)."""
    infos = [info async for info in client.object_store.list(CHUNKS)]
    infos += [info async for info in client.object_store.list(PACKS)]
    return sum(info.size for info in infos if not info.key.endswith(INDEX_SUFFIX))


async def test_two_images_sharing_a_base_layer_store_it_once(
    client: Client, tmp_path: Path
) -> None:
    img = Umoci(tmp_path / "layout")
    img.new("base")
    img.insert("base", write_tree(tmp_path / "base", {"usr/lib/big": random_bytes(6 * MiB, 1)}))
    for name, seed in (("app1", 2), ("app2", 3)):
        img.tag("base", name)
        img.insert(name, write_tree(tmp_path / name, {f"{name}/data": random_bytes(MiB, seed)}))
    layout = str(img.layout)

    r1 = await import_into(client, layout, "images/app1", tag="app1")
    before = await stored_chunk_bytes(client)
    r2 = await import_into(client, layout, "images/app2", tag="app2")
    added = await stored_chunk_bytes(client) - before

    app1 = await load_image(client.catalog, "images/app1")
    app2 = await load_image(client.catalog, "images/app2")
    assert app1.image.layers[0] == app2.image.layers[0]  # same layer manifest id
    base_size = app1.layers[0].size
    assert base_size > 6 * MiB * 0.99  # random data does not compress
    assert added == app2.layers[1].size  # only app2's own layer was uploaded
    assert r2.new_bytes == added < r1.new_bytes - base_size + MiB // 4

    sharing = await image_sharing(client.catalog, "images/app1")
    assert sharing.layers[0].shared_with == ("images/app2",)
    assert sharing.layers[1].shared_with == ()
    assert sharing.shared_layer_bytes == base_size
    assert sharing.bytes == base_size + app1.layers[1].size
    doc = sharing.to_json()
    assert doc["layers"][0]["shared_with"] == ["images/app2"]


async def test_new_version_with_one_changed_file_adds_about_that_file(
    client: Client, tmp_path: Path
) -> None:
    """Uncompressed layers are chunked as tars: v2 costs about the changed file."""
    files = {f"opt/model/shard{i}.bin": random_bytes(3 * MiB, 10 + i) for i in range(8)}
    tree = write_tree(tmp_path / "tree", files)
    img = Umoci(tmp_path / "layout")
    img.new("v1")
    img.insert("v1", tree)
    write_tree(tree, {"opt/model/shard3.bin": random_bytes(3 * MiB, 99)})  # one file changes
    img.new("v2")
    img.insert("v2", tree)
    archives = {}
    for tag in ("v1", "v2"):
        archives[tag] = tmp_path / f"{tag}.tar"  # docker-archive: plain tar layers
        skopeo_copy(f"oci:{img.layout}:{tag}", f"docker-archive:{archives[tag]}")

    await import_into(client, str(archives["v1"]), "images/m:v1")
    before = await stored_chunk_bytes(client)
    r2 = await import_into(client, str(archives["v2"]), "images/m:v2")
    added = await stored_chunk_bytes(client) - before

    v2 = await load_image(client.catalog, "images/m:v2")
    layer_size = v2.layers[0].size
    print(
        f"\nv2 layer {layer_size} bytes; import added {added} bytes of chunks "
        f"({added / layer_size:.1%}); the changed file is {3 * MiB} bytes"
    )
    assert added == r2.new_bytes
    assert 3 * MiB <= added <= 3 * MiB + 2 * 4 * MiB  # the file + at most a max chunk each side
    assert added < layer_size / 3
    sharing = await image_sharing(client.catalog, "images/m:v2")
    assert sharing.shared_layer_bytes == 0
    assert sharing.shared_chunk_bytes == sharing.stored_bytes - added
    shutil.rmtree(tree)
