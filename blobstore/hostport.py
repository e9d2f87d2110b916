"""HOST:PORT addresses: one parser for every place that reads one (config, CLI, gossip)."""

from __future__ import annotations


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
