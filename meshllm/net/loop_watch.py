"""How late an event loop runs its timers: the time a starved or overloaded node could not listen.

A node whose transport loop falls seconds behind (its process short of CPU, its threads of the GIL, a
burst of handshakes) sends its probes late and reads their answers late. Its peers were not silent:
it was deaf. The heartbeat counts only the silence this node could have heard. So the loop sends it
a pulse (:class:`~meshllm.wire.messages.LoopPulse`) every second while it runs on time, and at once
after it ran late, with the time it lost: pulses that stop mean the loop is stalled right now.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

CHECK_S = 0.25
"""How often the loop's lateness is measured."""
ALLOWED_LATE_S = 0.25
"""A timer this late is a busy loop, not a stalled one: only the time beyond it is lost."""
PULSE_S = 1.0
"""A loop on time says so this often."""


class LoopWatch:
    """Schedules itself every ``check_s`` on a loop. It calls ``on_pulse(lost_s)`` after a check
    that ran more than ``allowed_late_s`` late (``lost_s`` is the time beyond that allowance), and
    with 0.0 every ``pulse_s`` when the loop runs on time."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_pulse: Callable[[float], None],
        check_s: float = CHECK_S,
        allowed_late_s: float = ALLOWED_LATE_S,
        pulse_s: float = PULSE_S,
    ) -> None:
        self.loop = loop
        self.on_pulse = on_pulse
        self.check_s = check_s
        self.allowed_late_s = allowed_late_s
        self.pulse_s = pulse_s
        self._handle: asyncio.TimerHandle | None = None
        self._last_pulse = 0.0

    def start(self) -> None:
        """Start watching (call on the loop's thread)."""
        self._last_pulse = self.loop.time()
        self.on_pulse(0.0)
        self._schedule(self._last_pulse + self.check_s)

    def _schedule(self, due: float) -> None:
        self._handle = self.loop.call_at(due, self._check, due)

    def _check(self, due: float) -> None:
        now = self.loop.time()
        lost = max(0.0, now - due - self.allowed_late_s)
        if lost > 0 or now - self._last_pulse >= self.pulse_s:
            self._last_pulse = now
            self.on_pulse(lost)
        self._schedule(now + self.check_s)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
