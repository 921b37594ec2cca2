"""The console's same-origin door to this node's OpenAI API, for the page's chat panel.

The page could call the gateway directly, but the gateway listens on another port (so the browser
would need CORS headers there) and often only on loopback while the console may be reached through a
tunnel or another interface. Relaying the two calls the page makes (``GET /v1/models``, ``POST
/v1/chat/completions``) through the console keeps the page on one origin and one port, and leaves the
gateway untouched. Bodies stream through chunk by chunk, so server-sent tokens arrive as they come.
When the gateway needs a key (``[api] api_keys``) the relay sends one of them: the console is part of
the same node, and the page never sees the key.
"""

from __future__ import annotations

from collections.abc import Callable

import aiohttp
from aiohttp import web

WILDCARDS = ("0.0.0.0", "::", "")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding"}


def api_urls(address: tuple[str, int] | None) -> tuple[str, str]:
    """(what the status shows as the API's base URL, where the console reaches it) for the gateway
    bound to ``address``; a wildcard address is reached on loopback."""
    if address is None or not address[1]:
        return "", ""
    host, port = address
    shown = f"[{host}]" if ":" in host else host
    reach = "127.0.0.1" if host in WILDCARDS else shown
    return f"http://{shown}:{port}/v1", f"http://{reach}:{port}/v1"


class ApiProxy:
    """Relays the chat panel's API calls to the gateway; opened and closed with the console."""

    def __init__(self, address: Callable[[], tuple[str, int] | None], key: str | None = None) -> None:
        self._address = address
        self._key = key
        self._session: aiohttp.ClientSession | None = None

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/models", self.relay)
        app.router.add_post("/v1/chat/completions", self.relay)

    async def open(self) -> None:
        # No total timeout: a streamed reply lasts as long as the model writes.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
        self._session = aiohttp.ClientSession(timeout=timeout, auto_decompress=False)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def relay(self, request: web.Request) -> web.StreamResponse:
        _, base = api_urls(self._address())
        if not base or self._session is None:
            return web.json_response({"error": {"message": "this node's API is not up"}}, status=503)
        url = base + request.path[len("/v1") :]
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        if self._key is not None:
            headers["Authorization"] = f"Bearer {self._key}"
        body = await request.read() if request.method == "POST" else None
        resp: web.StreamResponse | None = None
        try:
            async with self._session.request(request.method, url, data=body, headers=headers) as upstream:
                resp = web.StreamResponse(status=upstream.status)
                for name, value in upstream.headers.items():
                    if name.lower() not in HOP_BY_HOP:
                        resp.headers[name] = value
                await resp.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
        except aiohttp.ClientConnectionError as exc:
            if resp is not None and resp.prepared:
                raise  # mid-stream: the page sees the stream end early
            return web.json_response({"error": {"message": f"this node's API: {exc}"}}, status=502)
