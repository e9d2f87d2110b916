"""Which ``--store`` values are accepted (issue 10 item 17): a typo is one line, never a new dir.

``--store s3:/bucket/x`` used to create ``./s3:/bucket/x`` and push there with exit 0.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
from helpers import BLOBSTORE, assert_one_line_error, cli_env, make_tree

from blobstore.errors import ConfigError
from blobstore.stores import open_object_store, parse_file_url, parse_s3_url


def run_in(
    cwd: Path, args: Sequence[str | Path], env: Mapping[str, str]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BLOBSTORE, *map(str, args)],
        cwd=cwd,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """An empty working directory: whatever a refused store would create shows up here."""
    work = tmp_path / "work"
    work.mkdir()
    return work


@pytest.mark.parametrize(
    ("store", "hint"),
    [
        ("s3:/bucket/x", "did you mean s3://bucket/x?"),
        ("s3:bucket/x", "did you mean s3://bucket/x?"),
        ("S3:/bucket/x", "did you mean s3://bucket/x?"),
        ("s3//bucket/x", "did you mean s3://bucket/x?"),
        ("file:/srv/store", "did you mean file:///srv/store?"),
        ("http:/host/x", "mistyped URL"),
        ("bucket/x", "write ./bucket/x for a directory here, or s3://bucket/x"),
        ("store", "write ./store"),
    ],
)
def test_mistyped_store_is_refused_and_creates_nothing(
    work: Path, tmp_path: Path, store: str, hint: str
) -> None:
    src = make_tree(tmp_path / "src")
    env = cli_env(store, tmp_path / "cache")
    runs: list[list[str | Path]] = [["--store", store, "push", src, "t"], ["push", src, "t"]]
    for args in runs:  # flag, then env
        assert_one_line_error(run_in(work, args, env), hint)
    assert os.listdir(work) == []  # nothing was created where the typo pointed


def test_unsupported_scheme_names_the_accepted_forms(work: Path, tmp_path: Path) -> None:
    env = cli_env((tmp_path / "store").as_uri(), tmp_path / "cache")
    line = assert_one_line_error(run_in(work, ["--store", "gs://bucket/x", "ls"], env), "'gs'")
    assert "s3://bucket/prefix" in line
    assert "file:///" in line


@pytest.mark.parametrize(
    ("store", "where"),
    [
        ("./rel/store", "work/rel/store"),
        ("../up-store", "up-store"),
        ("~/home-store", "home/home-store"),
        ("./s3:colon", "work/s3:colon"),  # a directory with a colon stays reachable
        ("FILE://{tmp}/url-store", "url-store"),
        ("{tmp}/abs-store", "abs-store"),
    ],
)
def test_documented_path_forms_push_where_they_say(
    work: Path, tmp_path: Path, store: str, where: str
) -> None:
    (tmp_path / "home").mkdir()
    src = make_tree(tmp_path / "src")
    env = cli_env("unused", tmp_path / "cache", {"HOME": str(tmp_path / "home")})
    proc = run_in(work, ["--store", store.format(tmp=tmp_path), "push", src, "t"], env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / where / "refs" / "t").is_file()


@pytest.mark.parametrize(
    "url", ["s3:/b/x", "s3:b", "file:/x", "x/y", "ftp://h/x", "", "  ", "hdfs:x"]
)
def test_refused_before_anything_is_opened(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        open_object_store(url)
    assert "\n" not in str(info.value)


def test_scheme_is_case_insensitive() -> None:
    assert parse_s3_url("S3://my-bucket/p") == ("my-bucket", "p")
    assert parse_file_url("File:///var/x") == Path("/var/x")
    assert type(open_object_store("S3://my-bucket/p")).__name__ == "S3ObjectStore"
