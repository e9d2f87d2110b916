"""The S3 request path (s3store/s3http/httpranges/sigv4) against servers that
misbehave as SeaweedFS never will (tests/rawhttp.py): bodies that lie about
their length or never end, DTDs in listings, a Range ignored, slow answers,
redirects to odd regions, writes whose answer is lost, untrusted or misnamed
certificates. Each must end in one clear error line, with bounded memory,
and without a credential in it."""

from __future__ import annotations

import base64
import logging
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from certs import make_ca, make_leaf
from rawhttp import RawServer, Request, answer

from blobstore import httpranges
from blobstore.config import S3Config
from blobstore.errors import ConfigError, Conflict, StoreUnavailable
from blobstore.s3store import S3ObjectStore

pytestmark = pytest.mark.anyio

SECRET = "SECRETmustNOTleak0123456789"
TOKEN = "TOKENmustNOTleak+/=="
REF = "refs/apps/model"


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("AWS_") or name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDHOSTILE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", TOKEN)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)


Route = Callable[[Request, socket.socket], bool]


def routes(**by_key: Route) -> Route:
    """HEAD of the bucket answers 200; ``/bucket/p/<key>`` goes to its route
    (``_`` for ``/`` in names: refs_apps_model is refs/apps/model), else 404."""

    def handle(request: Request, sock: socket.socket) -> bool:
        if request.path.rstrip("/") == "/bucket" and request.method == "HEAD":
            return answer(sock, 200)
        for name, route in by_key.items():
            if request.path.split("?")[0] == "/bucket/p/" + name.replace("_", "/"):
                return route(request, sock)
        if request.path.startswith("/bucket?"):
            return by_key["LIST"](request, sock)
        return answer(sock, 404, b"<Error><Code>NoSuchKey</Code></Error>")

    return handle


@asynccontextmanager
async def store_at(server: RawServer, **options: Any) -> AsyncIterator[S3ObjectStore]:
    settings = S3Config(endpoint_url=server.endpoint, region="us-east-1", addressing_style="path")
    async with S3ObjectStore("bucket", "p", settings, **options) as store:
        yield store


def one_clean_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text
    assert SECRET not in text
    assert TOKEN not in text
    return text


def headers_then(sock: socket.socket, head: str, body: bytes = b"") -> None:
    """The status line and headers in ``head`` (CRLF-separated), then ``body``."""
    sock.sendall(f"HTTP/1.1 {head.rstrip()}\r\n\r\n".encode() + body)


async def test_a_lying_content_length_is_refused_before_reading(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A ref answered with Content-Length 1 TB: refused at once (no allocation,
    and no deadline stretched by 1 TB / min_bytes_per_second)."""

    def huge(request: Request, sock: socket.socket) -> bool:
        headers_then(sock, "200 OK\r\nContent-Length: 1000000000000\r\n", b"x" * 100)
        return False

    caplog.set_level(logging.DEBUG)
    with RawServer(routes(refs_apps_model=huge)) as server:
        async with store_at(server) as store:
            with anyio.fail_after(30), pytest.raises(StoreUnavailable) as info:
                await store.get(REF)
    assert "too large" in one_clean_line(info.value)
    assert SECRET not in caplog.text
    assert TOKEN not in caplog.text


async def test_an_endless_chunked_body_is_cut_at_max_object_size() -> None:
    sent: list[int] = []

    def endless(request: Request, sock: socket.socket) -> bool:
        headers_then(sock, "200 OK\r\nTransfer-Encoding: chunked\r\n")
        chunk = b"%x\r\n%s\r\n" % (64 << 10, b"y" * (64 << 10))
        for _ in range(10_000):  # 640 MiB if nobody stops reading
            sock.sendall(chunk)
            sent.append(1)
        return False

    with RawServer(routes(refs_apps_model=endless)) as server:
        async with store_at(server, max_object_size=1 << 20) as store:
            with anyio.fail_after(30), pytest.raises(StoreUnavailable) as info:
                await store.get(REF)
    assert "too large" in one_clean_line(info.value)
    assert len(sent) < 1000  # the client hung up long before 64 MiB


async def test_a_chunked_body_within_bounds_is_read() -> None:
    def chunked(request: Request, sock: socket.socket) -> bool:
        headers_then(sock, "200 OK\r\nTransfer-Encoding: chunked\r\n", b"3\r\nabc\r\n0\r\n\r\n")
        return True

    with RawServer(routes(refs_apps_model=chunked)) as server:
        async with store_at(server) as store:
            assert await store.get(REF) == b"abc"


async def test_a_body_shorter_than_its_length_is_an_error_after_retries() -> None:
    def short(request: Request, sock: socket.socket) -> bool:
        headers_then(sock, "200 OK\r\nContent-Length: 100\r\n", b"only ten..")
        return False

    with RawServer(routes(refs_apps_model=short)) as server:
        async with store_at(server) as store:
            with anyio.fail_after(30), pytest.raises(StoreUnavailable) as info:
                await store.get(REF)
        gets = [r for r in server.requests if r.method == "GET"]
    assert "cut short" in one_clean_line(info.value)
    assert len(gets) == 3  # _BODY_ATTEMPTS


async def test_a_trickling_server_meets_the_deadline() -> None:
    """Headers at once, then a byte every 0.1 s: read_timeout never fires, the
    request's own deadline does (1 s + 1 KiB at 1 MiB/s)."""

    def trickle(request: Request, sock: socket.socket) -> bool:
        headers_then(sock, "200 OK\r\nContent-Length: 1024\r\n")
        for _ in range(1024):
            sock.sendall(b"z")
            time.sleep(0.1)
        return False

    with RawServer(routes(refs_apps_model=trickle)) as server:
        async with store_at(server, request_deadline=1.0, min_bytes_per_second=1 << 20) as store:
            with anyio.fail_after(30), pytest.raises(StoreUnavailable) as info:
                await store.get(REF)
    assert "deadline" in one_clean_line(info.value)


def listing(body: bytes) -> Route:
    def route(request: Request, sock: socket.socket) -> bool:
        return answer(sock, 200, body)

    return route


async def test_a_listing_with_a_dtd_is_refused() -> None:
    laughs = (
        b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa">'
        b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;"><!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;">]>'
        b"<ListBucketResult><Contents><Key>&c;</Key><Size>1</Size></Contents>"
        b"</ListBucketResult>"
    )
    with RawServer(routes(LIST=listing(laughs))) as server:
        async with store_at(server) as store:
            with pytest.raises(StoreUnavailable) as info:
                _ = [i async for i in store.list("refs/")]
    assert "MalformedListing" in one_clean_line(info.value)


async def test_a_listing_with_garbage_fields_or_a_repeated_token_is_one_line() -> None:
    garbage = (
        b"<ListBucketResult><Contents><Key>p/refs/a</Key><Size>many</Size></Contents>"
        b"</ListBucketResult>"
    )
    looping = (
        b"<ListBucketResult><IsTruncated>true</IsTruncated>"
        b"<NextContinuationToken>same</NextContinuationToken>"
        b"<Contents><Key>p/refs/a</Key><Size>1</Size></Contents></ListBucketResult>"
    )
    for body, expected in ((garbage, "MalformedListing"), (looping, "continuation token")):
        with RawServer(routes(LIST=listing(body))) as server:
            async with store_at(server) as store:
                with anyio.fail_after(30), pytest.raises(StoreUnavailable) as info:
                    _ = [i async for i in store.list("refs/")]
        assert expected in one_clean_line(info.value)
        assert len(server.requests) <= 3  # the bucket check and at most two pages


OBJECT = bytes(range(256)) * 16


def ranged(kind: str) -> Route:
    """Answers a Range GET of OBJECT the way ``kind`` says."""

    def route(request: Request, sock: socket.socket) -> bool:
        first, last = map(int, request.headers["range"].removeprefix("bytes=").split("-"))
        part = OBJECT[first : last + 1]
        content_range = f"Content-Range: bytes {first}-{last}/{len(OBJECT)}\r\n"
        if kind == "ignore":  # the whole object, as if Range were not sent
            headers_then(sock, f"200 OK\r\nContent-Length: {len(OBJECT)}\r\n", OBJECT)
        elif kind == "shifted":  # a 206 for other bytes than asked
            wrong = f"Content-Range: bytes {first + 1}-{last + 1}/{len(OBJECT)}\r\n"
            headers_then(sock, f"206 P\r\nContent-Length: {len(part)}\r\n{wrong}", part)
        elif kind == "chunked-cut":  # chunked, then the connection ends mid-way
            chunk = part[: len(part) // 2]
            headers_then(
                sock,
                f"206 P\r\nTransfer-Encoding: chunked\r\n{content_range}",
                b"%x\r\n%s\r\n" % (len(chunk), chunk),
            )
            return False
        elif kind in ("close-delimited", "close-cut"):  # ends with the connection
            cut = part if kind == "close-delimited" else part[:10]
            headers_then(sock, f"206 P\r\nConnection: close\r\n{content_range}", cut)
            return False
        elif kind == "bare":  # no length, no range: cannot tell a cut from the end
            headers_then(sock, "200 OK\r\nConnection: close\r\n", OBJECT)
            return False
        else:
            headers_then(sock, f"206 P\r\nContent-Length: {len(part)}\r\n{content_range}", part)
        return True

    return route


async def test_ranges_are_checked_against_what_was_asked() -> None:
    for kind, offset, outcome in [
        ("good", 100, "ok"),
        ("ignore", 0, "ok"),  # the whole object from 0: only the asked bytes come out
        ("ignore", 100, "ignored the Range"),
        ("shifted", 100, "Content-Range"),
        ("chunked-cut", 100, "cut short"),
        ("close-delimited", 100, "ok"),  # the Content-Range gives the length
        ("close-cut", 100, "cut short"),
        ("bare", 0, "neither a Content-Length"),
    ]:
        with RawServer(routes(packs_ab_pack=ranged(kind))) as server:
            async with store_at(server) as store:
                stream = store.get_range("packs/ab/pack", offset, 1000)
                if outcome == "ok":
                    got = b"".join([block async for block in stream])
                    assert got == OBJECT[offset : offset + 1000], kind
                    continue
                with anyio.fail_after(30), pytest.raises(StoreUnavailable) as info:
                    _ = [block async for block in stream]
                assert outcome in one_clean_line(info.value), kind


async def test_threaded_ranges_are_checked_too() -> None:
    """The pre-signed path (worker threads read spans) refuses the same bodies."""
    for kind, offset, outcome in [
        ("good", 100, "ok"),
        ("ignore", 100, "ignored the Range"),
        ("shifted", 100, "Content-Range"),
        ("chunked-cut", 100, "cut short"),
    ]:
        with RawServer(routes(packs_ab_pack=ranged(kind))) as server:
            async with store_at(server) as store:
                opener = await store.threaded_ranges("packs/ab/pack")
                assert opener is not None

                def read(
                    opener: httpranges.PresignedObject = opener, offset: int = offset
                ) -> bytes:
                    body = opener.open(offset, 1000)
                    assert body is not None
                    try:
                        return body.read(1000)
                    finally:
                        body.close()

                if outcome == "ok":
                    assert await anyio.to_thread.run_sync(read) == OBJECT[offset : offset + 1000]
                    continue
                with pytest.raises(StoreUnavailable) as info:
                    await anyio.to_thread.run_sync(read)
                assert outcome in one_clean_line(info.value), kind


async def test_a_key_or_token_with_a_line_end_is_refused_without_showing_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_SESSION_TOKEN", TOKEN + "\n")
    with RawServer(routes()) as server:
        with pytest.raises(ConfigError) as info:
            async with store_at(server):
                pass
        assert server.requests == []
    assert "session token" in one_clean_line(info.value)


async def test_an_error_body_left_unread_never_reaches_the_next_request() -> None:
    """A 403 with 1 MiB of body on a kept-alive connection: only 64 KiB are read,
    so the connection is dropped, and the next request gets its own answer."""

    def denied(request: Request, sock: socket.socket) -> bool:
        body = b"<Error><Code>AccessDenied</Code></Error>" + b" " * (1 << 20)
        return answer(sock, 403, body)

    def small(request: Request, sock: socket.socket) -> bool:
        return answer(sock, 200, b"small", ETag='"1"')

    with RawServer(routes(refs_big=denied, refs_small=small)) as server:
        async with store_at(server) as store:
            with pytest.raises(StoreUnavailable) as info:
                await store.get("refs/big")
            assert "AccessDenied" in one_clean_line(info.value)
            assert await store.get("refs/small") == b"small"
            assert await store.get("refs/small") == b"small"
        assert server.connections == 2  # the bucket check's, reused, dropped; then one


class Bucket:
    """Conditional PUTs and GETs of one object; the answer to the first PUT that
    applies is lost (the connection closes), as on a network that fails after S3
    committed the write."""

    def __init__(self) -> None:
        self.data: bytes | None = None
        self.version = 0
        self.lose_next = True

    def route(self, request: Request, sock: socket.socket) -> bool:
        if request.method == "GET":
            if self.data is None:
                return answer(sock, 404, b"<Error><Code>NoSuchKey</Code></Error>")
            return answer(sock, 200, self.data, ETag=f'"{self.version}"')
        match = request.headers.get("if-match")
        absent_only = request.headers.get("if-none-match") == "*"
        if (absent_only and self.data is not None) or (
            match is not None and match != f'"{self.version}"'
        ):
            return answer(sock, 412, b"<Error><Code>PreconditionFailed</Code></Error>")
        self.data, self.version = request.body, self.version + 1
        if self.lose_next:
            self.lose_next = False
            return False  # applied, never answered
        return answer(sock, 200, ETag=f'"{self.version}"')


async def test_a_conditional_write_whose_answer_was_lost_is_not_a_conflict() -> None:
    bucket = Bucket()
    with RawServer(routes(refs_apps_model=bucket.route)) as server:
        async with store_at(server) as store:
            await store.put_if(REF, b"first\n", None)  # applied, answer lost, 412 on retry
            assert bucket.data == b"first\n"
            with pytest.raises(Conflict):  # a real conflict stays one
                await store.put_if(REF, b"other\n", None)
            bucket.lose_next = True
            await store.put_if(REF, b"second\n", b"first\n")
            assert bucket.data == b"second\n"
            with pytest.raises(Conflict):
                await store.put_if(REF, b"third\n", b"first\n")
        puts = [r.method for r in server.requests if r.method == "PUT"]
    assert len(puts) == 2 + 1 + 2  # each lost answer: one PUT repeated


class _Moved:
    """A bucket that always answers 301 with ``region`` (AWS stand-in)."""

    def __init__(self, region: str) -> None:
        self.region = region

    def route(self, request: Request, sock: socket.socket) -> bool:
        return answer(sock, 301, b"", **{"x-amz-bucket-region": self.region})


@pytest.mark.parametrize("region", ["evil.example.com/x", "eu-west-1"])
async def test_a_region_redirect_is_followed_once_and_only_to_a_region(
    monkeypatch: pytest.MonkeyPatch, region: str
) -> None:
    """No endpoint configured: a 301's region names the next host. A region that
    is not a region name is not followed; a second 301 ends in one line."""
    hosts: list[str] = []
    with RawServer(_Moved(region).route) as server:

        def fake_aws(name: str) -> str:
            hosts.append(name)
            return server.endpoint

        monkeypatch.setattr("blobstore.s3store._aws_endpoint", fake_aws)
        settings = S3Config(region="us-east-1", addressing_style="path")
        with pytest.raises(StoreUnavailable) as info:
            async with S3ObjectStore("bucket", "p", settings):
                pass
    one_clean_line(info.value)
    assert hosts == (["us-east-1"] if "." in region else ["us-east-1", "eu-west-1"])


def connect_proxy(seen: list[str]) -> RawServer:
    """An HTTP CONNECT proxy (HTTPS_PROXY): a tunnel to where it is asked."""

    def tunnel(request: Request, sock: socket.socket) -> bool:
        seen.append(f"{request.method} {request.path}")
        host, _, port = request.path.rpartition(":")
        upstream = socket.create_connection((host, int(port)))
        sock.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")

        def pump(source: socket.socket, sink: socket.socket) -> None:
            try:
                while data := source.recv(1 << 16):
                    sink.sendall(data)
            except OSError:
                pass
            finally:
                sink.close()
                source.close()

        threading.Thread(target=pump, args=(upstream, sock), daemon=True).start()
        pump(sock, upstream)
        return False

    return RawServer(tunnel)


def serve_ref(request: Request, sock: socket.socket) -> bool:
    return answer(sock, 200, b"ref over tls")


@pytest.mark.parametrize("via_proxy", [False, True])
async def test_tls_is_verified_with_hostnames_also_through_a_proxy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, via_proxy: bool
) -> None:
    """Untrusted CA: refused. Trusted CA (AWS_CA_BUNDLE) but a name the certificate
    does not hold (localhost; it holds IP 127.0.0.1): refused. Both right: read.
    Through a CONNECT proxy the same, the tunnel's host checked."""
    ca = make_ca(tmp_path, "ca")
    leaf = make_leaf(tmp_path, "s3", ca)
    seen: list[str] = []
    with RawServer(routes(refs_apps_model=serve_ref), tls=leaf) as server:
        with connect_proxy(seen) as proxy:
            if via_proxy:
                monkeypatch.setenv("HTTPS_PROXY", proxy.endpoint)
            ip_settings = S3Config(endpoint_url=server.endpoint, addressing_style="path")
            name_settings = S3Config(
                endpoint_url=f"https://localhost:{server.port}", addressing_style="path"
            )
            for settings, trusted, problem in [
                (ip_settings, False, "certificate verify failed"),
                (name_settings, True, "mismatch"),
                (ip_settings, True, None),
            ]:
                if trusted:
                    monkeypatch.setenv("AWS_CA_BUNDLE", str(ca[0]))
                if problem is None:
                    async with S3ObjectStore("bucket", "p", settings) as store:
                        assert await store.get(REF) == b"ref over tls"
                    continue
                with pytest.raises(StoreUnavailable) as info:
                    async with S3ObjectStore("bucket", "p", settings):
                        pass
                assert problem in one_clean_line(info.value)
    assert bool(seen) == via_proxy
    assert all(s.startswith("CONNECT ") for s in seen)


async def test_an_unusable_ca_bundle_is_one_config_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    for bundle in (tmp_path / "missing.pem", garbage):
        monkeypatch.setenv("AWS_CA_BUNDLE", str(bundle))
        settings = S3Config(endpoint_url="https://127.0.0.1:9", addressing_style="path")
        with pytest.raises(ConfigError) as info:
            async with S3ObjectStore("bucket", "p", settings):
                pass
        assert str(bundle) in one_clean_line(info.value)


async def test_proxy_credentials_reach_an_http_proxy_unsigned(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """HTTP_PROXY with user:password: every request carries Proxy-Authorization
    (it was dropped for http endpoints), outside the signed headers."""

    def proxy_as_s3(request: Request, sock: socket.socket) -> bool:
        return answer(sock, 200, b"" if request.method == "HEAD" else b"via proxy")

    with RawServer(proxy_as_s3) as proxy:
        monkeypatch.setenv("HTTP_PROXY", f"http://user:p%40ss@127.0.0.1:{proxy.port}")
        settings = S3Config(endpoint_url="http://s3.invalid:9000", addressing_style="path")
        async with S3ObjectStore("bucket", "p", settings) as store:
            assert await store.get(REF) == b"via proxy"
    expected = "Basic " + base64.b64encode(b"user:p@ss").decode()
    assert [r.path for r in proxy.requests] == [
        "http://s3.invalid:9000/bucket",
        "http://s3.invalid:9000/bucket/p/refs/apps/model",
    ]
    for request in proxy.requests:
        assert request.headers["proxy-authorization"] == expected
        assert "proxy-authorization" not in request.headers["authorization"]


async def test_an_https_proxy_url_is_refused_without_its_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """http.client would speak plain HTTP to it, the password in clear."""
    monkeypatch.setenv("HTTPS_PROXY", "https://user:hunter2@127.0.0.1:9")
    settings = S3Config(endpoint_url="https://s3.invalid", addressing_style="path")
    with pytest.raises(ConfigError) as info:
        async with S3ObjectStore("bucket", "p", settings):
            pass
    assert "hunter2" not in one_clean_line(info.value)


async def test_threaded_ranges_meet_their_deadline_on_trickled_headers() -> None:
    """A server sending its headers a byte per 0.1 s (read_timeout never fires):
    the pre-signed path gives up at the request deadline too."""

    def trickle(request: Request, sock: socket.socket) -> bool:
        for byte in b"HTTP/1.1 206 Partial\r\nX-Slow: " + b"z" * 1000:
            sock.sendall(bytes([byte]))
            time.sleep(0.1)
        return False

    with RawServer(routes(packs_ab_pack=trickle)) as server:
        async with store_at(server, request_deadline=1.0) as store:
            opener = await store.threaded_ranges("packs/ab/pack")
            assert opener is not None
            with anyio.fail_after(30), pytest.raises(StoreUnavailable) as info:
                await anyio.to_thread.run_sync(opener.open, 0, 1000)
    assert "no answer within" in one_clean_line(info.value)
    assert "X-Amz-Signature" not in repr(opener)


async def test_an_error_message_cannot_write_terminal_escapes() -> None:
    def hostile(request: Request, sock: socket.socket) -> bool:
        body = b"<Error><Code>Acc\x1b[2Jess</Code><Message>a\x1b]0;pwned\x07\r\nb</Message></Error>"
        return answer(sock, 403, body)

    with RawServer(routes(refs_apps_model=hostile)) as server:
        async with store_at(server) as store:
            with pytest.raises(StoreUnavailable) as info:
                await store.get(REF)
    text = one_clean_line(info.value)
    assert "\x1b" not in text
    assert "\x07" not in text
    assert "Acc?[2Jess" in text


async def test_a_broken_tls_record_after_connecting_gets_every_attempt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error mid-exchange (a TLS record that is not one) is not a dead endpoint:
    max_attempts, not connect_attempts (every error counted as a failed connect)."""
    ca = make_ca(tmp_path, "ca")
    monkeypatch.setenv("AWS_CA_BUNDLE", str(ca[0]))

    def garbage(request: Request, sock: socket.socket) -> bool:
        socket.socket.sendall(sock, b"\x17\x03\x03\x00\x05plain")  # not encrypted
        return False

    with RawServer(routes(refs_apps_model=garbage), tls=make_leaf(tmp_path, "s3", ca)) as server:
        async with store_at(server, max_attempts=4) as store:
            with anyio.fail_after(60), pytest.raises(StoreUnavailable) as info:
                await store.get(REF)
        gets = [r for r in server.requests if r.method == "GET"]
    one_clean_line(info.value)
    assert len(gets) == 4
