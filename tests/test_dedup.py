"""Dedup report: the pure computation, the catalog shell, the CLI body, HTML."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from blobstore.cli.dedup import run_dedup_report
from blobstore.client import Client
from blobstore.config import CacheConfig, Config, PeerConfig
from blobstore.dedup import as_tree, compute, load_trees, render_table
from blobstore.errors import BadInput, RefNotFound
from blobstore.ids import hash_bytes
from blobstore.manifest import ChunkerInfo, ChunkRef, Entry, Image, ImageLayer, Layer, Tree
from blobstore.report_html import display_names, render_html

MIB = 1 << 20
CHUNKER = ChunkerInfo("test", 1, 1, 1)


def fake_chunks(name: str, count: int, size: int = 1000) -> tuple[ChunkRef, ...]:
    return tuple(ChunkRef(hash_bytes(f"{name}/{k}".encode()), size) for k in range(count))


def file_entry(path: str, *parts: tuple[ChunkRef, ...]) -> Entry:
    chunks = tuple(c for p in parts for c in p)
    return Entry(path, "file", 0o644, sum(c.size for c in chunks), None, chunks)


def write_random(path: Path, size: int, seed: int) -> None:
    """Write ``size`` pseudo-random bytes (bounded memory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = _Rng(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(rng.bytes(n))
            left -= n


class _Rng:
    def __init__(self, seed: int) -> None:
        import random

        self._r = random.Random(seed)

    def bytes(self, n: int) -> bytes:
        return self._r.randbytes(n)


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[Client]:
    config = Config(
        store_url=(tmp_path / "store").as_uri(),
        cache=CacheConfig(tmp_path / "cache"),
        peers=PeerConfig(mode="none"),
    )
    async with Client.open(config, peers=False) as c:
        yield c


# --------------------------------------------------------------------------- pure


def test_definitions_add_up() -> None:
    model = fake_chunks("model", 50)
    tok = fake_chunks("tok", 2)
    trees = {
        "a": Tree(CHUNKER, (file_entry("m", model), file_entry("m2", model), file_entry("t", tok))),
        "b": Tree(CHUNKER, (file_entry("w", model), file_entry("own", fake_chunks("b", 10)))),
        "c": Tree(CHUNKER, (file_entry("t", tok), Entry("d", "dir", 0o755))),
    }
    r = compute(trees)
    a, b, c = r.refs
    assert (a.logical_bytes, a.unique_bytes, a.files) == (102_000, 52_000, 3)
    assert r.shared_bytes("a", "b") == 50_000
    assert r.shared_bytes("a", "c") == 2_000
    assert r.shared_bytes("b", "c") == 0
    assert r.shared_bytes("b", "a") == r.shared_bytes("a", "b")
    assert r.shared[1][1] == b.unique_bytes == 60_000
    assert b.exclusive_bytes == 10_000
    assert a.exclusive_bytes == 0
    assert c.exclusive_bytes == 0
    assert r.stored_bytes == 62_000
    assert r.logical_bytes == 102_000 + 60_000 + 2_000
    assert sum(x.attributed_bytes for x in r.refs) == pytest.approx(r.stored_bytes, abs=3)
    assert sum(x.saved_bytes for x in r.refs) == pytest.approx(r.saved_bytes, abs=3)
    assert {(h.refcount, h.chunks, h.bytes) for h in r.histogram} == {
        (1, 10, 10_000),
        (2, 52, 52_000),
    }
    top = r.top_files[0]
    assert top.size == 50_000
    assert set(top.locations) == {("a", "m"), ("a", "m2"), ("b", "w")}
    assert all(f.shared_bytes > 0 for f in r.top_files)
    assert ("b", "own") not in {loc for f in r.top_files for loc in f.locations}
    with pytest.raises(BadInput):
        r.shared_bytes("a", "zzz")


def test_text_and_json_outputs() -> None:
    trees = {
        "apps/x/data": Tree(CHUNKER, (file_entry("m", fake_chunks("m", 3)),)),
        "apps/y/data": Tree(CHUNKER, (file_entry("m", fake_chunks("m", 3)),)),
    }
    r = compute(trees)
    text = render_table(r)
    assert "apps/x/data <-> apps/y/data: 2.9 KiB" in text
    doc = json.loads(json.dumps(r.to_json()))
    assert doc["shared"]["apps/x/data"]["apps/y/data"] == 3000
    assert doc["saved_bytes"] == 3000
    assert doc["ratio"] == 2.0


def test_display_names_strip_common_parts() -> None:
    assert display_names(["apps/a/data", "apps/b/data"]) == (["a", "b"], "apps/*/data")
    assert display_names(["x", "y"]) == (["x", "y"], "")
    assert display_names(["only/one"]) == (["only/one"], "")
    assert display_names(["a/x", "a/x/y"])[0] == ["x", "x/y"]


@pytest.mark.anyio
async def test_images_and_layers_are_viewed_as_trees() -> None:
    layer = Layer("sha256:" + "a" * 64, "application/x-tar", 3000, CHUNKER, fake_chunks("l", 3))

    class Loader:
        async def load(self, manifest_id: object) -> Layer:
            return layer

    image = Image(b"{}", "m", b"{}", (ImageLayer(layer.digest, hash_bytes(b"layer")),))
    tree = await as_tree(image, Loader())
    assert [e.path for e in tree.entries] == ["layers/sha256-" + "a" * 64]
    assert (await as_tree(layer, Loader())).size == 3000


# --------------------------------------------------------------------------- with a store


@pytest.mark.anyio
async def test_shared_model_within_one_percent_of_truth(client: Client, tmp_path: Path) -> None:
    """Three apps; two ship the same model, two the same tokenizer. The truth comes
    from how the test built the files, not from chunk ids."""
    model, tok = 9 * MIB + 12345, 700_000
    src = tmp_path / "src"
    write_random(src / "shared-model", model, seed=1)
    write_random(src / "shared-tok", tok, seed=2)
    apps = {"apps/chat/data": 1, "apps/instruct/data": 2, "apps/whisper/data": 3}
    for ref, seed in apps.items():
        root = tmp_path / ref.replace("/", "_")
        write_random(root / "own.bin", 3 * MIB + seed * 1000, seed=100 + seed)
        if seed in (1, 2):
            (root / "weights").mkdir()
            shutil.copy(src / "shared-model", root / "weights" / "model.safetensors")
        if seed in (1, 3):
            shutil.copy(src / "shared-tok", root / "tokenizer.json")
        await client.push(root, ref)

    trees = await load_trees(client.catalog, prefix="apps/")
    report = compute(trees)
    truth = {
        ("apps/chat/data", "apps/instruct/data"): model,
        ("apps/chat/data", "apps/whisper/data"): tok,
        ("apps/instruct/data", "apps/whisper/data"): 0,
    }
    for (a, b), expected in truth.items():
        got = report.shared_bytes(a, b)
        assert abs(got - expected) <= 0.01 * max(expected, 1), (a, b, got, expected)
    expected_saved = model + tok
    assert abs(report.saved_bytes - expected_saved) <= 0.01 * expected_saved
    logical = 3 * 3 * MIB + 6000 + 2 * model + 2 * tok
    assert report.logical_bytes == logical


@pytest.mark.anyio
async def test_cli_body_writes_each_format(client: Client, tmp_path: Path) -> None:
    root = tmp_path / "app"
    write_random(root / "f", 300_000, seed=7)
    await client.push(root, "apps/one/data")
    await client.push(root, "apps/two/data")
    for fmt in ("table", "json", "html"):
        out = tmp_path / f"report.{fmt}"
        args = argparse.Namespace(
            refs=["apps/one/data"],
            prefix="apps/t",
            format=fmt,
            json=False,
            out=out,
            top=5,
            title="t",
        )
        assert await run_dedup_report(args, client) == 0
        assert out.stat().st_size > 100
    doc = json.loads((tmp_path / "report.json").read_text())
    assert [r["ref"] for r in doc["refs"]] == ["apps/one/data", "apps/two/data"]
    assert doc["shared"]["apps/one/data"]["apps/two/data"] == 300_000
    with pytest.raises(RefNotFound):
        await load_trees(client.catalog, ["apps/nope"])
    with pytest.raises(BadInput):
        await load_trees(client.catalog, [], prefix="nothing/")


# --------------------------------------------------------------------------- HTML


def test_html_is_self_contained_and_renders(tmp_path: Path) -> None:
    base = fake_chunks("base", 40, 100_000)
    trees = {
        f"apps/app-{k}/data": Tree(
            CHUNKER,
            (
                file_entry("weights/model.safetensors", base if k < 3 else fake_chunks("o", 9)),
                file_entry("own.bin", fake_chunks(f"own{k}", 5 + k, 100_000)),
                file_entry("<script>x.json", fake_chunks("tok", 1)),
            ),
        )
        for k in range(5)
    }
    html = render_html(compute(trees), title="Fleet <report>")
    assert html.startswith("<!DOCTYPE html>")
    assert "<script" not in html
    assert "<link" not in html
    assert "&lt;script&gt;x.json" in html
    assert "Fleet &lt;report&gt;" in html
    for line in html.splitlines():
        for scheme in ("http://", "https://"):
            assert scheme not in line.replace('xmlns="http://www.w3.org/2000/svg"', ""), line
    assert html.count("<svg") == 3
    page = tmp_path / "report.html"
    page.write_text(html, encoding="utf-8")

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have chromium to screenshot the HTML report")
        pytest.skip("chromium not installed (apt-get install -y chromium); CI is not set")
    png = tmp_path / "report.png"
    profile = tmp_path / "profile"
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            f"--screenshot={png}",
            "--window-size=1400,1000",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 30_000, "a blank page compresses to a few KiB"
    assert _distinct_colours(data) > 50


def _distinct_colours(png: bytes) -> int:
    """Distinct pixel values of an 8-bit RGB/RGBA PNG (a tiny decoder: no PIL)."""
    import struct
    import zlib

    pos, idat, width, height, channels = 8, b"", 0, 0, 0
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos : pos + 8])
        body = png[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
            assert depth == 8
            assert colour in (2, 6)
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * channels
    prev = bytearray(stride)
    seen: set[bytes] = set()
    for y in range(height):
        line = raw[y * (stride + 1) : (y + 1) * (stride + 1)]
        ftype, cur = line[0], bytearray(line[1:])
        for i in range(stride):
            a = cur[i - channels] if i >= channels else 0
            b = prev[i]
            c = prev[i - channels] if i >= channels else 0
            if ftype == 1:
                cur[i] = (cur[i] + a) & 0xFF
            elif ftype == 2:
                cur[i] = (cur[i] + b) & 0xFF
            elif ftype == 3:
                cur[i] = (cur[i] + (a + b) // 2) & 0xFF
            elif ftype == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                cur[i] = (cur[i] + pred) & 0xFF
        if y % 10 == 0:
            seen.update(bytes(cur[i : i + channels]) for i in range(0, stride, channels * 4))
        prev = cur
    return len(seen)


def test_cli_entry_point(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``blobstore dedup-report`` through the real CLI parser and exit codes."""
    from blobstore.cli import main

    common = [
        "--store",
        (tmp_path / "store").as_uri(),
        "--cache",
        str(tmp_path / "cache"),
        "--peers",
        "none",
    ]
    write_random(tmp_path / "a" / "m", 400_000, seed=3)
    assert main(["push", str(tmp_path / "a"), "apps/a/data", *common]) == 0
    assert main(["push", str(tmp_path / "a"), "apps/b/data", *common]) == 0
    capsys.readouterr()
    assert main(["dedup-report", "--prefix", "apps/", "--json", *common]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["shared"]["apps/a/data"]["apps/b/data"] == 400_000
    out = tmp_path / "r.html"
    assert (
        main(["dedup-report", "apps/a/data", "--format", "html", "--out", str(out), *common]) == 0
    )
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert main(["dedup-report", "apps/missing", *common]) == 1
    assert "not found" in capsys.readouterr().err
