"""Start-up cost guards: what a command imports, not how long it takes.

Every ``blobstore`` run pays for its imports before doing anything, and benchmarks
compare whole commands against ``cp -r``. These tests fail when a change makes a
core command import a module only other paths need (aiobotocore for s3:// stores,
zeroconf/aiohttp for peers and the daemon, the image tooling, the p2p plugin).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from blobstore import cli, plugins

HEAVY = ("botocore", "aiobotocore", "aiohttp", "zeroconf", "ifaddr", "prometheus_client")
"""Modules a file-store pull or push never needs."""
UNNEEDED_FOR_CORE = (
    *HEAVY,
    "p2p",
    "blobstore.image",
    "blobstore.syncdir",
    "blobstore.runner",
    "blobstore.gc",
    "importlib.metadata",
)


def loaded_after(script: str, env: dict[str, str] | None = None) -> set[str]:
    """The top-level packages and listed modules in sys.modules after ``script`` ran
    in a fresh interpreter."""
    probe = (
        f"{script}\nimport json, sys\n"
        f"names = {list(UNNEEDED_FOR_CORE)!r}\n"
        "print(json.dumps([n for n in names if n in sys.modules]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_parsing_a_core_command_loads_no_plugin_or_heavy_module(tmp_path: Path) -> None:
    loaded = loaded_after(
        "from blobstore import cli\n"
        f"argv = ['--store', 'file://{tmp_path}/store', 'pull', 'ref', '{tmp_path}/out']\n"
        "args = cli.build_parser(cli.named_command(argv)).parse_args(argv)\n"
        "from blobstore.cli import registry, transfer\n"
        "assert args.run == registry.WithClient(transfer.run_pull, peers=True)\n"
        "cli.make_config(args)\n"
    )
    assert loaded == set()


def file_store_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a CLI on a file:// store under ``tmp_path``, peers off."""
    return {
        **os.environ,
        "BLOBSTORE_STORE": f"file://{tmp_path}/store",
        "BLOBSTORE_CACHE": str(tmp_path / "cache"),
        "BLOBSTORE_PEERS": "none",
    }


def one_file_tree(tmp_path: Path, size: int) -> Path:
    """A directory ``src`` holding ``w.bin`` of ``size`` random bytes."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "w.bin").write_bytes(os.urandom(size))
    return src


def test_push_and_pull_with_peers_off_import_nothing_heavy(tmp_path: Path) -> None:
    """The whole commands, in process: file store, peers none."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"hello\n")
    (src / "sub" / "b.txt").write_bytes(b"world\n")
    env = file_store_env(tmp_path)
    loaded = loaded_after(
        "from blobstore import cli\n"
        f"assert cli.main(['push', '{src}', 'tiny']) == 0\n"
        f"assert cli.main(['pull', 'tiny', '{tmp_path}/out']) == 0\n",
        env,
    )
    assert (tmp_path / "out" / "sub" / "b.txt").read_bytes() == b"world\n"
    assert loaded == set()


def test_the_whole_parser_loads_plugins_without_their_network_stacks() -> None:
    """``blobstore --help`` and contributed commands: every module that adds a command
    is imported, but neither discovery, the S3 client nor importlib.metadata."""
    loaded = loaded_after("from blobstore import cli\ncli.build_parser()\n")
    assert {"p2p", "blobstore.image"} <= loaded
    assert loaded & {*HEAVY, "importlib.metadata"} == set()


def test_the_group_table_names_each_group_module_s_commands() -> None:
    for names, load in cli.GROUPS:
        assert tuple(c.name for c in load()) == names


def test_a_command_loads_only_its_own_group_module() -> None:
    probe = (
        "import sys\nfrom blobstore import cli\n"
        "argv = ['pull', 'r', 'd']\n"
        "cli.build_parser(cli.named_command(argv)).parse_args(argv)\n"
        "print(sorted(m for m in sys.modules if m.startswith('blobstore.cli.')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == str(
        [
            "blobstore.cli.output",
            "blobstore.cli.registry",
            "blobstore.cli.transfer",
            "blobstore.cli.version",
        ]
    )


def test_parsing_any_builtin_command_loads_no_plugin_or_heavy_module() -> None:
    """Built-in commands beyond the core (image, sync, dedup-report) parse without
    the plugins or what their bodies import."""
    loaded = loaded_after(
        "from blobstore import cli\n"
        "for argv in (['image', 'show', 'r'], ['sync', 'r', 'd'], ['dedup-report', 'r'],\n"
        "             ['leases'], ['locality', 'r']):\n"
        "    assert cli.build_parser(cli.named_command(argv)).parse_args(argv).command == argv[0]\n"
    )
    assert loaded <= {"blobstore.image"}  # image export's --format choices


def test_the_whole_parser_has_every_command_and_the_plugins() -> None:
    """--help (no command named) builds the whole parser, plugins included."""
    parser = cli.build_parser()
    for argv in (
        ["pull", "r", "d"],
        ["push", "d", "r"],
        ["gc"],
        ["image", "import", "src", "r"],
        ["sync", "r", "d"],
        ["daemon"],
        ["peers", "--json"],
    ):
        assert parser.parse_args(argv).command == argv[0]
    assert cli.named_command(["image", "import", "x"]) == "image"
    assert cli.named_command(["daemon"]) is None  # a plugin's: the whole parser


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["pull", "ref", "out"], "pull"),
        (
            ["--store", "file:///s", "-v", "pull", "--link-mode", "copy", "ref", "out", "--json"],
            "pull",
        ),
        (["--store=file:///s", "--peers", "none", "push", "dir", "ref"], "push"),
        (["--cache", "pull", "gc", "--dry-run", "--grace", "30m"], "gc"),  # a value, not a command
        (["-v", "-v", "verify", "ref", "--repair", "--from", "d"], "verify"),
        (["show", "ref", "--store", "file:///later"], "show"),
        (["ls"], "ls"),
        (["migrate", "--json"], "migrate"),
    ],
)
def test_a_core_command_parses_as_with_the_whole_parser(argv: list[str], command: str) -> None:
    assert cli.named_command(argv) == command
    fast = vars(cli.build_parser(command).parse_args(argv))
    whole = vars(cli.build_parser().parse_args(argv))
    # the same check, bound to each parser's own sub-command parser
    assert fast.pop("check_usage").check is whole.pop("check_usage").check
    assert fast == whole


@pytest.mark.parametrize(
    "argv", [["-h", "pull"], ["--sto", "x", "pull"], ["-vv", "pull"], ["--", "pull"], []]
)
def test_anything_unusual_before_the_command_builds_the_whole_parser(argv: list[str]) -> None:
    assert cli.named_command(argv) is None


@pytest.mark.parametrize("group", ["blobstore.plugins", "console_scripts", "pytest11"])
def test_entry_points_are_found_as_importlib_metadata_finds_them(group: str) -> None:
    ours = sorted(plugins.entry_points(group))
    theirs = sorted((ep.name, ep.value) for ep in entry_points(group=group))
    assert ours == theirs


def test_the_p2p_plugin_loads_once() -> None:
    first = plugins.load_plugins()
    assert [p.name for p in first] == ["p2p"]
    assert [id(p) for p in plugins.load_plugins()] == [id(p) for p in first]


PULL_NEVER_NEEDS = (
    *UNNEEDED_FOR_CORE,
    "blobstore.push",  # push's half of the client (and ingest, leases under it)
    "blobstore.ingest",
    "blobstore.leases",
    "platformdirs",  # only for a default store/cache dir (tempfile, random, lzma)
    "ctypes",  # only when a pull syncs what it wrote (syncfs)
    "uuid",  # loads platform (~1.7 ms); boot ids and temp names need no uuid module
    "configparser",  # only where an AWS profile file is read
    "blobstore.packs",  # reads by id only (origin.locator): a pull has the manifest's places
    "blobstore.chunker",
)
VERSION_NEVER_NEEDS = (
    *PULL_NEVER_NEEDS,
    "anyio",
    "asyncio",
    "uvloop",
    "blobstore.config",
    "blobstore.client",
    "blobstore.cli.transfer",
    "blobstore.cli.running",
    "shutil",  # argparse's formatter measures the terminal without it (bz2, lzma)
)


def imported_by(argv: list[str], names: tuple[str, ...], env: dict[str, str]) -> list[str]:
    """Which of ``names`` the real command ``blobstore ARGV`` imported, in a fresh
    interpreter (the console script's ``run``: exits with the command's status)."""
    probe = (
        "import atexit, json, sys\n"
        f"names = {list(names)!r}\n"
        "atexit.register(lambda: print(json.dumps([n for n in names if n in sys.modules])))\n"
        f"sys.argv = ['blobstore', *{argv!r}]\n"
        "from blobstore.__main__ import run\n"
        "run()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    loaded: list[str] = json.loads(done.stdout.splitlines()[-1])
    return loaded


def test_version_loads_no_command_and_no_event_loop(tmp_path: Path) -> None:
    env = {**os.environ, "BLOBSTORE_STORE": f"file://{tmp_path}/store"}
    assert imported_by(["--version"], VERSION_NEVER_NEEDS, env) == []
    done = subprocess.run(
        [sys.executable, "-m", "blobstore.cli", "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    python = ".".join(map(str, sys.version_info[:3]))
    assert done.stdout == f"blobstore {metadata.version('blobstore')} (Python {python})\n"


def test_a_file_store_pull_loads_neither_push_nor_defaults(tmp_path: Path) -> None:
    """The CLI's warm pull pays for what it uses only; a push does not load the
    materializer either."""
    src = one_file_tree(tmp_path, 100_000)
    env = file_store_env(tmp_path)
    assert imported_by(["-q", "push", str(src), "w"], ("blobstore.materialize",), env) == []
    writing = tuple(n for n in PULL_NEVER_NEEDS if n != "ctypes")  # it may syncfs
    out = ["-q", "pull", "w", str(tmp_path / "out")]
    assert imported_by(out, writing, env) == []
    assert imported_by(out, PULL_NEVER_NEEDS, env) == []  # nothing to do: nothing synced
    assert (tmp_path / "out" / "w.bin").read_bytes() == (src / "w.bin").read_bytes()
    copy = ["-q", "pull", "--link-mode", "copy", "w", str(tmp_path / "copy")]
    assert imported_by(copy, writing, env) == []
    assert (tmp_path / "copy" / "w.bin").read_bytes() == (src / "w.bin").read_bytes()


@pytest.mark.parametrize(
    "argv",
    [
        ["-q", "ls"],  # a built-in command: resumes once its client is open
        ["peers", "--json"],  # a plugin's own run (no client): resumes before it starts
    ],
)
def test_the_collector_paused_for_start_up_runs_again(tmp_path: Path, argv: list[str]) -> None:
    """cli.run pauses the cyclic collector while the command starts; a command that
    ran has it back (a daemon must not run for days without it)."""
    probe = (
        "import atexit, gc, sys\n"
        "seen = []\n"
        "from blobstore.cli import registry\n"
        "resume = registry.start_up_done\n"
        "def spy():\n"
        "    seen.append(gc.isenabled())\n"
        "    resume()\n"
        "    seen.append(gc.isenabled())\n"
        "registry.start_up_done = spy\n"
        "import blobstore.cli.running as running\n"
        "running.start_up_done = spy\n"
        "atexit.register(lambda: print(seen, gc.isenabled()))\n"
        f"sys.argv = ['blobstore', *{argv!r}]\n"
        "from blobstore.__main__ import run\n"
        "run()\n"
    )
    env = file_store_env(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.stdout.splitlines()[-1] == "[False, True] True", done.stderr


REPULL_NEVER_NEEDS = (
    *PULL_NEVER_NEEDS,
    "anyio",  # atomic.py, ids.py and stores.py import it in their async functions
    "asyncio",  # the event loop, and all it loads (ssl, subprocess)
    "uvloop",
    "sqlite3",  # the node store's index
    "blobstore.client",
    "blobstore.materialize",
    "blobstore.nodestore",
)


def test_an_up_to_date_re_pull_loads_no_event_loop_node_store_or_peers(tmp_path: Path) -> None:
    """A re-pull into a DIR the last pull left complete is answered before the
    event loop starts (repull.py), with peers on auto too: nothing to fetch."""
    src = one_file_tree(tmp_path, 100_000)
    env = file_store_env(tmp_path)
    out = ["-q", "pull", "w", str(tmp_path / "out")]
    assert imported_by(["-q", "push", str(src), "w"], (), env) == []
    assert "blobstore.materialize" in imported_by(out, REPULL_NEVER_NEEDS, env)
    auto = {**env, "BLOBSTORE_PEERS": "auto"}
    assert imported_by(out, REPULL_NEVER_NEEDS, auto) == []
    (tmp_path / "out" / "w.bin").write_bytes(b"changed")  # now the full pull repairs it
    assert "blobstore.materialize" in imported_by(out, REPULL_NEVER_NEEDS, env)
    assert (tmp_path / "out" / "w.bin").read_bytes() == (src / "w.bin").read_bytes()


def test_a_warm_pull_with_peers_auto_opens_no_peer_tier(tmp_path: Path) -> None:
    """The peer tier opens on the first chunk the node lacks (tiers.OpenedOnUse):
    a pull that finds every chunk on the node imports no discovery."""
    src = one_file_tree(tmp_path, 300_000)
    env = file_store_env(tmp_path)
    peers = ("p2p.peertier", "zeroconf")
    assert imported_by(["-q", "push", str(src), "w"], (), env) == []
    assert imported_by(["-q", "pull", "w", str(tmp_path / "a")], (), env) == []
    auto = {**env, "BLOBSTORE_PEERS": "auto"}
    assert imported_by(["-q", "pull", "w", str(tmp_path / "b")], peers, auto) == []
    assert (tmp_path / "b" / "w.bin").read_bytes() == (src / "w.bin").read_bytes()
