"""Dialling a node over QUIC, with its certificate pinned to the node id it should have.

Peers use self-signed certificates made from their node key; TLS does not check them, this does:
a connection whose certificate belongs to another key is closed and reported as an
:class:`~meshllm.wire.admission.AuthError`, never used.
"""

from __future__ import annotations

import asyncio
import functools
import socket
from typing import TYPE_CHECKING

from aioquic.quic.connection import QuicConnection

from meshllm.net.connection import MeshConnection
from meshllm.net.library_internals import quiet_wait_connected
from meshllm.wire.admission import AuthError

if TYPE_CHECKING:
    from meshllm.net.endpoint import MeshEndpoint


def split_addr(addr: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` to (host, port)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"bad address {addr!r}: expected host:port")
    return host.strip("[]"), int(port)


def _same(conn: MeshConnection) -> MeshConnection:
    return conn


async def dial(
    endpoint: MeshEndpoint, node_id: str, addrs: tuple[str, ...], timeout: float
) -> MeshConnection:
    """A new connection to ``node_id``, trying its addresses in order; raises ConnectionError with
    every address's failure when none answers, AuthError when one answers with the wrong key."""
    loop = endpoint.loop
    errors: list[str] = []
    for addr in addrs:
        try:
            host, port = split_addr(addr)
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            family, _, _, _, sockaddr = infos[0]
            config = endpoint.configuration(is_client=True)
            config.server_name = node_id
            quic = QuicConnection(configuration=config)
            local = ("::", 0) if family == socket.AF_INET6 else ("0.0.0.0", 0)
            conn = MeshConnection(quic, endpoint=endpoint, outbound=True)
            transport, _ = await loop.create_datagram_endpoint(
                functools.partial(_same, conn), local_addr=local
            )
            conn.datagram_transport = transport
            endpoint.track(conn)
            conn.connect(sockaddr)
            try:
                await asyncio.wait_for(quiet_wait_connected(conn), timeout)
            except BaseException:
                endpoint.drop(conn)
                raise
            cert_id = conn.peer_certificate_id()
            if cert_id != node_id:
                endpoint.drop(conn)
                raise AuthError(f"certificate at {addr} belongs to {cert_id}, not {node_id}")
            conn.peer_id = node_id
            return conn
        except AuthError:
            raise
        except (OSError, ConnectionError, TimeoutError, ValueError) as exc:
            errors.append(f"{addr}: {type(exc).__name__} {exc}".strip())
    raise ConnectionError("; ".join(errors) or "no addresses")
