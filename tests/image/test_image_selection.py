"""Choosing one image out of several, and compressions docker-archive cannot carry."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from imagetools import Umoci, check_layout_blobs, random_bytes, skopeo_copy, write_tree

from blobstore.client import Client
from blobstore.errors import BadInput
from blobstore.image import BadImage, export_image, import_into
from blobstore.image.blobs import load_image

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("umoci", "skopeo")]


@pytest.fixture
def two_images(tmp_path: Path) -> Path:
    img = Umoci(tmp_path / "layout")
    for tag, seed in (("one", 1), ("two", 2)):
        img.new(tag)
        img.insert(tag, write_tree(tmp_path / tag, {tag: random_bytes(100_000, seed)}))
    return img.layout


async def test_tag_picks_one_of_several(client: Client, two_images: Path) -> None:
    with pytest.raises(BadImage, match=r"holds 2 images.*'one', 'two'"):
        await import_into(client, str(two_images), "images/x")
    with pytest.raises(BadImage, match="no image tagged three"):
        await import_into(client, str(two_images), "images/x", tag="three")
    assert await client.catalog.list_refs() == []
    await import_into(client, str(two_images), "images/two", tag="two")
    assert (await load_image(client.catalog, "images/two")).image.tags == ("two",)


async def test_zstd_layers_round_trip_as_oci_only(
    client: Client, two_images: Path, tmp_path: Path
) -> None:
    docker = tmp_path / "d.tar"
    skopeo_copy(f"oci:{two_images}:one", f"docker-archive:{docker}")
    zstd = tmp_path / "zstd"
    skopeo_copy(
        f"docker-archive:{docker}",
        f"oci:{zstd}:v1",
        "--dest-compress",
        "--dest-compress-format",
        "zstd",
    )
    await import_into(client, str(zstd), "images/z")
    stored = await load_image(client.catalog, "images/z")
    assert stored.layers[0].media_type.endswith("+zstd")
    out = tmp_path / "out"
    await export_image(client.catalog, client.source, "images/z", out, "oci")
    assert check_layout_blobs(out) == 3
    with pytest.raises(BadInput, match="cannot export zstd layer"):
        await export_image(
            client.catalog, client.source, "images/z", tmp_path / "z.tar", "docker-archive"
        )
    assert not [n for n in os.listdir(tmp_path) if n.startswith((".z.tar", "z.tar"))]
