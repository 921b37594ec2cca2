"""The fast path shares the QUIC port number: when a drawn ephemeral port is already taken on TCP
(another program's outgoing connection holds it), the node draws again rather than running without
its fast path - a CI run once failed on exactly that."""

from __future__ import annotations

import errno
import socket
from typing import Any

import pytest

from meshllm.net.fast_path import FastPath
from tests.support import NodeFactory


def test_a_port_taken_on_tcp_is_drawn_again(nodes: NodeFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    squatters: list[socket.socket] = []
    tried: list[int] = []
    real_listen = FastPath.listen

    async def listen_after_someone_took_the_port(self: FastPath, host: str, port: int) -> Any:
        tried.append(port)
        if len(tried) == 1:  # the first drawn number: someone else holds it on TCP
            squatter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            squatters.append(squatter)
            try:
                squatter.bind((host, port))
                squatter.listen()
            except OSError as exc:  # another test's connection holds it already: taken all the same
                assert exc.errno == errno.EADDRINUSE, exc
        return await real_listen(self, host, port)

    monkeypatch.setattr(FastPath, "listen", listen_after_someone_took_the_port)
    try:
        a = nodes.start("a")
        assert a.endpoint is not None
        # Drawn again (more than once only if a number drawn later is in use on TCP too)
        assert len(tried) >= 2 and tried[-1] != tried[0]
        assert a.endpoint.port == tried[-1]
        with socket.create_connection(("127.0.0.1", a.endpoint.port), timeout=5):
            pass  # the fast path listens on the node's own port number
    finally:
        for squatter in squatters:
            squatter.close()
