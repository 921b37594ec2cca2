"""Tensor-split benchmark (prints figures, asserts nothing).

1. SmolLM2 split 1:1 over two rpc-servers: generation tokens/s and time to first token with
   ``llama-server --rpc`` pointing straight at two rpc-servers over loopback TCP, versus the mesh's
   own split (host + worker node processes, the worker's share through the QUIC RPC tunnel).
   Requests alternate between the two, same prompt, temperature 0, streaming.
2. Time from the host's ``election.plan`` (mode split) to the first generated token.
3. Bytes that crossed the RPC tunnel to load the model (host -> worker), from the host's counters.
4. After ``kill -9`` of the host: when the worker logs ``peer.died``, stops its rpc-server and has
   its own llama-server ready (tests/test_split.py checks that these happen, not how soon).
5. RPC tunnel bulk throughput against plain loopback TCP (a sink behind each).

Run: .venv/bin/python -m tests.bench.bench_split [--rounds 15] [--tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from meshllm.models.catalog import resolve_model
from meshllm.serving.llama import find_binaries, free_port, rpc_server_command, server_command
from tests.support import NodeProcess, ProcessFactory, exit_cleanly_on_sigterm, wait_until
from tests.test_mesh_processes import _epoch

MODEL = "smollm2-135m"
THREADS = 1  # 2 cores here: llama's spinning threads must leave room for the relays (both sides alike)
SPLIT_ARGS = (
    "-t",
    str(THREADS),
    "--tensor-split",
    "0.5,0.5",
    "-ngl",
    "999",
    "-ot",
    r"token_embd\.weight=CPU",
)


def stream_once(port: int, prompt: str, tokens: int) -> tuple[float, float, int]:
    """(time to first token, tokens/s after the first, tokens) for one streamed completion."""
    body = json.dumps(
        {
            "prompt": prompt,
            "max_tokens": tokens,
            "temperature": 0,
            "stream": True,
            "model": MODEL,
            "ignore_eos": True,
        }
    ).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions", data=body, headers={"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    stamps: list[float] = []
    with urllib.request.urlopen(req, timeout=120) as resp:
        for line in resp:
            if line.startswith(b"data: ") and b"[DONE]" not in line:
                payload = json.loads(line[6:])
                if payload.get("choices") and payload["choices"][0].get("text"):
                    stamps.append(time.perf_counter())
    ttft = stamps[0] - start
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return ttft, rate, len(stamps)


def wait_health(port: int, timeout: float = 120) -> None:
    def ok() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
            return resp.status == 200

    wait_until(ok, timeout, interval=0.1, what=f"llama-server on {port}")


def start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def status(proc: NodeProcess) -> dict[str, Any]:
    with urllib.request.urlopen(proc.console_url + "/api/status", timeout=5) as resp:
        body: dict[str, Any] = json.loads(resp.read())
    return body


def split_model(proc: NodeProcess) -> dict[str, Any]:
    return next((m for m in status(proc)["models"] if m["name"] == MODEL), {})


def tokens_figures(tmp: Path, rounds: int, tokens: int) -> None:
    bins = find_binaries(None)
    gguf = resolve_model(MODEL).path
    children: list[subprocess.Popen[bytes]] = []
    factory = ProcessFactory(tmp)
    try:
        # (a) straight over TCP
        rpc_ports = [free_port(), free_port()]
        for i, p in enumerate(rpc_ports):
            children.append(start(rpc_server_command(bins, p, ("-t", str(THREADS))), tmp / f"rpc{i}.log"))
        tcp_port = free_port()
        rpc = ",".join(f"127.0.0.1:{p}" for p in rpc_ports)
        # the rpc-servers need a moment to listen; llama-server aborts if they are not there
        import socket

        for p in rpc_ports:
            wait_until(lambda p=p: socket.create_connection(("127.0.0.1", p), 1).close() or True, 20)
        children.append(
            start(server_command(bins, str(gguf), tcp_port, ("--rpc", rpc, *SPLIT_ARGS)), tmp / "tcp.log")
        )
        wait_health(tcp_port)

        # (b) the mesh: host + worker node processes, forced split, equal VRAM
        serve = f'[models]\nserve = ["{MODEL}"]\nforce_split = true\n[llama]\nthreads = {THREADS}\n'
        vram = "vram_gb = 1.0"
        a = factory.start("a", extra=serve, node_extra=vram)
        b = factory.start("b", join=(a.token,), extra=serve, node_extra=vram)
        host = min((a, b), key=lambda p: p.node_id)
        wait_until(lambda: split_model(host).get("state") == "split", 180, interval=0.1, what="mesh split")
        plan = next(r for r in host.events("election.plan", mode="split"))
        # The split is settled once no llama.* event has happened for a while.
        settled_for = 3.0
        wait_until(
            lambda: (
                time.time() - max(_epoch(r) for r in host.records() if r["event"].startswith("llama."))
                > settled_for
            ),
            60,
            interval=0.2,
            what="the split to settle",
        )
        ready = host.events("llama.ready", kind="llama-server")[-1]
        mesh_port = int(ready["port"])
        starts = [r["ts"][11:23] + " " + r["key"] for r in host.events("llama.starting")]
        print("host llama starts:", starts)
        print("== split start ==")
        print(
            f"plan -> split llama-server ready (rpc-servers up, weights loaded): {_epoch(ready) - _epoch(plan):.2f}s"
        )
        moved = status(host)["rpc_bytes"]
        print(
            f"RPC tunnel bytes for the load + 1 token: host->worker {moved['to_workers'] / 1e6:.2f} MB, "
            f"worker->host {moved['from_workers'] / 1e6:.2f} MB"
        )

        prompt = "Once upon a time, in a small village by the sea, there lived"
        results: dict[str, list[tuple[float, float, int]]] = {"tcp": [], "mesh": []}
        try:
            for _warm in range(2):
                stream_once(tcp_port, prompt, tokens)
                stream_once(mesh_port, prompt, tokens)
        except OSError:
            for r in host.records():
                if r["event"].startswith(("llama.", "election.", "rpc.", "peer.")):
                    print(
                        r["ts"][11:23],
                        r["event"],
                        {k: r.get(k) for k in ("key", "port", "mode", "reason", "detail")},
                    )
            raise
        for r in range(rounds):
            order = [("tcp", tcp_port), ("mesh", mesh_port)]
            if r % 2:
                order.reverse()
            for name, port in order:
                results[name].append(stream_once(port, prompt, tokens))
        print(f"== SmolLM2 split 1:1, {rounds} interleaved rounds, {tokens} tokens, streaming ==")
        med = {
            k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v))
            for k, v in results.items()
        }
        for name, (ttft, rate) in med.items():
            print(f"{name:>5}: ttft {ttft * 1000:7.1f} ms   {rate:6.1f} tok/s")
        print(
            f"ratio mesh/tcp tokens/s: {med['mesh'][1] / med['tcp'][1]:.3f}   "
            f"added ttft: {(med['mesh'][0] - med['tcp'][0]) * 1000:+.1f} ms"
        )

        print("== host kill -9: the worker notices, stops its rpc-server and serves the model alone ==")
        worker = b if host is a else a
        mark = len(worker.records())
        killed_at = time.time()
        host.kill9()
        died = worker.wait_event("peer.died", timeout=60, since=mark, peer=host.node_id)
        stopped = worker.wait_event("llama.stopped", timeout=60, since=mark, key=f"rpc:{MODEL}")
        solo = worker.wait_event("llama.ready", timeout=180, since=mark, kind="llama-server")
        print(
            f"peer.died after {_epoch(died) - killed_at:.2f} s, rpc-server stopped after "
            f"{_epoch(stopped) - killed_at:.2f} s, solo llama-server ready after {_epoch(solo) - killed_at:.2f} s"
        )
    finally:
        for c in children:
            stop(c)
        factory.close()


async def _open_handlers() -> int:
    """Connection handlers of ``asyncio.start_server`` still running on a node's loop."""
    return sum(
        1
        for t in asyncio.all_tasks()
        if not t.done() and getattr(t.get_coro(), "__qualname__", "") == "FastPath._serve"
    )


async def _throughput(total: int) -> tuple[float, float]:
    """MB/s through plain loopback TCP and through an RPC tunnel between two in-process nodes.

    A push counts until the sink has every byte, not until the sender is done writing: the host's
    relay closes the sender's connection as soon as it has handed the last bytes to its own socket.
    Teardown waits for every connection to end first: on Python 3.11 a connection handler cancelled
    when its loop stops logs a ``CancelledError`` traceback (CPython gh-113538)."""
    from meshllm.wire.messages import EnsureRpcListeners, LocalServing, Seed
    from tests.support import NodeFactory

    received = 0
    done = asyncio.Event()
    sinks: set[asyncio.Task[Any]] = set()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received
        task = asyncio.current_task()
        assert task is not None
        sinks.add(task)
        try:
            while data := await reader.read(1 << 20):
                received += len(data)
            done.set()
        finally:
            writer.close()
            sinks.discard(task)

    server = await asyncio.start_server(sink, "127.0.0.1", 0)
    sink_port = server.sockets[0].getsockname()[1]

    async def push(port: int) -> float:
        nonlocal received
        received = 0
        done.clear()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        chunk = b"x" * (1 << 20)
        t0 = time.perf_counter()
        for _ in range(total // len(chunk)):
            writer.write(chunk)
            await writer.drain()
        writer.write_eof()
        await asyncio.wait_for(done.wait(), 120)
        elapsed = time.perf_counter() - t0
        if received != total:
            raise RuntimeError(f"the sink got {received} of {total} bytes")
        await asyncio.wait_for(reader.read(), 20)  # the far end closes once the sink has closed
        writer.close()
        await writer.wait_closed()
        return total / elapsed / 1e6

    try:
        tcp = await push(sink_port)
        with tempfile.TemporaryDirectory() as tmp:
            factory = NodeFactory(Path(tmp))
            try:
                a = factory.start("a")
                b = factory.start("b", join=(a.invite_token,))
                await asyncio.to_thread(wait_until, lambda: a.peer_ids() == {b.node_id}, 20)
                b.directory.tell("router", LocalServing(model="bulk", port=sink_port, kind="rpc-server"))
                # A tell: the transport answers the election, and logs the listener's port.
                a.directory.tell(
                    "transport", EnsureRpcListeners(model="bulk", workers=(Seed(b.node_id, b.addrs),))
                )
                listening = await asyncio.to_thread(
                    factory.logs["a"].wait_for, "rpc.listening", 20, model="bulk", worker=b.node_id
                )
                quic = await push(int(listening["port"]))
                a.directory.tell("transport", EnsureRpcListeners(model="bulk", workers=()))
                await asyncio.to_thread(factory.logs["a"].wait_for, "rpc.closed", 20, model="bulk")
                for node in (a, b):
                    await asyncio.to_thread(
                        wait_until,
                        lambda node=node: node.endpoint.loop_thread.run(_open_handlers(), 5) == 0,
                        20,
                        what="the tunnel's connection handlers to return",
                    )
            finally:
                factory.close()
    finally:
        server.close()
        await server.wait_closed()
        if sinks:
            await asyncio.wait(sinks, timeout=20)
    return tcp, quic


def main() -> None:
    exit_cleanly_on_sigterm()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--bulk-mb", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tokens_figures(Path(tmp), args.rounds, args.tokens)
    tcp, quic = asyncio.run(_throughput(args.bulk_mb * 1024 * 1024))
    print(f"== bulk throughput ({args.bulk_mb} MB, in-process nodes) ==")
    print(f"loopback TCP {tcp:8.1f} MB/s   RPC tunnel (mesh) {quic:8.1f} MB/s   ratio {quic / tcp:.3f}")


if __name__ == "__main__":
    main()
