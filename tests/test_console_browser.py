"""The console in a real browser: Debian's chromium, headless, against a real agent.

One agent process on mock pins (tests/agentproc.py) and one `gate-agent console
serve` process beside it, as a board runs them (two processes, the console
reaching the agent only through its socket and reading the journal). Each test
drives chromium through the pages as a technician or a guard would and checks
what the gate did in the gate's own journal. Every page is saved as a
screenshot (tests/browser.py SCREENSHOTS).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.agentproc import AgentProcess, ConsoleProcess
from tests.browser import REQUIRE_BROWSER, browser_missing, open_browser, screenshot

pytestmark = [pytest.mark.browser, pytest.mark.long(20)]

_missing = browser_missing()
if _missing:
    if REQUIRE_BROWSER:
        raise RuntimeError(f"GATE_REQUIRE_BROWSER=1 but {_missing}")
    pytest.skip(_missing, allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
TECH, TECH_PW = "tech.ivanova", "correct horse 1"
GUARD, GUARD_PW = "guard.petrov", "correct horse 2"
WAIT_S = 15.0  # generous: a loaded CI machine; nothing here asserts speed


def until(what, timeout: float = WAIT_S, step: float = 0.1):
    """what()'s first truthy value within timeout seconds, else None."""
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A running agent and its console (plain HTTP on loopback), with one account of each role."""
    agent = AgentProcess(tmp_path_factory.mktemp("console")).start()
    console = ConsoleProcess(agent)
    try:
        console.add_user(TECH, "technician", TECH_PW)
        console.add_user(GUARD, "guard", GUARD_PW)
        console.start()
        yield {"agent": agent, "base": console.base}
    finally:
        console.stop()
        agent.stop()


@pytest.fixture
def browser(site, tmp_path):
    driver = open_browser("en-US")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    try:
        yield driver
    finally:
        driver.quit()


def login(driver, base: str, account: str, password: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(base + "/login")
    driver.find_element(By.ID, "account").send_keys(account)
    driver.find_element(By.ID, "password").send_keys(password)
    driver.find_element(By.ID, "login").click()
    assert until(lambda: "/login" not in driver.current_url), driver.page_source[:2000]


def post_from_page(driver, path: str, form: dict) -> int:
    """POST a form from inside the page (the session's cookie goes with it, as a forged
    form from another tab would send it); the HTTP status."""
    return driver.execute_async_script(
        "var done = arguments[arguments.length - 1];"
        "fetch(arguments[0], {method: 'POST', body: new URLSearchParams(arguments[1]),"
        " redirect: 'manual'}).then(function (r) { done(r.status); }, function () { done(-1); });",
        path, form)


def journal(site, **match) -> list[dict]:
    return [r for r in site["agent"].records() if all(r.get(k) == v for k, v in match.items())]


def test_a_technician_sees_a_card_live_pulses_a_line_and_exports_the_journal(site, browser):
    from selenium.webdriver.common.by import By

    base, agent = site["base"], site["agent"]
    browser.get(base + "/status")
    assert "/login" in browser.current_url  # nothing without a login
    screenshot(browser, "login")
    login(browser, base, TECH, TECH_PW)

    browser.get(base + "/status")
    assert until(lambda: agent.site in browser.page_source or agent.gate in browser.page_source)
    screenshot(browser, "status")

    # Live: a card read on the mock pins appears in the open page, through the SSE feed.
    browser.get(base + "/live")
    assert until(lambda: browser.find_element(By.ID, "link").get_attribute("class") == "good")
    reply = agent.card("100,60003")
    decision = reply["decision"]
    assert decision["type"] == "access.granted" and decision["person"] == "p-3"
    row = until(lambda: [tr for tr in browser.find_elements(By.CSS_SELECTOR, "#live tbody tr")
                         if json.loads(tr.get_attribute("data-rec")).get("id") == decision["id"]])
    assert row, browser.page_source[:3000]
    assert "p-3" in row[0].text
    screenshot(browser, "live")

    # io-test: pulse the entry reader's LED; the mock pin goes active and back.
    from agent.consolesock import request, socket_path

    def led() -> bool:  # the pin itself, as the agent reads it off the mock pin factory
        return request(socket_path(agent.state), {"op": "status"})["status"]["outputs"]["entry.led"]

    assert until(lambda: not led())  # the grant's own LED signal is over
    browser.get(base + "/tech")
    cell = lambda: browser.find_element(By.CSS_SELECTOR, '[data-out="entry.led"]')
    assert until(lambda: cell().get_attribute("class") == "off")
    # The page pulses for 1 s; 5 s here, so a loaded machine still sees the line lit.
    browser.execute_script('document.getElementById("pulse-entry.led").form.seconds.value = "5"')
    browser.find_element(By.ID, "pulse-entry.led").click()
    assert until(lambda: journal(site, type="console.action", action="pulse", account=TECH))
    done = journal(site, type="console.action", action="pulse", account=TECH)[0]
    assert done["result"] == "done" and done["args"] == {"line": "entry.led", "seconds": 5.0}
    assert led()  # the mock pin is driven
    # The page the form comes back to shows the line lit, then the live feed shows it back at rest.
    assert until(lambda: "/tech" in browser.current_url and cell().get_attribute("class") == "on")
    screenshot(browser, "technician")
    assert until(lambda: cell().get_attribute("class") == "off")
    assert not led()

    # The journal page finds the card and exports it as CSV.
    browser.get(base + "/journal?card=100%2C60003")
    assert "p-3" in browser.find_element(By.ID, "results").text
    screenshot(browser, "journal")
    browser.find_element(By.ID, "csv").click()

    def csv_text() -> str:
        # The browser may name the file before it has written it all: read it until it is.
        files = [p for p in browser.downloads.iterdir() if p.suffix == ".csv"]
        return files[0].read_text(encoding="utf-8-sig") if files else ""

    assert until(lambda: decision["id"] in csv_text()), "no CSV with the card was downloaded"
    text = csv_text()
    assert decision["id"] in text and "p-3" in text

    for page in ("today", "presence"):
        browser.get(f"{base}/{page}")
        assert browser.find_elements(By.TAG_NAME, "h1")
        screenshot(browser, page)


def test_the_pages_switch_to_russian(site, browser):
    from selenium.webdriver.common.by import By

    login(browser, site["base"], TECH, TECH_PW)
    browser.get(site["base"] + "/status")
    english = browser.find_element(By.TAG_NAME, "nav").text
    browser.find_element(By.ID, "lang-switch").click()
    assert until(lambda: browser.find_element(By.TAG_NAME, "html").get_attribute("lang") == "ru")
    russian = browser.find_element(By.TAG_NAME, "nav").text
    assert russian != english and "Журнал" in russian, russian
    # The inputs' meanings too (the agent sends them in English, the catalogue has them).
    assert "the fire-alarm loop is open" not in browser.page_source
    screenshot(browser, "status-ru")
    browser.get(site["base"] + "/tech")  # the language is the session's: it stays
    assert browser.find_element(By.TAG_NAME, "html").get_attribute("lang") == "ru"
    screenshot(browser, "technician-ru")


def test_a_guard_cannot_reach_the_technicians_actions(site, browser):
    from selenium.webdriver.common.by import By

    login(browser, site["base"], GUARD, GUARD_PW)
    browser.get(site["base"] + "/status")
    assert not browser.find_elements(By.ID, "nav-tech")
    browser.get(site["base"] + "/tech")
    assert not browser.find_elements(By.ID, "pulse-entry.led")
    screenshot(browser, "guard-denied")
    browser.get(site["base"] + "/status")
    csrf = browser.find_element(By.NAME, "csrf").get_attribute("value")  # the guard's own, valid token
    assert post_from_page(browser, "/tech/mode", {"csrf": csrf, "mode": "lockdown"}) == 403
    assert post_from_page(browser, "/tech/pulse", {"csrf": csrf, "line": "entry.led", "seconds": "1"}) == 403
    time.sleep(0.5)
    assert not journal(site, type="console.action", account=GUARD)
    assert not journal(site, type="mode.changed", by="console", account=GUARD)


def test_a_post_without_the_csrf_token_is_refused(site, browser):
    from selenium.webdriver.common.by import By

    login(browser, site["base"], TECH, TECH_PW)
    browser.get(site["base"] + "/tech")
    before = len(journal(site, type="mode.changed", by="console"))
    assert post_from_page(browser, "/tech/mode", {"mode": "lockdown"}) == 403
    assert post_from_page(browser, "/tech/mode", {"mode": "lockdown", "csrf": "0" * 43}) == 403
    time.sleep(0.5)
    assert len(journal(site, type="mode.changed", by="console")) == before
    # The page's own form carries the token: the same change goes through, journalled with the account.
    browser.find_element(By.ID, "mode-lockdown").click()
    assert until(lambda: journal(site, type="mode.changed", by="console", account=TECH, to="lockdown"))
    # The page the form comes back to shows the mode just set, not a status from before it.
    assert until(lambda: "/tech" in browser.current_url and browser.find_element(By.ID, "mode").text == "lockdown")
    assert browser.find_element(By.ID, "mode-lockdown").get_attribute("disabled")
    browser.find_element(By.ID, "mode-normal").click()
    assert until(lambda: journal(site, type="mode.changed", by="console", account=TECH, to="normal"))
