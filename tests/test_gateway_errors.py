"""The gateway's answer when the node's own actors cannot answer it: OpenAI-shaped, never a bare 500."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from tests.support import NodeFactory


def test_no_router_is_an_openai_503(nodes: NodeFactory) -> None:
    a = nodes.start("a")
    ref = a.directory.ref("router")
    assert ref is not None
    ref.stop()  # the router is gone; the gateway must still answer properly
    for path, body in (("/models", None), ("/chat/completions", b'{"model": "m", "messages": []}')):
        request = urllib.request.Request(
            a.api_url + path, data=body, headers={"Content-Type": "application/json"}
        )
        try:
            urllib.request.urlopen(request, timeout=10)
            raise AssertionError(f"{path} answered 2xx without a router")
        except urllib.error.HTTPError as exc:
            assert exc.code == 503
            error = json.loads(exc.read())["error"]
        assert error["code"] == "router_unavailable" and error["type"] == "server_error"
    assert nodes.logs["a"].find("gateway.router_unavailable")
