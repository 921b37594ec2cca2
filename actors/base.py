"""The msgpack-only actor base, and the per-node directory actors reach each other through.

Every actor inbox receives ``bytes``; the base decodes them into a catalog message and calls the one
handler registered for that type. A handler's return value (a message) is the reply to an ``ask``,
encoded to bytes again. Undecodable or unhandled messages, and handlers that raise, are logged and
dropped: the actor keeps running. Actors never hold each other's objects, only names in a
:class:`Directory`.

An actor puts its own name in the directory from its constructor, before pykka starts its thread,
so nothing it says from ``on_start`` can be answered to a name that is not there yet. Replies are
typed: :meth:`Directory.ask` names the reply type it expects and raises :class:`AskError` (with the
actor's reason when it answered ``Refused``) instead of handing the caller something else.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, TypeVar

import pykka

from meshllm.logsetup import Logger
from meshllm.wire.codec import CodecError, Message, decode, encode
from meshllm.wire.messages import Refused, Tick

MsgT = TypeVar("MsgT", bound=Message)
ReplyT = TypeVar("ReplyT", bound=Message)
Handler = Callable[[Any, Any], Message | None]


def handles(msg_type: type[Message]) -> Callable[[Callable[[Any, MsgT], Message | None]], Handler]:
    """Mark a method as the handler for one message type."""

    def mark(fn: Callable[[Any, MsgT], Message | None]) -> Handler:
        fn._handles = msg_type  # type: ignore[attr-defined]
        return fn

    return mark


_ASK_POOL = ThreadPoolExecutor(max_workers=64, thread_name_prefix="actor-ask")
"""Threads that wait for actor replies on behalf of asyncio code (HTTP handlers, tunnels)."""


class AskError(RuntimeError):
    """An ask got no usable reply: nobody by that name, a refusal, or a reply of another type."""


DROP_REPORT_S = 10.0  # a dropped tell is reported at most this often per (actor, message type)


class Directory:
    """A node's actors by name.

    A tell to a name that is not (or no longer) there cannot be delivered: outside a shutdown that is
    a fault, and ``on_dropped`` hears of it (the node logs it). An actor that dies of an error, not a
    stop, is reported to ``on_actor_failed`` (the node stops, and ``meshllm run`` exits non-zero so a
    service manager restarts it with its state rebuilt from the mesh).
    """

    def __init__(self) -> None:
        self._refs: dict[str, pykka.ActorRef[Any]] = {}
        self._lock = threading.Lock()
        self.closing = False
        self.on_dropped: Callable[[str, str], None] | None = None
        self.on_actor_failed: Callable[[str, str], None] | None = None
        self._dropped_at: dict[tuple[str, str], float] = {}

    def _dropped(self, name: str, msg: Message) -> None:
        report = self.on_dropped
        if report is None or self.closing:
            return
        key, now = (name, type(msg).__name__), time.monotonic()
        with self._lock:
            if now - self._dropped_at.get(key, -DROP_REPORT_S) < DROP_REPORT_S:
                return
            self._dropped_at[key] = now
        report(name, key[1])

    def actor_failed(self, name: str, reason: str) -> None:
        report = self.on_actor_failed
        if report is not None and not self.closing:
            report(name, reason)

    def register(self, name: str, ref: pykka.ActorRef[Any]) -> None:
        with self._lock:
            self._refs[name] = ref
            self.closing = False  # actors start again (a standby's promotion restarts them)

    def unregister(self, name: str) -> None:
        with self._lock:
            self._refs.pop(name, None)

    def ref(self, name: str) -> pykka.ActorRef[Any] | None:
        with self._lock:
            return self._refs.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return list(self._refs)

    def tell(self, name: str, msg: Message) -> bool:
        """Send a message; False (and reported, outside a shutdown) if nobody by that name is alive."""
        ref = self.ref(name)
        if ref is None:
            self._dropped(name, msg)
            return False
        try:
            ref.tell(encode(msg))
        except pykka.ActorDeadError:
            self._dropped(name, msg)
            return False
        return True

    def tell_if_running(self, name: str, msg: Message) -> bool:
        """:meth:`tell` to an actor that runs only on some nodes (the standby): its absence is no fault,
        so nothing is reported. False when nobody by that name is alive."""
        ref = self.ref(name)
        if ref is None:
            return False
        try:
            ref.tell(encode(msg))
        except pykka.ActorDeadError:
            return False
        return True

    def ask(self, name: str, msg: Message, reply_type: type[ReplyT], timeout: float = 5.0) -> ReplyT:
        """Send a message and wait for its reply, which must be a ``reply_type``.

        Raises :class:`AskError` when nobody has that name, the actor refused (its reason is in the
        error), or it answered with something else; ``pykka.Timeout`` when it did not answer in time.
        """
        ref = self.ref(name)
        if ref is None:
            raise AskError(f"no actor named {name!r}")
        try:
            raw = ref.ask(encode(msg), timeout=timeout)
        except pykka.ActorDeadError:
            raise AskError(f"{name} stopped") from None
        if not isinstance(raw, bytes):
            raise AskError(f"{name} gave no reply to {type(msg).__name__}")
        try:
            reply = decode(raw)
        except CodecError as exc:
            raise AskError(f"{name} replied with an undecodable message: {exc}") from None
        if isinstance(reply, reply_type):
            return reply
        if isinstance(reply, Refused):
            raise AskError(f"{name} refused {type(msg).__name__}: {reply.reason}")
        raise AskError(
            f"{name} answered {type(msg).__name__} with {type(reply).__name__}, not {reply_type.__name__}"
        )

    async def ask_async(
        self, name: str, msg: Message, reply_type: type[ReplyT], timeout: float = 5.0
    ) -> ReplyT:
        """:meth:`ask` for asyncio code: the wait happens on a pool thread, not the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(_ASK_POOL, self.ask, name, msg, reply_type, timeout)

    def stop_all(self, timeout: float = 5.0) -> None:
        with self._lock:
            self.closing = True
            refs = list(self._refs.items())
            self._refs.clear()
        for _name, ref in reversed(refs):
            try:
                ref.stop(block=True, timeout=timeout)
            except (pykka.ActorDeadError, pykka.Timeout):
                pass


class MsgpackActor(pykka.ThreadingActor):
    """Base for every meshllm actor: bytes in, one handler per message type, bytes out."""

    _handlers: ClassVar[dict[type[Message], Handler]] = {}
    name: ClassVar[str] = "actor"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        handlers: dict[type[Message], Handler] = {}
        for klass in reversed(cls.__mro__):
            for attr in vars(klass).values():
                msg_type = getattr(attr, "_handles", None)
                if msg_type is not None:
                    handlers[msg_type] = attr
        cls._handlers = handlers

    def __init__(self, directory: Directory, logger: Logger) -> None:
        super().__init__()
        self.directory = directory
        self.log = logger.bind(actor=self.name)
        self._timers: list[threading.Event] = []
        # Registered before pykka starts this actor's thread: see the module docstring.
        directory.register(self.name, self.actor_ref)

    # -- inbox --------------------------------------------------------------------------------------

    def on_receive(self, message: Any) -> Any:
        if not isinstance(message, bytes):
            self.log.warning("actor.bad_message", reason=f"inbox got {type(message).__name__}, not bytes")
            return encode(Refused("messages must be msgpack bytes"))
        try:
            msg = decode(message)
        except CodecError as exc:
            self.log.warning("actor.bad_message", reason=str(exc), error=type(exc).__name__)
            return encode(Refused(f"{type(exc).__name__}: {exc}"))
        handler = self._handlers.get(type(msg))
        if handler is None:
            self.log.warning("actor.unhandled", message=type(msg).__name__)
            return encode(Refused(f"{self.name} does not handle {type(msg).__name__}"))
        try:
            reply = handler(self, msg)
            return encode(reply) if reply is not None else None
        except Exception as exc:
            self.log.exception("actor.handler_failed", message=type(msg).__name__)
            return encode(Refused(f"{type(exc).__name__}: {exc}"[:1000]))

    # -- helpers ------------------------------------------------------------------------------------

    def tell(self, name: str, msg: Message) -> bool:
        return self.directory.tell(name, msg)

    def teller(self) -> Callable[[Message], None]:
        """A function other threads (this actor's workers) call to tell this actor a message; after
        the actor stopped, what they tell is dropped."""
        ref = self.actor_ref

        def tell(msg: Message) -> None:
            with contextlib.suppress(pykka.ActorDeadError):
                ref.tell(encode(msg))

        return tell

    def every(
        self, interval_s: float, tick: str, jitter: float = 0.0, first_after: float | None = None
    ) -> None:
        """Tell this actor ``Tick(tick)`` every ``interval_s`` seconds (± jitter fraction) until it stops."""
        stop = threading.Event()
        self._timers.append(stop)
        ref = self.actor_ref
        payload = encode(Tick(tick))

        def run() -> None:
            delay = interval_s if first_after is None else first_after
            while not stop.wait(delay):
                try:
                    ref.tell(payload)
                except pykka.ActorDeadError:
                    return
                delay = interval_s * (1 + random.uniform(-jitter, jitter))

        threading.Thread(target=run, name=f"{self.name}-timer-{tick}", daemon=True).start()

    def on_stop(self) -> None:
        for stop in self._timers:
            stop.set()

    def on_failure(self, exception_type: Any, exception_value: Any, traceback: Any) -> None:
        for stop in self._timers:
            stop.set()
        reason = f"{getattr(exception_type, '__name__', exception_type)}: {exception_value}"
        self.log.error("actor.crashed", error=reason)
        self.directory.actor_failed(self.name, reason)
