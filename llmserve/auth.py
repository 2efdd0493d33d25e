"""API keys, as ``vllm serve --api-key``: every API route wants ``Authorization: Bearer <key>``.

Keys come from the app's ``api_keys`` (``llmserve run --api-key``) and from the
``LLMSERVE_API_KEY`` environment variable (comma-separated; the place for a
secret). Without keys the API is open. ``/health`` and ``/metrics`` are always
open, so load balancers, Kubernetes probes and Prometheus need no key. A presented key is hashed and
compared with every key in constant time, and no key is ever logged.

Example::

    keys = ApiKeys.configured(["sk-local"])
    keys.allows(b"Bearer sk-local")   # -> True
    Starlette(routes=..., middleware=[Middleware(ApiKeyGuard, keys=keys)])  # 401 for the rest
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Any, Iterable, Optional, Union

from llmserve.errors import UnauthorizedError

KEYS_VARIABLE = "LLMSERVE_API_KEY"
# Load balancers and Prometheus need no key (`vllm serve --api-key` keeps /metrics open too).
# (/-/healthz and /-/routes: the health checks of Serve's proxy, which probes such as KubeRay's send without a key.)
OPEN_PATHS = frozenset({"/health", "/metrics", "/-/healthz", "/-/routes"})


class ApiKeys:
    def __init__(self, keys: Iterable[str]):
        self._digests = [_digest(key.encode()) for key in keys if key]

    @classmethod
    def configured(cls, app_keys: Iterable[str] = ()) -> "ApiKeys":
        """The app's keys and those in ``LLMSERVE_API_KEY``."""
        from_environment = [key.strip() for key in os.environ.get(KEYS_VARIABLE, "").split(",")]
        return cls([*app_keys, *from_environment])

    @property
    def required(self) -> bool:
        return bool(self._digests)

    def allows(self, authorization: Optional[Union[str, bytes]]) -> bool:
        """Whether an ``Authorization`` header value carries one of the keys (always, without keys)."""
        if not self._digests:
            return True
        if isinstance(authorization, str):
            authorization = authorization.encode("latin-1", errors="replace")
        scheme, _, presented = (authorization or b"").partition(b" ")
        digest = _digest(presented.strip())
        matched = False
        for known in self._digests:  # every key compared, whichever matches
            matched |= hmac.compare_digest(digest, known)
        return matched and scheme.lower() == b"bearer"

    def guards(self, path: str, method: str) -> bool:
        """Whether a request for ``path`` needs a key."""
        return self.required and method != "OPTIONS" and path.split("?", 1)[0] not in OPEN_PATHS


def _digest(key: bytes) -> bytes:
    # Equal-length digests: the comparison's time says nothing about the key's length.
    return hashlib.sha256(key).digest()


class ApiKeyGuard:
    """ASGI middleware: a request without a valid key gets 401 (its body unread); the rest
    go on to the app. Example: ``Starlette(middleware=[Middleware(ApiKeyGuard, keys=keys)])``."""

    def __init__(self, app: Any, keys: ApiKeys):
        self._app = app
        self._keys = keys

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self._keys.guards(scope["path"], scope["method"]):
            authorization = next((value for name, value in scope["headers"] if name == b"authorization"), None)
            if not self._keys.allows(authorization):
                error = UnauthorizedError("A valid API key is required: send `Authorization: Bearer <key>`.")
                body = error.to_json_bytes()
                headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)), (b"www-authenticate", b"Bearer")]
                await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self._app(scope, receive, send)
