"""Plugin loading (``blobstore.plugins``): entry points read from the path's
``*.dist-info``, loaded in name order, a broken plugin named and left out."""

from __future__ import annotations

import logging
import sys
import zipfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest

from blobstore import plugins

ENTRY_POINTS = """\
# a comment
[console_scripts]
zeta = not.this:one

[blobstore.plugins]
zeta = zeta_plugin:PLUGIN
alpha = alpha_plugin:holder.PLUGIN [extra]
broken = broken_plugin:PLUGIN
; another comment
"""


@pytest.fixture
def fresh_plugins() -> Iterator[None]:
    """load_plugins caches per process: start and end each test with it empty."""
    plugins._load_plugins.cache_clear()
    yield
    plugins._load_plugins.cache_clear()


def distribution(root: Path, dirname: str, entry_points: str | None) -> Path:
    info = root / dirname
    info.mkdir(parents=True)
    if entry_points is not None:
        (info / "entry_points.txt").write_text(entry_points)
    return info


def on_path(monkeypatch: pytest.MonkeyPatch, *entries: Path) -> None:
    monkeypatch.setattr(sys, "path", [*map(str, entries), *sys.path])


def test_entry_points_of_a_group_in_file_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    distribution(tmp_path, "demo_plugins-1.0.dist-info", ENTRY_POINTS)
    distribution(tmp_path, "no_entry_points-2.0.dist-info", None)
    on_path(monkeypatch, tmp_path)
    found = [ep for ep in plugins.entry_points(plugins.GROUP) if not ep[1].startswith("p2p")]
    assert found == [
        ("zeta", "zeta_plugin:PLUGIN"),
        ("alpha", "alpha_plugin:holder.PLUGIN [extra]"),
        ("broken", "broken_plugin:PLUGIN"),
    ]
    assert ("zeta", "not.this:one") in plugins.entry_points("console_scripts")


def test_the_first_distribution_of_a_name_on_the_path_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    distribution(first, "Demo.Plugins-2.0.dist-info", "[blobstore.plugins]\nnew = new:P\n")
    distribution(second, "demo_plugins-1.0.dist-info", "[blobstore.plugins]\nold = old:P\n")
    on_path(monkeypatch, first, second)
    names = [name for name, _ in plugins.entry_points(plugins.GROUP)]
    assert "new" in names
    assert "old" not in names


def test_same_answer_as_importlib_metadata_for_this_environment() -> None:
    """The installed p2p plugin is found, as importlib.metadata finds it."""
    expected = sorted((ep.name, ep.value) for ep in metadata.entry_points(group=plugins.GROUP))
    assert ("p2p", "p2p.plugin:PLUGIN") in expected
    assert sorted(plugins.entry_points(plugins.GROUP)) == expected


def test_a_zip_on_the_path_falls_back_to_importlib_metadata(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = tmp_path / "zipped.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("zipped-1.0.dist-info/METADATA", "Name: zipped\nVersion: 1.0\n")
        zf.writestr("zipped-1.0.dist-info/entry_points.txt", "[blobstore.plugins]\nz = z:P\n")
    on_path(monkeypatch, archive)
    found = plugins.entry_points(plugins.GROUP)
    assert ("z", "z:P") in found  # only importlib.metadata reads inside a zip
    assert ("p2p", "p2p.plugin:PLUGIN") in found


def module(root: Path, name: str, source: str) -> None:
    (root / f"{name}.py").write_text(source)


@pytest.mark.usefixtures("fresh_plugins")
def test_load_plugins_in_name_order_and_a_broken_one_is_named_and_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    distribution(tmp_path, "demo_plugins-1.0.dist-info", ENTRY_POINTS)
    module(tmp_path, "zeta_plugin", "class P:\n    name = 'zeta'\nPLUGIN = P()\n")
    module(
        tmp_path,
        "alpha_plugin",
        "class P:\n    name = 'alpha'\nclass holder:\n    PLUGIN = P()\n",
    )
    module(tmp_path, "broken_plugin", "raise RuntimeError('cannot start: missing libfoo')\n")
    on_path(monkeypatch, tmp_path)
    for name in ("zeta_plugin", "alpha_plugin", "broken_plugin"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with caplog.at_level(logging.WARNING, logger="blobstore.plugins"):
        loaded = plugins.load_plugins()
    names = [plugin.name for plugin in loaded]
    assert names == ["alpha", "p2p", "zeta"]
    assert [r.getMessage() for r in caplog.records] == [
        "plugin broken failed to load: cannot start: missing libfoo"
    ]
    assert plugins.load_plugins() == loaded  # found and imported once per process
    assert len(caplog.records) == 1


@pytest.mark.usefixtures("fresh_plugins")
def test_a_missing_attribute_is_a_broken_plugin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    distribution(tmp_path, "odd-1.0.dist-info", "[blobstore.plugins]\nodd = odd_plugin:NOPE\n")
    module(tmp_path, "odd_plugin", "PLUGIN = None\n")
    on_path(monkeypatch, tmp_path)
    monkeypatch.delitem(sys.modules, "odd_plugin", raising=False)
    with caplog.at_level(logging.WARNING, logger="blobstore.plugins"):
        names = [plugin.name for plugin in plugins.load_plugins()]
    assert names == ["p2p"]
    assert "plugin odd failed to load" in caplog.text
    assert "NOPE" in caplog.text
