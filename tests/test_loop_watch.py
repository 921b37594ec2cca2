"""LoopWatch on a real event loop: a loop held up past the allowance reports the time it lost."""

from __future__ import annotations

import asyncio
import time

from meshllm.net.loop_watch import LoopWatch
from tests.support import NodeFactory, wait_until

STALL_S = 0.6


def hold_the_loop(seconds: float) -> None:
    """Keep the loop's thread busy, as a burst of work or a starved process does."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_a_loop_held_up_reports_the_time_beyond_the_allowance() -> None:
    async def main() -> list[float]:
        lost: list[float] = []
        reported = asyncio.Event()

        def on_pulse(seconds: float) -> None:
            if seconds > 0:
                lost.append(seconds)
                reported.set()

        watch = LoopWatch(asyncio.get_running_loop(), on_pulse, check_s=0.05, allowed_late_s=0.1, pulse_s=60)
        watch.start()
        hold_the_loop(STALL_S)  # the first check was due 0.05 s in
        await asyncio.wait_for(reported.wait(), 5)
        watch.close()
        return lost

    [lost] = asyncio.run(main())
    # Due at 0.05 s, run at 0.6 s or later: at least 0.55 s late, 0.1 s of it allowed.
    assert STALL_S - 0.05 - 0.1 - 0.01 <= lost < 5


def test_a_loop_on_time_pulses_with_nothing_lost_and_close_stops_it() -> None:
    async def main() -> tuple[list[float], bool]:
        lost: list[float] = []
        watch = LoopWatch(
            asyncio.get_running_loop(), lost.append, check_s=0.02, allowed_late_s=1.0, pulse_s=0.05
        )
        watch.start()
        await asyncio.to_thread(wait_until, lambda: len(lost) >= 3, 10, what="three pulses")
        pending = watch._handle
        watch.close()
        return lost, pending is not None and pending.cancelled()

    lost, next_check_cancelled = asyncio.run(main())
    assert set(lost) == {0.0} and next_check_cancelled


def test_a_member_whose_transport_loop_stalls_declares_no_peer_dead(nodes: NodeFactory) -> None:
    a = nodes.start("a")
    b = nodes.start("b", join=(a.invite_token,))
    wait_until(lambda: a.peer_ids() == {b.node_id}, 10, what="b to join")
    assert a.endpoint is not None
    a.endpoint.loop.call_soon_threadsafe(hold_the_loop, 4.0)  # past dead_after_s (3.5 s)
    logged = nodes.logs["a"].wait_for("heartbeat.stalled", timeout=10, where="transport")
    assert logged["stalled_s"] >= 3.0
    wait_until(lambda: b.node_id in a.peer_ids(), 5, what="b still a peer of a")
    assert not nodes.logs["a"].find("peer.died"), [
        {k: r.get(k) for k in ("event", "reason", "_t", "stalled_s", "where")}
        for r in nodes.logs["a"].records
        if r.get("event") in ("peer.died", "heartbeat.stalled", "peer.death_disputed", "connection.lost")
    ]
