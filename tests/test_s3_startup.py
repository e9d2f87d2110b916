"""An s3:// pull and a no-op push import neither aiobotocore nor botocore when the
credentials are static (environment, or a profile's keys in the shared files);
any other credential source goes through botocore's chain, loaded then.

Real commands in fresh interpreters against SeaweedFS; what they import is read
from ``sys.modules`` at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from s3server import ACCESS_KEY, REGION, SECRET_KEY, SeaweedS3Server

pytestmark = pytest.mark.s3

STACKS = ("aiobotocore", "botocore", "aiohttp", "boto3", "awscrt")


def run_and_list_stacks(argvs: list[list[str]], env: dict[str, str]) -> set[str]:
    """Run each ``blobstore`` command line in one fresh interpreter (exit 0 each);
    the S3 client stacks loaded afterwards."""
    probe = (
        "import json, sys\nfrom blobstore import cli\n"
        f"for argv in {argvs!r}:\n"
        "    code = cli.main(argv)\n"
        "    assert code == 0, (argv, code)\n"
        f"print(json.dumps([n for n in {list(STACKS)!r} if n in sys.modules]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


def _env(s3: SeaweedS3Server, tmp_path: Path, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        BLOBSTORE_STORE=s3.bucket_url(),
        BLOBSTORE_CACHE=str(tmp_path / "cache"),
        BLOBSTORE_PEERS="none",
        AWS_CONFIG_FILE=str(tmp_path / "no-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-credentials"),
    )
    env.update(extra)
    return env


def _tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(os.urandom(300 << 10))
    (src / "sub" / "b.txt").write_bytes(b"world\n")
    return src


def _push_then_pull(env: dict[str, str], tmp_path: Path) -> set[str]:
    src = _tree(tmp_path)
    push = ["push", str(src), "tiny"]
    assert run_and_list_stacks([push], env) == set()  # the first push uploads
    out = tmp_path / "out"
    loaded = run_and_list_stacks([push, ["pull", "tiny", str(out)]], env)  # no-op, pull
    assert (out / "sub" / "b.txt").read_bytes() == b"world\n"
    assert (out / "a.bin").read_bytes() == (src / "a.bin").read_bytes()
    return loaded


def test_environment_keys_load_no_s3_client_stack(
    s3_server: SeaweedS3Server, tmp_path: Path
) -> None:
    env = _env(s3_server, tmp_path, s3_server.client_env())
    assert _push_then_pull(env, tmp_path) == set()


def test_profile_keys_load_no_s3_client_stack(s3_server: SeaweedS3Server, tmp_path: Path) -> None:
    """--profile's static keys in the credentials file, its endpoint and region
    in the config file."""
    config = tmp_path / "aws-config"
    config.write_text(f"[profile sw]\nregion = {REGION}\nendpoint_url = {s3_server.endpoint}\n")
    credentials = tmp_path / "aws-credentials"
    credentials.write_text(
        f"[sw]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
    )
    env = _env(
        s3_server,
        tmp_path,
        {
            "AWS_CONFIG_FILE": str(config),
            "AWS_SHARED_CREDENTIALS_FILE": str(credentials),
            "AWS_PROFILE": "sw",
        },
    )
    assert _push_then_pull(env, tmp_path) == set()


def test_credential_process_goes_through_botocore(
    s3_server: SeaweedS3Server, tmp_path: Path
) -> None:
    """A source the fast path does not read (credential_process) is botocore's
    chain: the commands work, and botocore (not aiobotocore) is loaded."""
    keys = json.dumps({"Version": 1, "AccessKeyId": ACCESS_KEY, "SecretAccessKey": SECRET_KEY})
    script = tmp_path / "creds.py"
    script.write_text(f"print({keys!r})\n")
    config = tmp_path / "aws-config"
    config.write_text(
        f"[default]\nregion = {REGION}\ncredential_process = {sys.executable} {script}\n"
    )
    env = _env(
        s3_server,
        tmp_path,
        {"AWS_CONFIG_FILE": str(config), "AWS_ENDPOINT_URL": s3_server.endpoint},
    )
    src = _tree(tmp_path)
    loaded = run_and_list_stacks([["push", str(src), "t"], ["pull", "t", str(tmp_path / "o")]], env)
    assert loaded == {"botocore"}
    assert (tmp_path / "o" / "sub" / "b.txt").read_bytes() == b"world\n"


def test_wrong_keys_are_one_line(s3_server: SeaweedS3Server, tmp_path: Path) -> None:
    env = _env(
        s3_server,
        tmp_path,
        {**s3_server.client_env(), "AWS_SECRET_ACCESS_KEY": "not-the-secret"},
    )
    done = subprocess.run(
        [sys.executable, "-m", "blobstore.cli", "ls"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 1
    lines = [ln for ln in done.stderr.splitlines() if ln]
    assert len(lines) == 1, done.stderr
    assert "SignatureDoesNotMatch" in lines[0] or "403" in lines[0], lines[0]
