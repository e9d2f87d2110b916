"""Synchronized directories: three-way merge, CAS races between runners, CLI."""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from blobstore.cli.sync import run_sync
from blobstore.client import Client
from blobstore.config import CacheConfig, Config, PeerConfig, S3Config
from blobstore.ids import hash_bytes
from blobstore.manifest import ChunkerInfo, ChunkRef, Entry, Tree
from blobstore.syncdir import (
    merge_trees,
    sync_pull,
    sync_push,
    synchronized_directory,
)

REF = "apps/llama/inductor-cache/A100"
CHUNKER = ChunkerInfo("test", 1, 1, 1)


# --------------------------------------------------------------------------- merge (pure)


def f(path: str, content: str) -> Entry:
    cid = hash_bytes(content.encode())
    return Entry(path, "file", 0o644, len(content), cid, (ChunkRef(cid, len(content)),))


def d(path: str) -> Entry:
    return Entry(path, "dir", 0o755)


def tree(*entries: Entry) -> Tree:
    return Tree(CHUNKER, tuple(sorted(entries, key=lambda e: e.path)))


def paths(t: Tree) -> dict[str, str | None]:
    return {e.path: (e.digest or e.kind) for e in t.entries}


def test_merge_rules() -> None:
    base = tree(
        f("keep", "k"),
        f("ours-mod", "1"),
        f("theirs-mod", "1"),
        f("both", "1"),
        f("ours-del", "x"),
        f("theirs-del", "x"),
        f("del-vs-mod", "1"),
        d("dir"),
    )
    ours = tree(
        f("keep", "k"),
        f("ours-mod", "2"),
        f("theirs-mod", "1"),
        f("both", "ours"),
        f("theirs-del", "x"),
        f("ours-new", "o"),
        f("same-new", "s"),
        d("dir"),
        f("dir/ours", "o"),
    )
    theirs = tree(
        f("keep", "k"),
        f("ours-mod", "1"),
        f("theirs-mod", "3"),
        f("both", "theirs"),
        f("ours-del", "x"),
        f("del-vs-mod", "2"),
        f("theirs-new", "t"),
        f("same-new", "s"),
        d("dir"),
        f("dir/theirs", "t"),
    )
    m = merge_trees(base, ours, theirs)
    got = {e.path: e for e in m.tree.entries}
    assert set(got) == {
        "keep",
        "ours-mod",
        "theirs-mod",
        "both",
        "del-vs-mod",
        "ours-new",
        "theirs-new",
        "same-new",
        "dir",
        "dir/ours",
        "dir/theirs",
    }
    assert got["ours-mod"] == f("ours-mod", "2")
    assert got["theirs-mod"] == f("theirs-mod", "3")
    assert got["both"] == f("both", "ours")
    assert got["del-vs-mod"] == f("del-vs-mod", "2")
    assert m.conflicts == ("both",)


def test_merge_without_base_is_a_union_and_fixes_nesting() -> None:
    ours = tree(f("a", "1"), d("x"), f("x/y", "2"))
    theirs = tree(f("b", "1"), f("x", "file now"))
    m = merge_trees(None, ours, theirs)
    assert set(paths(m.tree)) == {"a", "b", "x", "x/y"}
    assert m.tree.entries[2] == d("x")
    assert "x" in m.conflicts
    # their directory content under a path we turned into a file is dropped, reported
    m2 = merge_trees(tree(d("p")), tree(f("p", "file")), tree(d("p"), f("p/q", "1")))
    assert set(paths(m2.tree)) == {"p"}
    assert m2.conflicts == ("p/q",)


# --------------------------------------------------------------------------- with a store


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return (tmp_path / "store").as_uri()


@pytest.fixture
async def s3_or_file_runners(tmp_path: Path, object_store_url: str) -> AsyncIterator[list[Client]]:
    """Four runners on a file:// store, then on S3 (SeaweedFS)."""
    async with AsyncExitStack() as stack:
        yield [await _client(stack, tmp_path, object_store_url, f"r{k}") for k in range(4)]


async def _client(stack: AsyncExitStack, tmp_path: Path, store_url: str, name: str) -> Client:
    config = Config(
        store_url=store_url,
        cache=CacheConfig(tmp_path / name / "cache"),
        peers=PeerConfig(mode="none"),
        s3=S3Config.from_env(),  # the SeaweedFS endpoint the s3 fixture put in AWS_*
    )
    return await stack.enter_async_context(Client.open(config, peers=False))


@pytest.fixture
async def runners(tmp_path: Path, store_url: str) -> AsyncIterator[list[Client]]:
    """Four runners (own caches) on one store."""
    async with AsyncExitStack() as stack:
        yield [await _client(stack, tmp_path, store_url, f"r{k}") for k in range(4)]


def read_tree(dest: Path) -> dict[str, str]:
    return {str(p.relative_to(dest)): p.read_text() for p in sorted(dest.rglob("*")) if p.is_file()}


async def pulled(client: Client, dest: Path) -> dict[str, str]:
    """Pull REF into a fresh directory and return its files' text."""
    await client.pull(REF, dest)
    return await anyio.to_thread.run_sync(read_tree, dest)


@pytest.mark.anyio
async def test_first_sync_creates_ref_then_nothing_changed(
    runners: list[Client], tmp_path: Path
) -> None:
    a = runners[0]
    async with synchronized_directory(a, REF, tmp_path / "a") as s:
        assert s.base_id is None
        (tmp_path / "a" / "kernels").mkdir()
        (tmp_path / "a" / "kernels" / "k1.so").write_text("k1")
    assert s.result is not None
    assert s.result.pushed
    first = s.result.manifest
    assert await a.catalog.resolve(REF) == first

    async with synchronized_directory(a, REF, tmp_path / "a") as s2:
        assert s2.base_id == first
    assert s2.result is not None
    assert not s2.result.pushed
    assert await a.catalog.resolve(REF) == first


@pytest.mark.anyio
async def test_only_changed_files_are_rehashed(runners: list[Client], tmp_path: Path) -> None:
    a = runners[0]
    async with synchronized_directory(a, REF, tmp_path / "seed") as s:
        for k in range(5):
            (tmp_path / "seed" / f"f{k}").write_text(f"v{k}")
    async with synchronized_directory(runners[1], REF, tmp_path / "b") as s:
        (tmp_path / "b" / "f0").write_text("changed")
        (tmp_path / "b" / "new").write_text("new")
    assert s.result is not None
    assert s.result.changed_files == 2
    assert (await pulled(a, tmp_path / "check"))["f0"] == "changed"


@pytest.mark.anyio
async def test_halves_report_progress_of_what_moves(runners: list[Client], tmp_path: Path) -> None:
    a, b = runners[0], runners[1]
    async with synchronized_directory(a, REF, tmp_path / "seed"):
        (tmp_path / "seed" / "old.so").write_text("o" * 1000)
    pulls: list[tuple[int, int]] = []
    session = await sync_pull(b, REF, tmp_path / "b", progress=lambda *p: pulls.append(p))
    assert pulls[-1] == (1000, 1000)
    (tmp_path / "b" / "new.so").write_text("n" * 300)
    pushes: list[tuple[int, int]] = []
    result = await sync_push(b, session, progress=lambda *p: pushes.append(p))
    assert result.changed_files == 1
    assert pushes[-1] == (300, 300)  # only the new file is read again


@pytest.mark.anyio
async def test_two_runners_race_and_lose_nothing(
    s3_or_file_runners: list[Client], tmp_path: Path
) -> None:
    a, b, c = s3_or_file_runners[:3]
    async with synchronized_directory(c, REF, tmp_path / "seed"):
        (tmp_path / "seed" / "base.bin").write_text("base")
        (tmp_path / "seed" / "shared.json").write_text("v1")
        (tmp_path / "seed" / "old.tmp").write_text("old")

    # Both runners pull the same base before either pushes.
    sa = await sync_pull(a, REF, tmp_path / "a")
    sb = await sync_pull(b, REF, tmp_path / "b")
    (tmp_path / "a" / "kernel-a.so").write_text("from a")
    (tmp_path / "a" / "shared.json").write_text("v2 from a")
    (tmp_path / "b" / "kernel-b.so").write_text("from b")
    (tmp_path / "b" / "sub").mkdir()
    (tmp_path / "b" / "sub" / "deep.bin").write_text("deep b")
    (tmp_path / "b" / "old.tmp").unlink()

    ra = await sync_push(a, sa)  # a wins the swap ...
    rb = await sync_push(b, sb)  # ... b's swap fails, it merges and retries
    assert not ra.merged
    assert rb.merged
    assert rb.attempts >= 2
    assert rb.conflicts == ()
    assert await a.catalog.resolve(REF) == rb.manifest

    files = await pulled(c, tmp_path / "after")
    assert files == {
        "base.bin": "base",
        "shared.json": "v2 from a",
        "kernel-a.so": "from a",
        "kernel-b.so": "from b",
        "sub/deep.bin": "deep b",
    }


@pytest.mark.anyio
async def test_concurrent_runners_all_land(
    s3_or_file_runners: list[Client], tmp_path: Path
) -> None:
    runners = s3_or_file_runners
    async with synchronized_directory(runners[0], REF, tmp_path / "seed"):
        (tmp_path / "seed" / "base").write_text("base")

    async def runner(k: int, client: Client) -> None:
        async with synchronized_directory(client, REF, tmp_path / f"run{k}"):
            (tmp_path / f"run{k}" / f"kernel-{k}.so").write_text(f"k{k}")
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        for k, client in enumerate(runners):
            tg.start_soon(runner, k, client)

    files = await pulled(runners[0], tmp_path / "after")
    assert files == {"base": "base", **{f"kernel-{k}.so": f"k{k}" for k in range(len(runners))}}


@pytest.mark.anyio
async def test_no_push_when_the_block_fails(runners: list[Client], tmp_path: Path) -> None:
    a = runners[0]

    async def crash(push_on_error: bool) -> None:
        async with synchronized_directory(a, REF, tmp_path / "a", push_on_error=push_on_error):
            (tmp_path / "a" / "half").write_text("x")
            raise RuntimeError("setup crashed")

    with pytest.raises(RuntimeError):
        await crash(push_on_error=False)
    assert await a.catalog.list_refs("apps/") == []
    with pytest.raises(RuntimeError):
        await crash(push_on_error=True)
    assert "half" in await pulled(a, tmp_path / "after")


@pytest.mark.anyio
async def test_cli_runs_the_command_between_pull_and_push(
    runners: list[Client], tmp_path: Path
) -> None:
    a = runners[0]
    work = tmp_path / "work"
    script = "import pathlib,sys; pathlib.Path(sys.argv[1], 'out.txt').write_text('made')"

    def args(*cmd: str) -> argparse.Namespace:
        return argparse.Namespace(
            ref=REF, dir=work, cmd=["--", *cmd], push_on_failure=False, json=True
        )

    assert await run_sync(args(sys.executable, "-c", script, str(work)), a) == 0
    assert await pulled(a, tmp_path / "after") == {"out.txt": "made"}
    before = await a.catalog.resolve(REF)
    failing = "import pathlib,sys; pathlib.Path(sys.argv[1], 'bad').write_text('x'); exit(3)"
    assert await run_sync(args(sys.executable, "-c", failing, str(work)), a) == 3
    assert await a.catalog.resolve(REF) == before


def test_sync_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``blobstore sync [OPTIONS] REF DIR -- CMD`` through the real parser."""
    from blobstore.cli import main

    opts = ["--store", (tmp_path / "store").as_uri(), "--cache", str(tmp_path / "cache")]
    opts += ["--peers", "none"]
    work = tmp_path / "w"
    make = "import pathlib,sys; pathlib.Path(sys.argv[1], 'k.so').write_text('k')"
    cmd = [sys.executable, "-c", make, str(work)]
    assert main(["sync", "--json", *opts, REF, str(work), "--", *cmd]) == 0
    assert '"pushed": true' in capsys.readouterr().out
    assert main(["sync", *opts, REF, str(tmp_path / "w2")]) == 0
    assert (tmp_path / "w2" / "k.so").read_text() == "k"
    assert main(["sync", *opts, REF, str(work), sys.executable, "-c", "exit(5)"]) == 5
    with pytest.raises(SystemExit) as usage:  # a usage error, as argparse's own: status 2
        main(["sync", *opts, REF, str(work), "--json"])
    assert usage.value.code == 2
    assert "before REF DIR" in capsys.readouterr().err


@pytest.mark.anyio
async def test_download_marker_is_never_pushed(runners: list[Client], tmp_path: Path) -> None:
    from blobstore.runner import MARKER, marker_name

    async with synchronized_directory(runners[0], REF, tmp_path / "a"):
        (tmp_path / "a" / MARKER).write_text("{}")  # the old single marker
        (tmp_path / "a" / marker_name("m", allow_patterns="*.json")).write_text("{}")
        (tmp_path / "a" / "k.so").write_text("k")
    assert await pulled(runners[1], tmp_path / "b") == {"k.so": "k"}
