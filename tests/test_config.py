"""Sizes a user types (issue 10 item 20): ``--cache-size 50`` is not 50 bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import assert_one_line_error, cli_env, run_cli

from blobstore.config import DEFAULT_CACHE_BYTES, MIN_CACHE_BYTES, Config, S3Config, parse_size
from blobstore.errors import ConfigError

G = 1 << 30


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("50G", 50 * G),
        ("50g", 50 * G),
        ("50GB", 50 * G),
        ("50GiB", 50 * G),
        ("50 G", 50 * G),
        ("1.5T", 3 * G * 512),
        ("512M", 512 << 20),
        ("1P", 1 << 50),
        ("1048576", MIN_CACHE_BYTES),  # a bare number is bytes, and this one is big enough
        (" 2G ", 2 * G),
    ],
)
def test_cache_sizes_accepted(text: str, size: int) -> None:
    assert Config.from_env({"BLOBSTORE_CACHE_SIZE": text}).cache.max_bytes == size


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("50", "cache size '50' is 50 bytes, below the 1M minimum: did you mean 50G?"),
        ("0", "below the 1M minimum"),
        ("2000", "did you mean 2000G?"),
        ("512K", "cache size '512K' is 524288 bytes, below the 1M minimum"),
        ("1048575", "below the 1M minimum"),
        ("lots", "cache size 'lots' is not a size (try 10G or 512M)"),
        ("-5G", "is not a size"),
        ("5X", "is not a size"),
        ("1e9", "is not a size"),
    ],
)
def test_cache_sizes_refused_in_one_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_env({"BLOBSTORE_CACHE_SIZE": text})
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"below|not a size"):
        Config.from_env({}, cache_size=text)  # the runner API's override, same rule


def test_no_hint_where_a_unit_was_given() -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_env({"BLOBSTORE_CACHE_SIZE": "50K"})
    assert "did you mean" not in str(info.value)


def test_unset_or_empty_cache_size_is_the_default() -> None:
    assert Config.from_env({}).cache.max_bytes == DEFAULT_CACHE_BYTES
    assert Config.from_env({"BLOBSTORE_CACHE_SIZE": ""}).cache.max_bytes == DEFAULT_CACHE_BYTES


def test_parse_size_without_minimum_keeps_bytes() -> None:
    assert parse_size("50") == 50  # bench --size and other non-cache sizes: no minimum


def test_cli_cache_size_without_unit(tmp_path: Path) -> None:
    env = cli_env((tmp_path / "store").as_uri(), tmp_path / "cache")
    assert_one_line_error(run_cli(["--cache-size", "50", "ls"], env), "did you mean 50G?")
    env["BLOBSTORE_CACHE_SIZE"] = "50"
    assert_one_line_error(run_cli(["ls"], env), "did you mean 50G?")
    assert run_cli(["--cache-size", "50G", "ls"], env).returncode == 0


def test_s3_settings_follow_the_aws_conventions() -> None:
    env = {
        "AWS_ENDPOINT_URL": "http://global:9000",
        "AWS_ENDPOINT_URL_S3": "https://s3only:9443",
        "AWS_PROFILE": "team",
        "AWS_DEFAULT_REGION": "eu-west-1",
    }
    s3 = S3Config.from_env(env)
    assert s3 == S3Config("https://s3only:9443", "team", "eu-west-1")
    assert S3Config.from_env({**env, "AWS_REGION": "us-west-2"}).region == "us-west-2"
    explicit = S3Config.from_env(env, endpoint_url=" http://cli:1 ", profile="mine")
    assert (explicit.endpoint_url, explicit.profile) == ("http://cli:1", "mine")
    ignoring = S3Config.from_env({**env, "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "TRUE"})
    assert (ignoring.endpoint_url, ignoring.use_profile_endpoint) == (None, False)
    assert S3Config.from_env({}) == S3Config()
    config = Config.from_env(env, store="s3://b/p", endpoint_url="http://cli:1", profile="mine")
    assert config.s3 == explicit


@pytest.mark.parametrize(
    ("env", "options", "match"),
    [
        ({"AWS_ENDPOINT_URL": "localhost:9000"}, {}, "AWS_ENDPOINT_URL='localhost:9000'"),
        ({}, {"endpoint_url": "ftp://x"}, "--endpoint-url='ftp://x'"),
        ({}, {"profile": " "}, "--profile is empty"),
        ({"AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "yes"}, {}, "expected true or false"),
    ],
)
def test_bad_s3_settings_are_one_line(
    env: dict[str, str], options: dict[str, str], match: str
) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        S3Config.from_env(env, **options)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="addressing style 'sideways'"):
        S3Config(addressing_style="sideways")  # type: ignore[arg-type]
