"""Real headless Chromium for page tests: Debian's `chromium` + `chromium-driver`, driven by Selenium.

No browser download ever happens (Selenium Manager is bypassed: both the browser binary and the
driver are given as paths). Install:
    apt-get install -y chromium chromium-driver        pip install selenium

`require_browser()` skips when Chromium, its driver or Selenium is missing — except in CI
(env CI=true), where a missing browser is a broken CI image and fails loudly.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time

import pytest

# WRAG_CHROMIUM / WRAG_CHROMEDRIVER override the paths.
BROWSER_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
DRIVER_CANDIDATES = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-dev-shm-usage",
                  "--disable-extensions", "--disable-default-apps", "--window-size=1400,1000")
INSTALL_HINT = "apt-get install -y chromium chromium-driver && pip install selenium"


def _first(env: str, candidates) -> str | None:
    p = os.environ.get(env)
    if p:  # an explicit path is used as given (and counts as missing if it is not there)
        return p if os.path.exists(p) else None
    for c in candidates:
        if os.path.exists(c):
            return c
    return None


def find_browser() -> tuple[str | None, str | None, str | None]:
    """(chromium path, chromedriver path, what is missing or None)."""
    browser = _first("WRAG_CHROMIUM", BROWSER_CANDIDATES)
    if not browser and not os.environ.get("WRAG_CHROMIUM"):
        browser = shutil.which("chromium")
    driver = _first("WRAG_CHROMEDRIVER", DRIVER_CANDIDATES)
    if not driver and not os.environ.get("WRAG_CHROMEDRIVER"):
        driver = shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return browser, driver, "the Python package selenium"
    if not browser:
        return None, driver, "Chromium (/usr/bin/chromium)"
    if not driver:
        return browser, None, "chromedriver (/usr/bin/chromedriver)"
    return browser, driver, None


def require_browser() -> tuple[str, str]:
    browser, driver, missing = find_browser()
    if missing:
        msg = f"browser tests need {missing}; install with: {INSTALL_HINT}"
        if os.environ.get("CI", "").strip().lower() == "true":
            pytest.fail(f"CI=true and {msg}", pytrace=False)
        pytest.skip(msg)
    return browser, driver


class Browser:
    """One headless Chromium with a fresh profile directory (removed by quit())."""

    def __init__(self, browser: str, driver: str):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.profile = tempfile.mkdtemp(prefix="wrag-chromium-")
        opts = webdriver.ChromeOptions()
        opts.binary_location = browser
        for f in CHROMIUM_FLAGS:
            opts.add_argument(f)
        opts.add_argument(f"--user-data-dir={self.profile}")
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(options=opts, service=Service(executable_path=driver))
        self.driver.set_page_load_timeout(60)

    def console_errors(self, ignore=("Failed to load resource",)) -> list[str]:
        """SEVERE console entries (JS errors, CSP violations), minus the HTTP errors tests provoke."""
        out = []
        for e in self.driver.get_log("browser"):
            if e.get("level") == "SEVERE" and not any(s in e.get("message", "") for s in ignore):
                out.append(e["message"])
        return out

    def wait_for(self, fn, timeout: float = 60.0, what: str = "condition", interval: float = 0.2):
        """Poll fn() until it returns something truthy; AssertionError naming `what` on timeout."""
        t0, last_exc = time.time(), None
        while time.time() - t0 < timeout:
            try:
                v = fn()
                if v:
                    return v
            except Exception as e:  # element not there yet, stale element...
                last_exc = e
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}"
                             + (f" (last error: {last_exc!r})" if last_exc else ""))

    def quit(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)
