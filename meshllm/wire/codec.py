"""Msgpack codec for the message catalog.

Actors and the wire speak one vocabulary: frozen dataclasses with a stable integer tag. This module
turns them into msgpack bytes (``[tag, field, field, ...]``) and back, checking every field against
the dataclass's type hints on the way in, so that a remote peer or a buggy actor can never hand a
handler a value of the wrong shape. Every rejection is a :class:`CodecError` subclass.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar, Union

import msgpack

MAX_MESSAGE_BYTES = 1 << 20
"""Hard cap on one encoded message (1 MiB); larger frames are refused before decoding."""


class CodecError(ValueError):
    """Base of every reason a payload is not a valid message."""


class MalformedMessage(CodecError):
    """The bytes are not msgpack, or not a ``[tag, fields...]`` array."""


class UnknownTag(CodecError):
    """The tag names no message in the catalog."""


class FieldTypeError(CodecError):
    """A field is missing, surplus, or of the wrong type."""


class MessageTooLarge(CodecError):
    """The payload is over the size cap."""


class Message:
    """Base of every catalog entry; subclasses are frozen dataclasses registered with :func:`message`."""

    TAG: ClassVar[int]


M = TypeVar("M", bound=Message)
T = TypeVar("T")

_BY_TAG: dict[int, type[Message]] = {}
_Decoder = Callable[[Any], Any]
_Encoder = Callable[[Any], Any]
_ENCODERS: dict[type, list[tuple[str, _Encoder | None]]] = {}
_SCALARS = (int, float, str, bytes, bool)


class _NotScalar:
    """Stands for the exact type of a field that is not a scalar: no value's type is this."""


class _Problem(Exception):
    """A field decoder's complaint. The path to the field is added on the way out (only then: a
    message that decodes formats no path at all), and :func:`decode` raises it as a
    :class:`FieldTypeError`."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.path: list[str] = []  # innermost first

    def at(self, segment: str) -> _Problem:
        self.path.append(segment)
        return self


def message(tag: int) -> Callable[[type[M]], type[M]]:
    """Register a frozen dataclass as a catalog message under a tag that is never reused."""

    def register(cls: type[M]) -> type[M]:
        if tag in _BY_TAG:
            raise RuntimeError(f"message tag {tag} used by {_BY_TAG[tag].__name__} and {cls.__name__}")
        if not dataclasses.is_dataclass(cls):
            raise RuntimeError(f"{cls.__name__} must be a dataclass")
        cls.TAG = tag
        _BY_TAG[tag] = cls
        return cls

    return register


def catalog() -> dict[int, type[Message]]:
    """Every registered message by tag (a copy)."""
    return dict(_BY_TAG)


# -- encoding ---------------------------------------------------------------------------------------


def _to_plain(value: Any) -> Any:
    """Any value as msgpack takes it (for fields typed ``Any``): dataclasses become arrays."""
    if isinstance(value, _SCALARS) or value is None:
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _encode_struct(type(value), value)
    if isinstance(value, list | tuple):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


def _encoder_for(hint: Any) -> _Encoder | None:
    """How to make a field's value msgpack-ready; None when it already is (scalars, and tuples and
    maps of them: msgpack packs a tuple as an array)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint in _SCALARS:
        return None
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        inner = _encoder_for(options[0]) if len(options) == 1 else _to_plain
        if inner is None:
            return None
        present = inner
        return lambda value: None if value is None else present(value)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        item = _encoder_for(args[0])
        if item is None:
            return None
        each = item
        return lambda value: [each(v) for v in value]
    if origin is dict and len(args) == 2:
        val = _encoder_for(args[1])
        if val is None:
            return None
        each_value = val
        return lambda value: {k: each_value(v) for k, v in value.items()}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        cls = hint
        return lambda value: _encode_struct(cls, value)
    return _to_plain


def _encode_struct(cls: type, value: Any) -> list[Any]:
    plan = _ENCODERS.get(cls)
    if plan is None:
        hints = typing.get_type_hints(cls)
        plan = [(f.name, _encoder_for(hints[f.name])) for f in dataclasses.fields(cls)]
        _ENCODERS[cls] = plan
    return [getattr(value, name) if enc is None else enc(getattr(value, name)) for name, enc in plan]


def encode(msg: Message) -> bytes:
    """Encode a catalog message to msgpack bytes."""
    body = _encode_struct(type(msg), msg)
    data: bytes = msgpack.packb([type(msg).TAG, *body], use_bin_type=True)
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageTooLarge(f"{type(msg).__name__} encodes to {len(data)} bytes, cap {MAX_MESSAGE_BYTES}")
    return data


# -- decoding ---------------------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    return type(value).__name__


def _primitive(expected: type) -> _Decoder:
    def check(value: Any) -> Any:
        if type(value) is expected:  # msgpack gives exact types: the common case, first
            return value
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, bool) and expected is not bool:
            raise _Problem(f"expected {expected.__name__}, got bool")
        if not isinstance(value, expected):
            raise _Problem(f"expected {expected.__name__}, got {_type_name(value)}")
        return value

    return check


def _any(value: Any) -> Any:
    return value


def _decoder_for(hint: Any) -> _Decoder:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint in _SCALARS:
        return _primitive(hint)
    if hint is Any:
        return _any
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if len(options) != 1:
            raise TypeError(f"only Optional[X] unions are supported, got {hint}")
        inner = _decoder_for(options[0])
        return lambda value: None if value is None else inner(value)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return _tuple_of(_decoder_for(args[0]), _exact(args[0]))
        raise TypeError(f"only tuple[X, ...] is supported, got {hint}")
    if origin is dict:
        return _dict_of(_decoder_for(args[0]), _decoder_for(args[1]))
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        cls = hint
        return lambda value: _decode_struct(cls, value)
    raise TypeError(f"unsupported field type {hint!r}")


def _tuple_of(item: _Decoder, exact: type) -> _Decoder:
    def tuple_of(value: Any) -> tuple[Any, ...]:
        if type(value) is not list:
            raise _Problem(f"expected array, got {_type_name(value)}")
        if not value:
            return ()
        if exact is not _NotScalar:  # scalars of the exact type need no call each
            for v in value:
                if type(v) is not exact:
                    break
            else:
                return tuple(value)
        try:
            return tuple(map(item, value))
        except _Problem as exc:
            for i, v in enumerate(value):  # which item: only now, on the way out
                try:
                    item(v)
                except _Problem:
                    raise exc.at(f"[{i}]") from None
            raise

    return tuple_of


def _dict_of(key: _Decoder, val: _Decoder) -> _Decoder:
    def dict_of(value: Any) -> dict[Any, Any]:
        if type(value) is not dict:
            raise _Problem(f"expected map, got {_type_name(value)}")
        if not value:
            return {}
        try:
            return {key(k): val(v) for k, v in value.items()}
        except _Problem as exc:
            for k, v in value.items():
                try:
                    key(k)
                except _Problem:
                    raise exc.at(".key") from None
                try:
                    val(v)
                except _Problem:
                    raise exc.at(f"[{k!r}]") from None
            raise

    return dict_of


def _exact(hint: Any) -> type:
    """The one type a value of this field may have to be taken as it is, without a decoder call."""
    return hint if hint in _SCALARS else _NotScalar


_FieldPlan = tuple[list[tuple[str, type, _Decoder]], int]
_DECODERS: dict[type, _FieldPlan] = {}


def _field_decoders(cls: type) -> _FieldPlan:
    """Per field: its name, the exact type a value may have to be taken as it is (a scalar field's
    own type; msgpack gives exact types, so this skips a call per field), and its decoder; and how
    many leading fields are required (the rest have defaults)."""
    cached = _DECODERS.get(cls)
    if cached is None:
        hints = typing.get_type_hints(cls)
        fields = dataclasses.fields(cls)
        plan = [(f.name, _exact(hints[f.name]), _decoder_for(hints[f.name])) for f in fields]
        optional = (dataclasses.MISSING,)
        required = max(
            (i + 1 for i, f in enumerate(fields) if f.default in optional and f.default_factory in optional),
            default=0,
        )
        cached = (plan, required)
        _DECODERS[cls] = cached
    return cached


def _decode_struct(cls: type[T], value: Any) -> T:
    if type(value) is not list:
        raise _Problem(f"expected array for {cls.__name__}, got {_type_name(value)}")
    plan, required = _field_decoders(cls)
    # Trailing fields with defaults may be left out, so a field added later still reads older frames.
    if not required <= len(value) <= len(plan):
        raise _Problem(f"{cls.__name__} has {len(plan)} fields, got {len(value)}")
    try:
        return cls(
            *[v if type(v) is exact else dec(v) for (_, exact, dec), v in zip(plan, value, strict=False)]
        )
    except _Problem as exc:
        for (name, _, dec), v in zip(plan, value, strict=False):  # which field: only now
            try:
                dec(v)
            except _Problem:
                raise exc.at(f".{name}") from None
        raise


def decode(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """Decode bytes into a catalog message, or raise a :class:`CodecError` saying why not."""
    if len(data) > max_bytes:
        raise MessageTooLarge(f"payload of {len(data)} bytes, cap {max_bytes}")
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise MalformedMessage(f"not msgpack: {exc.__class__.__name__}: {exc}") from None
    if not isinstance(raw, list) or not raw:
        raise MalformedMessage(f"expected [tag, fields...], got {_type_name(raw)}")
    tag = raw[0]
    if not isinstance(tag, int) or isinstance(tag, bool):
        raise MalformedMessage(f"tag must be an integer, got {_type_name(tag)}")
    cls = _BY_TAG.get(tag)
    if cls is None:
        raise UnknownTag(f"unknown message tag {tag}")
    try:
        return _decode_struct(cls, raw[1:])
    except _Problem as exc:
        where = cls.__name__ + "".join(reversed(exc.path))
        raise FieldTypeError(f"{where}: {exc.problem}") from None


def decode_as(data: bytes, cls: type[M], max_bytes: int = MAX_MESSAGE_BYTES) -> M:
    """Decode and insist on one message type (a reply to an ``ask``, the first frame of a stream)."""
    msg = decode(data, max_bytes)
    if not isinstance(msg, cls):
        raise FieldTypeError(f"expected {cls.__name__}, got {type(msg).__name__}")
    return msg
