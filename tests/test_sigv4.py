"""Our SigV4 (blobstore/sigv4.py) signs byte for byte as botocore's S3 signers do."""

from __future__ import annotations

import datetime
import hashlib
import random
import string
import time
import types
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest
from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as BotoCredentials

from blobstore import sigv4

_KEY_CHARS = string.ascii_letters + string.digits + "-_.~/ +=!*'()&$@,;:?#%éß漢"


@dataclass(frozen=True)
class Case:
    method: str
    host: str
    scheme: str
    path: str
    params: list[tuple[str, str]]
    headers: dict[str, str]
    token: str | None
    region: str
    body: bytes
    when: datetime.datetime

    def url(self) -> str:
        query = sigv4.canonical_query(self.params)
        url = f"{self.scheme}://{self.host}{sigv4.quote_path(self.path)}"
        return f"{url}?{query}" if query else url


def _cases(count: int) -> list[Case]:
    rng = random.Random(8)
    cases: list[Case] = []
    for i in range(count):
        key = "".join(rng.choice(_KEY_CHARS) for _ in range(rng.randint(1, 40))).strip("/")
        params: list[tuple[str, str]] = []
        if i % 3 == 0:
            params = [("list-type", "2"), ("prefix", key[:5]), ("encoding-type", "url")]
            if i % 2:
                params.append(("continuation-token", "1/abc+=="))
        headers: dict[str, str] = {}
        if i % 4 == 1:
            headers["Range"] = f"bytes={i}-{i * 1000 + 5}"
        if i % 5 == 2:
            headers["If-Match"] = '"0123456789abcdef"'
        if i % 7 == 3:
            headers["If-None-Match"] = "*"
        cases.append(
            Case(
                method=rng.choice(["GET", "HEAD", "PUT", "DELETE"]),
                host=rng.choice(["127.0.0.1:8333", "s3.eu-west-1.amazonaws.com", "b.s3.x"]),
                scheme=rng.choice(["http", "https"]),
                path=f"/bucket/{key}" if i % 2 else f"/{key}",
                params=params,
                headers=headers,
                token="FwoGZX+/token==" if i % 6 == 0 else None,
                region=rng.choice(["us-east-1", "eu-west-1", "ap-south-2"]),
                body=rng.randbytes(rng.randint(0, 300)) if i % 8 == 0 else b"",
                when=datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
                + datetime.timedelta(seconds=rng.randint(0, 10**8)),
            )
        )
    return cases


CASES = _cases(300)
SECRET = "wJalr/XUtnFEMI+K7MDENG"


def _frozen_now(monkeypatch: pytest.MonkeyPatch, when: datetime.datetime) -> None:
    """botocore's signers take the time from ``botocore.auth.get_current_datetime``."""
    naive = when.astimezone(datetime.UTC).replace(tzinfo=None)
    monkeypatch.setattr("botocore.auth.get_current_datetime", lambda: naive)


@pytest.mark.parametrize("sign_payload", [False, True])
def test_headers_match_botocore(monkeypatch: pytest.MonkeyPatch, sign_payload: bool) -> None:
    for case in CASES:
        _frozen_now(monkeypatch, case.when)
        theirs = AWSRequest(
            method=case.method, url=case.url(), headers=dict(case.headers), data=case.body
        )
        theirs.context["client_config"] = types.SimpleNamespace(
            s3={"payload_signing_enabled": sign_payload}
        )
        boto = BotoCredentials("AKIDEXAMPLE", SECRET, case.token)
        S3SigV4Auth(boto, "s3", case.region).add_auth(theirs)

        parts = urlsplit(case.url())
        payload = hashlib.sha256(case.body).hexdigest() if sign_payload else sigv4.UNSIGNED_PAYLOAD
        ours = sigv4.sign_headers(
            sigv4.Credentials("AKIDEXAMPLE", SECRET, case.token),
            case.region,
            case.method,
            parts.path,
            parts.query,
            {"host": case.host, **case.headers},
            payload,
            amz_date=sigv4.timestamp(case.when),
        )
        assert ours["Authorization"] == theirs.headers["Authorization"], case
        assert ours["x-amz-content-sha256"] == theirs.headers["X-Amz-Content-SHA256"]
        assert ours["x-amz-date"] == theirs.headers["X-Amz-Date"]


def test_presigned_urls_match_botocore(monkeypatch: pytest.MonkeyPatch) -> None:
    for case in CASES[:100]:
        _frozen_now(monkeypatch, case.when)
        path = sigv4.quote_path(case.path)
        url = f"{case.scheme}://{case.host}{path}"
        theirs = AWSRequest(method="GET", url=url)
        boto = BotoCredentials("AK", "secret", case.token)
        S3SigV4QueryAuth(boto, "s3", case.region, expires=3600).add_auth(theirs)
        ours = sigv4.presign_query(
            sigv4.Credentials("AK", "secret", case.token),
            case.region,
            "GET",
            path,
            case.host,
            3600,
            amz_date=sigv4.timestamp(case.when),
        )
        their_url, _, their_query = theirs.prepare().url.partition("?")
        assert their_url == url
        # the same parameters and signature (botocore does not sort the URL's own order)
        assert sorted(ours.split("&")) == sorted(their_query.split("&")), case


def test_host_header_drops_default_ports() -> None:
    assert sigv4.host_header("http", "h", 80) == "h"
    assert sigv4.host_header("https", "h", 443) == "h"
    assert sigv4.host_header("https", "h", 8443) == "h:8443"
    assert sigv4.host_header("http", "h", None) == "h"


def test_credentials_repr_hides_the_secret() -> None:
    assert "s3cr3t" not in repr(sigv4.Credentials("AK", "s3cr3t", "tok"))


def test_repeated_and_odd_query_parameters_match_botocore(monkeypatch: pytest.MonkeyPatch) -> None:
    """Repeated names (sorted by value too), empty values, reserved and non-ASCII
    characters, and header values with runs of spaces, against botocore."""
    when = datetime.datetime(2026, 11, 27, 23, 59, 59, tzinfo=datetime.UTC)
    _frozen_now(monkeypatch, when)
    params = [("b", "2"), ("a", "z"), ("a", ""), ("a", "a b+c/é"), ("tag", "x=y&z"), ("b", "1")]
    case_headers = {"x-amz-meta-note": "  two   spaces  inside ", "If-None-Match": "*"}
    query = sigv4.canonical_query(params)
    url = f"https://s3.example.com:8443{sigv4.quote_path('/b/k ü+%')}?{query}"
    theirs = AWSRequest(method="PUT", url=url, headers=dict(case_headers), data=b"")
    theirs.context["client_config"] = types.SimpleNamespace(s3={"payload_signing_enabled": True})
    S3SigV4Auth(BotoCredentials("AK", SECRET, "tok/en+=="), "s3", "eu-west-1").add_auth(theirs)
    parts = urlsplit(url)
    ours = sigv4.sign_headers(
        sigv4.Credentials("AK", SECRET, "tok/en+=="),
        "eu-west-1",
        "PUT",
        parts.path,
        query,
        {"host": "s3.example.com:8443", **case_headers},
        sigv4.EMPTY_SHA256,
        amz_date=sigv4.timestamp(when),
    )
    assert ours["Authorization"] == theirs.headers["Authorization"]
    assert query.startswith("a=&a=a%20b%2Bc%2F%C3%A9&a=z&b=1&b=2&")


def test_the_signing_clock_is_utc_whatever_the_local_zone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TZ", "Pacific/Kiritimati")  # UTC+14: another date most of the day
    time.tzset()
    try:
        before = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        stamp = sigv4.timestamp()
        after = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert before <= stamp <= after
