"""One QUIC connection of a node's endpoint, as an aioquic protocol subclass.

It knows who is at the other end once that is proven (the peer's certificate when we dialled, its
Hello when it dialled us), closes inbound connections that never prove the mesh secret, and hands
every stream the other side opens to the endpoint's control server.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.connection import QuicConnection

from meshllm.net.library_internals import (
    close_received,
    fail_pings,
    peer_certificate,
    quiet_ping,
    stream_readers,
)
from meshllm.net.misbehaviour import PEER_DROPPED, UNKNOWN_STRIKES, quic_fault
from meshllm.net.preauth import AUTH_DEADLINE_S, MAX_PREAUTH_BYTES
from meshllm.wire.identity import node_id_of, public_key_of_certificate

if TYPE_CHECKING:
    from meshllm.net.endpoint import MeshEndpoint
    from meshllm.net.preauth_guard import PreAuthGuard


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
        self._release_slot: Callable[[], None] | None = None
        self.guard: PreAuthGuard[Any] | None = None  # the listener's, for inbound connections
        self.source = ""  # the source address as the guard counts it
        self._counted = False  # its failure before admission was counted (once, by why)
        self._refused = False  # closed before it authenticated
        self._preauth_bytes = 0
        self.closing = False  # closed by us (or terminated): its streams' ends are nobody's fault
        self.dropped = ""  # why we dropped this admitted peer (meshllm.net.misbehaviour)
        self.strikes = 0  # streams refused for an unknown kind or tag
        self._reset_readers: weakref.WeakSet[asyncio.StreamReader] = weakref.WeakSet()
        if not outbound:
            # An inbound connection that never proves its grant is closed, not kept.
            self._loop.call_later(AUTH_DEADLINE_S, self._close_if_unauthenticated)

    def hold_preauth_slot(self, release: Callable[[], None], guard: PreAuthGuard[Any], source: str) -> None:
        """This inbound connection holds a pre-admission slot of the listener's guard until it
        authenticates or closes; ``release`` gives it back."""
        self._release_slot, self.guard, self.source = release, guard, source

    def _settle_preauth(self) -> None:
        release, self._release_slot = self._release_slot, None
        if release is not None:
            release()

    @property
    def preauth_pending(self) -> bool:
        """Inbound, counted by the listener's guard, and not authenticated (yet)."""
        return self.guard is not None and not self.authenticated.is_set()

    def note_preauth(self, why: str, event: str = "preauth.closed", **fields: Any) -> None:
        """Count and log (throttled) why this unauthenticated connection failed; once per connection
        (a refused Hello stays counted as such when the deadline then closes the connection)."""
        if self.guard is not None and not self._counted:
            self._counted = True
            self.guard.note(why, self.source, event=event, **fields)

    def refuse_preauth(self, why: str, linger_s: float = 0.0, **fields: Any) -> None:
        """Close an inbound connection that has not authenticated (counted once, see above); with
        ``linger_s``, a moment later, so that a Refused frame just written still goes out."""
        if self.authenticated.is_set() or self._refused or self.terminated:
            return
        self._refused = True
        self.note_preauth(why, **fields)
        self._settle_preauth()
        if linger_s > 0:
            self._loop.call_later(linger_s, self.endpoint.drop, self)
        else:
            self.endpoint.drop(self)

    def mark_authenticated(self) -> None:
        """The other side proved its grant (inbound) or answered our Hello (outbound)."""
        self.authenticated.set()
        self._settle_preauth()

    def _close_if_unauthenticated(self) -> None:
        self.refuse_preauth("deadline")

    def close(self, error_code: int = 0, reason_phrase: str = "") -> None:
        self.closing = True
        super().close(error_code=error_code, reason_phrase=reason_phrase)

    def was_reset(self, reader: asyncio.StreamReader) -> bool:
        """The peer reset this stream (it gave up on it): its cut is no protocol violation."""
        return reader in self._reset_readers

    def strike(self, reason: str, linger_s: float, **fields: Any) -> None:
        """Count a stream refused for an unknown kind or tag; too many drop the peer."""
        self.strikes += 1
        if self.strikes >= UNKNOWN_STRIKES:
            self.drop_peer(f"{self.strikes} streams refused, the last: {reason}", linger_s, **fields)

    def drop_peer(self, reason: str, linger_s: float = 0.0, **fields: Any) -> None:
        """Close the connection of an admitted peer that broke the protocol, saying why in the log and
        in the QUIC close; with ``linger_s``, a moment later, so a Refused frame just written goes out."""
        if self.dropped or self.closing:
            return
        self._note_dropped(reason, **fields)

        def close() -> None:
            self.close(error_code=PEER_DROPPED, reason_phrase=f"dropped: {reason}"[:200])
            self.endpoint.drop(self)

        if linger_s > 0:
            self._loop.call_later(linger_s, close)
        else:
            close()

    def _note_dropped(self, reason: str, **fields: Any) -> None:
        self.dropped = reason
        self.endpoint.log.warning("peer.dropped", peer=self.peer_id, role=self.peer_role, reason=reason, **fields)

    @property
    def passive(self) -> bool:
        return self.peer_role != "active"

    def _on_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.endpoint.spawn(self.endpoint.control.serve_stream(self, reader, writer))

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if (
            isinstance(event, events.StreamDataReceived)
            and not self.outbound
            and not self.authenticated.is_set()
        ):
            self._preauth_bytes += len(event.data)
            if self._preauth_bytes > MAX_PREAUTH_BYTES:
                reason = f"over {MAX_PREAUTH_BYTES} bytes before admission"
                self.refuse_preauth("garbage", event="stream.rejected", kind=None, reason=reason)
                return
        if isinstance(event, events.StreamReset):
            reader = stream_readers(self).pop(event.stream_id, None)
            if reader is not None:
                self._reset_readers.add(reader)
                reader.feed_eof()
        elif isinstance(event, events.ConnectionTerminated) and not self.terminated:
            self._terminate(event)
        super().quic_event_received(event)
        if isinstance(event, events.StreamDataReceived) and event.end_stream:
            # aioquic never forgets a stream's reader (~200 B a stream, forever); the stream's
            # handler holds its own reference, and no data comes after the end.
            stream_readers(self).pop(event.stream_id, None)

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        super().datagram_received(data, addr)
        if not self.terminated:
            closed = close_received(self)
            if closed is not None:
                # The peer closed it: aioquic drains it for three probe timeouts (seconds on a loaded
                # path) before it says so, and meanwhile nothing sent on it is answered. Whoever uses
                # it must know now: a probe that pinged it until then found a live peer silent.
                fail_pings(self)
                self.wake_readers()
                self._terminate(closed)

    def _terminate(self, event: events.ConnectionTerminated) -> None:
        """The connection is over (closed by either side, or timed out): tell the endpoint, once."""
        fault = quic_fault(event.error_code, event.frame_type, event.reason_phrase)
        if fault and self.authenticated.is_set() and not self.closing:
            self._note_dropped(fault)  # aioquic closed it (e.g. more streams than it allows)
        self.terminated = self.closing = True
        if self._release_slot is not None:  # closed by the other side before it authenticated
            self.note_preauth("gone", reason=event.reason_phrase or f"error {event.error_code}")
        self._settle_preauth()
        self.endpoint.on_terminated(self, event.reason_phrase or f"error {event.error_code}")

    @property
    def usable(self) -> bool:
        """Neither side has closed it: streams and pings on it can be answered."""
        return not self.closing

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
