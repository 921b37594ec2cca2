"""The requesting side of an HTTP tunnel: a gateway's request sent to another node that hosts the
model, and its answer relayed to the client.

The request goes on a pooled fast-path connection when there is one (TLS over TCP), else on a new one,
else on a QUIC stream. Nothing reaches the client before the answer's first body byte, so until then
a host that fails or refuses raises :class:`~meshllm.net.http_tunnel.UpstreamUnavailable` and the
gateway tries the next host. A host whose TCP port refuses has most likely died: it gets one quick
QUIC ping or handshake before the request waits on it. On QUIC, where no TCP reset tells of a dead
host, a silent tunnel is checked with pings while its answer is awaited.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web

from meshllm.logsetup import Logger
from meshllm.net.body_pump import source_of
from meshllm.net.endpoint import MeshEndpoint
from meshllm.net.fast_path import NothingListens
from meshllm.net.http_tunnel import CHUNK, UpstreamUnavailable, pass_headers
from meshllm.net.library_internals import abort_tunnel
from meshllm.net.raw_http import FRAMED, FRAMED_HEADER, BadBody, UntilEnd, body_from_tunnel, first_bytes
from meshllm.serving.relay import relay
from meshllm.serving.request_log import RECORD
from meshllm.wire.admission import AuthError
from meshllm.wire.codec import CodecError
from meshllm.wire.framing import PeerRefused, StreamKind, read_frame_as
from meshllm.wire.messages import HostInfo, TunnelRequest, TunnelResponse

TUNNEL_OPEN_TIMEOUT_S = 10.0
REFUSED_PING_S = 1.0
REFUSED_HANDSHAKE_S = 2.0
"""How long a host whose TCP port refused the fast path gets to answer a QUIC ping, or to complete a
QUIC handshake when there is no connection to ping on."""
LIVENESS_S = 2.0
T = TypeVar("T")


class StalePooled(Exception):
    """A pooled tunnel connection failed before any answer: the request may go again on a new one."""


class TunnelRequester:
    """Sends a gateway's requests through tunnels to other nodes; lives on the endpoint's loop."""

    def __init__(self, endpoint: MeshEndpoint, log: Logger) -> None:
        self.endpoint = endpoint
        self.log = log

    async def forward(
        self, request: web.Request, host: HostInfo, model: str, headers: dict[str, str], body: bytes
    ) -> web.StreamResponse:
        """Send ``request`` (its ``body`` already read) to ``host`` and relay the answer to the client;
        raises UpstreamUnavailable when the host fails before the answer's first body byte."""
        header = TunnelRequest(
            model=model,
            method=request.method,
            path=request.path,
            headers={**headers, FRAMED_HEADER: FRAMED},
            body_bytes=len(body),
        )
        try:
            return await self._tunnel_attempt(request, host, model, header, body, may_retry=True)
        except StalePooled:
            return await self._tunnel_attempt(request, host, model, header, body, may_retry=False)

    async def _open_tunnel(
        self, host: HostInfo, header: TunnelRequest, body: bytes
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool, bool]:
        """A tunnel with the request sent: (reader, writer, fast path?, pooled connection?)."""
        try:
            reader, writer, pooled = await self.endpoint.fast.take(host.node_id, host.addrs, header, body)
            return reader, writer, True, pooled
        except (ConnectionError, OSError, TimeoutError, ssl.SSLError) as exc:
            refused = isinstance(exc, NothingListens)
            try:
                if refused:
                    await self._ping_if_connected(host)
                reader, writer = await self.endpoint.open_tunnel(
                    host.node_id,
                    host.addrs,
                    StreamKind.HTTP_TUNNEL,
                    header,
                    REFUSED_HANDSHAKE_S if refused else TUNNEL_OPEN_TIMEOUT_S,
                )
            except TimeoutError:
                if not refused:
                    raise
                raise ConnectionError(
                    f"host {host.node_id[:12]} refused TCP and completed no QUIC handshake "
                    f"within {REFUSED_HANDSHAKE_S:g} s"
                ) from None
            writer.write(body)
            writer.write_eof()
            return reader, writer, False, False

    async def _tunnel_attempt(
        self,
        request: web.Request,
        host: HostInfo,
        model: str,
        header: TunnelRequest,
        body: bytes,
        may_retry: bool,
    ) -> web.StreamResponse:
        """One try of a tunnelled request; ``may_retry``: a pooled connection that turns out closed
        raises StalePooled instead of UpstreamUnavailable."""
        writer: asyncio.StreamWriter | None = None
        fast = keep = pooled = False
        try:
            try:
                reader, writer, fast, pooled = await self._open_tunnel(host, header, body)
                request[RECORD].via = "fast" if fast else "quic"
                read_more = self._tunnel_reader(host, reader, fast)
                head = await self._while_alive(host, read_frame_as(reader, TunnelResponse), ping=not fast)
                framing = body_from_tunnel(head.headers)
                # Nothing goes to the client before the body's first byte: until then, another host
                # can still answer instead.
                first = await first_bytes(framing, b"", read_more)
            except PeerRefused as exc:
                raise UpstreamUnavailable(f"host refused: {exc.reason}") from exc
            except (OSError, ConnectionError, TimeoutError, KeyError, CodecError, AuthError, BadBody) as exc:
                if pooled and may_retry:
                    # The host closed this idle connection as we sent on it: nothing was answered, so
                    # the request goes again on a fresh connection.
                    self.log.info("gateway.pooled_stale", target=host.node_id[:12], reason=str(exc))
                    raise StalePooled from exc
                raise UpstreamUnavailable(
                    f"tunnel to {host.node_id[:12]}: {type(exc).__name__}: {exc}"
                ) from exc
            if not first and head.status == 200:
                raise UpstreamUnavailable(f"host {host.node_id[:12]} ended its answer before its first byte")
            tunnel = writer
            response, whole = await relay(
                request,
                head.status,
                pass_headers(head.headers),
                framing,
                first,
                read_more,
                lambda: abort_tunnel(tunnel),
                self.log,
                model,
                host.node_id,
                pump_from=(reader, source_of(writer)) if fast else None,
            )
            keep = fast and whole and not isinstance(framing, UntilEnd)
            if keep:
                self.endpoint.fast.give_back(host.node_id, reader, writer)
            return response
        finally:
            if fast and writer is not None and not keep:
                writer.close()

    async def _ping_if_connected(self, host: HostInfo) -> None:
        """A host whose TCP port refused us has most likely died, and a QUIC connection would show that
        only after LIVENESS_S of silence and a ping, seconds in which another host could answer. So it
        must answer a ping at once (a live host without a fast path does, and is then used over QUIC);
        with no connection yet, the handshake gets REFUSED_HANDSHAKE_S."""
        try:
            await self.endpoint.ping_peer(host.node_id, REFUSED_PING_S)
        except TimeoutError:
            raise ConnectionError(
                f"host {host.node_id[:12]} refused TCP and did not answer a ping within {REFUSED_PING_S:g} s"
            ) from None
        except ConnectionError:
            pass  # no connection: open_tunnel dials

    def _tunnel_reader(
        self, host: HostInfo, reader: asyncio.StreamReader, fast: bool
    ) -> Callable[[], Awaitable[bytes]]:
        """The next bytes of a tunnel's body (on QUIC, while the host answers pings)."""
        if fast:
            return lambda: reader.read(CHUNK)
        return lambda: self._while_alive(host, reader.read(CHUNK))

    async def _while_alive(self, host: HostInfo, waiting: Awaitable[T], ping: bool = True) -> T:
        """Wait for a tunnel read while checking, every few seconds of silence, that the host still
        answers QUIC pings: a generation may take minutes, a dead host must not take that long.
        (On the fast path TCP does this: a dead host's kernel resets the connection, and keepalive
        probes catch a host that vanished without one.)"""
        if not ping:
            return await waiting  # no task per chunk: this runs once per streamed event
        task = asyncio.ensure_future(waiting)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=LIVENESS_S)
                if done:
                    return task.result()
                try:
                    await self.endpoint.ping_peer(host.node_id, LIVENESS_S)
                except (ConnectionError, TimeoutError) as exc:
                    raise ConnectionError(f"host {host.node_id[:12]} stopped answering: {exc}") from exc
        finally:
            task.cancel()
