"""API keys: the check both HTTP servers of a node (the gateway and the console) make when their
section of the config lists ``api_keys``.

Keys are compared in constant time (as SHA-256 digests, so their lengths do not show either) against
every configured key, and never logged: :func:`fingerprint` is the short, one-way name a log line may
carry so that an operator can tell which key a node was started with.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence

from aiohttp import web

from meshllm.serving.openai_api import error_body


def fingerprint(key: str) -> str:
    """A short one-way name for a key, safe to log."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()[:8]


def bearer(headers: Mapping[str, str]) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, if there is one."""
    scheme, _, token = headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class KeyCheck:
    """The keys one server accepts; with none, every request passes (the loopback default)."""

    def __init__(self, keys: Sequence[str]) -> None:
        self._digests = tuple(hashlib.sha256(k.encode()).digest() for k in keys)
        self.fingerprints = [fingerprint(k) for k in keys]

    @property
    def required(self) -> bool:
        return bool(self._digests)

    def valid(self, presented: str | None) -> bool:
        """Whether ``presented`` is one of the keys; the time taken does not depend on which, or how
        close a wrong one came."""
        if presented is None:
            return False
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found = False
        for known in self._digests:
            found |= hmac.compare_digest(digest, known)
        return found


def unauthorized(presented: str | None, section: str = "api") -> web.Response:
    """OpenAI's answer to a missing or wrong key: 401 with its JSON error body."""
    if presented is None:
        message = (
            "You didn't provide an API key. Send it in an Authorization header: "
            f"Authorization: Bearer YOUR_KEY (one of this node's [{section}] api_keys)."
        )
        body = error_body(message, "invalid_request_error", "missing_api_key")
    else:
        body = error_body("Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
    return web.json_response(body, status=401, headers={"WWW-Authenticate": 'Bearer realm="meshllm"'})
