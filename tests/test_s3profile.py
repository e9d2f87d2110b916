"""The profile read without botocore (blobstore/s3profile.py) answers as botocore
does: the same static keys where botocore's chain would find them, botocore's
chain itself for every other source, and the profile's S3 settings."""

from __future__ import annotations

import os
from pathlib import Path

import botocore.session
import pytest

from blobstore.config import S3Config
from blobstore.errors import ConfigError
from blobstore.s3profile import BotocoreCredentials, StaticCredentials, read_profile
from blobstore.sigv4 import Credentials


@pytest.fixture(autouse=True)
def no_aws_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore's chain reads os.environ: it holds exactly what a test sets."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance metadata here


def _files(tmp_path: Path, config: str, credentials: str = "") -> dict[str, str]:
    """The AWS files, named in os.environ too (for botocore's chain)."""
    (tmp_path / "config").write_text(config)
    (tmp_path / "credentials").write_text(credentials)
    env = {
        "AWS_CONFIG_FILE": str(tmp_path / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "credentials"),
    }
    os.environ.update(env)  # undone by no_aws_environment's monkeypatch (it saw them unset)
    return env


def _botocore_keys(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], profile: str | None
) -> Credentials:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    found = botocore.session.Session(profile=profile).get_credentials()
    assert found is not None
    frozen = found.get_frozen_credentials()
    return Credentials(frozen.access_key, frozen.secret_key, frozen.token)


CREDS = "[default]\naws_access_key_id = AKFILE\naws_secret_access_key = sfile\n"
CREDS += "[sw]\naws_access_key_id = AKSW\naws_secret_access_key = ssw\naws_session_token = tsw\n"
CONFIG = "[default]\nregion = eu-west-1\n[profile cfg]\naws_access_key_id = AKCFG\n"
CONFIG += "aws_secret_access_key = scfg\n[profile sw]\nregion = ap-south-2\n"


@pytest.mark.parametrize(
    ("extra", "profile", "origin"),
    [
        ({"AWS_ACCESS_KEY_ID": "AKENV", "AWS_SECRET_ACCESS_KEY": "senv"}, None, "environment"),
        (
            {"AWS_ACCESS_KEY_ID": "AKENV", "AWS_SECRET_ACCESS_KEY": "s", "AWS_SESSION_TOKEN": "t"},
            None,
            "environment",
        ),
        ({"AWS_ACCESS_KEY_ID": "AKENV", "AWS_SECRET_ACCESS_KEY": "senv"}, "sw", "credentials file"),
        ({}, None, "credentials file"),
        ({}, "sw", "credentials file"),
        ({}, "cfg", "config file"),
    ],
)
def test_static_keys_are_botocore_s(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    extra: dict[str, str],
    profile: str | None,
    origin: str,
) -> None:
    env = {**_files(tmp_path, CONFIG, CREDS), **extra}
    resolved = read_profile(S3Config(profile=profile), env)
    assert isinstance(resolved.credentials, StaticCredentials)
    assert resolved.credentials.origin == origin
    assert resolved.credentials.current() == _botocore_keys(monkeypatch, env, profile)


def test_assume_role_is_botocore_s_chain(tmp_path: Path) -> None:
    role = "role_arn = arn:aws:iam::123456789012:role/r\nsource_profile = cfg\n"
    env = _files(tmp_path, f"{CONFIG}[profile other]\n{role}", CREDS)
    resolved = read_profile(S3Config(profile="other"), env)
    assert isinstance(resolved.credentials, BotocoreCredentials)  # deferred: no STS call yet


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("credential_process = /bin/false\n", "custom-process"),
        ("sso_session = s\nsso_account_id = 1\nsso_role_name = r\n", "sso"),
    ],
)
def test_a_failing_botocore_source_is_one_config_error(
    tmp_path: Path, section: str, message: str
) -> None:
    """Sources the fast path does not read reach botocore (which runs the process,
    reads the SSO cache...); its failure is one line."""
    env = _files(tmp_path, f"{CONFIG}[profile other]\n{section}", CREDS)
    with pytest.raises(ConfigError, match=message) as info:
        read_profile(S3Config(profile="other"), env).credentials.current()
    assert "\n" not in str(info.value)


def test_no_credentials_anywhere_is_one_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = _files(tmp_path, "[default]\nregion = eu-west-1\n")
    with pytest.raises(ConfigError, match="no AWS credentials") as info:
        read_profile(S3Config(), env)
    assert "\n" not in str(info.value)


def test_profile_settings(tmp_path: Path) -> None:
    config = (
        "[profile sw]\nregion = ap-south-2\nendpoint_url = http://global:1\n"
        "services = local\nca_bundle = /etc/ca.pem\ns3 =\n    addressing_style = virtual\n"
        "[services local]\ns3 =\n    endpoint_url = http://s3only:2\n"
        "[profile fips]\nuse_fips_endpoint = true\n"
    )
    env = _files(
        tmp_path, config, CREDS + "[fips]\naws_access_key_id = F\naws_secret_access_key = G\n"
    )
    resolved = read_profile(S3Config(profile="sw"), env)
    assert resolved.region == "ap-south-2"
    assert resolved.endpoint_url == "http://s3only:2"  # the services section wins
    assert resolved.addressing_style == "virtual"
    assert resolved.ca_bundle == "/etc/ca.pem"
    assert not resolved.botocore_endpoint
    ignoring = read_profile(S3Config(profile="sw", use_profile_endpoint=False), env)
    assert ignoring.endpoint_url is None
    env["AWS_CA_BUNDLE"] = "/env/ca.pem"
    explicit = read_profile(S3Config("http://x:3", "sw", "us-west-2", "path"), env)
    assert (explicit.endpoint_url, explicit.region, explicit.addressing_style) == (
        "http://x:3",
        "us-west-2",
        "path",
    )
    assert explicit.ca_bundle == "/env/ca.pem"
    fips = read_profile(S3Config(profile="fips"), env)
    assert fips.botocore_endpoint
    assert (fips.region, fips.addressing_style) == ("us-east-1", "auto")


def test_unknown_profile_is_botocore_s_message(tmp_path: Path) -> None:
    env = _files(tmp_path, CONFIG, CREDS)
    with pytest.raises(ConfigError, match=r"The config profile \(nope\) could not be found"):
        read_profile(S3Config(profile="nope"), env)
    # a profile only in the credentials file is a profile
    (tmp_path / "credentials").write_text(
        CREDS + "[only]\naws_access_key_id = A\naws_secret_access_key = B\n"
    )
    assert read_profile(S3Config(profile="only"), env).credentials.current().access_key == "A"


@pytest.mark.parametrize(
    ("config", "creds", "where"),
    [
        ("", "[default]\naws_access_key_id = AK\naws_secret_access_key wJalrSECRET\n", "line 3"),
        ("", "aws_secret_access_key = wJalrSECRET\n", "line 1"),
        ("[default]\nregion = x\n\xff\n", "", "not UTF-8"),
    ],
)
def test_a_broken_credentials_file_is_one_line_without_its_secret(
    tmp_path: Path, config: str, creds: str, where: str
) -> None:
    """configparser's own message quotes the bad line: there, the secret."""
    env = _files(tmp_path, config, creds)
    if "\xff" in config:
        Path(env["AWS_CONFIG_FILE"]).write_bytes(config.encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        read_profile(S3Config(), env)
    text = str(info.value)
    assert where in text
    assert "wJalrSECRET" not in text
    assert "\n" not in text


def test_reprs_of_what_holds_credentials_show_no_secret(tmp_path: Path) -> None:
    env = _files(tmp_path, "[default]\nregion = eu-west-1\n")
    env |= {
        "AWS_ACCESS_KEY_ID": "AKIDREPR",
        "AWS_SECRET_ACCESS_KEY": "wJalrREPRsecret",
        "AWS_SESSION_TOKEN": "FwoGZXREPRtoken",
    }
    resolved = read_profile(S3Config(), env)
    for text in (repr(resolved), str(resolved), repr(resolved.credentials.current())):
        assert "AKIDREPR" in repr(resolved)
        assert "wJalrREPRsecret" not in text
        assert "FwoGZXREPRtoken" not in text
