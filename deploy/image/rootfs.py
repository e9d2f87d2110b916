"""Fill a container root filesystem with a Python and a venv running blobstore.

Run by ``scripts/build-image.sh`` with the Python of the venv whose installed
packages go into the image (``.venv`` by default)::

    .venv/bin/python deploy/image/rootfs.py ROOTFS WHEEL

No base image and no registry: the interpreter, its standard library and the
shared libraries it and the packages' extension modules link (found with
``ldd``) are copied from this machine; the venv at ``/opt/blobstore`` holds the
project's wheel and the distributions it requires, copied as installed in the
source venv (the versions the test suite ran against, no download). Only
glibc-based Linux is supported (ldd, the system library search path).
"""

from __future__ import annotations

import argparse
import email
import importlib.metadata as metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # a venv without the test extra: pip carries its own copy
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[assignment]
    from pip._vendor.packaging.utils import canonicalize_name  # type: ignore[assignment]

PREFIX = Path("/usr/local")
VENV = Path("/opt/blobstore")
USER_ID = 65532
"""The image's user (distroless "nonroot"); deploy/kubernetes runs the daemon as it."""
CACHE = Path("/var/cache/blobstore")

STDLIB_SKIP = {
    "site-packages",
    "dist-packages",
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "lib2to3",
}
"""Top-level stdlib entries an image does not need (tests, GUI, installers)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rootfs", type=Path, help="the root filesystem to fill (exists)")
    parser.add_argument("wheel", type=Path, help="the blobstore wheel to install")
    args = parser.parse_args()
    rootfs: Path = args.rootfs
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    python = copy_python(rootfs, version)
    site = rootfs / VENV.relative_to("/") / "lib" / version / "site-packages"
    make_venv(rootfs, python)
    wanted = install_wheel(args.wheel, site)
    copied = copy_distributions(wanted, site)
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "-j0", "-d", "/", str(site)], check=True
    )
    libraries = copy_libraries(rootfs)
    write_system_files(rootfs)
    print(
        f"rootfs: {version} ({sys.version.split()[0]}), blobstore + {len(copied)} "
        f"distributions, {libraries} shared libraries",
        file=sys.stderr,
    )


def copy_python(rootfs: Path, version: str) -> Path:
    """The base interpreter and its stdlib under /usr/local; returns the interpreter's
    path in the image."""
    interpreter = Path(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))
    target = PREFIX / "bin" / version
    dest = rootfs / target.relative_to("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(interpreter, dest)
    for alias in ("python3", "python"):
        (dest.parent / alias).symlink_to(version)
    stdlib = Path(sysconfig.get_path("stdlib"))
    shutil.copytree(
        stdlib,
        rootfs / PREFIX.relative_to("/") / "lib" / version,
        symlinks=True,
        ignore=lambda folder, names: (
            [n for n in names if n in STDLIB_SKIP or n.startswith("config-")]
            if Path(folder) == stdlib
            else []
        ),
    )
    return target


def make_venv(rootfs: Path, python: Path) -> None:
    """What ``python -m venv`` makes, with the image's paths (pip left out)."""
    venv = rootfs / VENV.relative_to("/")
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(python)
    (venv / "bin" / "python3").symlink_to("python")
    v = sys.version_info
    (venv / "pyvenv.cfg").write_text(
        f"home = {python.parent}\ninclude-system-site-packages = false\n"
        f"version = {v.major}.{v.minor}.{v.micro}\n"
    )


def install_wheel(wheel: Path, site: Path) -> list[Requirement]:
    """Unpack the project's wheel into ``site``, write its console scripts; return
    what it requires (no extras)."""
    site.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    dist_info = next(site.glob("*.dist-info"))
    (dist_info / "INSTALLER").write_text("build-image\n")
    entry_points = dist_info / "entry_points.txt"
    section = ""
    for line in entry_points.read_text().splitlines() if entry_points.exists() else []:
        if line.startswith("["):
            section = line.strip("[] ")
        elif section == "console_scripts" and "=" in line:
            name, _, target = (part.strip() for part in line.partition("="))
            module, _, attr = target.partition(":")
            script = site.parents[2] / "bin" / name
            script.write_text(
                f"#!{VENV}/bin/python\nimport sys\nfrom {module} import {attr}\n"
                f"sys.exit({attr}())\n"
            )
            script.chmod(0o755)
    meta = email.message_from_bytes((dist_info / "METADATA").read_bytes())
    return [Requirement(r) for r in meta.get_all("Requires-Dist") or []]


def copy_distributions(wanted: list[Requirement], site: Path) -> list[str]:
    """Copy every distribution ``wanted`` needs, recursively, as installed here."""
    done: set[str] = set()
    queue = list(wanted)
    while queue:
        req = queue.pop()
        name = canonicalize_name(req.name)
        if name in done or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        done.add(name)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            sys.exit(f"build-image: {req.name} (needed by the image) is not installed here")
        if dist.files is None:
            sys.exit(f"build-image: {req.name} has no RECORD of its files; reinstall it with pip")
        for file in dist.files:
            if file.parts[0] == ".." or "__pycache__" in file.parts:
                continue  # scripts of the source venv; bytecode is compiled afresh
            src = Path(str(dist.locate_file(file)))
            dest = site / file
            dest.parent.mkdir(parents=True, exist_ok=True)
            if src.is_file():
                shutil.copy2(src, dest)
        queue.extend(Requirement(r) for r in dist.requires or ())
    return sorted(done)


def copy_libraries(rootfs: Path) -> int:
    """Copy the shared libraries every ELF file in ``rootfs`` needs (ldd), with the
    dynamic loader at its own path. Libraries from outside the system search path
    (a libpython beside a pyenv interpreter) go into the system library folder."""
    elves = [Path(d) / f for d, _, names in os.walk(rootfs) for f in names]
    elves = [p for p in elves if _is_elf(p)]
    needed: dict[str, Path] = {}
    loader: Path | None = None
    for elf in elves:
        out = subprocess.run(["ldd", str(elf)], capture_output=True, text=True).stdout
        for line in out.splitlines():
            m = re.match(r"\s*(\S+) => (/\S+)", line)
            if m:
                needed[m.group(1)] = Path(m.group(2))
            elif (m := re.match(r"\s*(/\S+) \(0x", line)) is not None:
                loader = Path(m.group(1))
    inside = Path(os.path.realpath(rootfs))
    libc = needed.get("libc.so.6")
    if loader is None or libc is None:
        sys.exit("build-image: ldd found no glibc; only glibc-based Linux is supported")
    system_dir = Path(os.path.realpath(libc)).parent
    count = 0
    for name, path in sorted(needed.items()):
        real = Path(os.path.realpath(path))
        if real.is_relative_to(inside):
            continue  # a wheel's own bundled library, copied with its distribution
        if real.parent == system_dir:
            _replicate(rootfs, path)
        else:
            dest = rootfs / system_dir.relative_to("/") / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(real, dest)
        count += 1
    _replicate(rootfs, loader)
    return count


def _is_elf(path: Path) -> bool:
    if path.is_symlink() or not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


def _replicate(rootfs: Path, path: Path) -> None:
    """Copy ``path`` to the same place in ``rootfs``, with every symlink on the way
    (``/lib64 -> usr/lib64``, ``ld-linux.so -> ../lib/...``) made there too."""
    current = Path("/")
    for part in path.relative_to("/").parts:
        current = current / part
        dest = rootfs / current.relative_to("/")
        if current.is_symlink():
            target = os.readlink(current)
            if not dest.is_symlink():
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.symlink_to(target)
            _replicate(rootfs, Path(os.path.normpath(current.parent / target)))
            current = Path(os.path.realpath(current))
        elif current.is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            if not dest.exists():
                shutil.copy2(current, dest)


def write_system_files(rootfs: Path) -> None:
    """Users, name service, CA certificates, /tmp and the cache directory."""
    etc = rootfs / "etc"
    etc.mkdir(exist_ok=True)
    (etc / "passwd").write_text(
        "root:x:0:0:root:/root:/sbin/nologin\n"
        f"blobstore:x:{USER_ID}:{USER_ID}:blobstore:{CACHE}:/sbin/nologin\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n"
    )
    (etc / "group").write_text(
        f"root:x:0:\nblobstore:x:{USER_ID}:\nnogroup:x:65534:\n",
    )
    (etc / "nsswitch.conf").write_text("passwd: files\ngroup: files\nhosts: files dns\n")
    for name in ("hosts", "resolv.conf"):  # the runtime mounts its own over these
        (etc / name).touch()
    bundle = Path(
        os.environ.get("SSL_CERT_FILE", "") or "/etc/ssl/certs/ca-certificates.crt"
    )  # S3 over HTTPS needs the CAs
    if bundle.is_file():
        (etc / "ssl" / "certs").mkdir(parents=True, exist_ok=True)
        shutil.copy2(bundle, etc / "ssl" / "certs" / "ca-certificates.crt")
    tmp = rootfs / "tmp"
    tmp.mkdir(exist_ok=True)
    tmp.chmod(0o1777)
    cache = rootfs / CACHE.relative_to("/")
    cache.mkdir(parents=True, exist_ok=True)
    cache.chmod(0o2775)
    if os.geteuid() == 0:  # rootless builds record files as root anyway
        os.chown(cache, USER_ID, USER_ID)


if __name__ == "__main__":
    main()
