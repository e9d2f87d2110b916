"""blobstore.errors: one hierarchy, one parent per class, OSError translated in one place."""

from __future__ import annotations

import ast
import errno
import inspect
from pathlib import Path

import pytest

import blobstore
import p2p
from blobstore import errors
from blobstore.errors import (
    BadInput,
    BlobstoreError,
    ConfigError,
    DiskFull,
    StoreUnavailable,
    Unavailable,
    os_error,
    os_errors,
)

GROUPS = (
    errors.NotFound,
    errors.Corrupt,
    errors.Unavailable,
    errors.BadInput,
    errors.AuthError,
    errors.Conflict,
)


def _classes() -> list[type[BaseException]]:
    return [
        c
        for _, c in inspect.getmembers(errors, inspect.isclass)
        if issubclass(c, BaseException) and c.__module__ == errors.__name__
    ]


def test_every_class_has_one_parent_and_one_group() -> None:
    classes = _classes()
    assert len(classes) > 20
    for cls in classes:
        assert len(cls.__bases__) == 1, cls
        if cls is not BlobstoreError:
            assert issubclass(cls, BlobstoreError), cls
            in_groups = [g for g in GROUPS if issubclass(cls, g)]
            assert len(in_groups) == 1, (cls, in_groups)


def test_no_exception_class_outside_errors_py() -> None:
    ours = {c.__name__ for c in _classes()}
    found = set()
    for package in (blobstore, p2p):
        root = Path(str(package.__file__)).parent
        for path in root.rglob("*.py"):
            rel = path.relative_to(root.parent).as_posix()
            if rel == "blobstore/errors.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ClassDef) and any(
                    isinstance(b, ast.Name)
                    and (b.id.endswith(("Error", "Exception")) or b.id in ours)
                    for b in node.bases
                ):
                    found.add((rel, node.name))
    assert found == set()


@pytest.mark.parametrize(
    ("code", "user_path", "kind"),
    [
        (errno.ENOSPC, False, DiskFull),
        (errno.EDQUOT, True, DiskFull),
        (errno.ENOENT, True, BadInput),
        (errno.EACCES, True, BadInput),
        (errno.ENOENT, False, Unavailable),
        (errno.EIO, True, Unavailable),
    ],
)
def test_os_error_groups(code: int, user_path: bool, kind: type[BlobstoreError]) -> None:
    exc = OSError(code, "reason")
    got = os_error(exc, "cannot write /x", user_path=user_path)
    assert type(got) is kind
    assert str(got) == "cannot write /x: reason"


def test_os_error_names_the_file_once_and_keeps_the_subclass(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError) as info:
        missing.read_bytes()
    assert str(os_error(info.value, f"cannot read {missing}")) == (
        f"cannot read {missing}: No such file or directory"
    )
    inner = os_error(info.value, "cannot read the tree", unavailable=StoreUnavailable)
    assert isinstance(inner, StoreUnavailable)
    assert str(inner) == f"cannot read the tree: No such file or directory ({missing})"


def test_os_errors_context_manager(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="cannot open the token file") as info:
        with os_errors("cannot open the token file", user_path=True):
            (tmp_path / "nope").read_text()
    assert isinstance(info.value.__cause__, FileNotFoundError)
    with os_errors("nothing happens"):
        pass
    assert not issubclass(ConfigError, Unavailable)
