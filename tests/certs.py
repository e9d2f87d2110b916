"""Throwaway certificates for TLS tests (openssl CLI): a CA and leaves for 127.0.0.1."""

from __future__ import annotations

import subprocess
from pathlib import Path

_EC = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def make_ca(root: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA: (certificate, key)."""
    cert, key = root / f"{name}.crt", root / f"{name}.key"
    openssl(
        "req", "-x509", *_EC, "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}"
    )
    return cert, key


def make_leaf(root: Path, name: str, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    """A certificate for IP 127.0.0.1 signed by ``ca``, for servers and clients."""
    cert, key, csr, ext = (root / f"{name}.{s}" for s in ("crt", "key", "csr", "ext"))
    ext.write_text(
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
    )
    openssl("req", *_EC, "-keyout", key, "-out", csr, "-subj", f"/CN={name}")
    openssl(
        "x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
        "-out", cert, "-days", "2", "-extfile", ext,
    )  # fmt: skip
    return cert, key
