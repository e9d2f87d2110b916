"""Deployment (issue 11.1), each piece checked by the real tool.

- the daemon configured by BLOBSTORE_* variables alone (a unit file or a pod sets env);
- deploy/systemd: ``systemd-analyze verify`` and ``security --offline``,
  ``systemd-sysusers``/``systemd-tmpfiles`` into a scratch root;
- deploy/kubernetes: ``kubernetes-validate --strict`` (schemas ship with the wheel,
  no cluster, no network), and the wiring between ports, probes, env and volumes;
- scripts/build-image.sh: umoci builds the image, ``blobstore image import`` ingests
  it, and its entrypoint runs the daemon from the unpacked rootfs (chroot).

Tools are Debian's (systemd, umoci) and the test extra's (kubernetes-validate);
without them a test skips with the reason, except under CI, where it fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from helpers import BLOBSTORE, assert_one_line_error, cli_env, run_cli

from blobstore.errors import ConfigError
from p2p.plugin import DAEMON_ENV, daemon_options

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "systemd" / "blobstore-daemon.service"
K8S = DEPLOY / "kubernetes"
K8S_VERSIONS = ("1.29.0", "1.37.0")
"""The oldest Kubernetes the manifests promise (docs/deploy.md) and the newest schema
kubernetes-validate ships here."""
EXPOSURE_MAX = 1.5
"""``systemd-analyze security`` rates the unit 1.3 ("OK"); dropping a protection
from the unit pushes it above this."""


def require(tool: str) -> str:
    path = shutil.which(tool) or shutil.which(tool, path=str(Path(sys.executable).parent))
    if path is None:
        _missing(f"{tool} not installed")
    return str(path)


def require_root(why: str) -> None:
    if os.geteuid() != 0:
        _missing(f"needs root: {why}")


def _missing(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"CI requires it: {reason}")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def all_env_names() -> set[str]:
    """Every BLOBSTORE_* variable the code reads."""
    names: set[str] = set()
    for source in [*(ROOT / "blobstore").rglob("*.py"), *(ROOT / "p2p").rglob("*.py")]:
        names.update(re.findall(r"\bBLOBSTORE_[A-Z_]+[A-Z]\b", source.read_text()))
    return names


@contextmanager
def running(
    cmd: list[str], env: Mapping[str, str], log: Path, timeout: float = 60
) -> Iterator[tuple[subprocess.Popen[str], dict[str, Any]]]:
    """A daemon process and its ready line; SIGTERM at the end, which it must obey."""
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, env=dict(env), stdout=subprocess.PIPE, stderr=err, text=True)
    assert proc.stdout is not None
    try:
        line = _ready_line(proc, timeout)
        if line is None:
            proc.kill()
            pytest.fail(f"daemon did not start: {log.read_text()}")
        yield proc, json.loads(line)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def _ready_line(proc: subprocess.Popen[str], timeout: float) -> str | None:
    import selectors

    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline and proc.poll() is None:
            if sel.select(0.2):
                line = proc.stdout.readline()
                if '"ready"' in line:
                    return line
    return None


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        body: bytes = response.read()
        return body.decode()


def http_status(url: str, headers: Mapping[str, str] | None = None) -> int:
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        with exc:  # holds the connection
            return exc.code


# --------------------------------------------------------------------------- env only


def test_daemon_runs_from_environment_alone(tmp_path: Path) -> None:
    """No flag at all: listen, HTTP, node id, health interval and limits from env."""
    http = free_port()
    env = cli_env(
        f"file://{tmp_path / 'store'}",
        tmp_path / "cache",
        {
            "BLOBSTORE_LISTEN": "127.0.0.1:0",
            "BLOBSTORE_HTTP": f"127.0.0.1:{http}",
            "BLOBSTORE_NODE_ID": "env-only-node",
            "BLOBSTORE_HEALTH_INTERVAL": "0.5",
            "BLOBSTORE_LIMITS": "max_connections=1, max_connections_per_ip=1",
        },
    )
    with running([BLOBSTORE, "daemon"], env, tmp_path / "daemon.log") as (_, ready):
        assert ready["node"] == "env-only-node"
        assert ready["http"] == f"127.0.0.1:{http}"
        host, _, port = ready["listen"].rpartition(":")
        assert host == "127.0.0.1"
        health = json.loads(http_get(f"http://127.0.0.1:{http}/healthz"))
        assert health["node"] == "env-only-node"
        # The connection cap of 1 from BLOBSTORE_LIMITS: a second connection is closed.
        with (
            socket.create_connection((host, int(port))),
            socket.create_connection((host, int(port))) as second,
        ):
            second.settimeout(10)
            deadline = time.monotonic() + 10
            dropped = ""
            while time.monotonic() < deadline:
                metrics = http_get(f"http://127.0.0.1:{http}/metrics")
                found = re.search(
                    r'blobstore_peer_connections_dropped_total\{reason="connection_cap"\} (\S+)',
                    metrics,
                )
                if found and float(found.group(1)) >= 1:
                    dropped = found.group(1)
                    break
                time.sleep(0.1)
            assert dropped, "the second connection was not refused by the env limit"


@pytest.mark.parametrize(
    ("variable", "value", "needle"),
    [
        ("BLOBSTORE_HEALTH_INTERVAL", "soon", "BLOBSTORE_HEALTH_INTERVAL"),
        ("BLOBSTORE_HEALTH_INTERVAL", "0", "BLOBSTORE_HEALTH_INTERVAL"),
        (
            "BLOBSTORE_LIMITS",
            "max_connections=1,bogus=2",
            "BLOBSTORE_LIMITS: bad --limit 'bogus=2'",
        ),
        ("BLOBSTORE_LISTEN", "nowhere", "bad BLOBSTORE_LISTEN address 'nowhere'"),
        ("BLOBSTORE_HTTP", "127.0.0.1:http", "bad BLOBSTORE_HTTP address"),
    ],
)
def test_bad_daemon_variable_is_one_line(
    tmp_path: Path, variable: str, value: str, needle: str
) -> None:
    env = cli_env(f"file://{tmp_path / 'store'}", tmp_path / "cache", {variable: value})
    proc = run_cli(["daemon"], env, timeout=60)
    assert_one_line_error(proc, needle)


@pytest.mark.parametrize("value", ["soon", "0", "-1", "nan"])
def test_bad_health_interval_flag_is_a_usage_error(tmp_path: Path, value: str) -> None:
    env = cli_env(f"file://{tmp_path / 'store'}", tmp_path / "cache")
    proc = run_cli(["daemon", "--health-interval", value], env, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "--health-interval" in proc.stderr
    assert "Traceback" not in proc.stderr


def _daemon_args(**given: object) -> argparse.Namespace:
    args = dict.fromkeys(("listen", "http", "node_id", "health_interval"))
    args.update(limit=[], corrupt_for_tests=False)
    args.update(given)
    return argparse.Namespace(**args)


def test_flags_win_over_environment() -> None:
    env = {
        "BLOBSTORE_LISTEN": "127.0.0.1:9000",
        "BLOBSTORE_HTTP": "127.0.0.1:9001",
        "BLOBSTORE_NODE_ID": "from-env",
        "BLOBSTORE_HEALTH_INTERVAL": "4",
        "BLOBSTORE_LIMITS": "max_connections=10,idle_timeout=5",
    }
    both = daemon_options(
        _daemon_args(listen="0.0.0.0:7000", health_interval=2.0, limit=["max_connections=20"]),
        env,
    )
    assert both.listen == "0.0.0.0:7000"
    assert both.http == "127.0.0.1:9001"
    assert both.node == "from-env"
    assert both.timing.interval == 2.0
    assert both.limits.max_connections == 20  # the flag, applied after the variable
    assert both.limits.idle_timeout == 5.0  # the variable where no flag says otherwise
    defaults = daemon_options(_daemon_args(), {"BLOBSTORE_HTTP": "  "})
    assert (defaults.listen, defaults.http, defaults.node) == ("0.0.0.0:7411", None, None)
    assert defaults.timing.interval == 1.0
    with pytest.raises(ConfigError, match="BLOBSTORE_HEALTH_INTERVAL"):
        daemon_options(_daemon_args(), {"BLOBSTORE_HEALTH_INTERVAL": "nan"})
    with pytest.raises(ConfigError, match="bad --listen address"):
        daemon_options(_daemon_args(listen="x"), {"BLOBSTORE_LISTEN": "0.0.0.0:1"})


def test_every_daemon_flag_has_a_variable() -> None:
    """Each option of ``blobstore daemon`` (hidden test hooks aside) names its variable;
    the global options (store, cache, region, peers, token, TLS, logs) have theirs in
    blobstore.config and the CLI."""
    from blobstore.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    daemon = sub.choices["daemon"]
    global_flags = {flag for a in parser._actions for flag in a.option_strings}
    own = [
        a
        for a in daemon._actions
        if not set(a.option_strings) & global_flags and a.help not in (argparse.SUPPRESS, None)
    ]
    assert own
    for action in own:
        assert re.search(r"env BLOBSTORE_[A-Z_]+", action.help or ""), action.option_strings
    assert set(DAEMON_ENV.values()) <= all_env_names()


def test_version(tmp_path: Path) -> None:
    proc = run_cli(["--version"], cli_env(f"file://{tmp_path / 'store'}", tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (
        f"blobstore {metadata.version('blobstore')} (Python {platform.python_version()})\n"
    )
    assert not (tmp_path / "store").exists()  # nothing opened or created


# --------------------------------------------------------------------------- systemd


def _unit_for_verify(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this venv's blobstore (verify checks that the
    binary exists; the unit itself names /usr/local/bin/blobstore)."""
    text = UNIT.read_text()
    assert "ExecStart=/usr/local/bin/blobstore daemon" in text
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace("/usr/local/bin/blobstore", BLOBSTORE))
    return unit


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = require("systemd-analyze")
    unit = _unit_for_verify(tmp_path)
    proc = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    # verify exits 0 on unknown keys and bad values, with a warning: allow none.
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr
    broken = tmp_path / "broken.service"
    broken.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSystem=stric"))
    proc = subprocess.run(
        [analyze, "verify", str(broken)], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert "stric" in proc.stderr  # the check above is a real one


def test_systemd_unit_is_hardened(tmp_path: Path) -> None:
    analyze = require("systemd-analyze")
    unit = _unit_for_verify(tmp_path)
    proc = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert found, proc.stdout + proc.stderr
    assert float(found.group(1)) <= EXPOSURE_MAX, proc.stdout
    text = UNIT.read_text()
    for line in ("ProtectSystem=strict", "ReadWritePaths=/var/cache/blobstore", "Restart="):
        assert line in text
    assert re.search(r"^LoadCredential=token:", text, re.M)
    assert "BLOBSTORE_TOKEN_FILE=%d/token" in text


def test_stop_timeouts_outlast_the_drain() -> None:
    """systemd and kubelet wait longer than the daemon drains its answers on SIGTERM, so a
    stop is never a SIGKILL mid-answer."""
    from p2p.server import ServerLimits

    drain = ServerLimits().drain_timeout
    stop = re.search(r"^TimeoutStopSec=(\d+)s$", UNIT.read_text(), re.M)
    assert stop, "the unit bounds its stop"
    assert int(stop.group(1)) > drain + 5
    (ds,) = _load_yaml_documents(K8S / "daemonset.yaml")
    assert ds["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain + 5


def test_systemd_unit_sets_only_known_variables() -> None:
    variables = re.findall(r"^Environment=(BLOBSTORE_[A-Z_]+)=", UNIT.read_text(), re.M)
    assert {"BLOBSTORE_CACHE", "BLOBSTORE_LISTEN", "BLOBSTORE_HTTP"} <= set(variables)
    assert set(variables) <= all_env_names()


def test_unit_environment_configures_the_daemon(tmp_path: Path) -> None:
    """The unit's Environment= lines, its credential (%d) and an EnvironmentFile start
    the daemon as ExecStart says; the token it was handed guards /chunks."""
    text = UNIT.read_text()
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "token").write_text("unit-token-0123456789\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLOBSTORE_")}
    for name, value in re.findall(r"^Environment=(\w+)=(.*)$", text, re.M):
        env[name] = value.replace("%d", str(credentials))
    assert env["BLOBSTORE_TOKEN_FILE"] == str(credentials / "token")
    http = free_port()
    # /etc/blobstore/daemon.env of this test; it overrides the unit's lines, as it would.
    env.update(
        BLOBSTORE_STORE=f"file://{tmp_path / 'store'}",
        BLOBSTORE_CACHE=str(tmp_path / "cache"),
        BLOBSTORE_PEERS="none",
        BLOBSTORE_LISTEN="127.0.0.1:0",
        BLOBSTORE_HTTP=f"127.0.0.1:{http}",
    )
    (exec_start,) = re.findall(r"^ExecStart=(.*)$", text, re.M)
    program, *args = exec_start.split()
    assert program == "/usr/local/bin/blobstore"
    with running([BLOBSTORE, *args], env, tmp_path / "daemon.log"):
        assert json.loads(http_get(f"http://127.0.0.1:{http}/healthz"))["ok"] is True
        chunk = f"http://127.0.0.1:{http}/chunks/{'0' * 64}"
        assert http_status(chunk) == 401
        # Past the token check: no such chunk here.
        assert http_status(chunk, {"Authorization": "Bearer unit-token-0123456789"}) == 404


_HARDENED_EXEC = """
import ctypes, errno, os, sys
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_NO_NEW_PRIVS, PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 38, 65, 1
if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) or libc.prctl(
    PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0
):
    sys.exit(f"prctl: {os.strerror(ctypes.get_errno())}")
os.execv(sys.argv[1], sys.argv[1:])
"""
"""Run a program as the unit's NoNewPrivileges= and MemoryDenyWriteExecute= would (the
kernel's own W^X switch, PR_SET_MDWE, Linux 6.3+; inherited across exec)."""


def test_daemon_runs_under_memory_deny_write_execute(tmp_path: Path) -> None:
    """The unit sets MemoryDenyWriteExecute=yes: the daemon, with mDNS discovery (zeroconf,
    ifaddr's ctypes calls, uvloop), must start and serve without W+X memory."""
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            _HARDENED_EXEC,
            sys.executable,
            "-c",
            "import mmap\n"
            "mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "prctl:" in probe.stderr:
        _missing(f"kernel without PR_SET_MDWE (Linux 6.3+): {probe.stderr.strip()}")
    assert "PermissionError" in probe.stderr  # W+X memory is refused from here on
    http = free_port()
    env = cli_env(
        f"file://{tmp_path / 'store'}",
        tmp_path / "cache",
        {
            "BLOBSTORE_PEERS": "auto",
            "BLOBSTORE_REGION": f"mdwe-{os.getpid()}",
            "BLOBSTORE_LISTEN": "127.0.0.1:0",
            "BLOBSTORE_HTTP": f"127.0.0.1:{http}",
        },
    )
    cmd = [sys.executable, "-c", _HARDENED_EXEC, BLOBSTORE, "daemon"]
    with running(cmd, env, tmp_path / "daemon.log") as (proc, _):
        assert json.loads(http_get(f"http://127.0.0.1:{http}/healthz"))["ok"] is True
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        for module in ("_ctypes", "zeroconf", "uvloop"):  # the parts that could need W+X
            assert module in maps, module


_READ_ONLY_BUT = r"""
set -e
cache=$1 probe=$2; shift 2
mount --bind "$cache" "$cache"
findmnt -rno TARGET | while read -r m; do
  case "$m" in /proc|/proc/*|/sys|/sys/*|/dev|/dev/*|"$cache") continue ;; esac
  mount -o remount,bind,ro "$m"
done
if touch "$probe" 2>/dev/null; then echo "$probe is still writable" >&2; exit 3; fi
exec "$@"
"""
"""In a private mount namespace, every mount read-only but the cache (what the unit's
ProtectSystem=strict + ReadWritePaths= do, without PrivateTmp's fresh /tmp), then exec."""


def test_daemon_needs_only_its_cache_writable(tmp_path: Path) -> None:
    """ProtectSystem=strict leaves the daemon one writable directory, the cache: it must
    start, open its node store there and serve with everything else read-only."""
    unshare = require("unshare")
    require("findmnt")
    require_root("a private mount namespace with read-only remounts")
    cache, store = tmp_path / "cache", tmp_path / "store"
    cache.mkdir()
    store.mkdir()
    http = free_port()
    env = cli_env(
        f"file://{store}",
        cache,
        {"BLOBSTORE_LISTEN": "127.0.0.1:0", "BLOBSTORE_HTTP": f"127.0.0.1:{http}"},
    )
    cmd = [unshare, "--mount", "--propagation", "private", "sh", "-c", _READ_ONLY_BUT, "sh"]
    cmd += [str(cache), str(store / "probe"), BLOBSTORE, "daemon"]
    with running(cmd, env, tmp_path / "daemon.log"):
        assert json.loads(http_get(f"http://127.0.0.1:{http}/healthz"))["ok"] is True
    assert any(cache.iterdir())  # the node store was opened (and written) in the cache
    assert not (store / "probe").exists()


def test_sysusers_and_tmpfiles_make_user_and_cache(tmp_path: Path) -> None:
    """The unit's user and the shared cache directory, made by systemd's own tools in a
    scratch root (ownership needs root)."""
    sysusers, tmpfiles = require("systemd-sysusers"), require("systemd-tmpfiles")
    require_root("systemd-tmpfiles chowns the cache directory")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    subprocess.run(
        [sysusers, f"--root={root}", str(DEPLOY / "systemd" / "blobstore.sysusers")],
        check=True,
        capture_output=True,
        timeout=60,
    )
    passwd = (root / "etc" / "passwd").read_text()
    user = next(line.split(":") for line in passwd.splitlines() if line.startswith("blobstore:"))
    subprocess.run(
        [tmpfiles, f"--root={root}", "--create", str(DEPLOY / "systemd" / "blobstore.tmpfiles")],
        check=True,
        capture_output=True,
        timeout=60,
    )
    cache = (root / "var" / "cache" / "blobstore").stat()
    assert (cache.st_uid, cache.st_gid) == (int(user[2]), int(user[3]))
    assert cache.st_mode & 0o7777 == 0o2775


# --------------------------------------------------------------------------- Kubernetes


def _load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    import yaml

    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _resource_files() -> list[Path]:
    files = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert len(files) >= 5
    return files


def test_kubernetes_manifests_pass_schema_check() -> None:
    validate = require("kubernetes-validate")
    for version in K8S_VERSIONS:
        proc = subprocess.run(
            [validate, "--strict", "-k", version, *map(str, _resource_files())],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.count(" passed ") == len(_resource_files()), proc.stdout


def test_schema_check_catches_a_misspelled_field(tmp_path: Path) -> None:
    validate = require("kubernetes-validate")
    broken = tmp_path / "daemonset.yaml"
    broken.write_text(
        (K8S / "daemonset.yaml").read_text().replace("livenessProbe:", "livenesProbe:")
    )
    proc = subprocess.run(
        [validate, "--strict", "-k", K8S_VERSIONS[0], str(broken)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "livenesProbe" in proc.stdout + proc.stderr


def test_kustomization_lists_every_resource() -> None:
    (kustomization,) = _load_yaml_documents(K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    assert all((K8S / name).is_file() for name in listed)
    # The example Secret stays out, so no placeholder token is ever applied.
    assert {p.name for p in _resource_files()} - listed == {"secret.example.yaml"}


def test_daemonset_wiring() -> None:
    """Probes, scrape annotations, token and cache agree with the daemon's own env."""
    (ds,) = _load_yaml_documents(K8S / "daemonset.yaml")
    assert ds["kind"] == "DaemonSet"
    pod = ds["spec"]["template"]
    spec = pod["spec"]
    (container,) = spec["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert set(env) <= all_env_names()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert env["BLOBSTORE_HTTP"] == f"0.0.0.0:{ports['http']}"
    assert env["BLOBSTORE_LISTEN"] == f"0.0.0.0:{ports['peer']}"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(ports["http"])
    assert annotations["prometheus.io/path"] == "/metrics"
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert volumes["cache"]["hostPath"]["path"] == env["BLOBSTORE_CACHE"] == mounts["cache"]
    assert volumes["token"]["secret"]["secretName"] == "blobstore-token"
    assert env["BLOBSTORE_TOKEN_FILE"] == mounts["token"] + "/token"
    (secret,) = _load_yaml_documents(K8S / "secret.example.yaml")
    assert secret["metadata"]["name"] == "blobstore-token"
    assert "token" in secret["stringData"]
    (configmap,) = _load_yaml_documents(K8S / "configmap.yaml")
    assert container["envFrom"] == [{"configMapRef": {"name": configmap["metadata"]["name"]}}]
    assert {k for k in configmap["data"] if k.startswith("BLOBSTORE_")} <= all_env_names()
    assert container["securityContext"]["runAsNonRoot"] is True
    assert spec["hostNetwork"] is True  # pulls on the node ask 127.0.0.1:7411


# --------------------------------------------------------------------------- image


@pytest.fixture(scope="module")
def image_tar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require("umoci")
    require_root("chroot into the image's rootfs")
    out = tmp_path_factory.mktemp("image") / "blobstore.tar"
    proc = subprocess.run(
        [str(ROOT / "scripts" / "build-image.sh"), "-o", str(out), "--venv", sys.prefix],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


@pytest.fixture(scope="module")
def bundle(image_tar: Path) -> Path:
    """The image unpacked as a runtime would (umoci unpack: rootfs + runtime config)."""
    layout = image_tar.parent / "layout"
    with tarfile.open(image_tar) as tar:
        tar.extractall(layout, filter="tar")
    (tag,) = [
        m["annotations"]["org.opencontainers.image.ref.name"]
        for m in json.loads((layout / "index.json").read_text())["manifests"]
    ]
    out = image_tar.parent / "bundle"
    subprocess.run(
        [require("umoci"), "unpack", "--image", f"{layout}:{tag}", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


@pytest.mark.slow
def test_image_is_ingested_by_blobstore_image_import(image_tar: Path, tmp_path: Path) -> None:
    env = cli_env(f"file://{tmp_path / 'store'}", tmp_path / "cache")
    proc = run_cli(
        ["image", "import", image_tar, "images/blobstore:test", "--json"], env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    with tarfile.open(image_tar) as tar:
        index_file = tar.extractfile("./index.json") or tar.extractfile("index.json")
        assert index_file is not None
        (manifest,) = json.load(index_file)["manifests"]
    assert result["digest"] == manifest["digest"]
    assert result["layers"] == 1
    shown = run_cli(["image", "show", "images/blobstore:test", "--json"], env)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["digest"] == manifest["digest"]


@pytest.mark.slow
def test_image_entrypoint_runs_the_daemon(bundle: Path, tmp_path: Path) -> None:
    """Run the image's own entrypoint, env and user (from the runtime config umoci
    wrote) inside its rootfs: nothing from this machine's Python is reachable there."""
    config = json.loads((bundle / "config.json").read_text())
    process = config["process"]
    assert process["args"] == ["/opt/blobstore/bin/blobstore", "daemon"]
    assert process["user"]["uid"] == 65532
    env = dict(item.split("=", 1) for item in process["env"])
    assert env["BLOBSTORE_CACHE"] == "/var/cache/blobstore"
    chroot = [
        require("chroot"),
        f"--userspec={process['user']['uid']}:{process['user']['gid']}",
        str(bundle / "rootfs"),
    ]
    entrypoint = chroot + process["args"]
    helped = subprocess.run(
        [*entrypoint, "--help"], env=env, capture_output=True, text=True, timeout=60
    )
    assert helped.returncode == 0, helped.stderr
    assert "--listen" in helped.stdout
    shown = subprocess.run(
        [*entrypoint[:-1], "--version"], env=env, capture_output=True, text=True, timeout=60
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"blobstore {metadata.version('blobstore')} (Python 3.")
    http = free_port()
    env.update(
        BLOBSTORE_STORE="file:///tmp/store",
        BLOBSTORE_PEERS="none",
        BLOBSTORE_LISTEN="127.0.0.1:0",
        BLOBSTORE_HTTP=f"127.0.0.1:{http}",
        BLOBSTORE_NODE_ID="in-image",
    )
    with running(entrypoint, env, tmp_path / "daemon.log") as (_, ready):
        assert ready["node"] == "in-image"
        health = json.loads(http_get(f"http://127.0.0.1:{http}/healthz"))
        assert health == {"ok": True, "node": "in-image", "region": "default", "peers": 0}
    # The daemon wrote its node store as the image's user, in the image's cache.
    cache = bundle / "rootfs" / "var" / "cache" / "blobstore"
    assert any(p.stat().st_uid == 65532 for p in cache.rglob("*"))


@pytest.mark.parametrize(
    ("args", "needle"), [(["--bogus"], "unknown argument --bogus"), (["-o"], "-o needs a value")]
)
def test_build_image_usage_error(args: list[str], needle: str) -> None:
    proc = subprocess.run(
        [str(ROOT / "scripts" / "build-image.sh"), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"build-image: {needle} (see --help)"]


@pytest.mark.slow
def test_daemonset_pod_runs_from_the_image(bundle: Path, tmp_path: Path) -> None:
    """What kubelet does with deploy/kubernetes, done by hand on the built image: the
    hostPath cache made as root 0755, the init container's command (as its user) handing
    it over, the token Secret mounted with its defaultMode and the pod's fsGroup, then
    the daemon container with the ConfigMap + env as its user, probed on /healthz."""
    (ds,) = _load_yaml_documents(K8S / "daemonset.yaml")
    (configmap,) = _load_yaml_documents(K8S / "configmap.yaml")
    pod = ds["spec"]["template"]["spec"]
    (init,), (container,) = pod["initContainers"], pod["containers"]
    rootfs = bundle / "rootfs"
    image = json.loads((bundle / "config.json").read_text())["process"]
    image_env = dict(item.split("=", 1) for item in image["env"])
    chroot = require("chroot")

    def mount_path(name: str, spec: dict[str, Any]) -> Path:
        (path,) = [m["mountPath"] for m in spec["volumeMounts"] if m["name"] == name]
        return rootfs / str(path).lstrip("/")

    cache = mount_path("cache", container)
    assert mount_path("cache", init) == cache
    shutil.rmtree(cache)
    cache.mkdir(mode=0o755)  # hostPath DirectoryOrCreate: root, 0755
    os.chown(cache, 0, 0)
    as_init = f"--userspec={init['securityContext']['runAsUser']}:0"
    done = subprocess.run(
        [chroot, as_init, str(rootfs), *init["command"]],
        env=image_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr

    token_dir = mount_path("token", container)
    token_dir.mkdir(parents=True, exist_ok=True)
    (volume,) = [v for v in pod["volumes"] if v["name"] == "token"]
    token = token_dir / "token"
    token.write_bytes(b"pod-token-0123456789abcdef")
    token.chmod(volume["secret"]["defaultMode"])
    os.chown(token, 0, pod["securityContext"].get("fsGroup", 0))

    http = free_port()
    env = {**image_env, **configmap["data"]}
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        elif item["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName":
            env[item["name"]] = "gpu-node-7"
    assert env["BLOBSTORE_HTTP"].endswith(":7421")
    # This machine is not a cluster: a local store, no mDNS, free ports on loopback.
    env.update(
        BLOBSTORE_STORE="file:///tmp/store",
        BLOBSTORE_PEERS="none",
        BLOBSTORE_LISTEN="127.0.0.1:0",
        BLOBSTORE_HTTP=f"127.0.0.1:{http}",
    )
    user = container["securityContext"]
    groups = f"--groups={pod['securityContext'].get('fsGroup', user['runAsGroup'])}"
    cmd = [
        chroot,
        f"--userspec={user['runAsUser']}:{user['runAsGroup']}",
        groups,
        str(rootfs),
        *image["args"][:1],
        *container["args"],
    ]
    with running(cmd, env, tmp_path / "daemon.log") as (_, ready):
        assert ready["node"] == "gpu-node-7"
        probe = container["readinessProbe"]["httpGet"]
        health = json.loads(http_get(f"http://127.0.0.1:{http}{probe['path']}"))
        assert health["ok"] is True
    assert cache.stat().st_uid == user["runAsUser"]
    assert any(p.stat().st_uid == user["runAsUser"] for p in cache.rglob("*"))


def test_containerfile_passes_hadolint(tmp_path: Path) -> None:
    hadolint = require("hadolint")
    proc = subprocess.run(
        [hadolint, "--no-color", str(ROOT / "Containerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sloppy = tmp_path / "Containerfile"
    sloppy.write_text((ROOT / "Containerfile").read_text() + "RUN cd /opt && ls\n")
    proc = subprocess.run(
        [hadolint, "--no-color", str(sloppy)], capture_output=True, text=True, timeout=60
    )
    assert "DL3003" in proc.stdout  # "use WORKDIR to switch to a directory": it looks


def test_containerfile_matches_the_umoci_image() -> None:
    """The Containerfile (docker/podman) and build-image.sh promise the same image."""
    containerfile = (ROOT / "Containerfile").read_text()
    script = (ROOT / "scripts" / "build-image.sh").read_text()
    assert 'ENTRYPOINT ["/opt/blobstore/bin/blobstore"]' in containerfile
    assert "--config.entrypoint /opt/blobstore/bin/blobstore" in script
    assert 'CMD ["daemon"]' in containerfile
    assert "--config.cmd daemon" in script
    assert "USER 65532:65532" in containerfile
    assert "--config.user 65532:65532" in script
    for port in ("7411", "7421"):
        assert re.search(rf"^EXPOSE .*\b{port}\b", containerfile, re.M), port
        assert f"--config.exposedports {port}/tcp" in script
    for variable in ("BLOBSTORE_CACHE", "BLOBSTORE_LISTEN", "BLOBSTORE_HTTP"):
        value = re.search(rf"--config.env {variable}=(\S+)", script)
        assert value, variable
        assert f"{variable}={value.group(1)}" in containerfile
