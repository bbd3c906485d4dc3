"""What Serve's HTTP proxy checks before it routes a request: the key on its own routes, and
the declared body size. Pure ASGI (Starlette only, no Ray).

Ray Serve's proxy answers ``/-/routes`` itself (every application's route prefix and name)
before any application sees the request, so the API key of the app cannot guard it. The
proxy runs the middlewares that ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` names;
:func:`~moe_lab.orchestration.serve.start_server` points it at :func:`proxy_middlewares`
and passes the settings in two environment variables, which the proxy inherits from the
driver that starts the local cluster:

- ``MOE_LAB_SERVE_KEY_ENV``: the name of the variable holding the API key; with it,
  ``/-/routes`` needs ``Authorization: Bearer <key>`` (401 otherwise; always 401 when the
  proxy does not see that variable);
- ``MOE_LAB_SERVE_MAX_BODY_BYTES``: a request whose Content-Length is larger gets 413 at the
  proxy, before the body is read or routed (a chunked body is counted by the replica).

``/-/healthz`` (the proxy's own health check, "success") stays open.
"""

from __future__ import annotations

import os
import secrets
from typing import Any, Awaitable, Callable, Dict, List, MutableMapping, Optional

from .protocol import APIError, body_too_large, check_api_key, content_length

#: the environment variables :func:`proxy_middlewares` reads
KEY_ENV_VAR = "MOE_LAB_SERVE_KEY_ENV"
MAX_BODY_VAR = "MOE_LAB_SERVE_MAX_BODY_BYTES"

#: the proxy's own routes that need the key (when one is set)
GUARDED_PATHS = ("/-/routes",)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Dict[str, Any]]]
Send = Callable[[Dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class ProxyGuard:
    """ASGI middleware: 401 on :data:`GUARDED_PATHS` without the key, 413 on a declared body
    over ``max_body_bytes``; everything else goes to ``app`` untouched."""

    def __init__(self, app: ASGIApp, api_key: Optional[str] = None, max_body_bytes: Optional[int] = None) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        try:
            if self.api_key is not None and scope.get("path", "").rstrip("/") in GUARDED_PATHS:
                check_api_key(headers.get("authorization"), self.api_key)
            if self.max_body_bytes is not None:
                declared = content_length(headers.get("content-length"))
                if declared is not None and declared > self.max_body_bytes:
                    raise body_too_large(self.max_body_bytes, declared)
        except APIError as err:
            from starlette.responses import JSONResponse

            return await JSONResponse(err.to_dict(), status_code=err.status, headers=err.headers)(scope, receive, send)
        await self.app(scope, receive, send)


def proxy_middlewares() -> List[Any]:
    """The proxy's middlewares (Serve calls this in the proxy, through
    ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``), configured from the environment."""
    from starlette.middleware import Middleware

    key_env = os.environ.get(KEY_ENV_VAR)
    api_key = None
    if key_env:  # a key is wanted; if the proxy cannot see it, no caller knows the one used: closed
        api_key = os.environ.get(key_env) or secrets.token_urlsafe(32)
    max_body = os.environ.get(MAX_BODY_VAR)
    return [Middleware(ProxyGuard, api_key=api_key, max_body_bytes=int(max_body) if max_body else None)]
