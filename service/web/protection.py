"""What every request and answer of the worklist passes through, before any route (an ASGI middleware).

In order:

1. **Trusted Host**: the Host header (without its port) must be one of `Settings.web_trusted_hosts`,
   else 400 — a DNS-rebinding page cannot reach the app under a name of its own.
2. **Same origin for state-changing requests** (any method but GET, HEAD, OPTIONS): `Origin` must be
   present, not `null`, and name this host and port; `Sec-Fetch-Site`, when the browser sends it,
   must be `same-origin` (or `none`). Else 403. Scripts calling the API send `Origin` themselves.
3. **The CSRF cookie**: a browser without one gets a random value (`gatekeeper_csrf`); forms carry
   its HMAC as `csrf_token` (checked by `service.web.deps.csrf_form`).
4. **A refreshed session cookie** when `service.web.deps.current_user` asked for one (the idle
   timeout slides with use).
5. **Security headers on every answer**, error pages and static files included: a Content-Security-Policy
   without inline script or style and with `frame-ancestors 'none'`, nosniff, no Referer to other sites, and
   `Cache-Control: no-store` unless the route chose otherwise (slice images: `private`).
"""

from __future__ import annotations

import json
import re
from urllib.parse import urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.settings import Settings
from service.web.security import new_csrf_nonce

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SESSION_COOKIE = "gatekeeper_session"
CSRF_COOKIE = "gatekeeper_csrf"
CSRF_HEADER = "x-csrf-token"
#: No inline script or style anywhere: templates link /static files only.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    # Not no-referrer: with it, Chromium sends `Origin: null` on our own form posts, which step 2 refuses.
    "referrer-policy": "same-origin",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
    "permissions-policy": "camera=(), microphone=(), geolocation=()",
}
HSTS = "max-age=31536000"
_NONCE = re.compile(r"[A-Za-z0-9_-]{16,64}")


def host_name(host_header: str) -> str:
    """The name in a Host header, lower case, without the port: `[::1]:8000` → `::1`, `a.b:80` → `a.b`."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else ""
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def cross_site_reason(method: str, headers: Headers) -> str | None:
    """Why a request with `method` and `headers` is refused as cross-site, or None when it is same-origin.

    Safe methods always pass. Otherwise `Origin` must name the Host the request was sent to, and
    `Sec-Fetch-Site` (when present) must not be cross-site, same-site (another port or subdomain)
    or anything else but `same-origin` and `none`.
    """
    if method.upper() in SAFE_METHODS:
        return None
    fetch_site = headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return f"{method} refused: the browser says it came from another site (Sec-Fetch-Site: {fetch_site})"
    origin = headers.get("origin")
    if not origin or origin == "null":
        return (
            f"{method} refused: no Origin header (or null); browsers send one, scripts must send "
            "`Origin: <the URL they call, without a path>`"
        )
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or parts.netloc.lower() != headers.get("host", "").lower():
        return f"{method} refused: Origin {origin[:200]} is not this site"
    return None


def cookie_header(name: str, value: str, *, max_age: int | None, secure: bool, samesite: str) -> bytes:
    """One `Set-Cookie` header value (HttpOnly, path /), as Starlette writes it."""
    response = Response()
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        httponly=True,
        samesite=samesite,  # type: ignore[arg-type]
        secure=secure,
        path="/",
    )
    return next(v for k, v in response.raw_headers if k == b"set-cookie")


class SecurityMiddleware:
    """The checks and headers in this module's docstring, around the whole app (`create_app` adds it)."""

    def __init__(self, app: ASGIApp, *, settings: Settings) -> None:
        self.app = app
        self.trusted_hosts = frozenset(settings.web_trusted_hosts)
        self.secure = settings.web_cookie_secure

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        path: str = scope.get("path", "")
        host = host_name(headers.get("host", ""))
        if host not in self.trusted_hosts:
            await self._refuse(send, path, 400, f"unknown Host {host[:100]!r}: not in GATEKEEPER_WEB_ALLOWED_HOSTS")
            return
        reason = cross_site_reason(scope["method"], headers)
        if reason is not None:
            await self._refuse(send, path, 403, reason)
            return

        state: dict[str, object] = scope.setdefault("state", {})
        nonce = _cookie(headers, CSRF_COOKIE)
        new_nonce = None if nonce and _NONCE.fullmatch(nonce) else new_csrf_nonce()
        state["csrf_nonce"] = new_nonce or nonce

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                out = MutableHeaders(scope=message)
                self._add_headers(out, path)
                if new_nonce:
                    out.append("set-cookie", self._cookie(CSRF_COOKIE, new_nonce, max_age=None, samesite="strict"))
                refreshed = state.get("session_cookie")
                if isinstance(refreshed, tuple):
                    value, max_age = refreshed
                    out.append("set-cookie", self._cookie(SESSION_COOKIE, value, max_age=max_age, samesite="lax"))
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _add_headers(self, out: MutableHeaders, path: str) -> None:
        for name, value in SECURITY_HEADERS.items():
            out[name] = value
        if self.secure:
            out["strict-transport-security"] = HSTS
        if "cache-control" not in out:
            # Style sheet and script: revalidate (no patient data); pages and JSON: never stored.
            out["cache-control"] = "no-cache" if path.startswith("/static/") else "no-store"

    def _cookie(self, name: str, value: str, *, max_age: int | None, samesite: str) -> str:
        return cookie_header(name, value, max_age=max_age, secure=self.secure, samesite=samesite).decode("latin-1")

    async def _refuse(self, send: Send, path: str, status: int, reason: str) -> None:
        if path.startswith("/api/") or path == "/readyz":
            body, media_type = json.dumps({"detail": reason}).encode(), "application/json"
        else:
            body, media_type = (reason + "\n").encode(), "text/plain; charset=utf-8"
        out = MutableHeaders(raw=[(b"content-type", media_type.encode()), (b"content-length", str(len(body)).encode())])
        self._add_headers(out, path)
        await send({"type": "http.response.start", "status": status, "headers": out.raw})
        await send({"type": "http.response.body", "body": body})


def _cookie(headers: Headers, name: str) -> str | None:
    """The value of cookie `name` in the request's Cookie headers, or None."""
    for header in headers.getlist("cookie"):
        for part in header.split(";"):
            key, sep, value = part.strip().partition("=")
            if sep and key == name:
                return value
    return None
