"""Debian's chromium, headless, driven by selenium through Debian's chromedriver.

For the console's browser tests (tests/test_console_browser.py). ``open_browser()``
starts one; ``browser_missing()`` says why it cannot (a board installs neither
package: the tests skip there, unless GATE_REQUIRE_BROWSER=1, as CI sets, where
a missing browser fails the run instead of hiding it). The flags are the ones
this machine's closed network needs: without the background-networking ones
chromium keeps trying Google's hosts at every start.

Screenshots go to ``SCREENSHOTS`` (build/screenshots, or $GATE_SCREENSHOTS).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = Path(os.environ.get("GATE_SCREENSHOTS") or ROOT / "build" / "screenshots")
REQUIRE_BROWSER = os.environ.get("GATE_REQUIRE_BROWSER", "") in ("1", "true", "yes")
CHROMIUM = os.environ.get("GATE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = os.environ.get("GATE_CHROMEDRIVER") or shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,900", "--ignore-certificate-errors")


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"{path} is missing: apt-get install {package} (scripts/setup-system.sh does)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -e '.[test]'"
    return None


def open_browser(lang: str = "en-US") -> Any:
    """A headless chromium (selenium WebDriver) with a fresh profile, asking for ``lang``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--lang={lang}")
    options.add_experimental_option("prefs", {"intl.accept_languages": lang})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def screenshot(driver: Any, name: str) -> Path:
    """Save the page as SCREENSHOTS/<name>.png; the path."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path
