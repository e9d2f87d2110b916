"""The ``blobstore image`` commands, run as a user would (a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from imagetools import Umoci, random_bytes, sha256_file, skopeo_copy, skopeo_inspect, write_tree


def blobstore(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "BLOBSTORE_STORE": (tmp_path / "store").as_uri(),
        "BLOBSTORE_CACHE": str(tmp_path / "cache"),
        "BLOBSTORE_PEERS": "none",
    }
    return subprocess.run(
        [sys.executable, "-m", "blobstore.cli", *argv],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=120,
    )


@pytest.mark.usefixtures("umoci", "skopeo")
def test_import_show_export_layer(tmp_path: Path) -> None:
    img = Umoci(tmp_path / "layout")
    img.new("v1")
    img.insert("v1", write_tree(tmp_path / "t", {"a": random_bytes(1 << 20, 7)}))
    src = tmp_path / "src.tar"
    skopeo_copy(f"oci:{img.layout}:v1", f"docker-archive:{src}:demo:v1")

    r = blobstore(tmp_path, "image", "import", str(src), "images/demo:v1", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["ref"] == "images/demo:v1"
    assert doc["layers"] == 1

    r = blobstore(tmp_path, "image", "show", "images/demo:v1", "--json")
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["digest"] == doc["digest"]
    layer = shown["layers"][0]["digest"]
    assert blobstore(tmp_path, "image", "show", "images/demo:v1").returncode == 0

    out = tmp_path / "out.tar"
    r = blobstore(
        tmp_path, "image", "export", "images/demo:v1", str(out), "--format", "docker-archive"
    )
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == src.read_bytes()
    r = blobstore(
        tmp_path, "image", "export", "images/demo:v1", str(tmp_path / "oci"), "--format", "oci"
    )
    assert r.returncode == 0, r.stderr
    skopeo_inspect(f"oci:{tmp_path / 'oci'}")

    r = blobstore(tmp_path, "image", "layer", "images/demo:v1", layer, str(tmp_path / "l.tar"))
    assert r.returncode == 0, r.stderr
    assert sha256_file(tmp_path / "l.tar") == layer


def test_errors_are_one_line(tmp_path: Path) -> None:
    evil = tmp_path / "evil.tar"
    import tarfile

    with tarfile.open(evil, "w") as tf:
        info = tarfile.TarInfo("../escape")
        tf.addfile(info)
    r = blobstore(tmp_path, "image", "import", str(evil), "images/evil")
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1
    assert "unsafe archive member name" in r.stderr
    assert "Traceback" not in r.stderr
    r = blobstore(tmp_path, "image", "export", "images/none", str(tmp_path / "o"))
    assert r.returncode == 1
    assert not (tmp_path / "o").exists()
    r = blobstore(tmp_path, "image", "export", "x", "y", "--format", "zip")
    assert r.returncode == 2
