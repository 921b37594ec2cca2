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
_Decoder = Callable[[Any, str], Any]
_DECODERS: dict[type, tuple[list[tuple[str, _Decoder]], int]] = {}


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
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [_to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)]
    if isinstance(value, list | tuple):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


def encode(msg: Message) -> bytes:
    """Encode a catalog message to msgpack bytes."""
    body = _to_plain(msg)
    data: bytes = msgpack.packb([type(msg).TAG, *body], use_bin_type=True)
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageTooLarge(f"{type(msg).__name__} encodes to {len(data)} bytes, cap {MAX_MESSAGE_BYTES}")
    return data


# -- decoding ---------------------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    return type(value).__name__


def _primitive(expected: type) -> _Decoder:
    def check(value: Any, where: str) -> Any:
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, bool) and expected is not bool:
            raise FieldTypeError(f"{where}: expected {expected.__name__}, got bool")
        if not isinstance(value, expected):
            raise FieldTypeError(f"{where}: expected {expected.__name__}, got {_type_name(value)}")
        return value

    return check


def _decoder_for(hint: Any) -> _Decoder:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint in (int, float, str, bytes, bool):
        return _primitive(hint)
    if hint is Any:
        return lambda value, where: value
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if len(options) != 1:
            raise TypeError(f"only Optional[X] unions are supported, got {hint}")
        inner = _decoder_for(options[0])
        return lambda value, where: None if value is None else inner(value, where)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            item = _decoder_for(args[0])

            def tuple_of(value: Any, where: str) -> tuple[Any, ...]:
                if not isinstance(value, list):
                    raise FieldTypeError(f"{where}: expected array, got {_type_name(value)}")
                return tuple(item(v, f"{where}[{i}]") for i, v in enumerate(value))

            return tuple_of
        raise TypeError(f"only tuple[X, ...] is supported, got {hint}")
    if origin is dict:
        key, val = _decoder_for(args[0]), _decoder_for(args[1])

        def dict_of(value: Any, where: str) -> dict[Any, Any]:
            if not isinstance(value, dict):
                raise FieldTypeError(f"{where}: expected map, got {_type_name(value)}")
            return {key(k, f"{where}.key"): val(v, f"{where}[{k!r}]") for k, v in value.items()}

        return dict_of
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return lambda value, where: _decode_struct(hint, value, where)
    raise TypeError(f"unsupported field type {hint!r}")


def _field_decoders(cls: type) -> tuple[list[tuple[str, _Decoder]], int]:
    """The field decoders, and how many leading fields are required (the rest have defaults)."""
    cached = _DECODERS.get(cls)
    if cached is None:
        hints = typing.get_type_hints(cls)
        fields = dataclasses.fields(cls)
        decoders = [(f.name, _decoder_for(hints[f.name])) for f in fields]
        optional = (dataclasses.MISSING,)
        required = max(
            (i + 1 for i, f in enumerate(fields) if f.default in optional and f.default_factory in optional),
            default=0,
        )
        cached = (decoders, required)
        _DECODERS[cls] = cached
    return cached


def _decode_struct(cls: type[T], value: Any, where: str) -> T:
    if not isinstance(value, list):
        raise FieldTypeError(f"{where}: expected array for {cls.__name__}, got {_type_name(value)}")
    decoders, required = _field_decoders(cls)
    # Trailing fields with defaults may be left out, so a field added later still reads older frames.
    if not required <= len(value) <= len(decoders):
        raise FieldTypeError(f"{where}: {cls.__name__} has {len(decoders)} fields, got {len(value)}")
    kwargs = {name: dec(v, f"{where}.{name}") for (name, dec), v in zip(decoders, value, strict=False)}
    return cls(**kwargs)


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
    return _decode_struct(cls, raw[1:], cls.__name__)


def decode_as(data: bytes, cls: type[M], max_bytes: int = MAX_MESSAGE_BYTES) -> M:
    """Decode and insist on one message type (a reply to an ``ask``, the first frame of a stream)."""
    msg = decode(data, max_bytes)
    if not isinstance(msg, cls):
        raise FieldTypeError(f"expected {cls.__name__}, got {type(msg).__name__}")
    return msg
