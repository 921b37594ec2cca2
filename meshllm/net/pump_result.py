"""How passing a body on ended: the result both body relays give (the transport callback's,
:mod:`meshllm.net.body_pump`, and a thread's, :mod:`meshllm.net.thread_relay`)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meshllm.net.raw_http import Body


class PumpEnd(enum.Enum):
    WHOLE = "whole"
    """The body ended where its framing says (or with its stream, for a body that runs until then)."""
    SOURCE_BROKE = "source_broke"
    """The source ended or failed before the body did, or sent a body that is not valid framing."""
    SINK_LEFT = "sink_left"
    """The connection the body goes to closed: nobody reads the rest."""


@dataclass(frozen=True)
class PumpResult:
    end: PumpEnd
    reason: str = ""


CLOSED_AT_END = "the sink closed as the body ended"
"""The reason of a WHOLE result whose last bytes found the sink closed: the openai library closes its
connection at ``data: [DONE]``, and llama-server's terminating chunk can come after that. The source
ended where its framing says (a pooled tunnel stays usable), and nobody left mid-answer."""


def stream_ended(body: Body) -> PumpResult:
    """The source's stream ended: whole if that is where this body ends, else cut short."""
    if body.close_is_end():
        return PumpResult(PumpEnd.WHOLE)
    return PumpResult(PumpEnd.SOURCE_BROKE, "the stream ended mid-body")


def sink_gone(body: Body, reason: str) -> PumpResult:
    """The sink closed as bytes were to go to it: nobody reads the rest, unless those bytes were the
    body's last (:data:`CLOSED_AT_END`)."""
    if body.done:
        return PumpResult(PumpEnd.WHOLE, CLOSED_AT_END)
    return PumpResult(PumpEnd.SINK_LEFT, reason)
