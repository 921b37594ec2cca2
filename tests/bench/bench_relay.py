"""CPU per token of one relaying node, side by side (prints figures, asserts nothing).

The two legs of the remote gateway path, without llama-server, routing or HTTP heads, so that the
relay's own cost is not lost in llama.cpp's noise (tests/bench/bench_gateway.py measures the whole):

  producer --plain--> R1 --TLS--> R2 --plain--> consumer

R1 is the host's leg (llama-server's plain answer into the fast path's TLS), R2 the gateway's (the fast
path's TLS out to the client). The producer answers each one-byte request with ``--tokens`` chunks of
an SSE event the size of llama-server's, ``--gap-ms`` apart (its token rate), then the last chunk. Each
relay is its own process, in one of four kinds, run in a random order per round:

  thread    meshllm's body pump with relay threads (meshllm/net/thread_relay.py), as the nodes run it,
  callback  the same pump with relay threads off (the event loop's transport callbacks),
  floor     a bare blocking Python relay (recv, find the chunk ends, sendall): as little as Python does,
  plain     the floor relay with no TLS on either leg: what TLS adds to the floor.

With more than one ``--gap-ms`` every kind runs at each gap, interleaved, and the run prints each
kind's CPU per token at the longest gap over the shortest. On this project's 2-core Firecracker VM
(``--rounds 3 --answers 20 --gap-ms 1 10``) a relay thread pays 3.4-4 times the CPU for a token that
comes 10 ms after the last one (SmolLM2's rate) as for one 1 ms after: between tokens, what a wake-up
touches leaves the caches (on a node, llama-server's threads run in between). At 10 ms, TLS is about
40 % of the floor's CPU per token; the kernel's loopback TCP and the interpreter share the rest.

CPU is each relay process's, from ``/proc/PID/task/*/schedstat``, divided by the tokens passed. Both
relays use the fast path's own TLS contexts (TLS 1.3, the node certificates).

Run: .venv/bin/python -m tests.bench.bench_relay [--rounds 5] [--answers 40] [--tokens 64] [--gap-ms 4 [10 ...]]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import ssl
import statistics
import subprocess
import sys
import time

from meshllm.net.body_pump import pump_body, source_of
from meshllm.net.fast_path import tls_contexts
from meshllm.net.raw_http import ChunkedBody
from meshllm.wire.identity import NodeIdentity
from tests.bench.bench_gateway import CpuMeter

KINDS = ("thread", "callback", "floor", "plain")
EVENT = (
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":" token"}}],"created":1764600000,'
    b'"id":"chatcmpl-0123456789abcdef","model":"smollm2-135m","system_fingerprint":"b0-0","object":'
    b'"chat.completion.chunk"}\n\n'
)
CHUNK = b"%x\r\n%s\r\n" % (len(EVENT), EVENT)


def listen() -> socket.socket:
    server = socket.create_server(("127.0.0.1", 0))
    print(server.getsockname()[1], flush=True)  # the parent reads the port: no wait on a guess
    return server


def produce(tokens: int, gap_s: float) -> None:
    conn, _ = listen().accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while conn.recv(1):
        for _ in range(tokens):
            conn.sendall(CHUNK)
            time.sleep(gap_s)  # the producer's token rate, as llama-server's
        conn.sendall(b"0\r\n\r\n")


def floor_relay(up_port: int, down_tls: ssl.SSLContext | None, up_tls: ssl.SSLContext | None) -> None:
    down, _ = listen().accept()
    if down_tls is not None:
        down = down_tls.wrap_socket(down, server_side=True)
    up = socket.create_connection(("127.0.0.1", up_port))
    if up_tls is not None:
        up = up_tls.wrap_socket(up)
    for s in (down, up):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while request := down.recv(1):
        up.sendall(request)
        body = ChunkedBody()
        while not body.done:
            data = up.recv(65536)
            if not data:
                return  # the producer went away mid-answer: the consumer sees the close
            down.sendall(body.feed(data))


async def pump_relay(
    up_port: int, down_tls: ssl.SSLContext | None, up_tls: ssl.SSLContext | None, threads: bool
) -> None:
    accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
        asyncio.get_running_loop().create_future()
    )

    async def on_accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set_result((reader, writer))

    await asyncio.start_server(on_accept, sock=listen(), ssl=down_tls)
    down_r, down_w = await accepted
    up_r, up_w = await asyncio.open_connection("127.0.0.1", up_port, ssl=up_tls)
    while request := await down_r.read(1):
        up_w.write(request)
        body = ChunkedBody()
        down_w.write(body.feed(await up_r.read(65536)))
        if not body.done:
            await pump_body(body, up_r, source_of(up_w), down_w.transport, down_w.drain, threads=threads)


def cpu_s(pid: int) -> float:
    return CpuMeter.sched(pid)[0]  # summed over the process's threads, from schedstat


def start(*args: str) -> tuple[subprocess.Popen[bytes], int]:
    proc = subprocess.Popen([sys.executable, "-m", "tests.bench.bench_relay", *args], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(10)
        raise RuntimeError(f"{args[0]} exited before it listened (status {proc.returncode})")
    return proc, int(line)


def answer(consumer: socket.socket, kind: str) -> None:
    consumer.sendall(b"x")
    body = ChunkedBody()
    while not body.done:
        data = consumer.recv(65536)
        if not data:
            raise RuntimeError(f"{kind}: the relays closed mid-answer")
        body.feed(data)


def one_round(kind: str, answers: int, tokens: int, gap_ms: float) -> tuple[float, float]:
    """CPU per token (us) of R1 and R2 of the given kind over ``answers`` answers."""
    procs: list[subprocess.Popen[bytes]] = []
    plain = kind == "plain"
    try:
        producer, port = start("produce", str(tokens), str(gap_ms))
        procs.append(producer)
        r1, port = start("relay", kind, str(port), "plain" if plain else "tls-down")
        procs.append(r1)
        r2, port = start("relay", kind, str(port), "plain" if plain else "tls-up")
        procs.append(r2)
        with socket.create_connection(("127.0.0.1", port)) as consumer:
            consumer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            answer(consumer, kind)  # the connections and their TLS handshakes, not measured
            before = cpu_s(r1.pid), cpu_s(r2.pid)
            for _ in range(answers):
                answer(consumer, kind)
        per_token = 1e6 / (answers * tokens)
        return (cpu_s(r1.pid) - before[0]) * per_token, (cpu_s(r2.pid) - before[1]) * per_token
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)


def relay_main(kind: str, up_port: int, side: str) -> None:
    # The fast path's contexts; its client pins the node id after the handshake, which this leaves out.
    server_tls, client_tls = tls_contexts(NodeIdentity.generate())
    down_tls = server_tls if side == "tls-down" else None
    up_tls = client_tls if side == "tls-up" else None
    if kind in ("floor", "plain"):
        floor_relay(up_port, down_tls, up_tls)
    else:
        asyncio.run(pump_relay(up_port, down_tls, up_tls, threads=kind == "thread"))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "produce":
        produce(int(sys.argv[2]), float(sys.argv[3]) / 1e3)
        return
    if len(sys.argv) > 1 and sys.argv[1] == "relay":
        relay_main(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds, each kind once per round")
    parser.add_argument("--answers", type=int, default=40, help="answers per kind per round")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument(
        "--gap-ms", type=float, nargs="+", default=[4.0], help="the token rate; several: each, interleaved"
    )
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    gaps: list[float] = sorted(set(args.gap_ms))
    runs = [(kind, gap) for kind in KINDS for gap in gaps]
    figures: dict[tuple[str, float], list[tuple[float, float]]] = {run: [] for run in runs}
    for r in range(args.rounds):
        rng.shuffle(runs)
        for kind, gap in runs:
            figures[kind, gap].append(one_round(kind, args.answers, args.tokens, gap))
        for gap in gaps:
            line = "  ".join(
                f"{k} {figures[k, gap][-1][0]:5.0f} / {figures[k, gap][-1][1]:5.0f}" for k in KINDS
            )
            print(f"round {r + 1}, gap {gap:g} ms: us per token, R1 / R2: {line}", flush=True)
    legs = ("R1 plain->TLS", "R2 TLS->plain")
    for gap in gaps:
        print()
        print(
            f"== CPU per token (us) at {gap:g} ms between tokens, median of {args.rounds} rounds of {args.answers} answers =="
        )
        print(f"{'kind':<10} {legs[0]:>14} {legs[1]:>14} {'R1 / floor':>11} {'R2 / floor':>11}")
        floor = _medians(figures["floor", gap])
        for kind in KINDS:
            leg = _medians(figures[kind, gap])
            print(
                f"{kind:<10} {leg[0]:>14.1f} {leg[1]:>14.1f} {leg[0] / floor[0]:>11.2f} {leg[1] / floor[1]:>11.2f}"
            )
        print("  plain: both legs without TLS (plain->plain), beside the floor's TLS legs")
        for kind in ("thread", "floor"):
            one, two = _paired(figures[kind, gap], figures["callback", gap])
            print(f"SUMMARY gap {gap:g} ms: {kind} / callback, paired per round: R1 {one:.2f}, R2 {two:.2f}")
    if len(gaps) > 1:
        slow, fast = gaps[-1], gaps[0]
        print()
        print(f"== CPU per token at {slow:g} ms over at {fast:g} ms between tokens, paired per round ==")
        for kind in KINDS:
            one, two = _paired(figures[kind, slow], figures[kind, fast])
            print(f"SUMMARY {kind}: R1 {one:.2f}, R2 {two:.2f}")


def _medians(rounds: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(x[0] for x in rounds), statistics.median(x[1] for x in rounds)


def _paired(top: list[tuple[float, float]], bottom: list[tuple[float, float]]) -> tuple[float, float]:
    """The median over rounds of each leg's ratio, ``top`` over ``bottom`` in the same round."""
    one, two = (statistics.median(x[i] / y[i] for x, y in zip(top, bottom, strict=True)) for i in (0, 1))
    return one, two


if __name__ == "__main__":
    main()
