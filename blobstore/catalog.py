"""Manifests and refs in the object store.

Manifests are immutable and content-addressed (``manifests/<id>``); refs are
the only mutable names (``refs/<name>``, holding a manifest id as text).
Loading a manifest verifies its id, then validates every field.

``read_refs`` reads every ref without stopping at a bad one: each comes back
with the manifest it names, or with the reason it cannot be followed (a ref
holding garbage, one naming a missing manifest, one with a name the CLI
refuses), so ``ls`` and gc report bad refs instead of failing on them.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from .errors import BadInput, Conflict, InvalidManifest, InvalidRef, ObjectMissing, RefNotFound
from .ids import ChunkId, hash_bytes, is_id, parse_id
from .manifest import Image, Manifest, Tree, decode, encode, expect_kind
from .objectstore import MANIFESTS, REFS, ObjectInfo, ObjectStore, manifest_key, ref_key
from .parallel import for_each

_REF_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._:@+=-]{0,254}")
MAX_REF_LEN = 1024
_REF_READS = 32
"""Refs read in parallel by ``read_refs``."""
MIN_ID_PREFIX = 4
_ID_PREFIX = re.compile(rf"[0-9a-f]{{{MIN_ID_PREFIX},64}}")
_SHOWN_CANDIDATES = 5


@dataclass(frozen=True, slots=True)
class RefEntry:
    """One ref as found in the store."""

    name: str
    manifest: ChunkId | None
    """The manifest id it holds; None if it holds none."""
    problem: str | None = None
    """Why it cannot be used as it is (None: it can)."""
    modified: float | None = None
    """When the ref was last written (seconds since the epoch, the store's clock)."""


def check_ref(name: str) -> str:
    """Validate a ref name (``apps/llama/data``, ``images/llama:v3``). Raises InvalidRef."""
    if not name or len(name) > MAX_REF_LEN:
        raise InvalidRef(f"bad ref name {name[:80]!r}: empty or too long")
    for part in name.split("/"):
        if not _REF_PART.fullmatch(part) or part in (".", ".."):
            raise InvalidRef(
                f"bad ref name {name!r}: use '/'-separated parts of letters, digits and ._:@+=-"
            )
    return name


class Catalog:
    """Manifest and ref access over an ObjectStore."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    async def save(self, manifest: Manifest, *, check: bool = True) -> ChunkId:
        """Store a manifest (idempotent) and return its id. With ``check`` an
        existing copy is not written again (a HEAD first); without, it is just
        written (one PUT: what a writer that expects it new wants)."""
        data = encode(manifest)
        manifest_id = hash_bytes(data)
        key = manifest_key(manifest_id)
        if not check or not await self.store.exists(key):
            await self.store.put(key, data)
        return manifest_id

    async def publish(self, manifest: Manifest, ref: str) -> ChunkId:
        """Store ``manifest``, then point ``ref`` at it: two PUTs, no existence
        checks (the manifest is stored before the ref names it: ref last).
        Returns the manifest id. Raises InvalidRef, Unavailable."""
        check_ref(ref)
        manifest_id = await self.save(manifest, check=False)
        await self.store.put(ref_key(ref), manifest_id.encode() + b"\n")
        return manifest_id

    async def load(self, manifest_id: ChunkId) -> Manifest:
        """Raises NotFound, InvalidManifest (corrupt, truncated, unknown version)."""
        try:
            data = await self.store.get(manifest_key(manifest_id))
        except ObjectMissing:
            raise ObjectMissing(f"manifests/{manifest_id}", "object store") from None
        if hash_bytes(data) != manifest_id:
            raise InvalidManifest(f"manifest {manifest_id} is corrupt (content does not match id)")
        return decode(data)

    async def load_if_intact(self, manifest_id: ChunkId) -> Manifest | None:
        """The manifest, or None if its stored bytes do not match its id (read twice,
        so a flaky read is not taken for damage). Raises ObjectMissing,
        InvalidManifest (intact bytes that do not decode: perhaps a newer format),
        Unavailable."""
        for _ in range(2):
            data = await self.store.get(manifest_key(manifest_id))
            if hash_bytes(data) == manifest_id:
                return decode(data)
        return None

    async def load_tree(self, manifest_id: ChunkId) -> Tree:
        """Raises NotFound, InvalidManifest (also when it is not a tree)."""
        return expect_kind(await self.load(manifest_id), Tree, f"manifest {manifest_id}")

    async def resolve(self, ref: str) -> ChunkId:
        """The manifest id a ref points at. Raises RefNotFound, InvalidRef."""
        try:
            raw = await self.store.get(ref_key(check_ref(ref)))
        except ObjectMissing:
            raise RefNotFound(ref) from None
        try:
            return parse_id(raw.decode("ascii").strip())
        except (UnicodeDecodeError, BadInput) as exc:
            raise InvalidManifest(f"ref {ref!r} holds garbage, not a manifest id") from exc

    async def resolve_or_id(self, ref_or_id: str) -> ChunkId:
        """The manifest id of a ref name, else of a manifest id given directly or
        a unique prefix of one (at least MIN_ID_PREFIX hex digits, as git and
        docker accept short ids); a ref of that name wins. Raises RefNotFound,
        InvalidRef, BadInput (a prefix of several manifest ids)."""
        if not _ID_PREFIX.fullmatch(ref_or_id):
            return await self.resolve(ref_or_id)
        try:
            return await self.resolve(ref_or_id)
        except RefNotFound:
            if len(ref_or_id) == 64:
                return ChunkId(ref_or_id)
        listed = [
            info.key[len(MANIFESTS) :] async for info in self.store.list(MANIFESTS + ref_or_id)
        ]
        found = sorted(name for name in listed if is_id(name))
        if len(found) == 1:
            return ChunkId(found[0])
        if not found:
            raise RefNotFound(ref_or_id)
        shown = ", ".join(f[:16] for f in found[:_SHOWN_CANDIDATES])
        more = (
            f" and {len(found) - _SHOWN_CANDIDATES} more" if len(found) > _SHOWN_CANDIDATES else ""
        )
        raise BadInput(
            f"{ref_or_id!r} is a prefix of {len(found)} manifest ids ({shown}{more}): "
            "give more digits"
        )

    async def set_ref(self, ref: str, manifest_id: ChunkId) -> None:
        """Point ``ref`` at a manifest that must already be stored (ref last)."""
        if not await self.store.exists(manifest_key(manifest_id)):
            raise ObjectMissing(f"manifests/{manifest_id}", "object store")
        await self.store.put(ref_key(check_ref(ref)), manifest_id.encode() + b"\n")

    async def swap_ref(self, ref: str, expected: ChunkId | None, new: ChunkId) -> None:
        """Compare-and-swap a ref. Raises Conflict if it no longer points at ``expected``."""
        old = None if expected is None else expected.encode() + b"\n"
        try:
            await self.store.put_if(ref_key(check_ref(ref)), new.encode() + b"\n", old)
        except Conflict:
            raise Conflict(f"ref {ref!r} was moved by someone else") from None

    async def delete_ref(self, ref: str) -> None:
        await self.store.delete(ref_key(check_ref(ref)))

    async def list_refs(self, prefix: str = "") -> list[str]:
        """Ref names under ``prefix``, sorted."""
        names = [info.key[len(REFS) :] async for info in self.store.list(REFS + prefix)]
        return sorted(names)

    async def read_refs(self, prefix: str = "", *, check_manifests: bool = True) -> list[RefEntry]:
        """Every ref under ``prefix`` with its manifest id or its problem, sorted by
        name; a ref deleted while we read is left out. ``check_manifests`` also
        reports refs whose manifest is missing. Raises Unavailable only."""
        entries: list[RefEntry] = []

        async def read(info: ObjectInfo) -> None:
            name = info.key[len(REFS) :]
            try:
                raw = await self.store.get(info.key)
            except ObjectMissing:
                return  # deleted since we listed it
            try:
                manifest_id: ChunkId | None = parse_id(raw.decode("ascii").strip())
                problem = None
            except (UnicodeDecodeError, BadInput):
                manifest_id, problem = None, f"holds {len(raw)} bytes that are not a manifest id"
            if manifest_id is not None:
                try:
                    check_ref(name)
                except InvalidRef:
                    problem = "has a name blobstore refuses (rename it)"
            entries.append(RefEntry(name, manifest_id, problem, info.mtime))

        listed = [info async for info in self.store.list(REFS + prefix)]
        await for_each(listed, read, _REF_READS)
        if not check_manifests:
            return sorted(entries, key=lambda e: e.name)
        named = {e.manifest for e in entries if e.manifest is not None}
        present = await self.store.exists_many([manifest_key(m) for m in named])
        entries = [
            replace(e, problem=f"names manifest {e.manifest} which is missing")
            if e.problem is None
            and e.manifest is not None
            and manifest_key(e.manifest) not in present
            else e
            for e in entries
        ]
        return sorted(entries, key=lambda e: e.name)

    async def walk(self, manifest_id: ChunkId) -> AsyncIterator[tuple[ChunkId, Manifest]]:
        """Yield the manifest and every manifest it refers to (an image's layers),
        each once. Raises NotFound, InvalidManifest."""
        seen: set[ChunkId] = set()
        pending = [manifest_id]
        while pending:
            current = pending.pop()
            if current in seen:
                continue
            seen.add(current)
            manifest = await self.load(current)
            if isinstance(manifest, Image):
                pending.extend(layer.manifest for layer in manifest.layers)
            yield current, manifest
