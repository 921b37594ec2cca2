"""Node processes in network namespaces joined by a bridge, with links that tests can cut and heal.

Each lab takes its own /24 from the benchmarking range 198.18.0.0/15 (test traffic never leaves the
machine): the bridge in the root namespace is ``.1`` (so the test process reaches every node's API
and console), node ``i`` is ``.(10 + i)`` in a namespace of its own, on a veth pair whose other end is
on the bridge. Faults are iptables rules inside the node namespaces and only ever name the lab's own
node addresses, never the bridge's: the test keeps watching while the nodes cannot see each other.

- :meth:`NetLab.partition` drops every packet between two groups, both ways;
- :meth:`NetLab.drop_from` drops what one node receives from another (one way);
- :meth:`NetLab.loss` drops a random share of what a node receives from the other nodes;
- :meth:`NetLab.delay` holds what a node receives from the other nodes for a fixed time;
- :meth:`NetLab.heal` removes every rule and delay.

Needs root, ``ip`` (iproute2) and ``iptables`` (the test command installs it). The kernel here has
no ``sch_netem`` (so no ``tc netem``): delay is an iptables NFQUEUE rule in the node's namespace and
a small process there that accepts each queued packet after the delay (tests/netdelay.py). Loss
rules are in the ``filter`` table and delay rules in ``mangle``, which the kernel runs first, so the
two combine in either order. Everything a lab made is removed by :meth:`NetLab.close`, processes
first (by process group), also when the test fails.
"""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support import REPO, NodeProcess

DELAY_QUEUE = 50  # the NFQUEUE number delay uses in each node namespace (each namespace has its own)


def available() -> str | None:
    """Why labs cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"no {tool} (the test command installs iptables with apt)"
    return None


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {done.returncode}: {done.stderr.strip()}")
    return done


@dataclass
class Host:
    """One node's namespace and address."""

    name: str
    netns: str
    ip: str

    def exec(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", self.netns, *cmd, check=check)


class NamespacedNodeProcess(NodeProcess):
    """``meshllm run`` inside a host's namespace (``ip netns exec`` execs it: the PID is the node's)."""

    def __init__(self, host: Host, config: Path, log: Path, env: dict[str, str] | None = None) -> None:
        super().__init__(config, log, env)
        self.host = host
        self.command_prefix = ("ip", "netns", "exec", host.netns)


class NetLab:
    """Namespaces on one bridge; see the module docstring."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.tag = f"ml{os.getpid() % 100000:05d}{random.randrange(100):02d}"[:9]
        self.subnet = self._free_subnet()
        self.bridge = f"{self.tag}br"
        self.hosts: dict[str, Host] = {}
        self.procs: list[NamespacedNodeProcess] = []
        self.delayers: dict[str, subprocess.Popen[str]] = {}
        self.delay_counts: dict[str, dict[str, int]] = {}  # per node, from its last delayer (see heal)
        run("ip", "link", "add", self.bridge, "type", "bridge")
        run("ip", "addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        run("ip", "link", "set", self.bridge, "up")

    @staticmethod
    def _free_subnet() -> str:
        """A 198.18.x.0/24 that no interface here uses (labs of parallel runs must not share one)."""
        used = run("ip", "-4", "-o", "addr", "show").stdout
        free = [x for x in range(1, 255) if f" 198.18.{x}." not in used]
        return f"198.18.{random.choice(free)}"

    def host(self, name: str) -> Host:
        """A namespace for node ``name`` with its address on the bridge."""
        i = len(self.hosts)
        host = Host(name=name, netns=f"{self.tag}-{name}", ip=f"{self.subnet}.{10 + i}")
        outer, inner = f"{self.tag}h{i}", f"{self.tag}n{i}"
        run("ip", "netns", "add", host.netns)
        run("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
        run("ip", "link", "set", inner, "netns", host.netns)
        run("ip", "link", "set", outer, "master", self.bridge)
        run("ip", "link", "set", outer, "up")
        host.exec("ip", "addr", "add", f"{host.ip}/24", "dev", inner)
        host.exec("ip", "link", "set", inner, "up")
        host.exec("ip", "link", "set", "lo", "up")
        self.hosts[name] = host
        return host

    def start(
        self, name: str, join: tuple[str, ...] = (), extra: str = "", node_extra: str = ""
    ) -> NamespacedNodeProcess:
        """A node process in its own namespace (made on first use), listening on its lab address (the
        API and console open without keys: only this machine reaches the lab's addresses)."""
        host = self.hosts.get(name) or self.host(name)
        config = self.tmp / f"{name}.toml"
        if not config.exists():
            config.write_text(
                f"""
[node]
name = "{name}"
data_dir = "{self.tmp / name}"
quic_listen = "{host.ip}:0"
join = [{", ".join(json.dumps(t) for t in join)}]
{node_extra}

[api]
listen = "{host.ip}:0"
open = true

[console]
listen = "{host.ip}:0"
open = true
{extra}
"""
            )
        runs = sum(1 for p in self.procs if p.config == config)
        proc = NamespacedNodeProcess(host, config, self.tmp / f"{name}.{runs}.log").start()
        self.procs.append(proc)
        return proc

    # -- faults ------------------------------------------------------------------------------------------

    def drop_from(self, receiver: str, sender: str) -> None:
        """``receiver`` no longer gets anything ``sender`` sends (the other way still works)."""
        self.hosts[receiver].exec("iptables", "-A", "INPUT", "-s", self.hosts[sender].ip, "-j", "DROP")

    def partition(self, left: tuple[str, ...], right: tuple[str, ...]) -> None:
        """No packet between the two groups, either way."""
        for a in left:
            for b in right:
                self.drop_from(a, b)
                self.drop_from(b, a)

    def loss(self, name: str, probability: float) -> None:
        """``name`` drops this share of the packets the other nodes send it (not the test's own)."""
        host = self.hosts[name]
        for other in self.hosts.values():
            if other is not host:
                host.exec(
                    "iptables", "-A", "INPUT", "-s", other.ip, "-m", "statistic", "--mode", "random",
                    "--probability", f"{probability}", "-j", "DROP",
                )  # fmt: skip

    def delay(self, name: str, ms: float) -> None:
        """What the other nodes send ``name`` arrives ``ms`` later (one direction of each of its links;
        delay every node for a link delayed both ways). Packets from the bridge (the test) are not
        delayed. Calling it again for the same node replaces the delay."""
        host = self.hosts[name]
        self._undelay(name)
        proc = subprocess.Popen(
            ["ip", "netns", "exec", host.netns, sys.executable, "-m", "tests.netdelay",
             "--queue", str(DELAY_QUEUE), "--ms", f"{ms}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            cwd=REPO, text=True, start_new_session=True,
        )  # fmt: skip
        self.delayers[name] = proc
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        while True:  # wait for "ready" (bound to the queue) before any rule sends packets there
            left = deadline - time.monotonic()
            if left <= 0 or proc.poll() is not None:
                self._undelay(name)
                raise RuntimeError(f"delayer in {host.netns} did not start: exit {proc.returncode}")
            readable, _, _ = select.select([proc.stdout], [], [], left)
            if readable:
                line = proc.stdout.readline()
                if line.strip() == "ready":
                    break
                if not line:
                    continue  # EOF: the next turn sees the exit
        for other in self.hosts.values():
            if other is not host:
                host.exec(
                    "iptables", "-t", "mangle", "-A", "INPUT", "-s", other.ip,
                    "-j", "NFQUEUE", "--queue-num", str(DELAY_QUEUE),
                )  # fmt: skip

    def _undelay(self, name: str) -> None:
        """Remove ``name``'s delay rules, then stop its delayer (it lets what it holds through first)."""
        self.hosts[name].exec("iptables", "-t", "mangle", "-F", "INPUT")
        proc = self.delayers.pop(name, None)
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate(timeout=10)
        for line in out.splitlines():
            if line.startswith("{"):
                self.delay_counts[name] = json.loads(line)

    def heal(self) -> None:
        """Remove every fault: loss and cut rules, and delays (``delay_counts`` then has each delayed
        node's counts: packets delayed, most held at once, any the kernel dropped)."""
        for name, host in self.hosts.items():
            host.exec("iptables", "-F", "INPUT")
            if name in self.delayers:
                self._undelay(name)

    # -- teardown ----------------------------------------------------------------------------------------

    def close(self) -> None:
        for proc in self.procs:
            try:
                proc.kill9()
            except Exception:
                pass
        for delayer in self.delayers.values():
            if delayer.poll() is None:
                os.killpg(delayer.pid, signal.SIGKILL)
            delayer.communicate(timeout=10)
        self.delayers.clear()
        for i, host in enumerate(self.hosts.values()):
            run("ip", "netns", "del", host.netns, check=False)
            run("ip", "link", "del", f"{self.tag}h{i}", check=False)
        run("ip", "link", "del", self.bridge, check=False)
