"""Sessions, CSRF tokens and the login rate limit of the console (docs/console.md#security).

Sessions live in the console's memory only (a restart logs everyone out, which
is right for a gate's console): the browser holds a random 256-bit token in an
HttpOnly, SameSite=Strict cookie (Secure under HTTPS), and nothing else. A
session ends after ``idle_s`` without a request or ``absolute_s`` after the
login, whichever comes first. Each session has its own CSRF token, required on
every POST (form field ``csrf`` or header ``X-CSRF-Token``).

The login limit counts failures per client address and per account name: the
first ``free`` failures cost nothing, each one after doubles the wait (2 s, 4 s,
... at most ``max_wait_s``). While a wait runs the password is not even checked,
so guessing costs an attacker time, not the board's CPU (scrypt).
"""
from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["LoginLimiter", "Session", "Sessions", "tokens_equal"]

MAX_SESSIONS = 200
MAX_SESSIONS_PER_ACCOUNT = 10  # a guard's logins on every post of the school, and some to spare
MAX_TRACKED = 4096  # addresses and names the limiter remembers (a flood of names cannot grow it)


def tokens_equal(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(str(a).encode(), str(b).encode())


@dataclass
class Session:
    token: str
    account: str
    role: str
    lang: str
    created: float
    last: float
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    password_hash: str = ""  # the account's at the login: a changed password ends the session
    flash: list[tuple[str, str]] = field(default_factory=list)  # (kind, text) shown once


class Sessions:
    def __init__(self, *, idle_s: float = 1800.0, absolute_s: float = 43200.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.idle_s, self.absolute_s, self.clock = idle_s, absolute_s, clock
        self._by_token: OrderedDict[str, Session] = OrderedDict()

    def create(self, account: str, role: str, lang: str, password_hash: str = "") -> Session:
        now = self.clock()
        self._expire(now)
        # The account's own oldest login goes first: logging in again and again ends only
        # one's own sessions, never another account's.
        own = [t for t, s in self._by_token.items() if s.account == account]
        while len(own) >= MAX_SESSIONS_PER_ACCOUNT:
            del self._by_token[own.pop(0)]
        while len(self._by_token) >= MAX_SESSIONS:
            self._by_token.popitem(last=False)  # then the oldest login of all
        s = Session(secrets.token_urlsafe(32), account, role, lang, now, now, password_hash=password_hash)
        self._by_token[s.token] = s
        return s

    def get(self, token: str | None) -> Session | None:
        """The live session of a cookie (its idle clock restarted), or None."""
        if not token:
            return None
        s = self._by_token.get(token)
        if s is None:
            return None
        now = self.clock()
        if now - s.last > self.idle_s or now - s.created > self.absolute_s:
            del self._by_token[token]
            return None
        s.last = now
        return s

    def alive(self, token: str | None) -> bool:
        """Whether a session is still valid, without counting this as activity (a live page's
        stream asks this: a screen left open is not someone using it)."""
        s = self._by_token.get(token or "")
        now = self.clock()
        return s is not None and now - s.last <= self.idle_s and now - s.created <= self.absolute_s

    def drop(self, token: str | None) -> None:
        self._by_token.pop(token or "", None)

    def drop_account(self, account: str) -> None:
        for t in [t for t, s in self._by_token.items() if s.account == account]:
            del self._by_token[t]

    def _expire(self, now: float) -> None:
        for t in [t for t, s in self._by_token.items()
                  if now - s.last > self.idle_s or now - s.created > self.absolute_s]:
            del self._by_token[t]

    def __len__(self) -> int:
        return len(self._by_token)


class LoginLimiter:
    def __init__(self, *, free: int = 5, base_wait_s: float = 2.0, max_wait_s: float = 900.0,
                 forget_s: float = 3600.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.free, self.base, self.max_wait, self.forget_s, self.clock = free, base_wait_s, max_wait_s, forget_s, clock
        self._fails: OrderedDict[str, tuple[int, float]] = OrderedDict()  # key -> (failures, last failure)

    def _wait(self, key: str, now: float) -> float:
        n, at = self._fails.get(key, (0, 0.0))
        if n and now - at > self.forget_s:
            del self._fails[key]
            return 0.0
        if n < self.free:
            return 0.0
        return max(0.0, at + min(self.max_wait, self.base * 2 ** (n - self.free)) - now)

    def wait(self, address: str, account: str) -> float:
        """Seconds until a login from this address for this account may be tried (0: now)."""
        now = self.clock()
        return max(self._wait("a:" + address, now), self._wait("u:" + account.lower(), now))

    def failed(self, address: str, account: str) -> None:
        now = self.clock()
        for key in ("a:" + address, "u:" + account.lower()):
            n, _at = self._fails.pop(key, (0, 0.0))
            self._fails[key] = (n + 1, now)
        while len(self._fails) > MAX_TRACKED:
            self._fails.popitem(last=False)

    def succeeded(self, address: str, account: str) -> None:
        """The account's count starts again; the address's goes down by one only, so an
        account holder's own logins between guesses at other names do not wipe it."""
        self._fails.pop("u:" + account.lower(), None)
        key = "a:" + address
        n, at = self._fails.get(key, (0, 0.0))
        if n > 1:
            self._fails[key] = (n - 1, at)
        else:
            self._fails.pop(key, None)
