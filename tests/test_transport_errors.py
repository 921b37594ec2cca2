"""A route refresh that fails in an unexpected way is still answered to the router and logged: before,
an exception the endpoint did not list vanished with its task, and the passive router waited 30 s for
an answer that never came (a CI run once saw a standby miss a promotion that way)."""

from __future__ import annotations

from typing import Any

import pytest

from meshllm.net.endpoint import MeshEndpoint
from tests.support import NodeFactory
from tests.test_passive import FAST_REFRESH


def test_an_unexpected_error_in_a_route_request_is_told_to_the_router(
    nodes: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = nodes.start("a")

    async def broken(self: MeshEndpoint, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(MeshEndpoint, "_exchange_routes", broken)
    nodes.start("client", join=(a.invite("client"),), role="client", timing=FAST_REFRESH)
    logs = nodes.logs["client"]
    assert "RuntimeError: boom" in logs.wait_for("routes.request_error", 10)["error"]
    assert "boom" in logs.wait_for("routes.refresh_failed", 10)["reason"]  # the router heard back


def test_a_transport_task_that_fails_is_logged(nodes: NodeFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    a = nodes.start("a")

    async def broken(self: MeshEndpoint, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(MeshEndpoint, "refresh_routes", broken)
    nodes.start("client", join=(a.invite("client"),), role="client", timing=FAST_REFRESH)
    failed = nodes.logs["client"].wait_for("transport.task_failed", 10)
    assert failed["error"] == "RuntimeError: boom" and "broken" in failed["task"]
