"""Pure parts: JSON documents, member names, the layout record, gzip streaming."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path

import msgpack
import pytest

from blobstore.errors import BadImage, UnsafeMember
from blobstore.image import oci
from blobstore.image.archive import clean_name
from blobstore.image.blobs import _Gunzip
from blobstore.image.layout import Member, SourceLayout, decode_layout, encode_layout
from blobstore.image.stream import HashingWriter, file_sha256
from blobstore.manifest import Image, ImageLayer, decode, encode

D = "sha256:" + "a" * 64


def test_parse_manifest_and_index() -> None:
    doc = {
        "schemaVersion": 2,
        "config": {"mediaType": oci.OCI_CONFIG, "digest": D, "size": 3},
        "layers": [{"mediaType": oci.OCI_LAYER + "+gzip", "digest": D, "size": 5}],
    }
    m = oci.parse_manifest(json.dumps(doc).encode())
    assert m.media_type == oci.OCI_MANIFEST
    assert m.layers[0].size == 5
    index = {"schemaVersion": 2, "manifests": [{"digest": D, "size": 1, "annotations": {"a": "b"}}]}
    assert oci.parse_index(json.dumps(index).encode())[0].annotations == {"a": "b"}


@pytest.mark.parametrize(
    "doc",
    [
        {"schemaVersion": 1},
        {"schemaVersion": 2, "config": {"digest": "md5:x", "size": 1}, "layers": []},
        {"schemaVersion": 2, "config": {"digest": D, "size": -1}, "layers": []},
        {"schemaVersion": 2, "config": {"digest": D, "size": True}, "layers": []},
        {"schemaVersion": 2, "mediaType": "text/plain", "config": {}, "layers": []},
        {"schemaVersion": 2, "config": {"digest": D, "size": 1}, "layers": [D] * 2000},
    ],
)
def test_bad_manifests(doc: object) -> None:
    with pytest.raises(BadImage):
        oci.parse_manifest(json.dumps(doc).encode())


def test_json_cap_is_checked_before_parsing() -> None:
    with pytest.raises(BadImage, match="too large"):
        oci.load_json(b" " * (oci.MAX_JSON_BYTES + 1), "thing")


def test_synthesized_manifest_is_deterministic() -> None:
    a = oci.synthesize_manifest(b"{}", [(oci.OCI_LAYER, D, 10)])
    assert a == oci.synthesize_manifest(b"{}", [(oci.OCI_LAYER, D, 10)])
    assert oci.parse_manifest(a).config.digest == oci.sha256_digest(b"{}")


@pytest.mark.parametrize(
    ("name", "clean"),
    [("./a/b", "a/b"), ("a//b/", "a/b"), ("./", "."), ("blobs/sha256/x", "blobs/sha256/x")],
)
def test_clean_names(name: str, clean: str) -> None:
    assert clean_name(name) == clean


@pytest.mark.parametrize("name", ["../a", "/a", "a/../../b", "a\\b", "a\x00", ""])
def test_unsafe_names(name: str) -> None:
    with pytest.raises(UnsafeMember):
        clean_name(name)


def test_layout_record_round_trip_and_validation() -> None:
    layout = SourceLayout(
        "docker-archive",
        {"manifest.json": b"[]"},
        (
            Member(b"\0" * 512, 2, ("file", 0), "manifest.json"),
            Member(b"\0" * 1024, 9, ("layer", 0)),
        ),
        1024,
    )
    assert decode_layout(encode_layout(layout)) == layout
    broken = SourceLayout("x", {}, (Member(b"\0" * 100, 0, ("none", 0)),))
    with pytest.raises(BadImage, match="malformed"):
        decode_layout(encode_layout(broken))
    with pytest.raises(BadImage, match="malformed"):
        decode_layout(b"\x93garbage")
    body = {"source": "x", "files": {}, "members": [[b"\0" * 512, 0]], "trailer": 0}
    with pytest.raises(BadImage, match=r"malformed \(member\)"):
        decode_layout(msgpack.packb(body, use_bin_type=True))
    with pytest.raises(BadImage, match=r"malformed \(KeyError: 'trailer'\)"):
        decode_layout(msgpack.packb({"source": "x", "files": {}, "members": []}))


def test_file_sha256_of_a_short_file_is_bad_image(tmp_path: Path) -> None:
    path = tmp_path / "layer"
    path.write_bytes(b"abc")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert file_sha256(fd, 1, 2) == "sha256:" + hashlib.sha256(b"bc").hexdigest()
        with pytest.raises(BadImage, match="truncated: 2 of 4 bytes missing"):
            file_sha256(fd, 1, 4)
    finally:
        os.close(fd)


def test_image_layout_field_is_optional_in_the_codec() -> None:
    plain = Image(b"{}", oci.OCI_MANIFEST, b"{}", (ImageLayer(D, "0" * 64),))  # type: ignore[arg-type]
    assert b"layout" not in encode(plain)  # old image manifests keep their ids
    assert decode(encode(plain)) == plain
    with_layout = Image(b"{}", oci.OCI_MANIFEST, b"{}", (), layout=b"xyz")
    assert decode(encode(with_layout)) == with_layout


def test_gunzip_multi_member_streams_in_pieces() -> None:
    plain = bytes(range(256)) * 40_000
    blob = gzip.compress(plain[:5000]) + gzip.compress(plain[5000:])
    writer = HashingWriter(None)
    g = _Gunzip(writer)
    for i in range(0, len(blob), 777):
        g.feed(blob[i : i + 777])
    g.finish()
    writer.check("x", oci.sha256_digest(plain), len(plain))
    with pytest.raises(BadImage, match="gzip"):
        _Gunzip(HashingWriter(None)).feed(b"\x1f\x8bnot gzip at all")
