"""One QUIC connection of a node's endpoint, as an aioquic protocol subclass.

It knows who is at the other end once that is proven (the peer's certificate when we dialled, its
Hello when it dialled us), closes inbound connections that never prove the mesh secret, and hands
every stream the other side opens to the endpoint's control server.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.connection import QuicConnection

from meshllm.net.library_internals import peer_certificate, quiet_ping, stream_readers
from meshllm.wire.identity import node_id_of, public_key_of_certificate

if TYPE_CHECKING:
    from meshllm.net.endpoint import MeshEndpoint

HELLO_DEADLINE_S = 10.0


class MeshConnection(QuicConnectionProtocol):
    """One QUIC connection and what we know of the node at the other end."""

    def __init__(self, quic: QuicConnection, endpoint: MeshEndpoint, outbound: bool, **_: Any) -> None:
        super().__init__(quic, stream_handler=self._on_stream)
        self.endpoint = endpoint
        self.outbound = outbound
        self.peer_id: str | None = None  # verified: from the certificate (outbound) or the Hello (inbound)
        # What the peer may do: for a connection it opened, what its grant allows (set at admission);
        # for one we dialled, what it answered (we dialled it as a member we learnt of).
        self.peer_role = "active" if outbound else "client"
        self.token_id = ""  # the token id of the grant it was admitted with (inbound)
        self.revocations_sent = False
        self.authenticated = asyncio.Event()
        self.auth_lock = asyncio.Lock()
        self.datagram_transport: asyncio.BaseTransport | None = None
        self.terminated = False
        if not outbound:
            # An inbound connection that never proves the mesh secret is closed, not kept.
            self._loop.call_later(HELLO_DEADLINE_S, self._close_if_unauthenticated)

    def _close_if_unauthenticated(self) -> None:
        if not self.authenticated.is_set() and not self.terminated:
            self.endpoint.log.warning("auth.timeout", reason="no Hello within deadline")
            self.close(reason_phrase="no Hello within deadline")

    @property
    def passive(self) -> bool:
        return self.peer_role != "active"

    def _on_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.endpoint.spawn(self.endpoint.control.serve_stream(self, reader, writer))

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamReset):
            reader = stream_readers(self).pop(event.stream_id, None)
            if reader is not None:
                reader.feed_eof()
        elif isinstance(event, events.ConnectionTerminated):
            self.terminated = True
            self.endpoint.on_terminated(self, event.reason_phrase or f"error {event.error_code}")
        super().quic_event_received(event)
        if isinstance(event, events.StreamDataReceived) and event.end_stream:
            # aioquic never forgets a stream's reader (~200 B a stream, forever); the stream's
            # handler holds its own reference, and no data comes after the end.
            stream_readers(self).pop(event.stream_id, None)

    async def ping(self) -> None:
        await quiet_ping(self)

    def wake_readers(self) -> None:
        """Whoever waits on a stream of this connection learns now, not after QUIC's draining."""
        for reader in stream_readers(self).values():
            reader.feed_eof()

    def peer_certificate_id(self) -> str | None:
        cert = peer_certificate(self)
        if cert is None:
            return None
        key = public_key_of_certificate(cert)
        return node_id_of(key) if key is not None else None
