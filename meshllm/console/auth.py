"""Keys for a console reachable from other machines (``[console] api_keys``).

Scripts send a key as ``Authorization: Bearer <key>`` or as ``?key=<key>`` on any URL (``curl
.../api/events?key=...``). A browser cannot put a header on the page's ``EventSource``, so the page
rides on a cookie instead: opening ``/?key=<key>``, or sending the small login form the console shows
at ``/`` without one, sets an HttpOnly, SameSite cookie and redirects to ``/`` (the key leaves the
address bar). Same-origin ``fetch`` and ``EventSource`` send that cookie by themselves, so the page's
code does not handle the key at all. The cookie holds a token derived from the key (an HMAC), not the
key, and its name carries the port the browser used, so two consoles on one host keep their own.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web

from meshllm.serving.api_keys import KeyCheck, bearer, unauthorized

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
COOKIE_PREFIX = "meshllm_console_"
COOKIE_MAX_AGE_S = 30 * 24 * 3600
OPEN_PATHS = ("/login",)

LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>meshllm console: key needed</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body style="font-family: system-ui, sans-serif; max-width: 28rem; margin: 4rem auto;">
<h1 style="font-size: 1.3rem;">meshllm console</h1>
<p>This console needs one of its keys (<code>[console] api_keys</code> in the node's config).</p>
<form method="post" action="login">
<input id="key" name="key" type="password" autocomplete="current-password" autofocus required
 style="width: 100%; padding: .4rem;" placeholder="key">
<p><button id="login" type="submit">Open the console</button></p>
</form>
<p id="login-error" style="color: #b00;">%ERROR%</p>
</body></html>
"""


def session_token(key: str) -> str:
    """What the cookie holds for ``key``: proves the key was given, without being it."""
    return hmac.new(key.encode(), b"meshllm console session", hashlib.sha256).hexdigest()


def cookie_name(request: web.Request) -> str:
    return f"{COOKIE_PREFIX}{request.url.port or 80}"


def login_page(error: str = "") -> web.Response:
    text = LOGIN_PAGE.replace("%ERROR%", error)
    return web.Response(text=text, content_type="text/html", status=401, headers={"Cache-Control": "no-store"})


class ConsoleAuth:
    """The console's key check: Bearer header, ``?key=``, or the login cookie."""

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = KeyCheck(keys)
        self._sessions = KeyCheck([session_token(k) for k in keys])

    @property
    def required(self) -> bool:
        return self.keys.required

    def allowed(self, request: web.Request) -> bool:
        # Every way is checked, in constant time each, whichever matched.
        by_header = self.keys.valid(bearer(request.headers))
        by_query = self.keys.valid(request.query.get("key"))
        by_cookie = self._sessions.valid(request.cookies.get(cookie_name(request)))
        return by_header | by_query | by_cookie

    def _logged_in(self, request: web.Request, key: str) -> web.Response:
        """Redirect to the page with the session cookie set."""
        location = "./" if request.path == "/login" else request.path
        response = web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store"})
        response.set_cookie(
            cookie_name(request),
            session_token(key),
            max_age=COOKIE_MAX_AGE_S,
            path="/",
            httponly=True,
            samesite="Lax",
        )
        return response

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        key = request.query.get("key")
        if request.path == "/" and key is not None:
            if self.keys.valid(key):
                return self._logged_in(request, key)
            return login_page("That key is not one of this console's keys.")
        if self.allowed(request):
            return await handler(request)
        if request.path == "/":
            return login_page()
        return unauthorized(bearer(request.headers) or key, section="console")

    async def login(self, request: web.Request) -> web.StreamResponse:
        """``POST /login`` from the login form."""
        form = await request.post()
        key = form.get("key")
        if isinstance(key, str) and self.keys.valid(key.strip()):
            return self._logged_in(request, key.strip())
        return login_page("That key is not one of this console's keys.")
