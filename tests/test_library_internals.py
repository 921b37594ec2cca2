"""Each reach into aioquic's internals (meshllm/net/library_internals.py) still does what it is for,
on the installed version: an upgrade that breaks one fails here, by name."""

from __future__ import annotations

import asyncio
import gc
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.quic import connection as aioquic_connection
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from meshllm.net import library_internals as internals
from meshllm.net.fast_path import tls_contexts
from meshllm.wire.identity import NodeIdentity, node_id_of, public_key_of_certificate
from tests.support import until

T = TypeVar("T")


def test_versions_are_checked_with_a_clear_message() -> None:
    internals.check_versions()  # the pinned version is installed
    with pytest.raises(internals.LibraryVersionError, match=r"aioquic==0\.0\.1 .* is installed"):
        internals.check_versions({"aioquic": "0.0.1"})


def test_slim_aioquic_shrinks_crypto_buffers_and_caches_epochs() -> None:
    internals.slim_aioquic()
    internals.slim_aioquic()  # idempotent
    assert aioquic_connection.CRYPTO_BUFFER_SIZE == internals.CRYPTO_BUFFER_BYTES
    epochs = aioquic_connection.EPOCHS
    assert hasattr(epochs, "cache_info")
    assert epochs("IH01") is epochs("IH01")  # one frozenset shared by every connection


async def _pair(
    tmp_path: Path,
) -> AsyncIterator[tuple[QuicConnectionProtocol, QuicConnectionProtocol, str, asyncio.BaseTransport]]:
    """A real QUIC connection on loopback: (client side, server side, the server's node id, the
    server's UDP transport)."""
    identity = NodeIdentity.load_or_create(tmp_path)
    loop = asyncio.get_running_loop()
    servers: list[QuicConnectionProtocol] = []

    def make(quic: QuicConnection, **kw: object) -> QuicConnectionProtocol:
        proto = QuicConnectionProtocol(quic, **kw)  # type: ignore[arg-type]
        servers.append(proto)
        return proto

    server_config = QuicConfiguration(is_client=False, alpn_protocols=["t"])
    server_config.certificate = identity.certificate()
    server_config.private_key = identity.private_key
    transport, _ = await loop.create_datagram_endpoint(
        lambda: QuicServer(configuration=server_config, create_protocol=make), local_addr=("127.0.0.1", 0)
    )
    port = transport.get_extra_info("sockname")[1]
    client_config = QuicConfiguration(is_client=True, alpn_protocols=["t"])
    client_config.verify_mode = 0  # self-signed: the test checks the key itself
    client = QuicConnectionProtocol(QuicConnection(configuration=client_config))
    ctransport, _ = await loop.create_datagram_endpoint(lambda: client, local_addr=("127.0.0.1", 0))
    client.connect(("127.0.0.1", port))
    await asyncio.wait_for(client.wait_connected(), 5)
    try:
        yield client, servers[0], identity.node_id, transport
    finally:
        client.close()
        ctransport.close()
        transport.close()


def run(coro_fn: object, tmp_path: Path) -> None:
    async def main() -> None:
        gen = _pair(tmp_path)
        pair = await gen.__anext__()
        try:
            await coro_fn(*pair)  # type: ignore[operator]
        finally:
            await gen.aclose()

    asyncio.run(main())


def test_peer_certificate_is_the_servers(tmp_path: Path) -> None:
    async def check(
        client: QuicConnectionProtocol, server: QuicConnectionProtocol, node_id: str, _: object
    ) -> None:
        cert = internals.peer_certificate(client)
        assert cert is not None
        key = public_key_of_certificate(cert)
        assert key is not None and node_id_of(key) == node_id
        assert internals.peer_certificate(server) is None  # aioquic's server asks no client certificate

    run(check, tmp_path)


def test_stream_readers_are_the_ones_aioquic_feeds(tmp_path: Path) -> None:
    async def check(
        client: QuicConnectionProtocol, server: QuicConnectionProtocol, node_id: str, _: object
    ) -> None:
        reader, writer = await client.create_stream()
        stream_id = writer.get_extra_info("stream_id")
        readers = internals.stream_readers(client)
        assert readers[stream_id] is reader
        readers.pop(stream_id).feed_eof()  # what MeshConnection does on a reset
        assert await reader.read() == b""

    run(check, tmp_path)


def test_close_received_is_the_peers_close_while_aioquic_still_drains(tmp_path: Path) -> None:
    async def check(
        client: QuicConnectionProtocol, server: QuicConnectionProtocol, node_id: str, _: object
    ) -> None:
        assert internals.close_received(server) is None
        server._quic._loss.get_probe_timeout = lambda *_, **__: 30.0  # type: ignore[method-assign]  # a slow path
        client.close(error_code=0, reason_phrase="bye")
        await until(lambda: internals.close_received(server) is not None, 5, "the client's close")
        closed = internals.close_received(server)
        assert closed is not None and closed.reason_phrase == "bye"
        # aioquic reports the end only after 90 s of draining; a ping meanwhile waits for nothing.
        pending = asyncio.ensure_future(internals.quiet_ping(server))
        await asyncio.wait({pending}, timeout=0.2)
        assert not pending.done()
        internals.fail_pings(server)
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(pending, 1)

    run(check, tmp_path)


def _abandoned_ping_reports(
    tmp_path: Path, ping: Callable[[QuicConnectionProtocol], Coroutine[Any, Any, None]]
) -> list[str]:
    """Start a ping, give up on it before the answer (as a caller's timeout does), close the
    connection (which fails the waiter) and collect what the loop reports as never retrieved."""
    reports: list[str] = []

    async def check(
        client: QuicConnectionProtocol,
        server: QuicConnectionProtocol,
        node_id: str,
        server_socket: asyncio.BaseTransport,
    ) -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: reports.append(ctx["message"]))
        await asyncio.wait_for(ping(client), 5)  # a ping that is answered
        server_socket.close()  # from now on nothing is answered
        task = asyncio.ensure_future(ping(client))
        await asyncio.wait({task}, timeout=0)  # one turn of the loop: the waiter is registered
        task.cancel()  # the caller gives up, as asyncio.wait_for does on its timeout
        await asyncio.wait({task})
        client.close()
        await client.wait_closed()
        gc.collect()

    run(check, tmp_path)
    return reports


def test_quiet_ping_leaves_no_unretrieved_exception(tmp_path: Path) -> None:
    # (Other callbacks may complain about the closed socket; only an unretrieved ping matters here.)
    quiet = _abandoned_ping_reports(tmp_path / "quiet", internals.quiet_ping)
    assert not [r for r in quiet if "never retrieved" in r], quiet
    # What the patch is for: aioquic's own ping reports one.
    own = _abandoned_ping_reports(tmp_path / "own", QuicConnectionProtocol.ping)
    assert any("never retrieved" in r for r in own), own


def _abandoned_dial_reports(wait: Callable[[QuicConnectionProtocol], Coroutine[Any, Any, None]]) -> list[str]:
    """Dial a UDP port where nothing answers, give up on the handshake, close the connection (which
    fails the waiter) and collect what the loop reports as never retrieved."""
    reports: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda loop, ctx: reports.append(ctx["message"]))
        silent, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0))
        port = silent.get_extra_info("sockname")[1]
        config = QuicConfiguration(is_client=True, alpn_protocols=["t"])
        client = QuicConnectionProtocol(QuicConnection(configuration=config))
        transport, _ = await loop.create_datagram_endpoint(lambda: client, local_addr=("127.0.0.1", 0))
        client.connect(("127.0.0.1", port))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(wait(client), 0.2)
        client.close()
        await asyncio.wait_for(client.wait_closed(), 10)
        transport.close()
        silent.close()
        gc.collect()

    asyncio.run(main())
    return reports


def test_quiet_wait_connected_leaves_no_unretrieved_exception() -> None:
    quiet = _abandoned_dial_reports(internals.quiet_wait_connected)
    assert not [r for r in quiet if "never retrieved" in r], quiet
    # What the patch is for: aioquic's own wait reports one.
    own = _abandoned_dial_reports(QuicConnectionProtocol.wait_connected)
    assert any("never retrieved" in r for r in own), own


async def serving(handler: Any, client: Callable[[int], Awaitable[T]]) -> T:
    """Serve ``handler`` on GET / of an aiohttp app on a loopback port while ``client(port)`` runs."""
    from aiohttp import web

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        return await client(runner.addresses[0][1])
    finally:
        await runner.cleanup()


async def raw_get(port: int) -> bytes:
    """The raw bytes of a GET / answer, head and all."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    raw = await reader.read(-1)
    writer.close()
    return raw


def test_send_head_with_first_write_sends_head_and_first_bytes_in_one_write() -> None:
    """After ``prepare()`` nothing has gone to the transport; the first write carries the head and the
    first bytes in one call. Without the switch aiohttp writes the head at ``prepare()``."""
    from aiohttp import web

    calls: list[bytes] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        transport = request.transport
        assert transport is not None
        real_write, real_writelines = transport.write, transport.writelines

        def write(data: bytes) -> None:
            calls.append(bytes(data))
            real_write(data)

        def writelines(parts: list[bytes]) -> None:
            calls.append(b"".join(parts))
            real_writelines(parts)

        transport.write = write  # type: ignore[method-assign]
        transport.writelines = writelines  # type: ignore[method-assign]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        internals.send_head_with_first_write(response)
        await response.prepare(request)
        assert calls == [], "the head went out before the first body bytes"
        await response.write(b"data: one\n\n")
        await response.write_eof()
        return response

    raw = asyncio.run(serving(handler, raw_get))
    assert raw.startswith(b"HTTP/1.1 200")
    assert calls[0].startswith(b"HTTP/1.1 200") and b"data: one" in calls[0], calls


def test_send_chunks_as_they_are_passes_chunked_bytes_untouched() -> None:
    """A body already chunk-framed goes out as it is (no second framing, no second terminator), and
    the client reads the payload whole."""
    from aiohttp import ClientSession, web

    payload = [b"data: one\n\n", b"data: two\n\n"]
    framed = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in payload) + b"0\r\n\r\n"

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        internals.send_chunks_as_they_are(request.writer)
        await response.write(framed[:20])
        await response.write(framed[20:])
        await response.write_eof()
        return response

    async def client(port: int) -> tuple[bytes, bytes]:
        async with ClientSession() as session, session.get(f"http://127.0.0.1:{port}/") as resp:
            body = await resp.read()
        # and the raw bytes: exactly the framed body after the head
        raw = await raw_get(port)
        return body, raw.split(b"\r\n\r\n", 1)[1]

    body, raw = asyncio.run(serving(handler, client))
    assert body == b"".join(payload)
    assert raw == framed


def test_tls_state_is_the_transports_own_and_only_when_it_has_sent_everything() -> None:
    """The SSL object and buffers asyncio's TLS transport uses: what is encrypted with them reaches the
    peer as the transport's own next bytes would."""
    server_tls, client_tls = tls_contexts(NodeIdentity.generate())

    async def main() -> None:
        accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

        async def on_accept(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await accepted.put((r, w))

        server = await asyncio.start_server(on_accept, "127.0.0.1", 0, ssl=server_tls)
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_tls)
        far_r, far_w = await asyncio.wait_for(accepted.get(), 5)
        try:
            state = internals.tls_state(writer.transport)
            assert state is not None
            assert state.tcp.get_extra_info("socket") is writer.get_extra_info("socket")
            state.sslobj.write(b"by hand")
            state.tcp.write(state.outgoing.read())
            assert await asyncio.wait_for(far_r.readexactly(7), 5) == b"by hand"
            writer.write(b", then by the transport")
            assert await asyncio.wait_for(far_r.readexactly(23), 5) == b", then by the transport"
            near, far = socket.socketpair()
            _, plain_w = await asyncio.open_connection(sock=near)
            assert internals.tls_state(plain_w.transport) is None
            plain_w.close()
            far.close()
            writer.close()  # closing: no longer one a thread may take
            assert internals.tls_state(writer.transport) is None
        finally:
            writer.transport.abort()
            far_w.transport.abort()
            server.close()

    asyncio.run(main())
