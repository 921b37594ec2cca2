"""ggml-rpc over the mesh.

A split host's ``llama-server --rpc`` dials loopback TCP ports; each is a listener here that carries
every accepted connection to one worker, whose node connects it to its own loopback
``ggml-rpc-server``. No rpc-server ever listens beyond loopback. Bytes pass through untouched.

Two carriers, same security. The fast path is TLS 1.3 over TCP on the worker's QUIC port number:
the host pins the worker's certificate to its node id, and proves the mesh secret and its own key
with the same Hello frame as on QUIC. ggml-rpc is one small round trip per generated token, and
aioquic's per-packet Python cost made each ~3 ms slower than TCP; TLS records cost far less. When
the fast path cannot connect, the tunnel falls back to a QUIC RPC_TUNNEL stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import ssl
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from actors.base import Directory
from meshllm.auth import AuthError, make_hello, verify_hello
from meshllm.codec import CodecError
from meshllm.framing import PeerRefused, StreamKind, pack_frame, read_frame_as
from meshllm.identity import NodeIdentity, node_id_of, public_key_of_certificate
from meshllm.logsetup import Logger
from meshllm.messages import Ack, Hello, Refused, Route, RouteReply, RpcTunnelFailed, RpcTunnelRequest, Seed
from meshllm.transport import CONTROL_TIMEOUT_S, MeshEndpoint, split_addr

CHUNK = 256 * 1024
FAST_CONNECT_TIMEOUT_S = 3.0
ALPN_RPC = "meshllm-rpc/1"


def tls_contexts(identity: NodeIdentity) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """Server and client TLS 1.3 contexts from the node key. Certificates are self-signed: the
    client checks the server's key against the node id itself, the server checks the Hello."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    server.set_alpn_protocols([ALPN_RPC])
    with tempfile.TemporaryDirectory() as tmp:  # ssl loads keys only from files
        cert, key = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        cert.write_bytes(identity.certificate().public_bytes(serialization.Encoding.PEM))
        fd = os.open(key, os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(
                identity.private_key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        server.load_cert_chain(cert, key)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.minimum_version = ssl.TLSVersion.TLSv1_3
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE  # pinned to the node id after the handshake instead
    client.set_alpn_protocols([ALPN_RPC])
    return server, client


ROUTE_TIMEOUT_S = 5.0


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
        self._server_tls, self._client_tls = tls_contexts(endpoint.identity)
        self._tls_server: asyncio.base_events.Server | None = None
        self._fallback_logged = False
        self.fast_path = os.environ.get("MESHLLM_RPC_FAST_PATH", "1") != "0"
        endpoint.register_tunnel(StreamKind.RPC_TUNNEL, self.serve_worker_side)

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
        if self._tls_server is not None:
            self._tls_server.close()

    def _accepted(
        self, model: str, node_id: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        listener = self._listeners.get((model, node_id))
        if listener is None:
            writer.close()
            return
        task = asyncio.ensure_future(self._carry(model, listener.worker, reader, writer))
        listener.connections.add(task)
        task.add_done_callback(listener.connections.discard)

    async def _carry(
        self, model: str, worker: Seed, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            try:
                if not self.fast_path:
                    raise ConnectionError("fast path disabled")
                carrier = await self._open_fast(model, worker)
            except (ConnectionError, OSError, TimeoutError, ssl.SSLError) as exc:
                if not self._fallback_logged:
                    self.log.info("rpc.fast_path_fallback", worker=worker.node_id, reason=str(exc))
                    self._fallback_logged = True
                carrier = await self.endpoint.open_tunnel(
                    worker.node_id,
                    worker.addrs,
                    StreamKind.RPC_TUNNEL,
                    RpcTunnelRequest(model=model),
                    CONTROL_TIMEOUT_S,
                )
                await asyncio.wait_for(read_frame_as(carrier[0], Ack), CONTROL_TIMEOUT_S)
        except (OSError, ConnectionError, TimeoutError, KeyError, CodecError, PeerRefused, AuthError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            self.log.warning("rpc.tunnel_failed", model=model, worker=worker.node_id, reason=reason)
            self.directory.tell(
                "election", RpcTunnelFailed(model=model, worker=worker.node_id, reason=reason)
            )
            writer.close()
            return
        await splice((reader, writer), carrier, self.bytes_to_workers, self.bytes_from_workers)

    async def _open_fast(self, model: str, worker: Seed) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """TLS over TCP to the worker's QUIC port number, certificate pinned to its node id."""
        errors = []
        for addr in worker.addrs:
            host, port = split_addr(addr)
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port, ssl=self._client_tls, server_hostname=None),
                    FAST_CONNECT_TIMEOUT_S,
                )
            except (OSError, TimeoutError, ssl.SSLError) as exc:
                errors.append(f"{addr}: {type(exc).__name__}: {exc}")
                continue
            sslobj = writer.get_extra_info("ssl_object")
            der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
            key = public_key_of_certificate(x509.load_der_x509_certificate(der)) if der else None
            if key is None or node_id_of(key) != worker.node_id:
                writer.close()
                raise AuthError(f"TLS certificate at {addr} does not belong to {worker.node_id}")
            writer.write(
                pack_frame(
                    make_hello(self.endpoint.identity, self.endpoint.membership, "active", worker.node_id)
                )
            )
            writer.write(pack_frame(RpcTunnelRequest(model=model)))
            await asyncio.wait_for(read_frame_as(reader, Ack), CONTROL_TIMEOUT_S)
            with contextlib.suppress(OSError):
                writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return reader, writer
        raise ConnectionError("; ".join(errors) or "no address")

    # -- worker side --------------------------------------------------------------------------------------

    async def listen_tls(self, host: str, port: int) -> int | None:
        """The fast-path listener on the QUIC port number (TCP); None if that port is taken."""
        try:
            self._tls_server = await asyncio.start_server(self._serve_tls, host, port, ssl=self._server_tls)
        except OSError as exc:
            self.log.warning("rpc.fast_path_unavailable", port=port, reason=str(exc))
            return None
        return port

    async def _serve_tls(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            hello = await asyncio.wait_for(read_frame_as(reader, Hello), CONTROL_TIMEOUT_S)
            verify_hello(hello, self.endpoint.membership, self.endpoint.node_id)
            if hello.role != "active":
                raise AuthError("only active nodes host split models")
            await self.serve_worker_side(None, reader, writer)
        except AuthError as exc:
            self.log.warning("auth.refused", peer=None, reason=str(exc), side="listener", path="rpc-tls")
            writer.write(pack_frame(Refused(reason=str(exc))))
        except (CodecError, TimeoutError, ConnectionError, OSError, ssl.SSLError) as exc:
            self.log.warning("stream.rejected", kind="RPC_TLS", reason=f"{type(exc).__name__}: {exc}")
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def serve_worker_side(
        self, conn: object, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        request = await read_frame_as(reader, RpcTunnelRequest)
        route = await self.directory.ask_async("router", Route(model=request.model), ROUTE_TIMEOUT_S)
        port = route.local_rpc_port if isinstance(route, RouteReply) else 0
        if not port:
            writer.write(pack_frame(Refused(reason=f"no rpc-server for {request.model!r} on this node")))
            return
        try:
            local = await asyncio.open_connection("127.0.0.1", port)
        except OSError as exc:
            writer.write(pack_frame(Refused(reason=f"rpc-server unreachable: {exc}")))
            return
        writer.write(pack_frame(Ack()))
        await splice((reader, writer), local, self.bytes_served_in, self.bytes_served_out)
