"""The --json document helper, and ls -l on images and broken refs."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest
from helpers import cli_env, put_objects, run_cli, store_raw_manifest

from blobstore.cli.output import document, emit
from blobstore.ids import ChunkId
from blobstore.manifest import Image, ImageLayer, encode


@dataclass(frozen=True)
class Result:
    ref: str
    seconds: float
    skipped: tuple[str, ...]
    where: PurePosixPath
    nested: dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class OwnJson:
    value: int

    def to_json(self) -> dict[str, int]:
        return {"own": self.value}


def test_document_follows_one_contract() -> None:
    doc = document(Result("r", 1.23456, ("a", "b"), PurePosixPath("/x"), {"k": (1, 2)}), ok=True)
    assert doc == {
        "ref": "r",
        "seconds": 1.235,
        "skipped": ["a", "b"],
        "where": "/x",
        "nested": {"k": [1, 2]},
        "ok": True,
    }
    assert document(OwnJson(3)) == {"own": 3}
    assert document(OwnJson(3), extra=1) == {"own": 3, "extra": 1}
    assert document([OwnJson(1), OwnJson(2)]) == [{"own": 1}, {"own": 2}]


def test_emit(capsys: pytest.CaptureFixture[str]) -> None:
    emit(argparse.Namespace(json=True, quiet=True), {"a": 1}, "text")
    assert json.loads(capsys.readouterr().out) == {"a": 1}  # asked for: printed even with -q
    emit(argparse.Namespace(json=False, quiet=False), {"a": 1}, "text")
    assert capsys.readouterr().out == "text\n"
    emit(argparse.Namespace(json=False, quiet=True), {"a": 1}, "text")
    assert capsys.readouterr().out == ""


def test_ls_long_shows_images_by_layers_and_broken_refs(tmp_path: Path) -> None:
    url = (tmp_path / "store").as_uri()
    env = cli_env(url, tmp_path / "cache")
    image = Image(
        manifest_json=json.dumps({"layers": [{"size": 100}, {"size": 23}]}).encode(),
        manifest_media_type="application/vnd.oci.image.manifest.v1+json",
        config_json=b"{}",
        layers=(
            ImageLayer("sha256:" + "a" * 64, ChunkId("1" * 64)),
            ImageLayer("sha256:" + "b" * 64, ChunkId("2" * 64)),
        ),
    )
    image_id = store_raw_manifest(url, encode(image), "images/x:v1")
    put_objects(url, {"refs/broken": b"not an id"})

    done = run_cli(["ls", "-l", "--json"], env)
    assert done.returncode == 0, done.stderr
    rows = {r["ref"]: r for r in json.loads(done.stdout)}
    assert rows["images/x:v1"]["manifest"] == image_id
    assert {k: rows["images/x:v1"][k] for k in ("kind", "bytes", "files", "layers")} == {
        "kind": "image",
        "bytes": 123,
        "files": None,
        "layers": 2,
    }
    assert rows["broken"]["kind"] is None
    assert "not a manifest id" in rows["broken"]["problem"]
    assert "ref 'broken' holds" in done.stderr  # a warning, not a failure

    text = run_cli(["ls", "-l"], env).stdout.splitlines()
    assert text[0].split()[0] == "?"
    assert text[0].endswith("(broken)          broken")
    assert text[1].split()[:5] == ["image", "123", "B", "2", "layers"]
