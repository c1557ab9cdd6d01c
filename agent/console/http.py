"""The console's HTTP odds and ends: security headers and a body cap on every response and
request (the ASGI middleware ``Guard``), the page language, times as the board shows them,
and the only redirects allowed after a login.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from agent.console.security import Session

__all__ = ["LANG_COOKIE", "MAX_BODY", "SECURITY_HEADERS", "Guard", "lang_of", "local_time", "safe_next", "ts_local"]

LANG_COOKIE = "gate_console_lang"
MAX_BODY = 16 * 1024
SECURITY_HEADERS = [
    (b"content-security-policy", (b"default-src 'self'; img-src 'self' data:; style-src 'self'; "
                                 b"script-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'")),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


class Guard:
    """ASGI middleware: the security headers on every response (pages, static, errors), and
    no request body over MAX_BODY (every form here is a few hundred bytes; a flood of a body
    must not grow the process towards its memory cap)."""

    def __init__(self, app: Any, https: bool) -> None:
        self.app = app
        self.extra = SECURITY_HEADERS + ([(b"strict-transport-security", b"max-age=31536000")] if https else [])

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def wrapped(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + self.extra
            await send(message)

        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            await JSONResponse({"error": "request body too large"}, status_code=413)(scope, receive, wrapped)
            return
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > MAX_BODY:  # chunked, with no length given: cut it off all the same
                    raise _TooLarge
            return message

        try:
            await self.app(scope, counted, wrapped)
        except _TooLarge:
            await JSONResponse({"error": "request body too large"}, status_code=413)(scope, receive, wrapped)


class _TooLarge(Exception):
    pass


def lang_of(request: Request, session: Session | None) -> str:
    if session is not None:
        return session.lang
    chosen = request.cookies.get(LANG_COOKIE)
    if chosen in ("en", "ru"):
        return chosen
    # Accept-Language: the first of ours wins ("ru-RU,ru;q=0.9,en;q=0.8").
    for part in request.headers.get("accept-language", "").split(","):
        tag = part.split(";")[0].strip().lower()
        if tag.startswith("ru"):
            return "ru"
        if tag.startswith("en"):
            return "en"
    return "en"


def local_time(epoch: float | None, *, date: bool = False) -> str:
    """A time as the board's clock shows it; "-" for none, the number itself for one no date holds."""
    if epoch is None:
        return "-"
    try:
        return datetime.fromtimestamp(epoch).astimezone().strftime("%Y-%m-%d %H:%M:%S" if date else "%H:%M:%S")
    except (OverflowError, ValueError, OSError, TypeError):
        return str(epoch)


def ts_local(ts: Any, *, date: bool = True) -> str:
    from agent.core.presence import record_wall

    if isinstance(ts, (int, float)) and not isinstance(ts, bool):
        return local_time(float(ts), date=date)
    t = record_wall({"ts": ts})
    return local_time(t, date=date) if t is not None else str(ts or "-")

def safe_next(value: Any) -> str:
    """Only a path of this site (never //host or a scheme): no open redirect after the login."""
    v = str(value or "")
    if v.startswith("/") and not v.startswith("//") and "\\" not in v and "\n" not in v and "\r" not in v:
        return v
    return ""
