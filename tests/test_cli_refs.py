"""Everyday ref commands through the real CLI: ls -l, rm (and gc reclaiming), cp,
short manifest-id prefixes."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest
from helpers import assert_one_line_error, cli_env, put_objects, run_cli, write

from blobstore.ids import ChunkId
from blobstore.objectstore import manifest_key


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A file store: what these commands do does not depend on the store."""
    return cli_env((tmp_path / "store").as_uri(), tmp_path / "cache")


def small_tree(root: Path, text: bytes = b"hello\n") -> Path:
    write(root / "a.txt", text)
    write(root / "sub" / "b.txt", b"world\n")
    return root


def push(env: dict[str, str], src: Path, ref: str) -> str:
    done = run_cli(["push", src, ref, "--json"], env)
    assert done.returncode == 0, done.stderr
    manifest: str = json.loads(done.stdout)["manifest"]
    return manifest


def refs(env: dict[str, str]) -> dict[str, str]:
    return {r["ref"]: r["manifest"] for r in json.loads(run_cli(["ls", "--json"], env).stdout)}


def test_ls_long_cp_rm_and_gc_reclaims(env: dict[str, str], tmp_path: Path) -> None:
    manifest = push(env, small_tree(tmp_path / "src"), "apps/a")

    cp = run_cli(["cp", "apps/a", "tags/v1", "--json"], env)
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout) == {
        "ref": "tags/v1",
        "manifest": manifest,
        "source": "apps/a",
        "replaced": None,
    }
    assert refs(env) == {"apps/a": manifest, "tags/v1": manifest}

    long = run_cli(["ls", "-l", "--json"], env)
    assert long.returncode == 0, long.stderr
    rows = json.loads(long.stdout)
    assert [r["ref"] for r in rows] == ["apps/a", "tags/v1"]
    for row in rows:
        assert (row["kind"], row["bytes"], row["files"], row["manifest"]) == (
            "tree",
            12,
            2,
            manifest,
        )
        assert row["problem"] is None
        assert (
            abs(datetime.fromisoformat(row["modified"]).timestamp() - datetime.now().timestamp())
            < 600
        )
    text = run_cli(["ls", "-l", "tags/"], env).stdout.splitlines()
    assert len(text) == 1
    assert text[0].split()[:3] == ["tree", "12", "B"]
    assert text[0].endswith(f"{manifest[:16]}  tags/v1")

    # rm refuses the whole lot when one ref is missing: a typo removes nothing
    assert_one_line_error(run_cli(["rm", "apps/a", "apps/typo"], env), "apps/typo")
    assert set(refs(env)) == {"apps/a", "tags/v1"}

    rm = run_cli(["rm", "apps/a", "tags/v1", "--json"], env)
    assert rm.returncode == 0, rm.stderr
    assert json.loads(rm.stdout) == {
        "removed": [
            {"ref": "apps/a", "manifest": manifest},
            {"ref": "tags/v1", "manifest": manifest},
        ]
    }
    assert refs(env) == {}
    # the manifest is still there until gc; a pull by id still works
    assert run_cli(["pull", manifest, tmp_path / "out"], env).returncode == 0

    gc = run_cli(["gc", "--grace", "0s", "--json"], env)
    assert gc.returncode == 0, gc.stderr
    doc = json.loads(gc.stdout)
    assert doc["swept_manifests"] == 1
    assert doc["swept_packs"] >= 1
    assert_one_line_error(run_cli(["show", manifest], env), "not found")


def test_cp_replaces_a_tag_and_takes_an_id(env: dict[str, str], tmp_path: Path) -> None:
    one = push(env, small_tree(tmp_path / "one", b"one\n"), "r/one")
    two = push(env, small_tree(tmp_path / "two", b"two\n"), "r/two")
    assert run_cli(["cp", "r/one", "latest"], env).returncode == 0
    moved = run_cli(["cp", two[:10], "latest", "--json"], env)
    assert moved.returncode == 0, moved.stderr
    assert json.loads(moved.stdout)["replaced"] == one
    assert refs(env)["latest"] == two
    assert_one_line_error(run_cli(["cp", "r/none", "x"], env), "not found")
    assert_one_line_error(run_cli(["cp", "r/one", "bad//name"], env), "bad ref name")
    assert refs(env) == {"latest": two, "r/one": one, "r/two": two}


def test_short_id_prefixes(object_store_url: str, tmp_path: Path) -> None:
    """On S3 too: a prefix is looked up by listing keys under it."""
    env = cli_env(object_store_url, tmp_path / "cache")
    manifest = push(env, small_tree(tmp_path / "src"), "m")
    short = manifest[:8]

    show = run_cli(["show", short, "--json"], env)
    assert show.returncode == 0, show.stderr
    assert json.loads(show.stdout)["manifest"] == manifest
    pull = run_cli(["pull", manifest[:5], tmp_path / "out", "--json"], env)
    assert pull.returncode == 0, pull.stderr
    assert json.loads(pull.stdout)["manifest"] == manifest
    assert (tmp_path / "out" / "sub" / "b.txt").read_bytes() == b"world\n"
    assert run_cli(["verify", short], env).returncode == 0

    # Another manifest id sharing the first 8 digits (only its name matters here).
    twin = short + ("0" if manifest[8] != "0" else "1") + manifest[9:]
    put_objects(object_store_url, {manifest_key(ChunkId(twin)): b"not read"})
    line = assert_one_line_error(run_cli(["show", short], env), "prefix of 2 manifest ids")
    assert manifest[:16] in line
    assert twin[:16] in line
    assert run_cli(["show", manifest[:9]], env).returncode == 0  # one more digit decides

    # Fewer than 4 digits is a ref name, never an id; a ref of the name wins.
    assert_one_line_error(run_cli(["show", manifest[:3]], env), "not found")
    assert run_cli(["cp", "m", short], env).returncode == 0
    assert json.loads(run_cli(["show", short, "--json"], env).stdout)["manifest"] == manifest
    assert_one_line_error(run_cli(["show", "ffff0000"], env), "not found")
