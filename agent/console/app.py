"""The console's web application (Starlette): pages, login, the live feed, the technician's actions.

Security (docs/console.md#security): every route but /login, /lang and /static
needs a session (security.py); every POST needs the session's CSRF token; the
guard reads, the technician also acts, and every action goes to the agent's
socket with the account's name (the agent journals it as ``console.action``).
Pages are server-rendered (Jinja2); the two small scripts in static/ only
follow the live feed and filter it. No inline script: the Content-Security-
Policy allows only this origin's files.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from agent.console.accounts import Accounts
from agent.console.agentlink import AgentLink, AgentUnavailable, Hub
from agent.console.http import LANG_COOKIE, Guard, lang_of, local_time, safe_next, ts_local
from agent.console.security import LoginLimiter, Session, Sessions, tokens_equal
from agent.console.words import ACTION_REASONS, speaking, term, translator
from agent.core.events import PULSE_DEFAULT_S, PULSE_MAX_S, PULSE_MIN_S

__all__ = ["ConsoleSettings", "create_app"]

log = logging.getLogger("agent.console")
HERE = Path(__file__).resolve().parent
COOKIE = "gate_console"
PRE_COOKIE = "gate_console_login"  # the login form's own CSRF token (no session yet)
MODES = ("normal", "entry_only", "free", "lockdown")
MAX_STREAMS = 32
JOURNAL_READERS = 2  # journal reads at once (a search, today's figures, an export); the rest queue
MAX_STREAMS_PER_ACCOUNT = 8  # one guard's open pages cannot take every stream
SHOWN = 500  # journal rows on a page (the CSV has them all)
TECH = "technician"
@dataclass
class ConsoleSettings:
    accounts_path: Path
    socket_path: Path
    journal_path: Path
    presence_path: Path
    names_path: Path | None = None
    https: bool = False
    idle_s: float = 1800.0
    absolute_s: float = 43200.0
    late_after: str = "08:30"


def create_app(settings: ConsoleSettings, *, clock: Callable[[], float] = time.monotonic) -> Starlette:
    accounts = Accounts(settings.accounts_path).load()
    sessions = Sessions(idle_s=settings.idle_s, absolute_s=settings.absolute_s, clock=clock)
    limiter = LoginLimiter(clock=clock)
    link = AgentLink(settings.socket_path)
    hub = Hub(link)
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]),
                      trim_blocks=True, lstrip_blocks=True)
    env.globals.update(local=local_time, ts_local=ts_local)
    streams: Counter[str] = Counter()  # open live streams by account
    # Each journal read holds its rows in memory, on its own thread: a guard clicking Search in
    # many tabs at once would otherwise grow the console past its unit's MemoryMax. They wait here.
    journal_readers = threading.BoundedSemaphore(JOURNAL_READERS)
    @contextlib.contextmanager
    def journal(lang: str) -> Iterator[Any]:
        """The journal, read-only, as one of the JOURNAL_READERS (on a thread: this may wait);
        its errors in ``lang``."""
        from agent.tools.journaltool import open_readonly

        with journal_readers:
            with speaking(lang):
                conn = open_readonly(settings.journal_path)
            try:
                yield conn
            finally:
                conn.close()

    # One password check at a time: each scrypt takes 16 MB and ~0.1 s of a core, and the
    # logins of a crowd of addresses must neither pass the memory cap nor take the gate's CPU.
    checking = asyncio.Semaphore(1)

    # ------------------------------------------------------------------ helpers

    def render(request: Request, template: str, session: Session | None, status: int = 200, **ctx: Any) -> HTMLResponse:
        lang = lang_of(request, session)
        t = translator(lang)
        flash = list(session.flash) if session else []
        if session:
            session.flash.clear()
        html = env.get_template(template).render(
            t=t, term=lambda table, v: term(table, v, lang), lang=lang, s=session, path=request.url.path,
            csrf=session.csrf if session else "", flash=flash, **ctx)
        resp = HTMLResponse(html, status_code=status)
        resp.headers["cache-control"] = "no-store"
        return resp

    def account_current(s: Session) -> bool:
        """Whether the session's account is still as it was at the login; if not (deleted,
        given another role or another password since), the session is dropped."""
        accounts.reload_if_changed()
        acc = accounts.accounts.get(s.account)
        if acc is None or acc.role != s.role or acc.hash != s.password_hash:
            sessions.drop(s.token)
            return False
        return True

    def session_of(request: Request) -> Session | None:
        s = sessions.get(request.cookies.get(COOKIE))
        return s if s is not None and account_current(s) else None

    async def csrf_ok(request: Request, session: Session) -> bool:
        header = request.headers.get("x-csrf-token")
        if header is not None:
            return tokens_equal(header, session.csrf)
        form = await request.form()
        return tokens_equal(form.get("csrf"), session.csrf)  # type: ignore[arg-type]

    def guard(role: str | None = None, *, api: bool = False) -> Callable[[Callable[..., Awaitable[Response]]], Callable[[Request], Awaitable[Response]]]:
        """A route that needs a session (and, with role, that role); POSTs also the CSRF token.
        Without one, a page (GET) sends the browser to the login; ``api`` routes and POSTs say 401."""
        def wrap(handler: Callable[..., Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
            async def endpoint(request: Request) -> Response:
                session = session_of(request)
                if session is None:
                    if request.method == "GET" and not api:  # a page: to the login, and back after it
                        return RedirectResponse("/login?next=" + quote(request.url.path), status_code=303)
                    return JSONResponse({"error": "login required"}, status_code=401)
                if role is not None and session.role != role:
                    log.warning("refused: account %s (%s) asked for %s %s", session.account, session.role,
                                request.method, request.url.path)
                    return render(request, "denied.html", session, status=403)
                if request.method == "POST" and not await csrf_ok(request, session):
                    log.warning("refused: POST %s by %s without a valid CSRF token", request.url.path,
                                session.account)
                    return JSONResponse({"error": "missing or wrong CSRF token; reload the page"}, status_code=403)
                return await handler(request, session)
            endpoint.__name__ = handler.__name__
            return endpoint
        return wrap

    def client(request: Request) -> str:
        return request.client.host if request.client else "?"

    def set_cookie(resp: Response, name: str, value: str, max_age: int | None = None) -> None:
        resp.set_cookie(name, value, max_age=max_age, httponly=True, samesite="strict",
                        secure=settings.https, path="/")

    async def status_now() -> tuple[dict | None, str]:
        st = hub.fresh_status()
        if st is not None:
            return st, ""
        try:
            reply = await link.request("status", timeout=2.0)  # a page says "not reachable" soon, not late
        except AgentUnavailable as exc:
            return None, str(exc)
        if not reply.get("ok") or not isinstance(reply.get("status"), dict):
            return None, str(reply.get("message") or reply)
        return reply["status"], ""

    async def shaped_status() -> tuple[dict | None, str]:
        """The status with every part the pages read in the shape they read it: an agent of
        another version (a part missing, null, of another type) must not break a page."""
        st, error = await status_now()
        if st is None:
            return None, error
        st = dict(st)
        for part in ("fire", "journal", "acl", "clock", "uplink", "outputs", "inputs", "directions"):
            if not isinstance(st.get(part), dict):
                st[part] = {}
        for part in ("readers", "alarms"):
            if not isinstance(st.get(part), list):
                st[part] = []
        st["readers"] = [r for r in st["readers"] if isinstance(r, dict)]
        st["inputs"] = {k: v for k, v in st["inputs"].items() if isinstance(v, dict)}
        if not isinstance(st["acl"].get("age_s"), (int, float)):
            st["acl"]["age_s"] = None
        if not isinstance(st.get("uptime_s"), (int, float)):
            st["uptime_s"] = None
        return st, ""

    # ------------------------------------------------------------------ login

    async def login_page(request: Request) -> Response:
        if session_of(request) is not None:
            return RedirectResponse("/status", status_code=303)
        return _login_form(request, "", 200)

    def _login_form(request: Request, error: str, status: int, name: str = "") -> Response:
        pre = secrets.token_urlsafe(24)
        resp = render(request, "login.html", None, status=status, error=error, pre=pre, name=name,
                      next=safe_next(request.query_params.get("next")), none_yet=not accounts.accounts)
        set_cookie(resp, PRE_COOKIE, pre, max_age=3600)
        return resp

    async def login(request: Request) -> Response:
        form = await request.form()
        name = str(form.get("account", ""))[:64]
        password = str(form.get("password", ""))
        t = translator(lang_of(request, None))
        if not tokens_equal(str(form.get("csrf", "")), request.cookies.get(PRE_COOKIE)):
            log.warning("login refused: no valid login form token from %s", client(request))
            return _login_form(request, t("The login form expired; try again."), 403, name)
        addr = client(request)

        def limited(wait: float) -> Response:
            log.warning("login refused: too many failures (account %r from %s; %.0f s to wait)", name, addr, wait)
            resp = _login_form(request, t("Too many failed logins: wait {n} s and try again.").format(
                n=int(wait) + 1), 429, name)
            resp.headers["retry-after"] = str(int(wait) + 1)
            return resp

        wait = limiter.wait(addr, name)
        if wait > 0:
            return limited(wait)
        accounts.reload_if_changed()
        async with checking:
            # Checked again here, where the checks go one at a time: a burst of logins sent in
            # parallel all passed the check above before any of them had failed.
            wait = limiter.wait(addr, name)
            if wait > 0:
                return limited(wait)
            acc = await run_in_threadpool(accounts.check, name, password)  # scrypt: off the event loop
            if acc is None:
                limiter.failed(addr, name)
            else:
                limiter.succeeded(addr, name)
        if acc is None:
            log.warning("login failed: account %r from %s", name, addr)
            return _login_form(request, t("Wrong account or password."), 401, name)
        session = sessions.create(acc.name, acc.role, lang_of(request, None), acc.hash)
        log.info("login: account %s (%s) from %s", acc.name, acc.role, addr)
        resp = RedirectResponse(safe_next(form.get("next")) or "/status", status_code=303)  # type: ignore[arg-type]
        set_cookie(resp, COOKIE, session.token)
        resp.delete_cookie(PRE_COOKIE, path="/")
        return resp

    @guard()
    async def logout(request: Request, session: Session) -> Response:
        sessions.drop(session.token)
        log.info("logout: account %s from %s", session.account, client(request))
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(COOKIE, path="/")
        return resp

    async def set_lang(request: Request) -> Response:
        lang = request.query_params.get("to")
        lang = lang if lang in ("en", "ru") else "en"
        session = session_of(request)
        if session is not None:
            session.lang = lang
        resp = RedirectResponse(safe_next(request.query_params.get("next")) or "/status", status_code=303)
        set_cookie(resp, LANG_COOKIE, lang, max_age=365 * 86400)
        return resp

    # ------------------------------------------------------------------ pages

    @guard()
    async def home(request: Request, session: Session) -> Response:
        return RedirectResponse("/status", status_code=303)

    @guard()
    async def status_page(request: Request, session: Session) -> Response:
        st, error = await shaped_status()
        return render(request, "status.html", session, st=st, error=error)

    @guard(api=True)
    async def status_json(request: Request, session: Session) -> Response:
        st, error = await status_now()
        return JSONResponse({"status": st, "error": error}, headers={"cache-control": "no-store"})

    @guard()
    async def live_page(request: Request, session: Session) -> Response:
        st, _error = await shaped_status()
        readers = sorted((st or {}).get("directions") or {})
        return render(request, "live.html", session, readers=readers, agent_up=hub.connected)

    @guard(api=True)
    async def live_events(request: Request, session: Session) -> Response:
        if streams.total() >= MAX_STREAMS or streams[session.account] >= MAX_STREAMS_PER_ACCOUNT:
            return JSONResponse({"error": "too many live pages open"}, status_code=503)
        hub.start()
        sub = hub.subscribe()
        streams[session.account] += 1
        width = {"w": _width(hub.status)}

        def enrich(rec: dict, past: bool = False) -> dict:
            out = dict(rec)
            out["_time"] = ts_local(rec.get("ts"), date=False)
            if past:
                out["_past"] = True
            card = rec.get("card")
            if isinstance(card, int):
                from agent.core.cards import CardFormatError, format_key
                with contextlib.suppress(CardFormatError, ValueError):
                    out["_forms"] = format_key(card, width["w"])
            return out

        async def stream():
            try:
                yield "retry: 2000\n\n"
                yield f"event: link\ndata: {json.dumps(hub.connected)}\n\n"
                for rec in list(hub.recent)[-100:]:
                    yield f"event: record\ndata: {json.dumps(enrich(rec, True), ensure_ascii=False)}\n\n"
                while True:
                    item = await sub.get(15.0)
                    if not sessions.alive(request.cookies.get(COOKIE)) or not account_current(session):
                        yield "event: logout\ndata: {}\n\n"  # the session ended: the page goes to the login
                        return
                    if item is None:
                        yield ": keepalive\n\n"
                        continue
                    kind, value = item
                    if kind == "record":
                        value = enrich(value)
                    elif kind == "status":
                        width["w"] = _width(value)
                        value = {"outputs": value.get("outputs"), "inputs": value.get("inputs"),
                                 "mode": value.get("mode")}
                    yield f"event: {kind}\ndata: {json.dumps(value, ensure_ascii=False)}\n\n"
            finally:
                sub.close()
                streams[session.account] -= 1
                if streams[session.account] <= 0:
                    del streams[session.account]

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"cache-control": "no-store", "x-accel-buffering": "no"})

    @guard()
    async def today_page(request: Request, session: Session) -> Response:
        from agent.console.data import chart_svg, today_stats
        from agent.tools.journaltool import JournalReadError

        t = translator(session.lang)
        try:
            def read() -> dict:
                with journal(session.lang) as conn:
                    return today_stats(conn, time.time(), settings.late_after)
            stats = await run_in_threadpool(read)
        except (JournalReadError, OSError, Exception) as exc:  # noqa: BLE001 - a page, not the gate: say it
            return render(request, "today.html", session, error=str(exc), stats=None, chart="")
        chart = chart_svg(stats["ins"], stats["outs"], label_in=t("entries"), label_out=t("exits"),
                          title=t("Passages per 10 minutes"))
        names = _names()
        return render(request, "today.html", session, error="", stats=stats, chart=chart, names=names)

    names_cache: dict[str, Any] = {"stamp": None, "names": {}}

    def _names() -> dict[str, str]:
        """The school's names file, read again only when it changed (it may be megabytes)."""
        if settings.names_path is None:
            return {}
        try:
            st = settings.names_path.stat()
        except OSError:
            return {}
        stamp = (st.st_mtime_ns, st.st_size, st.st_mode)
        if stamp != names_cache["stamp"]:
            from agent.tools.presence import PresenceReadError, load_names
            try:
                names_cache["names"] = load_names(settings.names_path)
            except PresenceReadError as exc:
                log.warning("names file not used: %s", exc)
                names_cache["names"] = {}
            names_cache["stamp"] = stamp
        return names_cache["names"]

    @guard()
    async def presence_page(request: Request, session: Session) -> Response:
        from agent.tools.presence import PresenceReadError, read_presence, rollcall_lists

        names = _names()
        try:
            with speaking(session.lang):
                view = read_presence(settings.presence_path)
        except PresenceReadError as exc:
            return render(request, "presence.html", session, error=str(exc), view=None, names=names)
        people = view["people"]
        inside = sorted((p for p, (i, _w, _g) in people.items() if i),
                        key=lambda p: (names.get(p, "\uffff").casefold(), p))
        rc = view["rollcall"]
        lists = rollcall_lists(rc) if rc is not None else None
        return render(request, "presence.html", session, error="", view=view, names=names, inside=inside,
                      rc=rc, lists=lists, people=people)

    def _journal_query(request: Request, lang: str) -> tuple[dict, dict, str]:
        from agent.tools.journaltool import card_keys, parse_when

        t = translator(lang)
        q = request.query_params
        form = {k: (q.get(k) or "").strip()[:100] for k in ("from", "to", "card", "person", "type")}
        args: dict[str, Any] = {"since_wall": None, "until_wall": None}
        try:
            with speaking(lang):
                args["since_wall"] = parse_when(form["from"] or "today")
                args["until_wall"] = parse_when(form["to"], end=True) if form["to"] else None
        except ValueError as exc:
            return form, args, str(exc)
        if form["card"]:
            try:
                with speaking(lang):
                    args["cards"] = card_keys(form["card"])
            except ValueError as exc:
                return form, args, t("the card {card!r} cannot be read: {error}").format(card=form["card"], error=exc)
        args["person"] = form["person"] or None
        args["kind"] = form["type"] or None
        return form, args, ""

    @guard()
    async def journal_page(request: Request, session: Session) -> Response:
        from agent.console.data import search
        from agent.tools.journaltool import JournalReadError

        form, args, error = _journal_query(request, session.lang)
        rows: list[dict] = []
        more = False
        if not error and request.query_params:
            def read() -> tuple[list[dict], bool]:
                with journal(session.lang) as conn:
                    out = []
                    for rec in search(conn, **args):
                        if len(out) == SHOWN:
                            return out, True
                        out.append(rec)
                    return out, False
            try:
                rows, more = await run_in_threadpool(read)
            except (JournalReadError, Exception) as exc:  # noqa: BLE001
                error = str(exc)
        return render(request, "journal.html", session, form=form, rows=rows, more=more, error=error,
                      searched=bool(request.query_params), query=request.url.query, shown=SHOWN)

    @guard(api=True)
    async def journal_csv(request: Request, session: Session) -> Response:
        from agent.console.data import csv_rows, search
        from agent.tools.journaltool import JournalReadError, open_readonly

        _form, args, error = _journal_query(request, session.lang)
        if error:
            return JSONResponse({"error": error}, status_code=400)
        try:
            with speaking(session.lang):
                conn = open_readonly(settings.journal_path)
        except JournalReadError as exc:
            return JSONResponse({"error": str(exc)}, status_code=503)
        log.info("journal export by %s: %s", session.account, request.url.query)

        def rows():
            try:
                yield "\ufeff"  # a spreadsheet opens UTF-8 CSV right with the byte order mark
                with journal_readers:  # (this runs on a thread of its own, as the pages' reads do)
                    yield from csv_rows(search(conn, **args))
            finally:
                conn.close()

        day = datetime.now().strftime("%Y%m%d-%H%M")
        return StreamingResponse(rows(), media_type="text/csv; charset=utf-8",
                                 headers={"content-disposition": f'attachment; filename="journal-{day}.csv"',
                                          "cache-control": "no-store"})

    # ------------------------------------------------------------------ technician

    @guard(TECH)
    async def tech_page(request: Request, session: Session) -> Response:
        st, error = await shaped_status()
        return render(request, "tech.html", session, st=st, error=error, modes=MODES)

    async def act(session: Session, op: str, **args: Any) -> tuple[bool, str]:
        t = translator(session.lang)
        try:
            reply = await link.request(op, account=session.account, **args)
        except AgentUnavailable as exc:
            log.warning("action %s by %s: agent unavailable (%s)", op, session.account, exc)
            return False, t("The agent does not answer: nothing was done. Is the gate-agent service running?")
        hub.outdated()
        log.info("action %s %s by %s: %s", op, args, session.account,
                 reply.get("result") or reply.get("error"))
        if not reply.get("ok"):
            return False, t("Refused by the agent: {message}").format(message=reply.get("message") or reply.get("error"))
        if reply.get("result") == "refused":
            reason = reply.get("reason")
            said = (f"{t(ACTION_REASONS[reason])} ({reason})" if reason in ACTION_REASONS
                    else term("reason", reason, session.lang))
            return False, t("Refused: {reason}").format(reason=said)
        return True, t("Done.")

    def back(session: Session, ok: bool, text: str, request: Request) -> Response:
        if "application/json" in request.headers.get("accept", ""):
            return JSONResponse({"ok": ok, "message": text}, status_code=200 if ok else 409)
        session.flash.append(("ok" if ok else "error", text))
        return RedirectResponse("/tech", status_code=303)

    @guard(TECH)
    async def tech_pulse(request: Request, session: Session) -> Response:
        form = await request.form()
        line = str(form.get("line", ""))[:64]
        try:
            seconds = float(form.get("seconds") or PULSE_DEFAULT_S)  # type: ignore[arg-type]
        except ValueError:
            seconds = PULSE_DEFAULT_S
        seconds = min(PULSE_MAX_S, max(PULSE_MIN_S, seconds))
        ok, text = await act(session, "pulse", line=line, seconds=seconds)
        return back(session, ok, text, request)

    @guard(TECH)
    async def tech_mode(request: Request, session: Session) -> Response:
        mode = str((await request.form()).get("mode", ""))
        if mode not in MODES:
            return back(session, False, translator(session.lang)("Unknown mode."), request)
        ok, text = await act(session, "set_mode", mode=mode)
        return back(session, ok, text, request)

    @guard(TECH)
    async def tech_open(request: Request, session: Session) -> Response:
        direction = str((await request.form()).get("direction", ""))
        if direction not in ("in", "out"):
            return back(session, False, translator(session.lang)("Unknown direction."), request)
        ok, text = await act(session, "open", direction=direction)
        return back(session, ok, text, request)

    @guard(TECH)
    async def tech_enroll(request: Request, session: Session) -> Response:
        what = str((await request.form()).get("action", "started"))
        ok, text = await act(session, "note", action="enroll",
                             detail="enroll stopped from the console" if what == "stopped"
                             else "enroll started from the console")
        return back(session, ok, text, request)

    # ------------------------------------------------------------------ app

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        hub.start()
        log.info("console ready; accounts: %d; agent socket %s", len(accounts.accounts), settings.socket_path)
        try:
            yield
        finally:
            await hub.stop()

    routes = [
        Route("/", home),
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/lang", set_lang, methods=["GET"]),
        Route("/status", status_page),
        Route("/api/status", status_json),
        Route("/live", live_page),
        Route("/live/events", live_events),
        Route("/today", today_page),
        Route("/presence", presence_page),
        Route("/journal", journal_page),
        Route("/journal.csv", journal_csv),
        Route("/tech", tech_page),
        Route("/tech/pulse", tech_pulse, methods=["POST"]),
        Route("/tech/mode", tech_mode, methods=["POST"]),
        Route("/tech/open", tech_open, methods=["POST"]),
        Route("/tech/enroll", tech_enroll, methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.sessions, app.state.limiter, app.state.hub, app.state.accounts = sessions, limiter, hub, accounts
    app.add_middleware(Guard, https=settings.https)
    return app


def _width(status: Any) -> int:
    """The key width the status gives (24..64), else 24: a card's forms depend on it."""
    w = status.get("key_width") if isinstance(status, dict) else None
    return w if isinstance(w, int) and 24 <= w <= 64 else 24
