"""ggml-rpc over the mesh.

A split host's ``llama-server --rpc`` dials loopback TCP ports; each is a listener here that carries
every accepted connection to one worker, whose node connects it to its own loopback
``ggml-rpc-server``. No rpc-server ever listens beyond loopback. Bytes pass through untouched.

Carrier: the mesh's fast path (:mod:`meshllm.net.fast_path`, TLS pinned to node ids) first - ggml-rpc
is a small round trip per generated token, and each cost ~3 ms more through aioquic than through
TCP - and a QUIC RPC_TUNNEL stream when the fast path cannot connect. On the host the relay runs on
two threads with blocking sockets rather than on the event loop: per message it then spends its time
in C with the GIL released, which took the split from 0.85 to 0.96 of direct TCP (bench_split).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import ssl
import threading
from dataclasses import dataclass, field

from actors.base import Directory
from meshllm.logsetup import Logger
from meshllm.net.control_server import CONTROL_TIMEOUT_S
from meshllm.net.endpoint import MeshEndpoint
from meshllm.net.local_route import local_route
from meshllm.net.misbehaviour import read_header
from meshllm.wire.admission import AuthError
from meshllm.wire.codec import CodecError, decode
from meshllm.wire.framing import LENGTH, PeerRefused, StreamKind, pack_frame, read_frame_as
from meshllm.wire.messages import (
    Ack,
    Hello,
    Refused,
    RpcTunnelFailed,
    RpcTunnelRequest,
    Seed,
)

CHUNK = 256 * 1024


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counter: list[int]) -> None:
    """Copy until EOF, then half-close the other side."""
    try:
        while data := await reader.read(CHUNK):
            counter[0] += len(data)
            writer.write(data)
            await writer.drain()
    finally:
        with contextlib.suppress(Exception):
            if writer.can_write_eof():
                writer.write_eof()
            else:
                writer.close()  # TLS cannot half-close: end the carrier so the far side sees EOF


async def splice(
    a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    b: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    a_to_b: list[int],
    b_to_a: list[int],
) -> None:
    """Both directions at once; when one side fails, both are closed."""
    try:
        await asyncio.gather(pump(a[0], b[1], a_to_b), pump(b[0], a[1], b_to_a))
    finally:
        for w in (a[1], b[1]):
            with contextlib.suppress(Exception):
                w.close()


THREAD_RELAY = os.environ.get("MESHLLM_THREAD_RELAY", "1") != "0"


def _read_ack(tls: ssl.SSLSocket) -> None:
    """Read one frame from a blocking socket: Ack, or a Refused that raises PeerRefused."""
    head = _recv_exactly(tls, LENGTH.size)
    (length,) = LENGTH.unpack(head)
    if length > 4096:
        raise CodecError(f"answer frame of {length} bytes")
    msg = decode(_recv_exactly(tls, length))
    if isinstance(msg, Refused):
        raise PeerRefused(msg.reason)
    if not isinstance(msg, Ack):
        raise CodecError(f"expected Ack, got {type(msg).__name__}")


def _recv_exactly(sock: ssl.SSLSocket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed before the answer")
        buf += chunk
    return buf


def relay_threads(a: socket.socket, b: socket.socket, a_to_b: list[int], b_to_a: list[int]) -> None:
    """Copy both ways on two threads; blocking recv/sendall run in C without the GIL, which on a busy
    machine costs far less per message than an event loop. When either side ends, both close."""

    def pump(src: socket.socket, dst: socket.socket, counter: list[int]) -> None:
        try:
            while data := src.recv(CHUNK):
                counter[0] += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    threads = [
        threading.Thread(target=pump, args=(a, b, a_to_b), name="rpc-relay-up", daemon=True),
        threading.Thread(target=pump, args=(b, a, b_to_a), name="rpc-relay-down", daemon=True),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in (a, b):
        with contextlib.suppress(OSError):
            s.close()


@dataclass
class _Listener:
    worker: Seed
    server: asyncio.base_events.Server
    port: int
    connections: set[asyncio.Task[None]] = field(default_factory=set)


class RpcTunnels:
    """Both ends: listeners on the host, the stream handler on the worker. Lives on the endpoint loop."""

    def __init__(self, endpoint: MeshEndpoint, directory: Directory, logger: Logger) -> None:
        self.endpoint = endpoint
        self.directory = directory
        self.log = logger.bind(actor="rpc-tunnel")
        self._listeners: dict[tuple[str, str], _Listener] = {}
        self.bytes_to_workers = [0]
        self.bytes_from_workers = [0]
        self.bytes_served_in = [0]
        self.bytes_served_out = [0]
        self._allowed_hosts: dict[str, str] = {}  # model -> the plan's host, the only node served
        self._served: dict[str, set[tuple[str, asyncio.StreamWriter, asyncio.StreamWriter]]] = {}
        self._fallback_logged = False
        endpoint.register_tunnel(StreamKind.RPC_TUNNEL, self.serve_worker_side)
        endpoint.fast.register(RpcTunnelRequest, self._serve_fast, passive_ok=False)

    # -- host side ----------------------------------------------------------------------------------------

    async def ensure(self, model: str, workers: tuple[Seed, ...]) -> dict[str, int]:
        """Listeners for exactly these workers of ``model`` (existing ones keep their port)."""
        wanted = {w.node_id for w in workers}
        for (m, node_id), listener in list(self._listeners.items()):
            if m == model and node_id not in wanted:
                await self._close(m, node_id, listener)
        for worker in workers:
            key = (model, worker.node_id)
            if key not in self._listeners:
                server = await asyncio.start_server(
                    functools.partial(self._accepted, model, worker.node_id), "127.0.0.1", 0
                )
                port = server.sockets[0].getsockname()[1]
                self._listeners[key] = _Listener(worker=worker, server=server, port=port)
                self.log.info("rpc.listening", model=model, worker=worker.node_id, port=port)
            else:
                self._listeners[key].worker = worker
        return {node_id: lst.port for (m, node_id), lst in self._listeners.items() if m == model}

    async def _close(self, model: str, node_id: str, listener: _Listener) -> None:
        del self._listeners[(model, node_id)]
        listener.server.close()
        for task in list(listener.connections):
            task.cancel()
        self.log.info("rpc.closed", model=model, worker=node_id)

    async def close_all(self) -> None:
        for (model, node_id), listener in list(self._listeners.items()):
            await self._close(model, node_id, listener)

    def _accepted(
        self, model: str, node_id: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        listener = self._listeners.get((model, node_id))
        if listener is None:
            writer.close()
            return
        if self.endpoint.fast.enabled and THREAD_RELAY:
            # Take the socket off the event loop before anything is read; a thread relays it.
            writer.transport.pause_reading()  # type: ignore[attr-defined]
            raw = socket.socket(fileno=os.dup(writer.get_extra_info("socket").fileno()))
            writer.transport.abort()
            raw.setblocking(True)
            threading.Thread(
                target=self._thread_carry, args=(model, listener.worker, raw), name="rpc-relay", daemon=True
            ).start()
            return
        task = asyncio.ensure_future(self._carry(model, listener.worker, reader, writer))
        listener.connections.add(task)
        task.add_done_callback(listener.connections.discard)

    def _tunnel_failed(self, model: str, worker: Seed, exc: Exception) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        self.log.warning("rpc.tunnel_failed", model=model, worker=worker.node_id, reason=reason)
        self.directory.tell("election", RpcTunnelFailed(model=model, worker=worker.node_id, reason=reason))

    def _note_fallback(self, worker: Seed, exc: Exception) -> None:
        if not self._fallback_logged:
            self.log.info("rpc.fast_path_fallback", worker=worker.node_id, reason=str(exc))
            self._fallback_logged = True

    async def _carry_quic(
        self, model: str, worker: Seed, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Carry one llama-server connection over a QUIC RPC_TUNNEL stream (the fallback)."""
        try:
            carrier = await self.endpoint.open_tunnel(
                worker.node_id,
                worker.addrs,
                StreamKind.RPC_TUNNEL,
                RpcTunnelRequest(model=model),
                CONTROL_TIMEOUT_S,
            )
            await asyncio.wait_for(read_frame_as(carrier[0], Ack), CONTROL_TIMEOUT_S)
        except (OSError, ConnectionError, TimeoutError, KeyError, CodecError, PeerRefused, AuthError) as exc:
            self._tunnel_failed(model, worker, exc)
            writer.close()
            return
        await splice((reader, writer), carrier, self.bytes_to_workers, self.bytes_from_workers)

    async def _carry(
        self, model: str, worker: Seed, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Carry one llama-server connection on the event loop: fast path, else QUIC."""
        try:
            carrier = await self.endpoint.fast.open(
                worker.node_id, worker.addrs, RpcTunnelRequest(model=model)
            )
            await asyncio.wait_for(read_frame_as(carrier[0], Ack), CONTROL_TIMEOUT_S)
        except (ConnectionError, OSError, TimeoutError, ssl.SSLError) as exc:
            self._note_fallback(worker, exc)
            await self._carry_quic(model, worker, reader, writer)
            return
        except (CodecError, PeerRefused, AuthError) as exc:
            self._tunnel_failed(model, worker, exc)
            writer.close()
            return
        await splice((reader, writer), carrier, self.bytes_to_workers, self.bytes_from_workers)

    def _thread_carry(self, model: str, worker: Seed, local: socket.socket) -> None:
        try:
            tls = self.endpoint.fast.open_blocking(
                worker.node_id, worker.addrs, RpcTunnelRequest(model=model)
            )
            try:
                _read_ack(tls)
            except BaseException:
                tls.close()
                raise
            tls.settimeout(None)
        except (CodecError, PeerRefused, AuthError) as exc:
            self._tunnel_failed(model, worker, exc)
            local.close()
            return
        except (ConnectionError, OSError, ssl.SSLError) as exc:
            self._note_fallback(worker, exc)

            async def fall_back() -> None:
                reader, writer = await asyncio.open_connection(sock=local)
                await self._carry_quic(model, worker, reader, writer)

            asyncio.run_coroutine_threadsafe(fall_back(), self.endpoint.loop)
            return
        relay_threads(local, tls, self.bytes_to_workers, self.bytes_from_workers)

    # -- worker side --------------------------------------------------------------------------------------

    async def serve_worker_side(
        self, conn: object, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """A QUIC RPC tunnel stream: its header frame, then the same as the fast path."""
        peer = getattr(conn, "peer_id", None) or ""
        await self.serve_rpc(await read_header(reader, RpcTunnelRequest), peer, reader, writer)

    async def _serve_fast(
        self,
        request: RpcTunnelRequest,
        hello: Hello,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        await self.serve_rpc(request, hello.node_id, reader, writer)

    def allow(self, model: str, host: str) -> None:
        """Only ``host`` may tunnel to this node's rpc-server for ``model`` from now on (``""``: no
        one); open tunnels from any other node are cut. Runs on the endpoint loop."""
        if host:
            self._allowed_hosts[model] = host
        else:
            self._allowed_hosts.pop(model, None)
        for entry in list(self._served.get(model, ())):
            peer, outer, local = entry
            if peer != host:
                self.log.warning("rpc.tunnel_cut", model=model, peer=peer, reason="no longer the plan's host")
                for w in (outer, local):
                    with contextlib.suppress(Exception):
                        w.close()

    async def serve_rpc(
        self,
        request: RpcTunnelRequest,
        peer: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        """Connect a tunnel from ``peer`` (its verified node id) to this node's rpc-server for the
        requested model - if, and while, ``peer`` is the host of the plan that makes this node its
        worker."""
        allowed = self._allowed_hosts.get(request.model, "")
        if not peer or peer != allowed:
            reason = (
                f"node {peer[:12] or '?'} is not the host this node is a worker of for {request.model!r}"
                if allowed
                else f"this node is no split worker of {request.model!r}"
            )
            self.log.warning("rpc.refused", model=request.model, peer=peer, reason=reason)
            writer.write(pack_frame(Refused(reason=reason)))
            return
        route = await local_route(self.directory, request.model, self.log, self.endpoint.route_now)
        port = route.local_rpc_port if route is not None else 0
        if not port:
            writer.write(pack_frame(Refused(reason=f"no rpc-server for {request.model!r} on this node")))
            return
        try:
            local = await asyncio.open_connection("127.0.0.1", port)
        except OSError as exc:
            writer.write(pack_frame(Refused(reason=f"rpc-server unreachable: {exc}")))
            return
        entry = (peer, writer, local[1])
        served = self._served.setdefault(request.model, set())
        served.add(entry)
        try:
            if self._allowed_hosts.get(request.model) != peer:  # the plan changed while connecting
                local[1].close()
                writer.write(pack_frame(Refused(reason="the plan changed")))
                return
            writer.write(pack_frame(Ack()))
            await splice((reader, writer), local, self.bytes_served_in, self.bytes_served_out)
        finally:
            served.discard(entry)
