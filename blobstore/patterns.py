"""Select part of a tree by path patterns (``pull --include/--exclude``, ``allow_patterns``).

The semantics are huggingface_hub's ``allow_patterns``/``ignore_patterns``: each
pattern is an :func:`fnmatch.fnmatchcase` pattern matched against the whole POSIX
relative path (``*`` also matches ``/``), a pattern ending in ``/`` matches
everything below that directory, an empty include list selects everything, and
exclude wins over include.

Directories are structure, not content: a directory is kept when something below
it is kept, or when it is empty in the tree and the patterns select it (an empty
directory that was asked for); a directory whose contents were all filtered out
is not created. ``dir/`` selects (or excludes) the directory ``dir`` itself
too, so ``--exclude cache/`` leaves no empty ``cache`` behind.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from fnmatch import translate

from .manifest import Tree


class _Patterns:
    """A compiled list of patterns; ``bool()`` is False when the list is empty."""

    __slots__ = ("_dirs", "_regex")

    def __init__(self, patterns: Sequence[str]) -> None:
        globs = [p + "*" if p.endswith("/") else p for p in patterns]
        self._regex = re.compile("|".join(translate(g) for g in globs)) if globs else None
        self._dirs = frozenset(p.rstrip("/") for p in patterns if p.endswith("/"))

    def __bool__(self) -> bool:
        return self._regex is not None

    def matches(self, path: str, is_dir: bool) -> bool:
        if self._regex is None:
            return False
        return bool(self._regex.match(path)) or (is_dir and path in self._dirs)


def select(tree: Tree, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> Tree:
    """The part of ``tree`` whose paths match ``include`` (all when empty) and not ``exclude``.

    Entry order is kept. Raises nothing: a pattern is a glob, never an error;
    a selection matching nothing is an empty tree (the caller decides whether
    that is worth telling the user).
    """
    if not include and not exclude:
        return tree
    wanted = _Patterns(include)
    unwanted = _Patterns(exclude)

    def chosen(path: str, is_dir: bool) -> bool:
        if wanted and not wanted.matches(path, is_dir):
            return False
        return not unwanted.matches(path, is_dir)

    kept: set[str] = set()
    parents: set[str] = set()
    for entry in tree.entries:
        parts = entry.path.split("/")
        ancestors = ["/".join(parts[:i]) for i in range(1, len(parts))]
        parents.update(ancestors)
        if entry.kind != "dir" and chosen(entry.path, is_dir=False):
            kept.add(entry.path)
            kept.update(ancestors)
    entries = tuple(
        e
        for e in tree.entries
        if e.path in kept
        or (e.kind == "dir" and e.path not in parents and chosen(e.path, is_dir=True))
    )
    return replace(tree, entries=entries)
