"""Codec cost per message: meshllm's typed encode/decode against plain msgpack of the same data.

Every actor message and every control frame goes through :mod:`meshllm.wire.codec` (a tell between
two actors of one node is encoded and decoded too), so its cost is paid many times a second on every
node, idle or not. For each sample message this prints the microseconds per encode and per decode,
and each as a ratio to ``msgpack.packb``/``unpackb`` of the already-plain data, timed interleaved in
the same run (this machine is noisy): the ratio is what the typing and checking cost on top of
msgpack itself.

Run: .venv/bin/python -m tests.bench.bench_codec [--rounds 7] [--number 2000]
"""

from __future__ import annotations

import argparse
import statistics
import timeit
from collections.abc import Callable

import msgpack

from meshllm.wire.codec import Message, decode, encode
from meshllm.wire.messages import (
    Claim,
    Gossip,
    GpuReport,
    HostInfo,
    ModelRoute,
    PeerAnnouncement,
    ProbeResult,
    RouteTable,
    Seed,
    TunnelRequest,
    TunnelResponse,
)
from tests.support import exit_cleanly_on_sigterm


def announcement(i: int) -> PeerAnnouncement:
    return PeerAnnouncement(
        node_id=f"{i:02x}" * 16,
        name=f"node-{i}",
        role="active",
        addrs=(f"10.0.0.{i}:9338", f"[fd00::{i}]:9338"),
        vram_bytes=24 << 30,
        models=("SmolLM2-135M", "Qwen3-8B"),
        serving=("SmolLM2-135M",),
        incarnation=3,
        version=41,
        demand={"SmolLM2-135M": 12.5},
        model_bytes={"SmolLM2-135M": 100 << 20, "Qwen3-8B": 5 << 30},
        gpus=(GpuReport(name="NVIDIA H200", total_bytes=140 << 30, free_bytes=120 << 30),),
        signature=b"\x01" * 64,
    )


def samples() -> dict[str, Message]:
    hosts = tuple(
        HostInfo(node_id=f"{i:02x}" * 16, addrs=(f"10.0.0.{i}:9338",), vram_bytes=24 << 30) for i in range(3)
    )
    return {
        "ProbeResult": ProbeResult(node_id="ab" * 16, ok=True, rtt_ms=0.8),
        "TunnelRequest": TunnelRequest(
            model="SmolLM2-135M",
            method="POST",
            path="/v1/chat/completions",
            headers={
                "Content-Type": "application/json",
                "Accept": "text/event-stream",
                "X-Meshllm-Tunnel": "framed/1",
            },
            body_bytes=210,
        ),
        "TunnelResponse": TunnelResponse(
            status=200, headers={"Content-Type": "text/event-stream", "X-Meshllm-Body": "chunked"}
        ),
        "Gossip (5 nodes)": Gossip(announcements=tuple(announcement(i) for i in range(5))),
        "RouteTable (3 models)": RouteTable(
            models=tuple(ModelRoute(name=f"model-{m}", hosts=hosts, size_bytes=1 << 30) for m in range(3)),
            unserved=("big-model",),
            actives=tuple(Seed(node_id=h.node_id, addrs=h.addrs) for h in hosts),
            demand={"model-0": 3.0},
            claims=(Claim(model="big-model", node_id="cd" * 16, key=0.25),),
        ),
    }


def best_us(fn: Callable[[], object], number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=3)) / number * 1e6


def main() -> None:
    exit_cleanly_on_sigterm()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--number", type=int, default=2000)
    args = parser.parse_args()

    print(f"{'message':24} {'bytes':>6} {'encode us':>10} {'x packb':>8} {'decode us':>10} {'x unpackb':>10}")
    for name, msg in samples().items():
        e, p, d, u = measure(msg, args.rounds, args.number)
        print(f"{name:24} {len(encode(msg)):6d} {e:10.1f} {e / p:8.1f} {d:10.1f} {d / u:10.1f}")


def measure(msg: Message, rounds: int, number: int) -> tuple[float, float, float, float]:
    """Median microseconds of encode, packb, decode and unpackb, timed interleaved."""
    data = encode(msg)
    plain = msgpack.unpackb(data, raw=False)
    enc, dec, pack, unpack = [], [], [], []
    for _ in range(rounds):  # interleaved, so a noisy moment hits all four alike
        enc.append(best_us(lambda: encode(msg), number))
        pack.append(best_us(lambda: msgpack.packb(plain, use_bin_type=True), number))
        dec.append(best_us(lambda: decode(data), number))
        unpack.append(best_us(lambda: msgpack.unpackb(data, raw=False), number))
    e, p, d, u = (statistics.median(x) for x in (enc, pack, dec, unpack))
    return e, p, d, u


if __name__ == "__main__":
    main()
