"""TransportBridge actor: the actors' side of the QUIC endpoint.

The :class:`~meshllm.node.Node` owns the :class:`~meshllm.net.endpoint.MeshEndpoint` (it creates,
starts and stops it); this actor is the only way the other actors reach it. Outbound commands arrive
here as messages and are scheduled onto the endpoint's loop without waiting for them; what the loop
learns goes back to the owning actors as messages, straight from the endpoint. It owns the split
host's RPC tunnel listeners and closes them when it stops.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
from collections.abc import Coroutine
from typing import Any

from actors.base import Directory, MsgpackActor, handles
from meshllm.logsetup import Logger
from meshllm.net.control_server import CONTROL_TIMEOUT_S, ROUTE_REQUEST_TIMEOUT_S
from meshllm.net.endpoint import MeshEndpoint
from meshllm.net.rpc_tunnel import RpcTunnels
from meshllm.wire.framing import pack_frame
from meshllm.wire.messages import (
    Ack,
    AllowRpcHost,
    BroadcastPeerDown,
    EnsureRpcListeners,
    ExchangeGossip,
    ForgetPeer,
    GetTransportStats,
    GossipSnapshot,
    Leave,
    ProbePeer,
    RefreshRoutes,
    RouteRequest,
    RouteSnapshot,
    RpcListeners,
    Subscribe,
    TransportStats,
)


class TransportBridge(MsgpackActor):
    """Turns command messages into coroutines on the endpoint's loop."""

    name = "transport"

    def __init__(self, directory: Directory, logger: Logger, endpoint: MeshEndpoint) -> None:
        super().__init__(directory, logger)
        self.endpoint = endpoint
        self._thread = endpoint.loop_thread
        self.rpc_tunnels = RpcTunnels(endpoint, directory, logger)

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> None:
        """Run ``coro`` on the endpoint's loop without waiting; an error it ends with is logged, never
        dropped (a refresh that died silently left the router waiting for an answer)."""
        name = getattr(coro, "__qualname__", "task")

        def report(done: concurrent.futures.Future[object]) -> None:
            if not done.cancelled() and done.exception() is not None:
                exc = done.exception()
                self.log.error("transport.task_failed", task=name, error=f"{type(exc).__name__}: {exc}")

        self._thread.submit(coro).add_done_callback(report)

    @handles(EnsureRpcListeners)
    def on_rpc_listeners(self, msg: EnsureRpcListeners) -> None:
        async def ensure() -> None:
            try:
                ports = await self.rpc_tunnels.ensure(msg.model, msg.workers)
                reply = RpcListeners(model=msg.model, ports=ports)
            except OSError as exc:
                reply = RpcListeners(model=msg.model, ports={}, error=f"{type(exc).__name__}: {exc}")
            self.tell("election", reply)

        self._spawn(ensure())

    @handles(AllowRpcHost)
    def on_allow_rpc_host(self, msg: AllowRpcHost) -> None:
        async def allow() -> None:
            self.rpc_tunnels.allow(msg.model, msg.host)

        self._spawn(allow())

    @handles(GossipSnapshot)
    def on_snapshot(self, msg: GossipSnapshot) -> None:
        self._thread.loop.call_soon_threadsafe(self.endpoint.publish_gossip, msg.gossip)

    @handles(RouteSnapshot)
    def on_route_snapshot(self, msg: RouteSnapshot) -> None:
        # Packed here, once per change, not on the loop for each of many passive nodes' requests.
        frame = pack_frame(msg.table)
        self._thread.loop.call_soon_threadsafe(self.endpoint.publish_routes, msg, frame)

    @handles(RefreshRoutes)
    def on_refresh(self, msg: RefreshRoutes) -> None:
        request = RouteRequest(claim=msg.claim, claim_key=msg.claim_key, asked=msg.asked)
        self._spawn(
            self.endpoint.refresh_routes(msg.actives, ROUTE_REQUEST_TIMEOUT_S, msg.every, request)
        )

    @handles(ExchangeGossip)
    def on_exchange(self, msg: ExchangeGossip) -> None:
        self._spawn(
            self.endpoint.exchange_gossip(msg.node_id, msg.addrs, msg.gossip, CONTROL_TIMEOUT_S)
        )

    @handles(Subscribe)
    def on_subscribe(self, msg: Subscribe) -> None:
        """The heartbeat asks for the loop's pulse: a loop that stops pulsing is stalled."""
        self._thread.loop.call_soon_threadsafe(self.endpoint.pulse_to, msg.subscriber)

    @handles(ProbePeer)
    def on_probe(self, msg: ProbePeer) -> None:
        self._spawn(self.endpoint.probe(msg.node_id, msg.addrs, msg.timeout_s))

    @handles(BroadcastPeerDown)
    def on_broadcast_down(self, msg: BroadcastPeerDown) -> None:
        self._spawn(self.endpoint.broadcast_peer_down(msg.notice, msg.members, msg.served))

    @handles(ForgetPeer)
    def on_forget(self, msg: ForgetPeer) -> None:
        self._thread.loop.call_soon_threadsafe(self.endpoint.forget, msg.node_id)

    @handles(Leave)
    def on_leave(self, msg: Leave) -> Ack:
        try:
            self._thread.run(self.endpoint.leave(msg.notice, msg.timeout_s), timeout=msg.timeout_s + 1)
        except TimeoutError:
            self.log.warning("mesh.leave_timeout")
        return Ack()

    @handles(GetTransportStats)
    def on_stats(self, msg: GetTransportStats) -> TransportStats:
        async def read() -> TransportStats:
            t = self.rpc_tunnels
            return dataclasses.replace(
                self.endpoint.stats(),
                rpc_bytes_to_workers=t.bytes_to_workers[0],
                rpc_bytes_from_workers=t.bytes_from_workers[0],
                rpc_bytes_served_in=t.bytes_served_in[0],
                rpc_bytes_served_out=t.bytes_served_out[0],
            )

        return self._thread.run(read(), timeout=5)

    def on_stop(self) -> None:
        super().on_stop()
        with contextlib.suppress(Exception):
            self._thread.run(self.rpc_tunnels.close_all(), timeout=5)
