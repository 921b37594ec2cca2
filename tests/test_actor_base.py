"""Tests for actors.base: the msgpack-only actor, its dispatch, its timers and the Directory."""

from __future__ import annotations

import asyncio
import io
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pykka
import pytest

from actors.base import AskError, Directory, MsgpackActor, handles
from meshllm.logsetup import make_logger
from meshllm.wire.codec import decode, encode
from meshllm.wire.messages import (
    Ack,
    GetStatus,
    PeerDown,
    PeerStatus,
    Refused,
    StatusReply,
    Subscribe,
    Tick,
)

WAIT = 5.0  # deadline for anything that should happen "soon"; never a sleep


@dataclass
class Record:
    """What the test actor saw, shared with the test thread."""

    ticks: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    tick_seen: threading.Event = field(default_factory=threading.Event)
    beats: int = 0
    beats_done: threading.Event = field(default_factory=threading.Event)


class Recorder(MsgpackActor):
    name = "recorder"

    def __init__(self, directory: Directory, logger: Any, record: Record) -> None:
        super().__init__(directory, logger)
        self.record = record

    @handles(Tick)
    def on_tick(self, msg: Tick) -> None:
        with self.record.lock:
            self.record.ticks.append(msg.name)
            if msg.name == "beat":
                self.record.beats += 1
                if self.record.beats >= 3:
                    self.record.beats_done.set()
        self.record.tick_seen.set()

    @handles(GetStatus)
    def on_status(self, msg: GetStatus) -> StatusReply:
        with self.record.lock:
            seen = tuple(self.record.ticks)
        peers = (PeerStatus("p", "peer", "active", 1, (), (), 0.5),)
        return StatusReply(node_id="me", name="recorder", role="active", vram_bytes=len(seen), peers=peers)

    @handles(PeerDown)
    def on_peer_down(self, msg: PeerDown) -> None:
        raise RuntimeError(f"boom {msg.node_id}")

    @handles(Subscribe)
    def on_subscribe(self, msg: Subscribe) -> Ack:
        # Start a timer on request, so each test decides whether one runs.
        self.every(0.01, msg.subscriber, first_after=0.0)
        return Ack()


class Log(io.StringIO):
    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.getvalue().splitlines() if line.strip()]

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events() if e.get("event") == event]


@pytest.fixture
def log() -> Log:
    return Log()


@pytest.fixture
def directory() -> Iterator[Directory]:
    d = Directory()
    try:
        yield d
    finally:
        d.stop_all(timeout=WAIT)


@pytest.fixture
def record() -> Record:
    return Record()


@pytest.fixture
def actor(directory: Directory, log: Log, record: Record) -> pykka.ActorRef[Any]:
    return Recorder.start(directory, make_logger("test", stream=log), record)  # registers itself


def status(directory: Directory) -> StatusReply:
    return directory.ask("recorder", GetStatus(), StatusReply, timeout=WAIT)


def raw_ask(ref: pykka.ActorRef[Any], payload: Any) -> Any:
    reply = ref.ask(payload, timeout=WAIT)
    return decode(reply) if isinstance(reply, bytes) else reply


# -- delivery -------------------------------------------------------------------------------------------------


def test_tell_delivers(directory: Directory, actor: pykka.ActorRef[Any], record: Record) -> None:
    assert directory.tell("recorder", Tick("hello")) is True
    assert record.tick_seen.wait(WAIT)
    assert record.ticks == ["hello"]


def test_ask_decodes_the_reply(directory: Directory, actor: pykka.ActorRef[Any]) -> None:
    directory.tell("recorder", Tick("a"))
    directory.tell("recorder", Tick("b"))
    reply = status(directory)  # the inbox is ordered: both ticks were handled first
    assert reply.vram_bytes == 2
    assert reply.peers == (PeerStatus("p", "peer", "active", 1, (), (), 0.5),)


def test_raw_reply_is_msgpack_bytes(actor: pykka.ActorRef[Any]) -> None:
    reply = actor.ask(encode(GetStatus()), timeout=WAIT)
    assert isinstance(reply, bytes)
    assert isinstance(decode(reply), StatusReply)
    # A handler that returns nothing replies None.
    assert actor.ask(encode(Tick("x")), timeout=WAIT) is None


def test_ask_async(directory: Directory, actor: pykka.ActorRef[Any]) -> None:
    async def go() -> list[Any]:
        return list(
            await asyncio.gather(
                *(directory.ask_async("recorder", GetStatus(), StatusReply, WAIT) for _ in range(3))
            )
        )

    replies = asyncio.run(go())
    assert len(replies) == 3 and all(isinstance(r, StatusReply) for r in replies)


def test_ask_with_no_reply_is_an_ask_error(directory: Directory, actor: pykka.ActorRef[Any]) -> None:
    with pytest.raises(AskError, match="no reply to Tick"):
        directory.ask("recorder", Tick("x"), Ack, timeout=WAIT)


def test_ask_for_another_reply_type_is_an_ask_error(directory: Directory, actor: pykka.ActorRef[Any]) -> None:
    with pytest.raises(AskError, match="answered GetStatus with StatusReply, not Ack"):
        directory.ask("recorder", GetStatus(), Ack, timeout=WAIT)


def test_actor_is_in_the_directory_before_its_thread_runs(directory: Directory, log: Log) -> None:
    class Early(MsgpackActor):
        """Tells itself from on_start: lost if its name were registered only after start()."""

        name = "early"
        seen = threading.Event()

        def on_start(self) -> None:
            self.tell("early", Tick("self"))

        @handles(Tick)
        def on_tick(self, msg: Tick) -> None:
            Early.seen.set()

    Early.start(directory, make_logger("t", stream=log))
    assert Early.seen.wait(WAIT)


def test_unknown_names(directory: Directory) -> None:
    assert directory.tell("nobody", Tick("x")) is False
    with pytest.raises(AskError, match="nobody"):
        directory.ask("nobody", GetStatus(), StatusReply)
    with pytest.raises(AskError):
        asyncio.run(directory.ask_async("nobody", GetStatus(), StatusReply))
    assert directory.ref("nobody") is None


def test_directory_register_and_unregister(directory: Directory, actor: pykka.ActorRef[Any]) -> None:
    assert directory.names() == ["recorder"]
    assert directory.ref("recorder") is actor
    directory.unregister("recorder")
    assert directory.tell("recorder", Tick("x")) is False
    directory.unregister("recorder")  # twice is fine
    actor.stop()


def test_tell_to_a_stopped_actor_is_false(directory: Directory, actor: pykka.ActorRef[Any]) -> None:
    actor.stop(timeout=WAIT)
    assert directory.tell("recorder", Tick("x")) is False


def test_a_dropped_tell_is_reported_once_per_actor_and_type_and_not_in_a_shutdown(
    directory: Directory, actor: pykka.ActorRef[Any]
) -> None:
    dropped: list[tuple[str, str]] = []
    directory.on_dropped = lambda name, message: dropped.append((name, message))
    directory.tell("nobody", Tick("x"))
    directory.tell("nobody", Tick("y"))  # the same (actor, type) within the report interval: once
    directory.tell("nobody", GetStatus())
    actor.stop(timeout=WAIT)
    directory.tell("recorder", Tick("x"))
    assert dropped == [("nobody", "Tick"), ("nobody", "GetStatus"), ("recorder", "Tick")]
    directory.stop_all(timeout=WAIT)
    directory.tell("recorder", GetStatus())  # stopping: expected, not a fault
    assert len(dropped) == 3


def test_an_actor_that_dies_of_an_error_is_reported(directory: Directory, log: Log, record: Record) -> None:
    """Handlers' exceptions are caught; an error outside them kills the actor, and the directory hears."""
    failed: list[tuple[str, str]] = []
    done = threading.Event()
    directory.on_actor_failed = lambda name, reason: (failed.append((name, reason)), done.set())

    class Crasher(Recorder):
        def on_receive(self, message: Any) -> Any:
            if message == encode(Tick("crash")):
                raise RuntimeError("state corrupted")  # outside any handler: nothing catches it
            return super().on_receive(message)

    Crasher.start(directory, make_logger("test", stream=log), record)
    directory.tell("recorder", Tick("crash"))
    assert done.wait(WAIT)
    assert failed == [("recorder", "RuntimeError: state corrupted")]
    assert log.named("actor.crashed")[0]["error"] == "RuntimeError: state corrupted"


def test_stop_all_stops_everything(log: Log, record: Record) -> None:
    d = Directory()
    refs = [Recorder.start(d, make_logger("t", stream=log), record) for _ in range(3)]
    for i, ref in enumerate(refs):
        d.register(f"r{i}", ref)
    d.stop_all(timeout=WAIT)
    assert d.names() == []
    assert not any(ref.is_alive() for ref in refs)
    d.stop_all()  # idempotent


# -- bad input never kills the actor ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload", ["a string", {"tag": 1}, 42, None, [116, "x"], bytearray(encode(Tick("x")))]
)
def test_non_bytes_are_logged_and_refused(
    directory: Directory, actor: pykka.ActorRef[Any], log: Log, payload: Any
) -> None:
    reply = raw_ask(actor, payload)
    assert isinstance(reply, Refused) and "bytes" in reply.reason
    actor.tell(payload)  # the fire-and-forget form too
    assert status(directory)  # still alive and handling
    events = log.named("actor.bad_message")
    assert len(events) == 2
    assert (
        events[0]["actor"] == "recorder" and events[0]["node"] == "test" and events[0]["level"] == "warning"
    )


@pytest.mark.parametrize(
    "payload,error",
    [
        (b"", "MalformedMessage"),
        (b"\xc1", "MalformedMessage"),
        (msgpack.packb("not an array"), "MalformedMessage"),
        (msgpack.packb([424242, "x"]), "UnknownTag"),
        (msgpack.packb([Tick.TAG, 5]), "FieldTypeError"),
        (msgpack.packb([Tick.TAG]), "FieldTypeError"),
        (b"\x00" * (2 << 20), "MessageTooLarge"),
    ],
)
def test_undecodable_bytes_are_logged_and_refused(
    directory: Directory, actor: pykka.ActorRef[Any], log: Log, record: Record, payload: bytes, error: str
) -> None:
    reply = raw_ask(actor, payload)
    assert isinstance(reply, Refused) and error in reply.reason
    actor.tell(payload)
    directory.tell("recorder", Tick("after"))
    assert status(directory)
    assert record.ticks == ["after"]
    events = log.named("actor.bad_message")
    assert [e["error"] for e in events] == [error, error]


def test_unhandled_types_are_logged_and_refused(
    directory: Directory, actor: pykka.ActorRef[Any], log: Log, record: Record
) -> None:
    with pytest.raises(AskError, match="does not handle Ack"):
        directory.ask("recorder", Ack(), Ack, timeout=WAIT)
    assert directory.tell("recorder", Refused("nobody handles me")) is True
    directory.tell("recorder", Tick("after"))
    assert status(directory)
    assert record.ticks == ["after"]
    assert [e["message"] for e in log.named("actor.unhandled")] == ["Ack", "Refused"]


def test_raising_handler_is_logged_and_the_actor_survives(
    directory: Directory, actor: pykka.ActorRef[Any], log: Log, record: Record
) -> None:
    reply = directory.ask("recorder", PeerDown("n1", 1, "r"), Refused, timeout=WAIT)
    assert reply.reason == "RuntimeError: boom n1"
    directory.tell("recorder", PeerDown("n2", 1, "r"))  # a tell's failure must not kill it either
    directory.tell("recorder", Tick("after"))
    assert status(directory)
    assert actor.is_alive()
    assert record.ticks == ["after"]
    failures = log.named("actor.handler_failed")
    assert [e["message"] for e in failures] == ["PeerDown", "PeerDown"]
    assert "boom n2" in failures[1]["exception"]
    assert failures[0]["level"] == "error"


def test_handlers_are_inherited_and_overridable(directory: Directory, log: Log, record: Record) -> None:
    class Child(Recorder):
        name = "child"

        @handles(PeerDown)
        def on_peer_down_again(self, msg: PeerDown) -> Ack:
            return Ack()

    assert Child._handlers[Tick] is Recorder.on_tick
    assert Child._handlers[PeerDown] is Child.on_peer_down_again
    assert Recorder._handlers[PeerDown] is Recorder.on_peer_down
    assert MsgpackActor._handlers == {}
    Child.start(directory, make_logger("t", stream=log), record)
    assert directory.ask("child", PeerDown("n", 1, "r"), Ack, timeout=WAIT) == Ack()


class Replier(MsgpackActor):
    """A handler whose reply cannot be encoded (over the size cap)."""

    name = "replier"

    @handles(Tick)
    def on_tick(self, msg: Tick) -> Refused:
        return Refused("x" * (2 << 20))

    @handles(GetStatus)
    def on_status(self, msg: GetStatus) -> Ack:
        return Ack()


def test_unencodable_reply_to_a_tell_does_not_kill_the_actor(directory: Directory, log: Log) -> None:
    Replier.start(directory, make_logger("t", stream=log))
    assert directory.tell("replier", Tick("big")) is True
    assert directory.ask("replier", GetStatus(), Ack, timeout=WAIT) == Ack()


# -- timers ---------------------------------------------------------------------------------------------------


def _timer_threads(tick: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"recorder-timer-{tick}"]


def test_every_delivers_ticks_and_stops_with_the_actor(
    directory: Directory, actor: pykka.ActorRef[Any], record: Record
) -> None:
    assert directory.ask("recorder", Subscribe("beat"), Ack, timeout=WAIT) == Ack()
    assert record.beats_done.wait(WAIT), "timer did not deliver three ticks"
    threads = _timer_threads("beat")
    assert len(threads) == 1 and threads[0].daemon
    actor.stop(timeout=WAIT)
    threads[0].join(timeout=WAIT)
    assert not threads[0].is_alive(), "timer thread outlived its actor"
    with record.lock:
        count = record.beats
    assert count >= 3
    assert set(record.ticks) == {"beat"}


def test_every_timer_stops_when_stopped_through_the_directory(
    directory: Directory, actor: pykka.ActorRef[Any], record: Record
) -> None:
    directory.ask("recorder", Subscribe("beat2"), Ack, timeout=WAIT)
    assert record.tick_seen.wait(WAIT)
    threads = _timer_threads("beat2")
    assert threads
    directory.stop_all(timeout=WAIT)
    for t in threads:
        t.join(timeout=WAIT)
        assert not t.is_alive()
    assert not actor.is_alive()
