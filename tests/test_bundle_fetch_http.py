"""The bundle endpoint client speaks real HTTP: chunked bodies, split TLS records, redirects, bounded sizes.

SPIRE's bundle endpoint (Go's net/http) sends any bundle over 2 KiB with
``Transfer-Encoding: chunked`` — every bundle holding two roots, that is most of
a rotation's life — and TLS may split a body across records. The server here
is a fault-injecting double of that wire behaviour (one TLS server, the bytes
written by hand); interop with a real SPIRE server is the SPIRE suite's job.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import orjson
import pytest

from meshfed.errors import BundleFetchError
from meshfed.trust.endpoint_client import MAX_BUNDLE_BYTES, EndpointSpec, fetch_bundle
from meshfed.zone import Zone
from meshfed.zone.bundle_poller import BundlePoller
from tests.test_bundle_endpoint import _web_pki

Handler = Callable[[str, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def https_server(tmp_path: Path, handle: Handler) -> AsyncIterator[tuple[str, str]]:
    """A TLS server on 127.0.0.1 calling ``handle(path, writer)`` per request; yields (base URL, its CA)."""
    pki = _web_pki(tmp_path, "double")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server.cert_chain_file, pki.server.key_file)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        path = head.split(b" ", 2)[1].decode()
        try:
            await handle(path, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"https://127.0.0.1:{port}", pki.ca_pem
    finally:
        server.close()
        await server.wait_closed()


async def chunked(writer: asyncio.StreamWriter, body: bytes, pieces: int = 5) -> None:
    """``body`` as chunked transfer coding, each chunk flushed on its own (its own TLS records)."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    size = -(-len(body) // pieces)
    for start in range(0, len(body), size):
        chunk = body[start : start + size]
        writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        await writer.drain()
    writer.write(b"0\r\n\r\n")
    await writer.drain()


def two_root_bundle(zone: Zone) -> bytes:
    zone.authority.rotate()  # the new root is published at once: the bundle now holds two
    return zone.trust.own_bundle().to_spiffe_json()


def spec(zone: Zone, url: str, ca_pem: str) -> EndpointSpec:
    return EndpointSpec(zone.trust_domain, url, "https_web", web_ca_pem=ca_pem)


def test_a_chunked_two_root_bundle_split_across_records_is_read_whole(make_zone, tmp_path):
    east = make_zone("east")
    document = two_root_bundle(east)

    async def scenario() -> None:
        async with https_server(tmp_path, lambda path, writer: chunked(writer, document)) as (url, ca):
            bundle = await fetch_bundle(spec(east, f"{url}/bundle", ca), None)
        assert bundle.roots == east.trust.own_bundle().roots
        assert len(bundle.roots) == 2

    asyncio.run(scenario())


def test_redirects_are_followed_over_https_only(make_zone, tmp_path):
    east = make_zone("east")
    document = east.trust.own_bundle().to_spiffe_json()

    async def handle(path: str, writer: asyncio.StreamWriter) -> None:
        if path == "/old":
            writer.write(b"HTTP/1.1 302 Found\r\nLocation: /new\r\nContent-Length: 0\r\n\r\n")
        elif path == "/plain":
            writer.write(b"HTTP/1.1 301 Moved\r\nLocation: http://127.0.0.1:9/bundle\r\nContent-Length: 0\r\n\r\n")
        elif path == "/loop":
            writer.write(b"HTTP/1.1 302 Found\r\nLocation: /loop\r\nContent-Length: 0\r\n\r\n")
        else:
            await chunked(writer, document)
        await writer.drain()

    async def scenario() -> None:
        async with https_server(tmp_path, handle) as (url, ca):
            bundle = await fetch_bundle(spec(east, f"{url}/old", ca), None)
            assert bundle.roots == east.trust.own_bundle().roots
            with pytest.raises(BundleFetchError, match="must be an https:// URL"):
                await fetch_bundle(spec(east, f"{url}/plain", ca), None)
            with pytest.raises(BundleFetchError, match="redirected more than 3 times"):
                await fetch_bundle(spec(east, f"{url}/loop", ca), None)

    asyncio.run(scenario())


def test_an_endless_or_oversized_body_is_refused_while_it_streams(make_zone, tmp_path):
    east = make_zone("east")

    async def handle(path: str, writer: asyncio.StreamWriter) -> None:
        if path == "/declared":
            writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {MAX_BUNDLE_BYTES + 1}\r\n\r\n".encode())
            await writer.drain()
            return
        await chunked(writer, b" " * (MAX_BUNDLE_BYTES + 1), pieces=64)

    async def scenario() -> None:
        async with https_server(tmp_path, handle) as (url, ca):
            with pytest.raises(BundleFetchError, match="more than"):
                await fetch_bundle(spec(east, f"{url}/chunked", ca), None)
            with pytest.raises(BundleFetchError, match="more than"):
                await fetch_bundle(spec(east, f"{url}/declared", ca), None)

    asyncio.run(scenario())


def test_an_error_status_names_the_endpoint_and_the_status(make_zone, tmp_path):
    east = make_zone("east")

    async def handle(path: str, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    async def scenario() -> None:
        async with https_server(tmp_path, handle) as (url, ca):
            with pytest.raises(BundleFetchError, match="answered 503 Service Unavailable, expected 200"):
                await fetch_bundle(spec(east, f"{url}/", ca), None)

    asyncio.run(scenario())


def test_the_poller_follows_the_refresh_hint_the_endpoint_announces_even_at_the_same_sequence(make_zone, tmp_path):
    """SPIRE announces its refresh hint on every response; a changed hint must not wait for a new sequence."""
    east, west = make_zone("east"), make_zone("west")
    hint = [300]

    async def handle(path: str, writer: asyncio.StreamWriter) -> None:
        document = orjson.loads(east.trust.own_bundle().to_spiffe_json())
        document["spiffe_refresh_hint"] = hint[0]
        await chunked(writer, orjson.dumps(document))

    async def scenario() -> None:
        async with https_server(tmp_path, handle) as (url, ca):
            west.trust.federate(east.trust_domain, f"{url}/", "https_web", web_ca_pem=ca)
            poller = BundlePoller(west, _no_change)
            assert await poller.poll_all() == dt.timedelta(seconds=300)
            hint[0] = 15  # same bundle, same sequence, a new hint
            assert await poller.poll_all() == dt.timedelta(seconds=15)

    asyncio.run(scenario())


async def _no_change() -> None:
    return None
