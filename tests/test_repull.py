"""The CLI's re-pull into an up-to-date DIR, answered before the event loop
(blobstore/repull.py): same answer as the full pull, and it declines — the full
pull runs — whenever the marker does not vouch for everything."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest
from helpers import cli_env, make_tree, run_cli, snapshot

from blobstore.marker import read_marker, state_dir_of, write_marker
from blobstore.repull import pull_in_place


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return cli_env((tmp_path / "store").as_uri(), tmp_path / "cache")


@pytest.fixture
def src(tmp_path: Path, env: dict[str, str]) -> Path:
    root = make_tree(tmp_path / "src")
    assert run_cli(["push", root, "t"], env).returncode == 0
    return root


def pull(env: dict[str, str], dest: Path, *args: str) -> dict[str, object]:
    done = run_cli(["pull", "t", dest, "--json", *args], env)
    assert done.returncode == 0, done.stderr
    doc: dict[str, object] = json.loads(done.stdout)
    return doc


def in_place(tmp_path: Path, dest: Path, **options: object) -> object:
    return pull_in_place(
        tmp_path / "store",
        state_dir_of(tmp_path / "cache"),
        "t",
        dest,
        **options,  # type: ignore[arg-type]
    )


def test_an_up_to_date_dir_gets_the_full_pull_s_answer(
    tmp_path: Path, env: dict[str, str], src: Path
) -> None:
    dest = tmp_path / "dest"
    first = pull(env, dest)
    result = in_place(tmp_path, dest)
    assert result is not None
    again = pull(env, dest)
    for doc in (again, result.to_json()):  # type: ignore[attr-defined]
        assert {k: v for k, v in doc.items() if k != "seconds"} == {
            **{k: v for k, v in first.items() if k != "seconds"},
            "kept_files": first["files"],
            "from": {"local": 0, "peer": 0, "origin": 0},
        }
    assert snapshot(dest) == snapshot(src)
    # by the manifest id too, and with patterns
    manifest = str(first["manifest"])
    assert (
        pull_in_place(tmp_path / "store", state_dir_of(tmp_path / "cache"), manifest, dest)
        is not None
    )
    assert in_place(tmp_path, dest, include=["*.json"]) is not None


@pytest.mark.parametrize(
    "change",
    [
        "rewritten, same size and mtime",
        "mode",
        "symlink",
        "missing file",
        "dir mode",
        "marker of another boot",
        "no marker",
        "file replaced by a symlink",
    ],
)
def test_anything_the_marker_does_not_vouch_for_goes_the_full_way(
    tmp_path: Path, env: dict[str, str], src: Path, change: str
) -> None:
    dest = tmp_path / "dest"
    pull(env, dest)
    leaf = dest / "deep" / "er" / "est" / "leaf.txt"
    markers = list(state_dir_of(tmp_path / "cache").iterdir())
    if change == "rewritten, same size and mtime":
        st = leaf.stat()
        leaf.write_bytes(b"\0" * st.st_size)  # torn: zeroes under the old size and mtime
        os.utime(leaf, ns=(st.st_atime_ns, st.st_mtime_ns))
    elif change == "mode":
        (dest / "bin" / "run.sh").chmod(0o700)
    elif change == "symlink":
        (dest / "link-to-leaf").unlink()
        (dest / "link-to-leaf").symlink_to("config.json")
    elif change == "missing file":
        (dest / "config.json").unlink()
    elif change == "dir mode":
        (dest / "empty-dir").chmod(0o700)
    elif change == "marker of another boot":  # records not known durable: checked
        doc = read_marker(markers[0])
        write_marker(markers[0], doc["dest"], "another-boot", doc["files"])
    elif change == "no marker":
        markers[0].unlink()
    elif change == "file replaced by a symlink":
        (dest / "empty.txt").unlink()
        (dest / "empty.txt").symlink_to("config.json")
    assert in_place(tmp_path, dest) is None
    pull(env, dest)  # the full pull repairs (or checks) it
    assert snapshot(dest) == snapshot(src)
    assert in_place(tmp_path, dest) is not None  # and vouches for it again


def test_a_locked_dest_a_delete_or_an_s3_store_goes_the_full_way(
    tmp_path: Path, env: dict[str, str], src: Path
) -> None:
    dest = tmp_path / "dest"
    pull(env, dest)
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another pull into it is running
        assert in_place(tmp_path, dest) is None
    finally:
        os.close(fd)
    assert in_place(tmp_path, tmp_path / "nowhere") is None
    assert not (tmp_path / "nowhere").exists()
    (dest / "extra.txt").write_bytes(b"not in the manifest")
    assert in_place(tmp_path, dest) is not None  # left alone, as the full pull does
    assert pull(env, dest, "--delete")["deleted"] == 1  # --delete: the full way
    assert not (dest / "extra.txt").exists()
    closed = {**env, "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "k"}
    closed["AWS_SECRET_ACCESS_KEY"] = "s"
    s3 = run_cli(["--store", "s3://no-such-bucket/x", "pull", "t", dest], closed)
    assert s3.returncode == 1, s3.stderr  # not answered from the local marker
