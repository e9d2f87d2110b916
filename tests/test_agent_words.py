"""The node agent's client reads only enough of a command line to find the daemon's
socket and DIR (agent.pull_words); its option tables must be the parser's, and
whatever it hands over the CLI's own parser must read the same way."""

from __future__ import annotations

import argparse
import inspect
import re

import pytest

from blobstore import agent, config
from blobstore.cli import GLOBAL_OPTIONS, build_parser
from blobstore.config import Config


def _pull_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    pull: argparse.ArgumentParser = sub.choices["pull"]
    return pull


def test_the_option_tables_are_the_parsers() -> None:
    takes = {f: o.takes_value for o in GLOBAL_OPTIONS for f in o.flags}
    assert agent._GLOBAL_OPTIONS == takes
    pull = _pull_parser(build_parser("pull"))
    own = {
        flag: action.nargs != 0
        for action in pull._actions
        for flag in action.option_strings
        if flag not in takes
    }
    handed = {f: v for f, v in own.items() if f not in ("-h", "--help", "--delete")}
    assert agent._PULL_OPTIONS == handed


@pytest.mark.parametrize(
    "argv",
    [
        ["pull", "r", "d"],
        ["-v", "pull", "r", "d"],
        ["-vv", "--cache", "c", "pull", "r", "d", "--json"],
        ["--cache=c", "pull", "--include", "*.bin", "r", "d"],
        ["pull", "r", "--exclude=x", "d", "--cache", "c2", "--link-mode", "copy"],
        ["--store", "file:///s", "pull", "-q", "r", "d", "--keep-special-modes"],
        ["pull", "r", "d", "--include", "a", "--include", "b"],
    ],
)
def test_what_is_handed_over_parses_the_same(argv: list[str]) -> None:
    words = agent.pull_words(argv)
    assert words is not None
    args = build_parser("pull").parse_args(argv)
    assert words == (args.cache, str(args.dir))


@pytest.mark.parametrize(
    "argv",
    [
        ["pull", "r", "d", "--delete"],  # prunes by path
        ["pull", "--help"],
        ["pull", "r"],
        ["pull", "r", "d", "e"],
        ["push", "d", "r"],
        ["pull", "r", "d", "--jso"],  # an abbreviation argparse would take
        ["pull", "r", "d", "--include"],
        ["pull", "r", "d", "--include", "-x"],
        ["pull", "--", "r", "d"],
        ["--json", "pull", "r", "d"],  # a pull option before the command
        ["-qv", "pull", "r", "d"],
        ["pull", "r", "d", "--json=yes"],
        [],
    ],
)
def test_anything_else_is_left_to_the_cli(argv: list[str]) -> None:
    assert agent.pull_words(argv) is None


def test_a_request_carries_the_settings_of_the_environment_and_nothing_else() -> None:
    """The environment a request carries (agent.settings_env) gives the same config
    as the whole of it, and holds no credentials."""
    read = set(re.findall(r'"(AWS_[A-Z0-9_]+)"', inspect.getsource(config)))
    assert read <= set(agent._S3_ENV)
    env = {
        **{var: "true" if "IGNORE" in var else "x" for var in agent._S3_ENV},
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
        "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9001",
        "BLOBSTORE_STORE": "s3://bucket/prefix",
        "BLOBSTORE_CACHE": "/var/cache/blobstore",
        "BLOBSTORE_REGION": "eu",
        "BLOBSTORE_PEERS": "none",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "AWS_SESSION_TOKEN": "token",
        "PATH": "/usr/bin",
    }
    sent = agent.settings_env(env)
    assert Config.from_env(sent) == Config.from_env(env)
    assert set(sent) == set(env) - {"AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "PATH"}
