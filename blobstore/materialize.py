"""pull: materialize a tree manifest into a directory through the tiers.

Every chunk comes verified from the tier list; files are assembled in temp
files beside their final name (``pwrite`` at each chunk's offset, chunks of
one file fetched in parallel), fsynced, checked against the whole-file BLAKE3
and renamed into place. A crash leaves temp files, never a half file under a
final name. Memory is bounded by the number of chunks in flight.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import blake3

from .errors import BadInput, Corrupt, DiskFull, Unavailable, UnsafePath
from .ids import ChunkId, hash_bytes
from .manifest import Entry, Tree, file_key
from .parallel import for_each
from .source import ChunkData, ChunkSource

Progress = Callable[[int, int], None]
"""Called with (bytes done, bytes total)."""
TMP_MARK = ".blobstore-tmp-"


@dataclass(slots=True)
class PullStats:
    files: int = 0
    bytes: int = 0
    kept_files: int = 0
    """Files already present and identical, left untouched."""
    seconds: float = 0.0


class _FileJob:
    """One file being assembled: its temp fd and chunks outstanding."""

    __slots__ = ("entry", "fd", "final", "lock", "remaining", "tmp")

    def __init__(self, entry: Entry, final: Path) -> None:
        self.entry = entry
        self.final = final
        self.tmp = final.with_name(f".{final.name[:100]}{TMP_MARK}{uuid.uuid4().hex[:8]}")
        self.fd = -1
        """-1 before the first write opens it (in a worker thread), -2 after closing."""
        self.lock = threading.Lock()
        self.remaining = len(entry.chunks)

    @property
    def whole_chunk(self) -> bool:
        """The file is one chunk whose (verified) id is the file's BLAKE3: checking the
        written file again would hash the same bytes twice."""
        chunks = self.entry.chunks
        return len(chunks) == 1 and chunks[0].id == self.entry.digest

    def write(self, data: ChunkData, offset: int) -> None:
        """pwrite a chunk at ``offset``; the first write creates the temp file."""
        with self.lock:
            if self.fd == -1:
                self.fd = _open_tmp(self.tmp)
        _pwrite_all(self.fd, data, offset)


_PLAN_BATCH = 256
"""Files looked at per worker-thread hop before the pull: one hop per file cost
more than the look itself for thousands of small files."""


def _safe_dest(root: Path, rel: str) -> Path:
    """``root/rel``; replaces a symlink or file standing where a parent dir
    must be (it is inside root), so nothing is ever written through a link."""
    parts = rel.split("/")
    cur = root
    for part in parts[:-1]:
        cur = cur / part
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            os.mkdir(cur, 0o755)
            continue
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(cur)
            os.mkdir(cur, 0o755)
    return cur / parts[-1]


def _same_file(path: Path, entry: Entry) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_size != entry.size:
        return False
    if entry.digest == file_key(entry):  # a v2 digest: check chunk by chunk
        return _chunks_match(path, entry)
    return _blake3_file(path) == entry.digest


def _chunks_match(path: Path, entry: Entry) -> bool:
    with open(path, "rb", buffering=0) as f:
        return all(
            hash_bytes(os.pread(f.fileno(), c.size, offset)) == c.id
            for c, offset in zip(entry.chunks, _offsets(entry), strict=True)
        )


def _offsets(entry: Entry) -> list[int]:
    out, pos = [], 0
    for c in entry.chunks:
        out.append(pos)
        pos += c.size
    return out


_HASH_BUF = 1 << 20


def _blake3_file(path: Path) -> str:
    # Read through one reused buffer, not mmap: mapped pages count toward the
    # pull's RSS, which then grows with the largest file instead of staying bounded.
    h = blake3.blake3()
    buf = bytearray(_HASH_BUF)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def default_priority(entry: Entry) -> Any:
    """Small files first (config, tokenizer), then big weights."""
    return entry.size


async def materialize(
    tree: Tree,
    dest: Path,
    source: ChunkSource,
    *,
    concurrency: int = 16,
    progress: Progress | None = None,
    priority: Callable[[Entry], Any] = default_priority,
) -> PullStats:
    """Write ``tree`` into ``dest``. Raises BadInput/UnsafePath (nothing
    written), Unavailable/NotFound (a chunk could not be fetched), DiskFull."""
    started = time.monotonic()
    stats = PullStats()
    root = await anyio.to_thread.run_sync(_prepare_dest, dest)
    files = sorted((e for e in tree.entries if e.kind == "file"), key=priority)
    stats.files = len(files)
    total = sum(e.size for e in files)
    done = 0

    jobs: list[_FileJob] = []
    try:
        await anyio.to_thread.run_sync(_make_dirs, root, [e for e in tree.entries
                                                          if e.kind == "dir"])
        for start in range(0, len(files), _PLAN_BATCH):
            batch = files[start : start + _PLAN_BATCH]
            for entry, final, same in await anyio.to_thread.run_sync(_plan, root, batch):
                if same:
                    stats.kept_files += 1
                    done += entry.size
                else:
                    jobs.append(_FileJob(entry, final))
        if progress:
            progress(done, total)

        def work() -> Iterator[tuple[_FileJob, int, ChunkId, int]]:
            for job in jobs:
                offset = 0
                for chunk in job.entry.chunks:
                    yield job, offset, chunk.id, chunk.size
                    offset += chunk.size

        async def fetch(item: tuple[_FileJob, int, ChunkId, int]) -> None:
            nonlocal done
            job, offset, chunk_id, size = item
            data = await source.get(chunk_id)
            if len(data) != size:
                raise Corrupt(f"chunk {chunk_id} has {len(data)} bytes, manifest says {size}")
            await anyio.to_thread.run_sync(job.write, data, offset)
            done += size
            job.remaining -= 1
            if job.remaining == 0:
                await anyio.to_thread.run_sync(_finish, job)
            if progress:
                progress(done, total)

        await for_each(work(), fetch, concurrency)
        for job in jobs:
            if not job.entry.chunks:  # empty file
                job.fd = await anyio.to_thread.run_sync(_open_tmp, job.tmp)
                await anyio.to_thread.run_sync(_finish, job)
        for entry in (e for e in tree.entries if e.kind == "symlink"):
            await anyio.to_thread.run_sync(_make_symlink, root, entry)
        # Directory modes last, deepest first: a read-only dir must not block its children.
        dirs = [e for e in tree.entries if e.kind == "dir"]
        for entry in sorted(dirs, key=lambda e: -len(e.path)):
            await anyio.to_thread.run_sync(os.chmod, root / entry.path, entry.mode)
    except OSError as exc:
        if exc.errno == 28:
            raise DiskFull(f"no space left writing into {dest}") from exc
        raise Unavailable(f"cannot write {exc.filename or dest}: {exc.strerror}") from exc
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_cleanup, jobs)
    stats.bytes = total
    stats.seconds = time.monotonic() - started
    return stats


def _plan(root: Path, entries: list[Entry]) -> list[tuple[Entry, Path, bool]]:
    """Each file's destination, and whether an identical file is already there."""
    out = []
    for entry in entries:
        final = _safe_dest(root, entry.path)
        out.append((entry, final, _same_file(final, entry)))
    return out


def _make_dirs(root: Path, entries: list[Entry]) -> None:
    for entry in entries:
        _make_dir(root, entry)


def _prepare_dest(dest: Path) -> Path:
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInput(f"cannot create {dest}: {exc.strerror}") from exc
    if not dest.is_dir():
        raise BadInput(f"not a directory: {dest}")
    return dest.resolve()


def _make_dir(root: Path, entry: Entry) -> None:
    path = _safe_dest(root, entry.path)
    try:
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            return
        os.unlink(path)
    except FileNotFoundError:
        pass
    os.mkdir(path, 0o755)


def _make_symlink(root: Path, entry: Entry) -> None:
    assert entry.target is not None
    final = _safe_dest(root, entry.path)
    with contextlib.suppress(OSError):
        if os.readlink(final) == entry.target:
            return
    tmp = final.with_name(f".{final.name[:100]}{TMP_MARK}{uuid.uuid4().hex[:8]}")
    os.symlink(entry.target, tmp)
    try:
        if os.path.isdir(final) and not os.path.islink(final):
            raise UnsafePath(f"{entry.path}: a directory stands where the manifest has a symlink")
        os.replace(tmp, final)
    except BaseException:
        os.unlink(tmp)
        raise


def _open_tmp(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)


def _pwrite_all(fd: int, data: ChunkData, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _finish(job: _FileJob) -> None:
    """fsync, verify the whole file, set its mode, rename into place."""
    os.fsync(job.fd)
    size = os.fstat(job.fd).st_size
    os.close(job.fd)
    job.fd = -2
    if size != job.entry.size:
        raise Corrupt(f"{job.entry.path}: assembled file has {size} bytes, manifest says "
                      f"{job.entry.size}")
    # A v2 digest is the file key: every chunk was verified as it arrived.
    if not job.whole_chunk and job.entry.digest != file_key(job.entry):
        actual = _blake3_file(job.tmp)
        if job.entry.digest is not None and actual != job.entry.digest:
            raise Corrupt(f"{job.entry.path}: assembled file does not match its BLAKE3")
    os.chmod(job.tmp, job.entry.mode)
    if os.path.isdir(job.final) and not os.path.islink(job.final):
        raise UnsafePath(f"{job.entry.path}: a directory stands where the manifest has a file")
    os.replace(job.tmp, job.final)


def _cleanup(jobs: list[_FileJob]) -> None:
    for job in jobs:
        if job.fd >= 0:
            os.close(job.fd)
            job.fd = -2
        with contextlib.suppress(FileNotFoundError):
            os.unlink(job.tmp)
