"""HOST:PORT addresses: one parser for every place that reads one (config, CLI, gossip)."""

from __future__ import annotations

from .errors import ConfigError


def split_hostport(text: str, *, port_zero: bool = False) -> tuple[str, int] | None:
    """``(host, port)`` from ``HOST:PORT`` (``[v6]:PORT`` too; host may be empty,
    meaning every address), or None if ``text`` is not one. Only ASCII digits
    count (``str.isdigit`` also takes "²" and "١٢"); ``port_zero`` allows port 0
    (a listener that lets the kernel pick)."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or len(port) > 5:
        return None
    number = int(port)
    if not (0 if port_zero else 1) <= number <= 65535:
        return None
    if host.startswith("[") != host.endswith("]"):
        return None
    return host.strip("[]"), number


def listen_address(text: str, what: str) -> tuple[str, int]:
    """Where a listener binds, from ``HOST:PORT`` given as ``what`` (a flag or
    variable name): an empty host is every IPv4 address, port 0 lets the kernel
    pick. Raises ConfigError (one line naming ``what``) unless ``text`` is one."""
    parsed = split_hostport(text, port_zero=True)
    if parsed is None:
        raise ConfigError(f"bad {what} address {text!r}: expected HOST:PORT")
    return parsed[0] or "0.0.0.0", parsed[1]


def peer_address(text: str) -> tuple[str, int]:
    """Where a peer is reached, from ``HOST:PORT`` (host required, port 1-65535).
    Raises ConfigError unless ``text`` is one."""
    parsed = split_hostport(text)
    if parsed is None or not parsed[0]:
        raise ConfigError(f"bad peer {text!r}: expected HOST:PORT")
    return parsed
