"""The network: a node's QUIC endpoint (control traffic: gossip, probes, route requests, notices),
the TLS-over-TCP fast path for the data plane, and the HTTP and RPC tunnels that ride on them.

Everything here runs on the endpoint's asyncio loop thread (:mod:`.aio`). The actors reach it only
through the TransportBridge actor; the gateway and tunnels, which move bytes, call it directly.
"""
