"""HOST:PORT parsing: one parser for config, CLI and gossip."""

from __future__ import annotations

import pytest

from blobstore.config import PeerConfig
from blobstore.errors import ConfigError
from blobstore.hostport import listen_address, peer_address, split_hostport


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.1:7411", ("10.0.0.1", 7411)),
        ("node-a.example:1", ("node-a.example", 1)),
        ("[::1]:7411", ("::1", 7411)),
        (":7411", ("", 7411)),
        (" host:65535 ", ("host", 65535)),
    ],
)
def test_valid_addresses(text: str, expected: tuple[str, int]) -> None:
    assert split_hostport(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "host",
        "host:",
        "host:0",
        "host:65536",
        "host:²",
        "host:١٢",
        "host:+1",
        "host:123456",
        "[::1:7411",
        "::1]:7411",
        "",
    ],
)
def test_invalid_addresses(text: str) -> None:
    assert split_hostport(text) is None


def test_port_zero_only_for_listeners() -> None:
    assert split_hostport("0.0.0.0:0", port_zero=True) == ("0.0.0.0", 0)
    assert split_hostport("0.0.0.0:0") is None


@pytest.mark.parametrize("bad", ["h:²", "h:١٢", ":7411", "h:99999"])
def test_peer_list_refuses_bad_addresses_in_one_line(bad: str) -> None:
    with pytest.raises(ConfigError, match="expected HOST:PORT"):
        PeerConfig.parse(f"ok:7411,{bad}")


def test_listen_address_defaults_to_every_address_and_names_the_flag() -> None:
    assert listen_address(":0", "--listen") == ("0.0.0.0", 0)
    assert listen_address("127.0.0.1:7420", "--http") == ("127.0.0.1", 7420)
    with pytest.raises(ConfigError, match=r"^bad --http address '7420': expected HOST:PORT$"):
        listen_address("7420", "--http")


def test_peer_address_needs_a_host() -> None:
    assert peer_address("[::1]:7411") == ("::1", 7411)
    with pytest.raises(ConfigError, match="expected HOST:PORT"):
        peer_address(":7411")
