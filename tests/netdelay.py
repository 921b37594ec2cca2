"""Delay every packet of one netfilter queue by a fixed time: ``tc netem`` without netem.

The kernel on these machines has no ``sch_netem`` (nor ``sch_fq``, whose EDT timestamps could stand in
for it), but it has NFQUEUE: an iptables rule ``-j NFQUEUE --queue-num N`` hands each matching packet to
the process bound to queue ``N`` of that network namespace, and the packet waits in the kernel until the
process gives a verdict. This module is that process, speaking nfnetlink directly through a raw netlink
socket (no compiled dependency, nothing to install): it asks for packet metadata only (no payload is
copied), notes when each packet arrived, and accepts packets ``delay_ms`` later. A constant delay keeps
the queue in order, so one batch verdict ("accept every id up to this one") releases everything due.

Run inside a namespace (tests/netns.py's :meth:`NetLab.delay` does)::

    ip netns exec NS python -m tests.netdelay --queue 50 --ms 50

It prints ``ready`` once bound, then runs until SIGTERM/SIGINT, when it accepts what it still holds
(no packet is lost by stopping it) and prints one JSON line of counts.
"""

from __future__ import annotations

import argparse
import collections
import errno
import json
import select
import signal
import socket
import struct
import sys
import time
from types import FrameType

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
SO_RCVBUFFORCE = 33

NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4

NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_CONFIG = 2
NFQNL_MSG_VERDICT_BATCH = 3

NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2

NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQA_CFG_F_GSO = 1 << 2  # hand GSO packets over whole: we never look inside, so no need to segment

NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NF_ACCEPT = 1

QUEUE_MAXLEN = 65536  # packets held at once; beyond it the kernel drops (counted in /proc, see stats)


def _attr(kind: int, payload: bytes) -> bytes:
    """One netlink attribute (native-endian header, payload padded to 4 bytes)."""
    head = struct.pack("=HH", 4 + len(payload), kind)
    return head + payload + b"\0" * (-len(payload) % 4)


def _message(kind: int, queue: int, attrs: bytes, flags: int = NLM_F_REQUEST, seq: int = 0) -> bytes:
    """An nfnetlink queue message: nlmsghdr, nfgenmsg (family unspec, v0, queue number), attributes."""
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + attrs
    msg_type = (NFNL_SUBSYS_QUEUE << 8) | kind
    return struct.pack("=IHHII", 16 + len(body), msg_type, flags, seq, 0) + body


def _messages(data: bytes) -> list[tuple[int, bytes]]:
    """(type, payload after nlmsghdr) of each netlink message in one datagram."""
    out = []
    at = 0
    while at + 16 <= len(data):
        length, msg_type, _flags, _seq, _pid = struct.unpack_from("=IHHII", data, at)
        if length < 16:
            break
        out.append((msg_type, data[at + 16 : at + length]))
        at += (length + 3) & ~3
    return out


def _attrs(payload: bytes) -> dict[int, bytes]:
    """The attributes after an nfgenmsg header, by type."""
    out = {}
    at = 4
    while at + 4 <= len(payload):
        length, kind = struct.unpack_from("=HH", payload, at)
        if length < 4:
            break
        out[kind & 0x7FFF] = payload[at + 4 : at + length]
        at += (length + 3) & ~3
    return out


class Delayer:
    """Bound to one queue of the current namespace; :meth:`run` holds each packet ``delay_s``."""

    def __init__(self, queue: int, delay_s: float) -> None:
        self.queue = queue
        self.delay_s = delay_s
        self.pending: collections.deque[tuple[float, int]] = collections.deque()  # (due, packet id)
        self.packets = 0
        self.most_held = 0
        self.stopping = False
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
        self.sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
        self.sock.bind((0, 0))
        self._configure(_attr(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_BIND, 0, socket.AF_INET)))
        self._configure(_attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META)))
        self._configure(_attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", QUEUE_MAXLEN)))
        self._configure(
            _attr(NFQA_CFG_MASK, struct.pack("!I", NFQA_CFG_F_GSO)) + _attr(NFQA_CFG_FLAGS, struct.pack("!I", NFQA_CFG_F_GSO))
        )
        self.sock.setblocking(False)

    def _configure(self, attrs: bytes) -> None:
        """Send one config message and wait for the kernel's acknowledgement (raises on an error)."""
        self.sock.sendall(_message(NFQNL_MSG_CONFIG, self.queue, attrs, NLM_F_REQUEST | NLM_F_ACK))
        while True:
            for msg_type, payload in _messages(self.sock.recv(65536)):
                if msg_type == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", payload)
                    if code:
                        raise OSError(-code, f"nfqueue config on queue {self.queue}: {errno.errorcode.get(-code)}")
                    return

    def _accept_up_to(self, packet_id: int) -> None:
        """Accept every packet of the queue whose id is at most ``packet_id`` (ids grow in arrival order)."""
        verdict = _attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, packet_id))
        self.sock.sendall(_message(NFQNL_MSG_VERDICT_BATCH, self.queue, verdict))

    def _read(self) -> None:
        """Take every packet the kernel has for us now, each due ``delay_s`` from now."""
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            now = time.monotonic()
            for msg_type, payload in _messages(data):
                if msg_type != (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                    continue
                header = _attrs(payload).get(NFQA_PACKET_HDR)
                if header is None:
                    continue
                (packet_id,) = struct.unpack_from("!I", header)
                self.pending.append((now + self.delay_s, packet_id))
                self.packets += 1
            self.most_held = max(self.most_held, len(self.pending))

    def _release(self, now: float) -> None:
        last = None
        while self.pending and self.pending[0][0] <= now:
            last = self.pending.popleft()[1]
        if last is not None:
            self._accept_up_to(last)

    def stop(self, _signum: int = 0, _frame: FrameType | None = None) -> None:
        self.stopping = True

    def run(self) -> None:
        while not self.stopping:
            timeout = max(0.0, self.pending[0][0] - time.monotonic()) if self.pending else 0.5
            try:
                ready, _, _ = select.select([self.sock], [], [], timeout)
            except InterruptedError:
                continue
            if ready:
                self._read()
            self._release(time.monotonic())
        self._read()
        self._release(float("inf"))  # stopping: let everything we hold through


def queue_counts(queue: int) -> dict[str, int]:
    """The kernel's counts for ``queue`` in this namespace (dropped: queue full; user_dropped: our
    socket's buffer was full), or {} when it is not bound."""
    try:
        with open("/proc/net/netfilter/nfnetlink_queue") as counts:
            lines = counts.read().splitlines()
    except OSError:
        return {}
    for line in lines:
        f = line.split()
        if f and int(f[0]) == queue:
            return {"held": int(f[2]), "dropped": int(f[5]), "user_dropped": int(f[6])}
    return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queue", type=int, required=True)
    parser.add_argument("--ms", type=float, required=True)
    args = parser.parse_args()
    delayer = Delayer(args.queue, args.ms / 1000)
    signal.signal(signal.SIGTERM, delayer.stop)
    signal.signal(signal.SIGINT, delayer.stop)
    print("ready", flush=True)
    delayer.run()
    counts = queue_counts(args.queue)
    print(json.dumps({"packets": delayer.packets, "most_held": delayer.most_held, **counts}), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
