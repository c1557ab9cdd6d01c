"""The web console (agent/console/, docs/console.md): its security points, one test each, and its pages.

The agent's side of the socket is played by a small fake server of its protocol
(one JSON object a line each way: agent/consolesock.py) in this file; the real agent's socket has its
own tests (tests/test_consolesock.py) and the browser tests drive both together.
"""
from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from agent.console.accounts import Accounts, verify_password
from agent.console.app import ConsoleSettings, create_app
from agent.core.events import Now
from agent.core.records import make_record

ROOT = Path(__file__).resolve().parent.parent
BOOT = "5f0c1d2e-7a4b-4c3d-9e8f-0a1b2c3d4e5f"
FAST = {"n": 2, "r": 1, "p": 1}  # scrypt parameters for test accounts (the format is the point here)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def status_doc(mode: str = "normal", led: bool = False) -> dict:
    return {"site": "school-17", "gate": "main-1", "version": "0.1.0", "fastpath": "compiled", "uptime_s": 3600.0,
            "mode": mode, "commanded_mode": mode, "fire": {"latched": False, "loop_open": False},
            "outputs": {"unlock_a": False, "unlock_b": False, "stop": False, "entry.led": led},
            "inputs": {"pass_a": {"active": False, "meaning": "passage sensor A"},
                       "fire_loop": {"active": False, "meaning": "fire alarm loop"}},
            "readers": [{"name": "entry", "type": "wiegand", "direction": "in", "online": True, "errors": 0,
                         "last_read": None}],
            "journal": {"backlog": 7, "last_seq": 1042},
            "acl": {"version": "2026-09-01.1", "cards": 1481, "age_s": 3600.0, "stale": False},
            "clock": {"synced": True, "now": "2026-09-01T07:45:00.000Z"},
            "uplink": {"enabled": True, "connected": False}, "alarms": ["acl_stale"],
            "key_width": 24, "directions": {"entry": "in", "exit": "out"}}


class FakeAgent:
    """The agent's console socket, as docs/console.md describes it, on its own thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.requests: list[dict] = []
        self.watches = 0
        self.status = status_doc()
        self._watchers: list[asyncio.StreamWriter] = []
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_unix_server(self._client, str(self.path)))
        ready.set()
        self.loop.run_forever()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                req = json.loads(line)
                self.requests.append(req)
                op = req.get("op")
                if op == "watch":
                    self.watches += 1
                    writer.write(b'{"ok":true,"op":"watch"}\n')
                    writer.write((json.dumps({"status": self.status}) + "\n").encode())
                    await writer.drain()
                    self._watchers.append(writer)
                    return  # the watch stays open; push() writes to it
                if op == "status":
                    reply = {"ok": True, "op": "status", "status": self.status}
                elif op == "pulse" and req.get("line") in ("unlock_a", "unlock_b"):
                    reply = {"ok": True, "op": op, "result": "refused", "reason": "use_open"}
                elif op in ("set_mode", "open", "pulse", "note"):
                    if op == "set_mode":
                        self.status = {**self.status, "mode": req["mode"]}
                    reply = {"ok": True, "op": op, "result": "done",
                             "record": {"type": "console.action", "account": req.get("account"), "action": op}}
                else:
                    reply = {"ok": False, "error": "unknown_op", "message": f"unknown op {op!r}"}
                writer.write((json.dumps(reply) + "\n").encode())
                await writer.drain()
        except (ConnectionError, ValueError):
            pass

    def push(self, line: dict) -> None:
        def send() -> None:
            for w in list(self._watchers):
                w.write((json.dumps(line) + "\n").encode())
        self.loop.call_soon_threadsafe(send)

    def actions(self) -> list[dict]:
        return [r for r in self.requests if r.get("op") not in ("watch", "status", "ping")]

    def close(self) -> None:
        def stop() -> None:
            for w in self._watchers:
                w.transport.abort()  # as the kernel does for a killed process
            self.server.close()
            self.loop.call_later(0.1, self.loop.stop)  # let the closes go out first
        self.loop.call_soon_threadsafe(stop)
        self.thread.join(5)


@pytest.fixture
def short_dir():
    d = Path(tempfile.mkdtemp(prefix="gc-", dir="/tmp"))  # a Unix socket's path is at most 107 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def site(short_dir):
    """A state directory with two accounts (tech/tech-pass technician, guard/guard-pass guard)."""
    accounts = Accounts(short_dir / "console-accounts.json")
    accounts.add("tech", "technician", "tech-pass", **FAST)
    accounts.add("guard", "guard", "guard-pass", **FAST)
    return short_dir


def settings_for(d: Path, **kw) -> ConsoleSettings:
    return ConsoleSettings(accounts_path=d / "console-accounts.json", socket_path=d / "console.sock",
                           journal_path=d / "journal.db", presence_path=d / "presence.json", names_path=None, **kw)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def agent(site):
    fake = FakeAgent(site / "console.sock")
    yield fake
    fake.close()


def client_for(site: Path, clock=time.monotonic, base_url: str = "http://testserver", **kw) -> TestClient:
    return TestClient(create_app(settings_for(site, **kw), clock=clock), base_url=base_url, follow_redirects=False)


def login(c: TestClient, name: str, password: str, *, headers: dict | None = None):
    page = c.get("/login", headers=headers)
    token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    return c.post("/login", data={"account": name, "password": password, "csrf": token, "next": ""}, headers=headers)


def csrf_of(c: TestClient, path: str = "/status") -> str:
    return re.search(r'name="csrf" value="([^"]+)"', c.get(path).text).group(1)


def wait_until(pred, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# --------------------------------------------------------------------------- security


def test_nothing_but_the_login_page_and_static_files_without_a_login(site):
    app = create_app(settings_for(site))
    with TestClient(app, follow_redirects=False) as c:
        assert c.get("/login").status_code == 200
        assert c.get("/static/console.css").status_code == 200
        paths = [(r.path, m) for r in app.routes if hasattr(r, "methods") for m in r.methods if m != "HEAD"]
        assert len(paths) > 15
        for path, method in paths:
            if path in ("/login", "/lang"):
                continue
            r = c.request(method, path)
            if method == "GET" and path not in ("/live/events", "/api/status", "/journal.csv"):
                assert r.status_code == 303 and r.headers["location"].startswith("/login"), (method, path)
            else:
                assert r.status_code in (401, 303), (method, path)
            assert "school-17" not in r.text and "Journal" not in r.text
        # A forged cookie is no session.
        c.cookies.set("gate_console", "x" * 43)
        assert c.get("/journal.csv").status_code == 401


def test_the_session_cookie_is_httponly_strict_and_secure_under_https(site):
    with client_for(site) as c:
        r = login(c, "tech", "tech-pass")
        assert r.status_code == 303
        cookie = r.headers["set-cookie"]
        assert "gate_console=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
        assert "Secure" not in cookie
        assert c.get("/status").status_code == 200
    with client_for(site, base_url="https://testserver", https=True) as c:
        r = login(c, "tech", "tech-pass")
        assert "Secure" in r.headers["set-cookie"]
        assert r.headers["strict-transport-security"]
        page = c.get("/status")
        assert page.status_code == 200
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert page.headers["x-frame-options"] == "DENY"


def test_a_session_ends_after_30_idle_minutes_and_after_12_hours_whatever_it_does(site):
    clock = Clock()
    with client_for(site, clock=clock) as c:
        login(c, "guard", "guard-pass")
        clock.t += 29 * 60
        assert c.get("/status").status_code == 200
        clock.t += 31 * 60
        r = c.get("/status")
        assert r.status_code == 303 and r.headers["location"].startswith("/login")
        login(c, "guard", "guard-pass")
        for _ in range(12 * 6 - 1):  # busy all day: a request every 10 minutes
            clock.t += 600
            assert c.get("/today").status_code == 200
        clock.t += 601
        assert c.get("/today").status_code == 303


def test_every_post_needs_the_session_csrf_token_in_the_form_or_the_header(site, agent):
    with client_for(site) as c:
        login(c, "tech", "tech-pass")
        token = csrf_of(c)
        assert c.post("/tech/mode", data={"mode": "lockdown"}).status_code == 403
        assert c.post("/tech/mode", data={"mode": "lockdown", "csrf": "nope"}).status_code == 403
        assert c.post("/tech/open", data={"direction": "in"}, headers={"X-CSRF-Token": "nope"}).status_code == 403
        assert c.post("/logout").status_code == 403
        assert agent.actions() == []  # nothing reached the gate
        r = c.post("/tech/mode", data={"mode": "lockdown", "csrf": token})
        assert r.status_code == 303
        r = c.post("/tech/enroll", headers={"X-CSRF-Token": token, "Accept": "application/json"})
        assert r.status_code == 200 and r.json()["ok"]
        assert [a["op"] for a in agent.actions()] == ["set_mode", "note"]
    with client_for(site) as c:  # the login form has its own token, tied to its cookie
        r = c.post("/login", data={"account": "tech", "password": "tech-pass", "csrf": "guess"})
        assert r.status_code == 403 and "gate_console=" not in r.headers.get("set-cookie", "")


def test_logins_are_limited_per_address_and_per_account_with_a_growing_wait(site):
    clock = Clock()
    app = create_app(settings_for(site), clock=clock)
    with TestClient(app, follow_redirects=False, client=("10.0.0.5", 4000)) as c:
        for _ in range(5):
            assert login(c, "tech", "wrong").status_code == 401
        r = login(c, "tech", "tech-pass")  # right, but too soon: not even checked
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert login(c, "guard", "guard-pass").status_code == 429  # the address waits for any account
    with TestClient(app, follow_redirects=False, client=("10.0.0.6", 4000)) as other:
        assert login(other, "tech", "tech-pass").status_code == 429  # the account waits from any address
        clock.t += 2.5
        assert login(other, "tech", "wrong-again").status_code == 401  # the 6th failure: now 4 s
        clock.t += 2.5
        assert login(other, "tech", "tech-pass").status_code == 429
        clock.t += 2
        assert login(other, "tech", "tech-pass").status_code == 303


def test_a_guard_gets_403_on_every_technician_page_and_action(site, agent):
    with client_for(site) as c:
        login(c, "guard", "guard-pass")
        token = csrf_of(c)
        assert "/tech" not in c.get("/status").text
        assert c.get("/tech").status_code == 403
        for path, data in (("/tech/mode", {"mode": "free"}), ("/tech/open", {"direction": "in"}),
                           ("/tech/pulse", {"line": "entry.led"}), ("/tech/enroll", {})):
            assert c.post(path, data={**data, "csrf": token}).status_code == 403, path
        assert agent.actions() == []
        for path in ("/status", "/live", "/today", "/presence", "/journal"):
            assert c.get(path).status_code == 200, path


def test_every_technician_action_goes_to_the_agent_with_the_account(site, agent):
    with client_for(site) as c:
        login(c, "tech", "tech-pass")
        token = csrf_of(c)
        c.post("/tech/mode", data={"mode": "entry_only", "csrf": token})
        c.post("/tech/open", data={"direction": "out", "csrf": token})
        c.post("/tech/pulse", data={"line": "entry.led", "seconds": "1", "csrf": token})
        r = c.post("/tech/pulse", data={"line": "unlock_a", "csrf": token})
        assert r.status_code == 303
        shown = c.get("/tech").text
        assert "use_open" in shown and "opened with Manual open" in shown  # the refusal, said once
        assert "use_open" not in c.get("/tech").text
        c.post("/tech/mode", data={"mode": "fire", "csrf": token})  # not a mode a person sets
    acts = agent.actions()
    assert [(a["op"], a.get("mode") or a.get("direction") or a.get("line")) for a in acts] == [
        ("set_mode", "entry_only"), ("open", "out"), ("pulse", "entry.led"), ("pulse", "unlock_a")]
    assert {a["account"] for a in acts} == {"tech"}
    assert acts[2]["seconds"] == 1.0


def test_login_logout_and_failures_are_logged_in_english(site, caplog):
    caplog.set_level(logging.INFO, logger="agent.console")
    with client_for(site) as c:
        login(c, "tech", "bad")
        login(c, "tech", "tech-pass")
        c.post("/logout", data={"csrf": csrf_of(c)})
        assert c.get("/status").status_code == 303  # the session is gone
    text = caplog.text
    assert "login failed: account 'tech' from testclient" in text
    assert "login: account tech (technician) from testclient" in text
    assert "logout: account tech" in text


def test_a_deleted_account_or_a_new_password_ends_its_sessions_and_no_next_leads_off_site(site):
    with client_for(site) as c:
        page = c.get("/login?next=//evil.example/x")
        token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
        r = c.post("/login", data={"account": "guard", "password": "guard-pass", "csrf": token,
                                   "next": "//evil.example/x"})
        assert r.headers["location"] == "/status"
        assert c.get("/status").status_code == 200
        for bad in ("//evil.example/x", "https://evil.example/", "/\\evil.example"):
            assert c.get("/lang", params={"to": "ru", "next": bad}).headers["location"] == "/status"
        accounts = Accounts(site / "console-accounts.json").load()
        accounts.set_password("guard", "a new one", **FAST)
        assert c.get("/status").status_code == 303  # a new password: log in again
        assert login(c, "guard", "a new one").status_code == 303
        assert c.get("/status").status_code == 200
        accounts.remove("guard")
        assert c.get("/status").status_code == 303


# --------------------------------------------------------------------------- accounts and the command line


def test_the_accounts_file_is_0600_with_a_salted_scrypt_hash_per_user(site):
    path = site / "console-accounts.json"
    assert (path.stat().st_mode & 0o777) == 0o600
    doc = json.loads(path.read_text())
    h1, h2 = doc["accounts"]["tech"]["hash"], doc["accounts"]["guard"]["hash"]
    assert h1.startswith("scrypt$2$1$1$") and "tech-pass" not in path.read_text()
    assert h1.split("$")[4] != h2.split("$")[4]  # each its own salt
    assert verify_password("tech-pass", h1) and not verify_password("tech-pasS", h1)
    assert Accounts(path).load().check("nobody", "x") is None


def _cli(*args: str, stdin: str = "", env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], check=False, input=stdin, capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env={**os.environ, "LANG": "C.UTF-8", "LANGUAGE": "", **(env or {})})


def test_user_add_list_passwd_del_and_serve_stays_off_until_an_account_exists(short_dir):
    cfg = short_dir / "agent.toml"
    cfg.write_text(f'[service]\nstate_dir = "{short_dir / "state"}"\n')
    (short_dir / "state").mkdir()
    r = _cli("console", "serve", "--config", str(cfg), "--port", "0")
    assert r.returncode == 2
    assert "no account in" in r.stderr and "console user add" in r.stderr
    r = _cli("console", "user", "add", "ivanova", "--role", "guard", "--password-stdin", "--config", str(cfg),
             stdin="a long secret\n")
    assert r.returncode == 0, r.stderr
    path = short_dir / "state" / "console-accounts.json"
    assert (path.stat().st_mode & 0o777) == 0o600
    assert Accounts(path).load().check("ivanova", "a long secret").role == "guard"
    assert _cli("console", "user", "add", "ivanova", "--role", "guard", "--password-stdin", "--config", str(cfg),
                stdin="x\n").returncode == 2
    assert _cli("console", "user", "add", "bad name", "--role", "guard", "--password-stdin", "--config",
                str(cfg), stdin="secret1\n").returncode == 2
    r = _cli("console", "user", "list", "--config", str(cfg))
    assert r.stdout.startswith("ivanova\tguard\t")
    assert _cli("console", "user", "passwd", "ivanova", "--password-stdin", "--config", str(cfg),
                stdin="another one\n").returncode == 0
    assert Accounts(path).load().check("ivanova", "another one") is not None
    r = _cli("console", "user", "del", "ivanova", "--config", str(cfg), env={"LANGUAGE": "ru", "LANG": "ru_RU.UTF-8"})
    assert r.returncode == 0 and re.search("[А-Яа-я]", r.stdout)
    assert Accounts(path).load().accounts == {}


# --------------------------------------------------------------------------- pages


def test_status_says_plainly_when_the_agent_is_not_reachable_and_still_serves(site):
    with client_for(site) as c:
        login(c, "guard", "guard-pass")
        r = c.get("/status")
        assert r.status_code == 200 and 'id="agent-down"' in r.text


def test_status_shows_the_mode_lines_readers_backlog_list_clock_uplink_alarms(site, agent):
    with client_for(site) as c:
        login(c, "tech", "tech-pass")
        r = c.get("/status")
        text = r.text
        for word in ("normal", "entry.led", "pass_a", "fire_loop", "entry", "2026-09-01.1", "acl_stale",
                     'id="backlog">7<', "not connected"):
            assert word in text, word
        r = c.get("/status", headers={"Accept-Language": "ru"})  # the session's language wins: still English
        assert "Mode" in r.text


def test_russian_from_accept_language_and_the_switch_per_session(site, agent):
    from agent.i18n import catalog

    normal_ru = catalog("ru")["normal mode"]
    with client_for(site) as c:
        assert "Вход" in c.get("/login", headers={"Accept-Language": "ru-RU,ru;q=0.9,en;q=0.8"}).text
        assert "Вход" not in c.get("/login", headers={"Accept-Language": "en-GB,ru;q=0.5"}).text
        login(c, "tech", "tech-pass", headers={"Accept-Language": "ru-RU,ru;q=0.9"})
        page = c.get("/status").text
        assert "Режим" in page and f"{normal_ru} (normal)" in page and "Mode" not in page
        c.get("/lang?to=en&next=/status")
        page = c.get("/status", headers={"Accept-Language": "ru"}).text  # the session's choice wins
        assert "Mode" in page and "Режим" not in page
        c.get("/lang?to=ru&next=/tech")
        assert "Ручное открытие" in c.get("/tech").text


def test_one_watch_upstream_is_fanned_out_to_every_live_page(site, agent):
    app = create_app(settings_for(site))
    with TestClient(app, follow_redirects=False) as c:
        login(c, "guard", "guard-pass")
        hub = app.state.hub
        wait_until(lambda: hub.connected, "the hub's watch")
        a, b = hub.subscribe(), hub.subscribe()
        rec = {"type": "access.denied", "reader": "entry", "direction": "in", "card": 6613779, "format": "w26",
               "person": None, "reason": "unknown_card", "ts": "2026-09-01T07:45:00.754Z", "seq": 5}
        agent.push({"record": rec})
        got = []

        async def take(sub):
            while True:
                item = await sub.get(10)
                if item is None or item[0] == "record":
                    return item

        for sub in (a, b):
            got.append(c.portal.call(take, sub) if hasattr(c, "portal") else None)
        assert agent.watches == 1
        assert [g[1]["card"] for g in got if g] == [6613779, 6613779]


def test_the_live_feed_streams_a_card_read_with_all_its_forms(site, agent):
    app = create_app(settings_for(site))
    with TestClient(app, follow_redirects=False) as c:
        login(c, "tech", "tech-pass")
        wait_until(lambda: app.state.hub.connected, "the hub's watch")
        rec = {"type": "access.denied", "reader": "entry", "direction": "in", "card": 6613779, "format": "w26",
               "person": None, "reason": "unknown_card", "ts": "2026-09-01T07:45:00.754Z", "seq": 5}
        threading.Timer(0.5, agent.push, args=({"record": rec},)).start()
        with c.stream("GET", "/live/events") as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("data: {") and '"card"' in line:
                    data = json.loads(line[6:])
                    break
        assert data["_forms"]["facility_card"] == "100,60179" and data["_forms"]["em_print"] == "0006613779"
        # The page went away: its subscription goes too (the shared watch stays).
        wait_until(lambda: not app.state.hub.subscribers, "the closed page's subscription to end")
        assert agent.watches == 1


def _journal(path: Path, records: list[tuple[float, str, dict]]) -> None:
    from agent.uplink.journal import Journal

    j = Journal(path, boot=BOOT, clock=lambda: Now(mono=1.0, wall=records[0][0], synced=True))
    j.commit([make_record(kind, Now(mono=10.0 + i, wall=wall, synced=True), BOOT, **fields)
              for i, (wall, kind, fields) in enumerate(records)])
    j.maintenance(records[-1][0])
    j.close()


def _today_at(hh: int, mm: int) -> float:
    from datetime import datetime
    return datetime.now().astimezone().replace(hour=hh, minute=mm, second=5, microsecond=0).timestamp()


def _passage(person, direction="in", card=6613779):
    return {"direction": direction, "source": "card", "person": person, "card": card, "after_ms": 900}


def test_today_draws_passages_per_10_minutes_denials_by_reason_and_late_arrivals(site):
    _journal(site / "journal.db", [
        (_today_at(8, 1), "passage", _passage("p-1")),
        (_today_at(8, 5), "passage", _passage("p-2")),
        (_today_at(8, 41), "passage", _passage("p-3")),  # late
        (_today_at(8, 50), "passage", _passage("p-1", "out")),
        (_today_at(9, 10), "passage", _passage("p-1")),  # came back: not late, first entry 08:01
        (_today_at(9, 12), "access.denied", {"reader": "entry", "direction": "in", "card": 5, "format": "w26",
                                             "person": None, "reason": "unknown_card"}),
    ])
    with client_for(site) as c:
        login(c, "guard", "guard-pass")
        text = c.get("/today").text
    assert 'id="passages">5<' in text
    svg = re.search(r"<svg.*?</svg>", text, re.DOTALL).group(0)
    assert svg.count('class="bin"') == 3 and svg.count('class="bout"') == 1  # 08:00 (2), 08:40, 09:10 / 08:50
    assert "08:00 entries: 2" in svg
    late = re.search(r'id="late">(.*?)</table>', text, re.DOTALL).group(1)
    assert "p-3" in late and "p-1" not in late and "p-2" not in late
    assert "unknown_card" in re.search(r'id="denials">(.*?)</table>', text, re.DOTALL).group(1)


def test_journal_search_by_card_in_any_form_and_person_and_the_csv_export(site):
    _journal(site / "journal.db", [
        (_today_at(8, 1), "passage", _passage("p-1", card=6613779)),
        (_today_at(8, 2), "passage", _passage("=cmd|x", card=42)),
        (_today_at(8, 3), "access.denied", {"reader": "entry", "direction": "in", "card": 6613779, "format": "w26",
                                            "person": "p-1", "reason": "outside_schedule"}),
    ])
    with client_for(site) as c:
        login(c, "guard", "guard-pass")
        for form in ("100,60179", "0006613779", "6613779"):
            text = c.get("/journal", params={"from": "today", "card": form}).text
            assert text.count("<td>p-1</td>") == 2, form
        assert c.get("/journal", params={"from": "not a day"}).text.count("is not a date") == 1
        r = c.get("/journal.csv", params={"from": "today", "person": "p-1"})
        assert r.headers["content-disposition"].startswith("attachment")
        rows = list(csv.reader(io.StringIO(r.text.lstrip("\ufeff"))))
        assert rows[0][:4] == ["seq", "id", "ts", "type"]
        assert [x[3] for x in rows[1:]] == ["passage", "access.denied"]
        assert json.loads(rows[1][-1]) == {"after_ms": 900}
        r = c.get("/journal.csv", params={"from": "today"})
        assert "'=cmd|x" in r.text  # a spreadsheet never runs a cell as a formula


def test_presence_and_the_roll_call_lists_printable(site):
    from agent.core.presence import Presence, RollCall
    from agent.presencefile import PresenceFile

    now = time.time()
    p = Presence()
    p.roll(now, "UTC")
    p.apply("p-1", True, now - 60, "UTC", "main-1")
    p.apply("p-2", True, now - 50, "UTC", "main-1")
    p.apply("p-3", False, now - 40, "UTC", "main-1")
    p.rollcall = RollCall(started=now - 30, by="fire_loop", gate="main-1", inside=("p-1", "p-2"),
                          left={"p-2": now - 10})
    assert PresenceFile(site / "presence.json", site="school-17", gate="main-1").save(p, now)
    with client_for(site) as c:
        login(c, "guard", "guard-pass")
        text = c.get("/presence").text
    assert 'id="inside-count">2<' in text
    assert "p-1" in re.search(r'id="rc-not_seen_leaving">(.*?)</table>', text, re.DOTALL).group(1)
    assert "p-2" not in re.search(r'id="rc-not_seen_leaving">(.*?)</table>', text, re.DOTALL).group(1)
    assert 'href="/static/print.css" media="print"' in text


def test_every_page_text_is_in_the_catalogue_words_table():
    from agent.console.words import PAGE_WORDS

    used = set()
    for f in [*sorted((ROOT / "agent/console/templates").glob("*.html")), ROOT / "agent/console/app.py"]:
        used |= {m.group(2) for m in re.finditer(r"""\bt\((["'])(.*?)\1\)""", f.read_text())}
    assert used and used <= set(PAGE_WORDS), sorted(used - set(PAGE_WORDS))
    from agent import i18n
    assert "agent/console/words.py" in i18n.TRANSLATED_MODULES


# --------------------------------------------------------------------------- the unit and the demo hook

CONSOLE_UNIT = ROOT / "systemd" / "gate-agent-console.service"


def test_the_console_unit_runs_as_the_agent_user_after_it_hardened_and_capped(tmp_path):
    text = CONSOLE_UNIT.read_text()
    for line in ("User=gate-agent", "After=gate-agent.service network-online.target", "Restart=on-failure",
                 "MemoryMax=80M", "RestartPreventExitStatus=2", "NoNewPrivileges=yes", "ProtectSystem=strict",
                 "CapabilityBoundingSet=\n",
                 # off until an account exists: skipped at boot, not failed, while there is none
                 "ConditionPathExists=/var/lib/gate-agent/console-accounts.json"):
        assert line in text, line
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed here")
    root = tmp_path / "root" / "etc" / "systemd" / "system"
    root.mkdir(parents=True)
    unit = root / CONSOLE_UNIT.name
    unit.write_text(text.replace("ExecStart=/opt/gate-agent/venv/bin/gate-agent", "ExecStart=/bin/true"))
    res = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0 and CONSOLE_UNIT.name not in res.stderr, res.stderr
    res = subprocess.run([tool, "security", "--offline=yes", f"--root={tmp_path / 'root'}", CONSOLE_UNIT.name],
                         capture_output=True, text=True, timeout=60, check=False)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", res.stdout)
    assert m and float(m.group(1)) < 3.0, res.stdout + res.stderr


def test_the_demo_hook_starts_a_console_with_its_two_accounts(short_dir):
    import httpx

    from agent.console.demo import start_demo_console

    cfg = short_dir / "agent.toml"
    cfg.write_text(f'[service]\nstate_dir = "{short_dir / "state"}"\n')
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = start_demo_console(cfg, port)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                page = httpx.get(base + "/login", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "the console did not start"
                time.sleep(0.1)
        with httpx.Client(base_url=base, timeout=10) as c:
            for name, role in (("demo", "technician"), ("guard", "guard")):
                page = c.get("/login")
                token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
                r = c.post("/login", data={"account": name, "password": name, "csrf": token, "next": ""})
                assert r.status_code == 303, name
                assert (c.get("/tech").status_code == 200) == (role == "technician")
                c.post("/logout", data={"csrf": csrf_of(c)})
    finally:
        proc.terminate()
        proc.wait(10)


# --------------------------------------------------------------------------- attacks


def test_a_big_body_is_refused_before_it_is_read_and_pages_escape_what_records_hold(site):
    _journal(site / "journal.db", [(_today_at(8, 1), "passage", _passage("<script>alert(1)</script>"))])
    with client_for(site) as c:
        r = c.post("/login", content=b"account=" + b"a" * (1 << 20), headers={"content-type": "application/x-www-form-urlencoded"})
        assert r.status_code == 413

        def chunks():
            for _ in range(64):
                yield b"a" * 4096

        r = c.post("/login", content=chunks(), headers={"content-type": "application/x-www-form-urlencoded"})
        assert r.status_code == 413
        login(c, "guard", "guard-pass")
        text = c.get("/journal", params={"from": "today"}).text
        assert "<script>alert" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text


def test_password_checks_run_one_at_a_time(site, monkeypatch):
    """A crowd of logins at once must not run a crowd of 16 MB scrypt checks at once."""
    from agent.console import accounts as accounts_mod

    running, peak = [0], [0]
    real = accounts_mod.verify_password

    def counting(password, stored):
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        try:
            return real(password, stored)
        finally:
            running[0] -= 1

    monkeypatch.setattr(accounts_mod, "verify_password", counting)
    import httpx

    app = create_app(settings_for(site))

    async def one(i: int) -> int:
        transport = httpx.ASGITransport(app=app, client=(f"10.1.0.{i}", 1))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            page = await c.get("/login")
            token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
            r = await c.post("/login", data={"account": f"user{i}", "password": "x", "csrf": token})
            return r.status_code

    async def crowd() -> list[int]:
        return list(await asyncio.gather(*(one(i) for i in range(6))))

    assert asyncio.run(crowd()) == [401] * 6
    assert peak[0] == 1


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_uses_the_gates_certificate_for_https_by_default(short_dir):
    import httpx

    from tests.pki import TestCA

    ca = TestCA(short_dir / "pki")
    gate = ca.issue("main-1", server=True)
    state = short_dir / "state"
    state.mkdir()
    cfg = short_dir / "agent.toml"
    cfg.write_text(f'[service]\nstate_dir = "{state}"\n[mqtt]\nhost = "broker"\n[mqtt.tls]\n'
                   f'ca_file = "{ca.cert_path}"\ncert_file = "{gate.cert}"\nkey_file = "{gate.key}"\n')
    Accounts(state / "console-accounts.json").add("tech", "technician", "tech-pass", **FAST)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "console", "serve", "--config", str(cfg),
                             "--port", str(port)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=str(ca.cert_path), timeout=5) as c:
            while True:
                try:
                    page = c.get("/login")
                    break
                except httpx.TransportError:
                    assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
                    time.sleep(0.1)
            token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
            r = c.post("/login", data={"account": "tech", "password": "tech-pass", "csrf": token})
            assert r.status_code == 303 and "Secure" in r.headers["set-cookie"]
        with pytest.raises(httpx.TransportError):  # no plain HTTP on that port
            httpx.get(f"http://127.0.0.1:{port}/login", timeout=5)
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_live_stream_ends_with_its_session_and_does_not_keep_it_alive(site, agent):
    clock = Clock()
    app = create_app(settings_for(site), clock=clock)
    with TestClient(app, follow_redirects=False) as c:
        login(c, "guard", "guard-pass")
        wait_until(lambda: app.state.hub.connected, "the hub's watch")
        events = []
        with c.stream("GET", "/live/events") as r:
            for line in r.iter_lines():
                if line.startswith("event: "):
                    events.append(line[7:])
                if line.startswith("data: ") and events[-1] in ("link", "status"):
                    if events.count("status") == 3:
                        break  # 48 minutes and still streaming: wrong
                    clock.t += 16 * 60  # the page open, nobody clicking: 16 min, then 32, then 48
                    agent.push({"status": agent.status})
                if events[-1:] == ["logout"]:
                    break
        assert events[-1] == "logout" and events.count("status") == 1  # nothing sent past 30 idle minutes
        assert c.get("/status").status_code == 303


def test_a_hung_agent_is_said_plainly_within_seconds(site):
    import socket

    hung = socket.socket(socket.AF_UNIX)
    hung.bind(str(site / "console.sock"))
    hung.listen(16)  # connections are taken by the kernel, never answered
    try:
        with client_for(site) as c:
            login(c, "guard", "guard-pass")
            t0 = time.monotonic()
            r = c.get("/status")
            assert r.status_code == 200 and 'id="agent-down"' in r.text
            assert time.monotonic() - t0 < 30  # generous: the page itself waits 2 s
    finally:
        hung.close()


def test_a_status_with_nulls_or_odd_values_still_renders(site, agent):
    odd = {k: None for k in status_doc()}
    odd.update({"inputs": {"pass_a": None, "fire_loop": {"active": True, "meaning": "fire alarm loop"}},
                "readers": [{"name": "entry", "type": "wiegand", "direction": "in", "online": None, "errors": 0,
                             "last_read": 1e20}], "clock": {"synced": False, "now": "not a time"}})
    agent.status = odd
    with client_for(site) as c:
        login(c, "tech", "tech-pass")
        for path in ("/status", "/tech", "/live"):
            r = c.get(path)
            assert r.status_code == 200, path
        assert "fire_loop" in c.get("/status").text


def test_the_shared_watch_comes_back_after_the_agent_restarts(site, agent):
    app = create_app(settings_for(site))
    with TestClient(app, follow_redirects=False) as c:
        login(c, "guard", "guard-pass")
        hub = app.state.hub
        wait_until(lambda: hub.connected, "the hub's watch")
        agent.close()  # as a kill -9 leaves it: the watch ends, the socket file stays
        wait_until(lambda: not hub.connected, "the hub to see the agent gone")
        assert 'id="agent-down"' in c.get("/status").text
        os.unlink(site / "console.sock")
        again = FakeAgent(site / "console.sock")
        try:
            wait_until(lambda: hub.connected, "the hub's watch again", timeout=30)
            assert again.watches == 1
            assert 'id="agent-down"' not in c.get("/status").text
        finally:
            again.close()


def test_the_tools_messages_on_a_page_are_in_the_sessions_language(site):
    from agent import i18n

    i18n.set_language("en")
    try:
        with client_for(site) as c:
            login(c, "guard", "guard-pass", headers={"Accept-Language": "ru"})
            assert re.search("[А-Яа-я]", re.search(r'class="flash error"[^>]*>([^<]*)<', c.get("/today").text).group(1))
            assert re.search("[А-Яа-я]", re.search(r'class="flash error"[^>]*>([^<]*)<',
                                                    c.get("/journal", params={"from": "never"}).text).group(1))
            assert re.search("[А-Яа-я]", re.search(r'class="flash error"[^>]*>([^<]*)<',
                                                    c.get("/presence").text).group(1))
        assert i18n.language() == "en"  # the process's own language is left as it was
    finally:
        i18n.set_language(None)


def _serve(cfg: Path, port: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "agent.cli", "console", "serve", "--config", str(cfg),
                             "--port", str(port), *extra], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _served_cert(port: int, proc: subprocess.Popen) -> bytes:
    """The DER certificate the console serves on 127.0.0.1:port, once it answers."""
    import ssl

    deadline = time.monotonic() + 30
    while True:
        try:
            return ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate(("127.0.0.1", port), timeout=5))
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
            time.sleep(0.1)


def test_a_gate_certificate_for_a_client_only_is_not_served_the_console_makes_its_own(short_dir):
    """Browsers refuse a clientAuth-only certificate for a web page: the console would never open."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from agent.console.tlscert import TLS_DIR
    from tests.pki import TestCA

    ca = TestCA(short_dir / "pki")
    gate = ca.issue("main-1")  # as the region issues them: for the broker, client use only
    state = short_dir / "state"
    state.mkdir()
    cfg = short_dir / "agent.toml"
    cfg.write_text(f'[service]\nstate_dir = "{state}"\n[mqtt]\nhost = "broker"\n[mqtt.tls]\n'
                   f'ca_file = "{ca.cert_path}"\ncert_file = "{gate.cert}"\nkey_file = "{gate.key}"\n')
    Accounts(state / "console-accounts.json").add("tech", "technician", "tech-pass", **FAST)
    prints = []
    for _ in range(2):  # a restart serves the same certificate
        port = _free_port()
        proc = _serve(cfg, port)
        try:
            der = _served_cert(port, proc)
        finally:
            proc.terminate()
            proc.wait(10)
        log = proc.stderr.read().decode()
        served = x509.load_der_x509_certificate(der)
        gate_cert = x509.load_pem_x509_certificate(gate.cert.read_bytes())
        assert served.fingerprint(hashes.SHA256()) != gate_cert.fingerprint(hashes.SHA256())  # not the gate's
        assert served.subject == served.issuer  # the console's own, self-signed
        usage = served.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert ExtendedKeyUsageOID.SERVER_AUTH in usage
        fp = ":".join(f"{b:02X}" for b in served.fingerprint(hashes.SHA256()))
        assert fp in log and "client only" in log  # the technician can compare it with the browser's
        prints.append(fp)
    assert prints[0] == prints[1]
    assert (state / TLS_DIR / "key.pem").stat().st_mode & 0o077 == 0


def test_the_consoles_own_certificate_names_the_bound_address_and_is_made_again_for_a_new_one(tmp_path):
    import ipaddress

    from cryptography import x509

    from agent.console.tlscert import choose

    first = choose(None, None, tmp_path, "192.168.1.20")
    assert first.own and "names no certificate" in first.why
    san = x509.load_pem_x509_certificate(first.cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("192.168.1.20") in san.get_values_for_type(x509.IPAddress)
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    same = choose(None, None, tmp_path, "192.168.1.20")
    assert same.cert.read_bytes() == first.cert.read_bytes()
    moved = choose(None, None, tmp_path, "10.0.0.7")  # the board got another address
    san = x509.load_pem_x509_certificate(moved.cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("10.0.0.7") in san.get_values_for_type(x509.IPAddress)


def test_serve_refuses_a_client_only_certificate_given_outright(short_dir):
    from tests.pki import TestCA

    ca = TestCA(short_dir / "pki")
    gate = ca.issue("main-1")
    state = short_dir / "state"
    state.mkdir()
    cfg = short_dir / "agent.toml"
    cfg.write_text(f'[service]\nstate_dir = "{state}"\n')
    Accounts(state / "console-accounts.json").add("tech", "technician", "tech-pass", **FAST)
    done = subprocess.run([sys.executable, "-m", "agent.cli", "console", "serve", "--config", str(cfg),
                           "--port", str(_free_port()), "--tls-cert", str(gate.cert), "--tls-key", str(gate.key)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "LANGUAGE": "en"})
    assert done.returncode == 2
    assert "client only" in done.stderr and "--tls-cert" in done.stderr


# --------------------------------------------------------------------------- found by an attack run


def test_a_burst_of_parallel_logins_is_limited_like_logins_one_by_one(site):
    """Sent at once, every login passed the limiter before any of them had failed."""
    import httpx

    app = create_app(settings_for(site))

    async def burst() -> list[int]:
        transport = httpx.ASGITransport(app=app, client=("10.0.0.9", 5000))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            page = await c.get("/login")
            token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
            tries = [c.post("/login", data={"account": "tech", "password": f"guess-{i}", "csrf": token})
                     for i in range(30)]
            return [r.status_code for r in await asyncio.gather(*tries)]

    codes = asyncio.run(burst())
    assert codes.count(401) == 5 and codes.count(429) == 25, codes  # five passwords checked, not thirty


def test_an_account_holders_own_logins_do_not_wipe_the_addresses_failures(site):
    """Guessing at other names, with one's own login between every few guesses."""
    clock = Clock()
    app = create_app(settings_for(site), clock=clock)
    codes = []
    for round_ in range(3):
        with TestClient(app, follow_redirects=False, client=("10.0.0.7", 4000)) as c:
            for i in range(4):
                codes.append(login(c, f"teacher{round_}{i}", "summer2026").status_code)
        with TestClient(app, follow_redirects=False, client=("10.0.0.7", 4001)) as own:
            assert login(own, "guard", "guard-pass").status_code in (303, 429)
    assert codes[:4] == [401] * 4 and 429 in codes[4:8], codes  # held back in the second round


def test_a_live_stream_ends_when_its_account_is_deleted(site, agent):
    app = create_app(settings_for(site))
    with TestClient(app, follow_redirects=False) as c:
        login(c, "guard", "guard-pass")
        wait_until(lambda: app.state.hub.connected, "the hub's watch")
        events = []
        with c.stream("GET", "/live/events") as r:
            for line in r.iter_lines():
                if line.startswith("event: "):
                    events.append(line[7:])
                    if events[-1] == "link":
                        Accounts(site / "console-accounts.json").load().remove("guard")
                        agent.push({"record": {"id": "x:1", "type": "access.granted", "person": "p-1"}})
                    if events[-1] == "logout" or len(events) > 200:
                        break
        assert events[-1] == "logout" and "record" not in events[events.index("link"):], events


def test_one_accounts_logins_and_live_pages_do_not_crowd_out_another(site, agent):
    from agent.console.app import MAX_STREAMS_PER_ACCOUNT
    from agent.console.security import MAX_SESSIONS

    app = create_app(settings_for(site))
    with TestClient(app, follow_redirects=False) as tech:
        assert login(tech, "tech", "tech-pass").status_code == 303
        for _ in range(MAX_SESSIONS + 5):  # a guard logging in again and again
            app.state.sessions.create("guard", "guard", "en")
        assert tech.get("/status").status_code == 200  # the technician is still logged in
    with TestClient(app, follow_redirects=False) as guard, TestClient(app, follow_redirects=False) as tech:
        login(guard, "guard", "guard-pass")
        login(tech, "tech", "tech-pass")
        wait_until(lambda: app.state.hub.connected, "the hub's watch")
        held = []
        try:
            for _ in range(MAX_STREAMS_PER_ACCOUNT):
                cm = guard.stream("GET", "/live/events")
                held.append(cm)
                assert cm.__enter__().status_code == 200
            refused = guard.get("/live/events")
            assert refused.status_code == 503  # the guard's own limit
            with tech.stream("GET", "/live/events") as r:  # the technician still gets a live page
                assert r.status_code == 200
        finally:
            for cm in held:
                cm.__exit__(None, None, None)


def test_slow_clients_cannot_hold_the_console(short_dir):
    """Slowloris: requests whose head never ends, and many connections from one address."""
    import socket

    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from agent.console.slowguard import GuardedH11Protocol

    class Quick(GuardedH11Protocol):  # the same guard, with limits a test can wait for
        head_timeout_s = 1.0
        max_per_address = 4

    async def hello(request):
        return PlainTextResponse("hello")

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(Starlette(routes=[Route("/", hello)]), host="127.0.0.1", port=port,
                                           http=Quick, ws="none", lifespan="off", log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, "the server")

    def closed(conn: socket.socket, within: float) -> bool:
        conn.settimeout(within)
        try:
            return conn.recv(1) == b""
        except TimeoutError:
            return False

    def get() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            out = b""
            while chunk := c.recv(4096):  # to the server's close
                out += chunk
            return out

    try:
        slow = socket.create_connection(("127.0.0.1", port), timeout=10)
        slow.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # ... and never the rest
        slow.sendall(b"X-a: b\r\n")
        assert closed(slow, 10.0)  # closed after the head timeout, though it kept sending
        slow.close()
        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(4)]
        extra = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert closed(extra, 10.0)  # the fifth from one address: closed at once
        extra.close()
        for c in held:
            c.close()
        wait_until(lambda: not Quick._open, "the held connections counted off")
        assert b"hello" in get()  # and the console serves again
    finally:
        server.should_exit = True
        thread.join(10)


def test_journal_reads_run_two_at_a_time_whatever_a_guard_opens(site, monkeypatch):
    """Each read holds its rows in memory on its own thread: 32 tabs of searches grew the
    console to 140 MB, past its unit's MemoryMax, before reads were bounded."""
    import sqlite3

    import httpx

    from agent.console import data
    from agent.console.app import JOURNAL_READERS

    sqlite3.connect(site / "journal.db").close()
    monkeypatch.setattr("agent.tools.journaltool.open_readonly", lambda path: sqlite3.connect(":memory:"))
    running, seen = [0], [0]
    lock = threading.Lock()

    def slow_search(conn, **kw):
        with lock:
            running[0] += 1
            seen[0] = max(seen[0], running[0])
        time.sleep(0.2)
        with lock:
            running[0] -= 1
        return iter([{"seq": 1, "type": "passage", "person": "p-1"}])

    monkeypatch.setattr(data, "search", slow_search)
    app = create_app(settings_for(site))

    async def tabs() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            page = await c.get("/login")
            token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
            await c.post("/login", data={"account": "guard", "password": "guard-pass", "csrf": token})
            got = await asyncio.gather(*[c.get("/journal?person=p-1") for _ in range(8)])
            return [r.status_code for r in got]

    assert asyncio.run(tabs()) == [200] * 8
    assert seen[0] == JOURNAL_READERS  # every tab answered, never more than two reads at once
