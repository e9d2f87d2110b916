"""Where S3 is and who we are: an ``S3Config`` completed from the AWS config
and credentials files, read the way the AWS CLI reads them, without botocore.

Why not botocore's session: importing it costs ~0.12 s and loading its S3
model another ~0.12 s per process, more than a whole no-op push. The common
cases are read here, in a few milliseconds: credentials from the environment
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``) or
static keys of the profile in the shared credentials or config file; region,
``endpoint_url`` (also in a ``services`` section), ``s3.addressing_style``
and ``ca_bundle`` of the profile. Anything else that yields credentials
(assume-role, SSO, web identity, ``credential_process``, container and
instance metadata, expiring environment keys) is botocore's credential chain,
loaded only then and used unchanged (``BotocoreCredentials``): the order of
the chain is botocore's, so the fast path only answers where botocore would
have answered the same.

Reads files and the environment: call ``read_profile`` in a worker thread.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .config import ADDRESSING_STYLES, S3Config, check_endpoint_url
from .errors import ConfigError
from .sigv4 import Credentials

DEFAULT_REGION = "us-east-1"
_NOT_STATIC = (
    "role_arn",
    "web_identity_token_file",
    "sso_session",
    "sso_start_url",
    "sso_account_id",
    "credential_process",
)
"""Profile settings that make botocore look elsewhere before static keys."""
_BOTOCORE_ENDPOINT_SETTINGS = ("use_fips_endpoint", "use_dualstack_endpoint")
_BOTOCORE_S3_SETTINGS = ("use_accelerate_endpoint", "use_dualstack_endpoint", "use_arn_region")
_TRUE = ("true", "1", "yes")


class CredentialSource(Protocol):
    def current(self) -> Credentials:
        """Credentials to sign with now (may block to refresh: worker threads only).
        Raises ConfigError."""
        ...


@dataclass(frozen=True, slots=True)
class StaticCredentials:
    """Keys from the environment or a profile's files; ``origin`` says which."""

    credentials: Credentials
    origin: str

    def current(self) -> Credentials:
        return self.credentials


class BotocoreCredentials:
    """botocore's credential chain for ``profile``, as the AWS CLI resolves it
    (refreshed by botocore as they expire). Imports botocore: only built when
    the fast path cannot answer."""

    def __init__(self, profile: str | None) -> None:
        import botocore.exceptions
        import botocore.session

        self._lock = threading.Lock()
        try:
            session = botocore.session.Session(profile=profile)
            found = session.get_credentials()
        except botocore.exceptions.ProfileNotFound as exc:
            raise ConfigError(_one_line(str(exc))) from exc
        except botocore.exceptions.PartialCredentialsError as exc:
            raise ConfigError(f"incomplete AWS credentials: {_one_line(str(exc))}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise ConfigError(f"AWS credentials: {_one_line(str(exc))}") from exc
        if found is None:
            raise ConfigError(
                "no AWS credentials: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
            )
        self._found: Any = found
        self._errors = (botocore.exceptions.BotoCoreError,)

    def current(self) -> Credentials:
        try:
            with self._lock:
                frozen = self._found.get_frozen_credentials()
        except self._errors as exc:
            raise ConfigError(f"AWS credentials: {_one_line(str(exc))}") from exc
        return Credentials(frozen.access_key, frozen.secret_key, frozen.token or None)


@dataclass(frozen=True, slots=True)
class ResolvedS3:
    """``S3Config`` completed from the profile and the environment."""

    credentials: CredentialSource
    region: str
    endpoint_url: str | None
    addressing_style: str
    ca_bundle: str | None
    """A CA file to trust (``AWS_CA_BUNDLE`` or the profile's ``ca_bundle``)."""
    botocore_endpoint: bool
    """FIPS, dual-stack or accelerate endpoints are asked for: botocore's
    endpoint rules name the host (``s3store`` asks it once)."""


def read_profile(settings: S3Config, env: Mapping[str, str] | None = None) -> ResolvedS3:
    """Read the profile (files: run in a worker thread). Raises ConfigError (an
    unknown profile, a bad endpoint_url or addressing_style in it, no credentials)."""
    env = os.environ if env is None else env
    name = settings.profile or "default"
    config = _read_ini(env.get("AWS_CONFIG_FILE") or "~/.aws/config")
    creds_file = _read_ini(env.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials")
    profiles = {_profile_name(s): s for s in config}
    profile = dict(config.get(profiles[name], {})) if name in profiles else {}
    if settings.profile is not None and name not in profiles and name not in creds_file:
        raise ConfigError(f"The config profile ({name}) could not be found")
    s3_section = _nested(profile.get("s3", ""))
    where = f"AWS profile {name}"

    endpoint = settings.endpoint_url
    if endpoint is None and settings.use_profile_endpoint:
        found = _services_endpoint(config, profile) or profile.get("endpoint_url")
        if found:
            endpoint = check_endpoint_url(found, f"endpoint_url of {where}")
    style = settings.addressing_style or s3_section.get("addressing_style")
    if style is None:
        # Custom endpoints (SeaweedFS, MinIO, 127.0.0.1) rarely have bucket DNS names.
        style = "path" if endpoint else "auto"
    elif style not in ADDRESSING_STYLES:
        raise ConfigError(
            f"s3.addressing_style {style!r} of {where} is not one of {'|'.join(ADDRESSING_STYLES)}"
        )
    region = settings.region or profile.get("region") or DEFAULT_REGION
    special = any(
        env.get(f"AWS_{k.upper()}", profile.get(k, "")).lower() in _TRUE
        for k in _BOTOCORE_ENDPOINT_SETTINGS
    ) or any(s3_section.get(k, "").lower() in _TRUE for k in _BOTOCORE_S3_SETTINGS)
    return ResolvedS3(
        credentials=_credentials(settings.profile, env, profile, creds_file.get(name, {})),
        region=region,
        endpoint_url=endpoint,
        addressing_style=style,
        ca_bundle=env.get("AWS_CA_BUNDLE") or profile.get("ca_bundle") or None,
        botocore_endpoint=special and endpoint is None,
    )


def _credentials(
    explicit_profile: str | None,
    env: Mapping[str, str],
    profile: Mapping[str, str],
    shared: Mapping[str, str],
) -> CredentialSource:
    """Static keys where botocore's chain would find exactly these, else the chain."""
    if explicit_profile is None:  # an explicit profile skips the environment (botocore)
        key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
        if key or secret:
            if key and secret and not env.get("AWS_CREDENTIAL_EXPIRATION"):
                token = env.get("AWS_SESSION_TOKEN") or env.get("AWS_SECURITY_TOKEN")
                return StaticCredentials(Credentials(key, secret, token or None), "environment")
            return BotocoreCredentials(explicit_profile)  # its error for partial keys
        if env.get("AWS_WEB_IDENTITY_TOKEN_FILE") or env.get("AWS_ROLE_ARN"):
            return BotocoreCredentials(explicit_profile)
    if any(profile.get(k) for k in _NOT_STATIC):
        return BotocoreCredentials(explicit_profile)
    for section, origin in ((shared, "credentials file"), (profile, "config file")):
        key, secret = section.get("aws_access_key_id"), section.get("aws_secret_access_key")
        if key and secret:
            token = section.get("aws_session_token") or section.get("aws_security_token")
            return StaticCredentials(Credentials(key, secret, token or None), origin)
        if key or secret:
            break
    return BotocoreCredentials(explicit_profile)


def _read_ini(path: str) -> dict[str, dict[str, str]]:
    """Sections of an AWS ini file (missing or unreadable: none). Raises ConfigError
    for a file that is not ini."""
    import configparser  # only where a profile file is read (~1 ms)

    parser = configparser.RawConfigParser(interpolation=None)
    try:
        parser.read([Path(path).expanduser()], encoding="utf-8")
    except configparser.ParsingError as exc:
        # Its text quotes the bad lines: in a credentials file, a secret.
        if isinstance(exc, configparser.MissingSectionHeaderError):
            lines = str(exc.lineno)
        else:
            lines = ", ".join(str(number) for number, _line in exc.errors)
        raise ConfigError(
            f"unreadable AWS config file {path}: line {lines} is not a [section] or name = value"
        ) from None
    except configparser.Error as exc:  # the others name sections and options only
        raise ConfigError(f"unreadable AWS config file {path}: {_one_line(str(exc))}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"unreadable AWS config file {path}: not UTF-8 text") from exc
    return {s: dict(parser.items(s)) for s in parser.sections()}


def _profile_name(section: str) -> str:
    """``[profile x]`` is profile x; ``[default]`` the default (config file names)."""
    if section.startswith("profile "):
        return section[len("profile ") :].strip()
    return section.strip()


def _nested(value: str) -> dict[str, str]:
    """A nested section (``s3 =\\n  addressing_style = path``) as a dict."""
    nested: dict[str, str] = {}
    for line in value.splitlines():
        key, sep, val = line.partition("=")
        if sep:
            nested[key.strip()] = val.strip()
    return nested


def _services_endpoint(config: Mapping[str, Mapping[str, str]], profile: Mapping[str, str]) -> str:
    """``endpoint_url`` of s3 in the profile's ``services`` section, or ''."""
    services = profile.get("services")
    if not services:
        return ""
    section = config.get(f"services {services.strip()}", {})
    return _nested(section.get("s3", "")).get("endpoint_url", "")


def _one_line(text: str) -> str:
    return " ".join(text.split())[:300]
