"""The command-line contract: exit codes, --json documents, one-line errors, env vars."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from helpers import (
    assert_one_line_error,
    cli_env,
    error_lines,
    get_object,
    make_tree,
    put_objects,
    run_cli,
    snapshot,
)

from blobstore.ids import hash_bytes
from blobstore.manifest import Tree, decode
from blobstore.objectstore import pack_key

PUSH_KEYS = {"ref", "manifest", "files", "bytes", "chunks", "new_chunks", "new_bytes", "seconds"}
PULL_KEYS = {"ref", "manifest", "files", "bytes", "seconds", "from"}


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "src")


@pytest.fixture
def env(object_store_url: str, tmp_path: Path) -> dict[str, str]:
    return cli_env(object_store_url, tmp_path / "cache")


def test_json_documents_follow_the_contract(env: dict[str, str], src: Path, tmp_path: Path) -> None:
    push = run_cli(["push", src, "apps/demo/data", "--json"], env)
    assert push.returncode == 0, push.stderr
    assert error_lines(push.stderr) == []  # quiet when piped: no progress line
    doc = json.loads(push.stdout)
    assert PUSH_KEYS <= doc.keys()
    assert doc["ref"] == "apps/demo/data"
    assert doc["files"] == 6
    assert doc["new_chunks"] == doc["chunks"]
    assert (
        doc["new_bytes"]
        == doc["bytes"]
        == sum((src / p).stat().st_size for p, e in snapshot(src).items() if e[0] == "file")
    )

    again = json.loads(run_cli(["push", src, "apps/demo/data", "--json"], env).stdout)
    assert (again["new_chunks"], again["new_bytes"]) == (0, 0)
    assert again["manifest"] == doc["manifest"]

    pull = run_cli(["pull", "apps/demo/data", tmp_path / "dst", "--json"], env)
    assert pull.returncode == 0, pull.stderr
    assert error_lines(pull.stderr) == []
    pdoc = json.loads(pull.stdout)
    assert PULL_KEYS <= pdoc.keys()
    assert pdoc["manifest"] == doc["manifest"]
    assert (pdoc["files"], pdoc["bytes"]) == (doc["files"], doc["bytes"])
    assert pdoc["from"] == {"local": 0, "peer": 0, "origin": doc["bytes"]}
    assert snapshot(tmp_path / "dst") == snapshot(src)

    assert run_cli(["push", src, "apps/other", "--json"], env).returncode == 0
    assert run_cli(["push", src, "images/x:v1"], env).returncode == 0
    ls = run_cli(["ls", "--json"], env)
    assert ls.returncode == 0
    rows = json.loads(ls.stdout)
    assert [r["ref"] for r in rows] == ["apps/demo/data", "apps/other", "images/x:v1"]
    assert all(r["manifest"] == doc["manifest"] for r in rows)
    assert [r["ref"] for r in json.loads(run_cli(["ls", "apps/", "--json"], env).stdout)] == [
        "apps/demo/data",
        "apps/other",
    ]

    show = json.loads(run_cli(["show", "apps/demo/data", "--json"], env).stdout)
    assert {"ref", "manifest", "kind", "bytes", "chunks", "files", "chunker"} <= show.keys()
    assert show["kind"] == "tree"
    assert (show["files"], show["dirs"], show["symlinks"]) == (6, 6, 3)
    assert show["bytes"] == doc["bytes"]
    assert show["chunker"] == {
        "name": "fastcdc2020-pyfastcdc",
        "min": 256 << 10,
        "avg": 768 << 10,
        "max": 4 << 20,
    }

    verify = run_cli(["verify", "apps/demo/data", "--json"], env)
    assert verify.returncode == 0
    assert json.loads(verify.stdout)["ok"] is True


def test_text_output_and_progress_silence(env: dict[str, str], src: Path, tmp_path: Path) -> None:
    push = run_cli(["push", src, "t"], env)
    assert push.returncode == 0
    assert push.stdout.startswith("pushed t -> ")
    assert error_lines(push.stderr) == []
    pull = run_cli(["pull", "t", tmp_path / "dst"], env)
    assert pull.stdout.startswith("pulled t -> ")
    assert error_lines(pull.stderr) == []


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus-command"],
        ["push"],
        ["push", "only-dir"],
        ["pull", "ref"],
        ["pull", "a", "b", "c"],
        ["push", "d", "r", "--no-such-flag"],
        ["gc", "--dry-run", "extra"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], tmp_path: Path) -> None:
    proc = run_cli(argv, cli_env((tmp_path / "s").as_uri(), tmp_path / "c"))
    assert proc.returncode == 2, proc
    assert "Traceback" not in proc.stderr
    assert "usage:" in proc.stderr


def test_predictable_failures_exit_1_with_one_line(
    env: dict[str, str], src: Path, tmp_path: Path
) -> None:
    assert_one_line_error(
        run_cli(["pull", "no/such/ref", tmp_path / "d"], env), "ref 'no/such/ref' not found"
    )
    assert not (tmp_path / "d").exists()
    assert_one_line_error(run_cli(["show", "nope"], env), "not found")
    assert_one_line_error(run_cli(["verify", "nope"], env), "not found")
    assert_one_line_error(run_cli(["push", src, "bad//ref"], env), "bad ref name")
    assert_one_line_error(run_cli(["push", src, "../up"], env), "bad ref name")
    assert_one_line_error(run_cli(["push", tmp_path / "missing", "t"], env), "not a directory")
    assert_one_line_error(run_cli(["push", src / "config.json", "t"], env), "not a directory")
    assert run_cli(["push", src, "t"], env).returncode == 0
    assert_one_line_error(run_cli(["pull", "t", src / "config.json"], env))


def test_bad_options_exit_1_with_one_line(tmp_path: Path) -> None:
    env = cli_env((tmp_path / "store").as_uri(), tmp_path / "cache")
    assert_one_line_error(run_cli(["--cache-size", "lots", "ls"], env), "not a size")
    assert_one_line_error(run_cli(["--peers", "nocolon", "ls"], env), "HOST:PORT")
    assert_one_line_error(run_cli(["--store", "ftp://host/x", "ls"], env), "unsupported")
    assert_one_line_error(run_cli(["--store", "file://relative/x", "ls"], env), "absolute")
    assert_one_line_error(run_cli(["--store", "s3://Bad_Bucket/x", "ls"], env), "bucket")
    assert_one_line_error(run_cli(["--token-file", tmp_path / "none", "ls"], env), "token")


def test_verify_reports_missing_and_corrupt_chunks(
    object_store_url: str, env: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "src").mkdir()
    a, b = b"a" * 1000, b"b" * 1000
    (tmp_path / "src" / "a").write_bytes(a)
    (tmp_path / "src" / "b").write_bytes(b)
    assert run_cli(["push", tmp_path / "src", "t"], env).returncode == 0
    manifest_id = json.loads(run_cli(["show", "t", "--json"], env).stdout)["manifest"]
    manifest = decode(get_object(object_store_url, f"manifests/{manifest_id}"))
    assert isinstance(manifest, Tree)
    (where,) = {c for c in manifest.chunk_refs() if c.id == hash_bytes(a)}
    assert where.pack is not None
    packed = bytearray(get_object(object_store_url, pack_key(where.pack)))
    packed[where.offset : where.offset + 8] = b"tampered"
    put_objects(object_store_url, {pack_key(where.pack): bytes(packed)})
    proc = run_cli(["verify", "t", "--json"], env)
    assert_one_line_error(proc, "0 chunks missing, 1 corrupt of 2")
    assert json.loads(proc.stdout)["corrupt"] == [hash_bytes(a)]


def test_env_vars_are_honoured_and_flags_win(src: Path, tmp_path: Path) -> None:
    store, cache = tmp_path / "env-store", tmp_path / "env-cache"
    env = cli_env(store.as_uri(), cache)
    assert run_cli(["push", src, "t"], env).returncode == 0
    assert (store / "refs" / "t").is_file()
    assert run_cli(["pull", "t", tmp_path / "dst"], env).returncode == 0
    assert (cache / "index.sqlite").exists()  # the pull went through BLOBSTORE_CACHE
    assert snapshot(tmp_path / "dst") == snapshot(src)
    # a bare path works as a store too, and --store / --cache beat the environment
    flag_store, flag_cache = tmp_path / "flag-store", tmp_path / "flag-cache"
    assert (
        run_cli(["--store", flag_store, "--cache", flag_cache, "push", src, "u"], env).returncode
        == 0
    )
    assert (flag_store / "refs" / "u").is_file()
    assert not (store / "refs" / "u").exists()
    assert (
        run_cli(
            ["pull", "u", tmp_path / "dst2", "--store", flag_store.as_uri(), "--cache", flag_cache],
            env,
        ).returncode
        == 0
    )
    assert (flag_cache / "index.sqlite").exists()
    ls = run_cli(["ls"], env)
    assert ls.stdout.split() == [ls.stdout.split()[0], "t"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_s3_endpoint_fails_in_bounded_time(src: Path, tmp_path: Path) -> None:
    env = cli_env(
        "s3://some-bucket/prefix",
        tmp_path / "cache",
        {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_closed_port()}",
            "AWS_ACCESS_KEY_ID": "x",
            "AWS_SECRET_ACCESS_KEY": "y",
            "AWS_REGION": "us-east-1",
        },
    )
    commands: list[list[str | Path]] = [["push", src, "t"], ["pull", "t", tmp_path / "dst"], ["ls"]]
    for argv in commands:
        # the timeout is the bound: connect failures are retried once, not for a minute
        proc = run_cli(argv, env, timeout=60)
        assert_one_line_error(proc)
        assert "127.0.0.1" in proc.stderr or "connect" in proc.stderr
    assert not (tmp_path / "dst").exists()


@pytest.mark.s3
def test_missing_bucket_one_line(s3_env: object, src: Path, tmp_path: Path) -> None:
    from s3server import SeaweedS3Server

    assert isinstance(s3_env, SeaweedS3Server)
    env = cli_env(s3_env.bucket_url(create=False), tmp_path / "cache")
    assert_one_line_error(run_cli(["push", src, "t"], env))
    assert_one_line_error(run_cli(["pull", "t", tmp_path / "dst"], env))
    assert not (tmp_path / "dst").exists()
