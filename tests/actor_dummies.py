"""Dummy neighbours for testing one actor at a time, the way Mopidy tests its actors.

The actor under test is started with its real constructor in a :class:`Harness`'s Directory; each of
its neighbours ("transport", "registry", "supervisor", ...) is a :class:`Dummy` actor registered under
that name, which records every message it is told in an :class:`Inbox` (and can react to some, the
way a fake transport answers a probe). Tests tell the actor msgpack messages, ask it questions, and
assert on what its neighbours received.

No bare sleeps: a test waits for a message with a deadline (:meth:`Inbox.wait_for`), or makes sure
everything already said has been handled with :meth:`Harness.settle` (an ask through the actor under
test, then through each dummy: inboxes are FIFO, so once those asks return, every message the actor
told while handling earlier messages sits in a dummy's record). Time that an actor measures can be
moved by hand with :class:`FakeClock`.
"""

from __future__ import annotations

import io
import json
import threading
import time
import types
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import pytest

from actors.base import Directory, MsgpackActor
from meshllm.logsetup import Logger, make_logger
from meshllm.wire.codec import CodecError, Message, decode, encode
from meshllm.wire.messages import Tick

WAIT = 5.0
"""Deadline for anything that should happen "soon"."""

M = TypeVar("M", bound=Message)
T = TypeVar("T")

Reaction = Callable[[Message], Message | None]
"""What a dummy does with one message type: return the reply to an ask (or None), and/or tell others."""

BARRIER = Tick("actor_dummies.barrier")
"""What :meth:`Harness.settle` asks a dummy; never recorded."""


def wait_until(predicate: Callable[[], T], timeout: float = WAIT, what: str = "condition") -> T:
    """Poll ``predicate`` until it is truthy (and return it); fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


class Inbox:
    """Every message one dummy was told, in order, shared with the test thread."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._items: list[Message] = []
        self._cond = threading.Condition()

    def add(self, msg: Message) -> None:
        with self._cond:
            self._items.append(msg)
            self._cond.notify_all()

    def mark(self) -> int:
        """A position in the record: pass it as ``since`` to look only at what came after."""
        with self._cond:
            return len(self._items)

    def messages(
        self, kind: type[M] | None = None, where: Callable[[M], bool] | None = None, since: int = 0
    ) -> list[M]:
        """The recorded messages of ``kind`` (all when None) matching ``where``, from ``since`` on."""
        with self._cond:
            items = self._items[since:]
        return [
            m  # type: ignore[misc]
            for m in items
            if (kind is None or isinstance(m, kind)) and (where is None or where(m))  # type: ignore[arg-type]
        ]

    def count(self, kind: type[M], where: Callable[[M], bool] | None = None, since: int = 0) -> int:
        return len(self.messages(kind, where, since))

    def last(self, kind: type[M], where: Callable[[M], bool] | None = None) -> M:
        found = self.messages(kind, where)
        assert found, f"{self.name} got no {kind.__name__}: {self.messages()}"
        return found[-1]

    def wait_for(
        self,
        kind: type[M],
        where: Callable[[M], bool] | None = None,
        n: int = 1,
        since: int = 0,
        timeout: float = WAIT,
    ) -> M:
        """The ``n``-th ``kind`` message (1-based) matching ``where`` from ``since`` on, waiting up to
        ``timeout`` seconds for it to arrive."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = self.messages(kind, where, since)
                if len(found) >= n:
                    return found[n - 1]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"{self.name}: no {kind.__name__} #{n} within {timeout}s; got {self._items[since:]}"
                    )
                self._cond.wait(left)


class Dummy(MsgpackActor):
    """A neighbour that records whatever it is told, under any name, and reacts as the test says."""

    def __init__(
        self,
        directory: Directory,
        logger: Logger,
        name: str,
        inbox: Inbox,
        reactions: Mapping[type[Message], Reaction] | None = None,
    ) -> None:
        self.name = name  # type: ignore[misc]  # the base registers the actor under self.name
        super().__init__(directory, logger)
        self.inbox = inbox
        self.reactions = dict(reactions or {})

    def on_receive(self, message: Any) -> Any:
        if not isinstance(message, bytes):
            raise AssertionError(f"{self.name} was sent {type(message).__name__}, not msgpack bytes")
        try:
            msg = decode(message)
        except CodecError as exc:
            raise AssertionError(f"{self.name} was sent an undecodable message: {exc}") from None
        if msg == BARRIER:
            return None
        self.inbox.add(msg)
        react = self.reactions.get(type(msg))
        reply = react(msg) if react is not None else None
        return encode(reply) if reply is not None else None

    def on_failure(self, exception_type: Any, exception_value: Any, traceback: Any) -> None:
        super().on_failure(exception_type, exception_value, traceback)
        self.log.error("dummy.failed", error=str(exception_value))


class LogCapture(io.StringIO):
    """The JSON log lines every actor in a harness writes."""

    def events(self, event: str | None = None, **fields: Any) -> list[dict[str, Any]]:
        records = [json.loads(line) for line in self.getvalue().splitlines() if line.strip()]
        return [
            r
            for r in records
            if (event is None or r.get("event") == event) and all(r.get(k) == v for k, v in fields.items())
        ]


class Harness:
    """A Directory, a log, and dummy neighbours around one actor under test."""

    def __init__(self) -> None:
        self.directory = Directory()
        self.log = LogCapture()
        self.logger = make_logger("test", stream=self.log)
        self.inboxes: dict[str, Inbox] = {}

    def dummy(self, name: str, reactions: Mapping[type[Message], Reaction] | None = None) -> Inbox:
        """Start a dummy under ``name``; its record of messages is returned."""
        inbox = Inbox(name)
        Dummy.start(self.directory, self.logger, name, inbox, reactions)
        self.inboxes[name] = inbox
        return inbox

    def tell(self, name: str, msg: Message) -> None:
        assert self.directory.tell(name, msg), f"nobody is called {name!r}"

    def ask(self, name: str, msg: Message, reply_type: type[M]) -> M:
        return self.directory.ask(name, msg, reply_type, timeout=WAIT)

    def sync(self, name: str, msg: Message) -> Message | None:
        """Ask ``name`` to handle ``msg`` and wait until it has (whatever it answers, if anything):
        every message told to ``name`` before has been handled by then."""
        ref = self.directory.ref(name)
        assert ref is not None, f"nobody is called {name!r}"
        raw = ref.ask(encode(msg), timeout=WAIT)
        return decode(raw) if isinstance(raw, bytes) else None

    def settle(self, actor: str, barrier: Message) -> None:
        """Make sure everything ``actor`` was told has been handled, and everything it told the
        dummies while doing so is in their records. ``barrier`` is a message ``actor`` handles without
        side effects (a query, or news about a node it does not know)."""
        self.sync(actor, barrier)
        for name in self.inboxes:
            self.sync(name, BARRIER)

    def close(self) -> None:
        self.directory.stop_all(timeout=WAIT)
        # A handler that raised, or a message nobody handles, would otherwise pass unnoticed.
        events = ("actor.handler_failed", "actor.unhandled", "actor.bad_message", "dummy.failed")
        failures = [e for name in events for e in self.log.events(name)]
        assert not failures, f"an actor failed or dropped a message: {failures}"


class FakeClock:
    """A monotonic clock the test moves; stands in for an actor module's ``time``."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def monotonic(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> float:
        with self._lock:
            self._now += seconds
            return self._now

    def install(self, monkeypatch: pytest.MonkeyPatch, module: types.ModuleType) -> FakeClock:
        """Make ``module`` (an actor module that does ``import time``) read this clock; everything
        else in ``time`` stays real."""
        fake = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("__")})
        fake.monotonic = self.monotonic
        monkeypatch.setattr(module, "time", fake)
        return self
