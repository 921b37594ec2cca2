"""An actor that dies of an error takes its state with it: the node stops itself and `meshllm run`
exits 70 (EX_SOFTWARE), so a service manager starts it afresh and it rebuilds its state from the mesh,
instead of limping on with a router or registry that no longer answers."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.support import REPO, iter_json, write_config

CRASH_AFTER_START = textwrap.dedent(
    """
    import sys
    from actors.router import Router
    from meshllm.node import Node
    from meshllm.wire.codec import encode
    from meshllm.wire.messages import Tick

    CRASH = encode(Tick("crash-for-test"))
    receive = Router.on_receive

    def on_receive(self, message):
        if message == CRASH:
            raise RuntimeError("state corrupted")  # outside any handler: the actor dies
        return receive(self, message)

    Router.on_receive = on_receive
    start = Node.start

    def start_then_crash(self):
        node = start(self)
        node.directory.tell("router", Tick("crash-for-test"))
        return node

    Node.start = start_then_crash
    from meshllm.cli import main

    sys.argv = ["meshllm", "run", "--config", sys.argv[1]]
    main()
    """
)


def test_a_crashed_actor_stops_the_node_with_exit_70(tmp_path: Path) -> None:
    config = write_config(tmp_path, "n")
    done = subprocess.run(
        [sys.executable, "-c", CRASH_AFTER_START, str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 70, done.stderr[-2000:]
    assert "meshllm: stopped: actor router crashed: RuntimeError: state corrupted" in done.stderr
    events = [r.get("event") for r in iter_json(done.stderr)]
    assert "actor.crashed" in events and "node.fatal" in events and "node.stopped" in events
