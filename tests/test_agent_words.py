"""The node agent's client reads only enough of a command line to find the daemon's
socket and DIR (agent.pull_words); its option tables must be the parser's, and
whatever it hands over the CLI's own parser must read the same way."""

from __future__ import annotations

import argparse

import pytest

from blobstore import agent
from blobstore.cli import GLOBAL_OPTIONS, build_parser


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
