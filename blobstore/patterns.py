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


class Selection:
    """Include and exclude patterns, compiled once."""

    __slots__ = ("_exclude", "_include")

    def __init__(self, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> None:
        self._include = _Patterns(include)
        self._exclude = _Patterns(exclude)

    def __bool__(self) -> bool:
        """False when it selects everything (no patterns)."""
        return bool(self._include) or bool(self._exclude)

    def chosen(self, path: str, is_dir: bool = False) -> bool:
        """Whether the patterns select ``path`` itself (its parents aside)."""
        if self._include and not self._include.matches(path, is_dir):
            return False
        return not self._exclude.matches(path, is_dir)


def select(tree: Tree, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> Tree:
    """The part of ``tree`` whose paths match ``include`` (all when empty) and not ``exclude``.

    Entry order is kept. Raises nothing: a pattern is a glob, never an error;
    a selection matching nothing is an empty tree (the caller decides whether
    that is worth telling the user).
    """
    selection = Selection(include, exclude)
    if not selection:
        return tree
    kept: set[str] = set()
    parents: set[str] = set()
    for entry in tree.entries:
        parts = entry.path.split("/")
        ancestors = ["/".join(parts[:i]) for i in range(1, len(parts))]
        parents.update(ancestors)
        if entry.kind != "dir" and selection.chosen(entry.path):
            kept.add(entry.path)
            kept.update(ancestors)
    entries = tuple(
        e
        for e in tree.entries
        if e.path in kept
        or (e.kind == "dir" and e.path not in parents and selection.chosen(e.path, is_dir=True))
    )
    return replace(tree, entries=entries)
