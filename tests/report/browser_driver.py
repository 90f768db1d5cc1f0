"""Headless Chromium for the browser tests: find (or apt-install) chromium and chromedriver, start Selenium.

The browser is Debian's ``chromium`` with ``chromium-driver`` (Playwright's own browser download
needs the network). When either is missing and this process is root on a machine with apt-get,
they are installed (``SVDBENCH_NO_APT=1`` forbids that); otherwise the caller skips with a reason
that names what is missing and how to get it.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
DRIVERS = ("chromedriver",)
PACKAGES = ("chromium", "chromium-driver")
# The flags that keep a headless Chromium quiet and offline (no sync, updates or background fetches).
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)


def _which(names: tuple[str, ...]) -> str | None:
    return next((p for p in map(shutil.which, names) if p), None)


def find_browser() -> tuple[str | None, str | None]:
    """Paths of the Chromium binary and of chromedriver, or None for each one missing."""
    return _which(BROWSERS), _which(DRIVERS) or (
        "/usr/lib/chromium/chromedriver" if Path("/usr/lib/chromium/chromedriver").exists() else None
    )


def _run_apt(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(["apt-get", *args], capture_output=True, text=True, timeout=1800, env=env, check=False)


def apt_install() -> str | None:
    """Install chromium and chromium-driver with apt-get; returns why it could not, or None on success."""
    if os.environ.get("SVDBENCH_NO_APT"):
        return "SVDBENCH_NO_APT is set, so the test does not install them"
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "the test installs them only as root"
    if shutil.which("apt-get") is None:
        return "apt-get is not available to install them"
    t0 = time.monotonic()
    done = _run_apt(["install", "-y", "-q", *PACKAGES])
    if done.returncode != 0:  # a fresh image has no package lists yet
        _run_apt(["update", "-q"])
        done = _run_apt(["install", "-y", "-q", *PACKAGES])
    if done.returncode != 0:
        tail = " ".join((done.stderr or done.stdout).strip().splitlines()[-2:])
        return f"apt-get install {' '.join(PACKAGES)} failed: {tail}"
    logger.warning("installed %s with apt-get in %.0f s", " ".join(PACKAGES), time.monotonic() - t0)
    return None


def ensure_browser() -> tuple[tuple[str, str] | None, str]:
    """``((browser, driver), "")`` when both are there (installing them if allowed), else ``(None, reason)``."""
    browser, driver = find_browser()
    if browser and driver:
        return (browser, driver), ""
    missing = [name for name, path in (("chromium", browser), ("chromedriver (chromium-driver)", driver)) if not path]
    why = apt_install()
    browser, driver = find_browser()
    if browser and driver:
        return (browser, driver), ""
    return None, (
        f"headless Chromium not available: {' and '.join(missing)} missing and {why or 'still missing after apt-get'}; "
        f"install them with: apt-get install -y {' '.join(PACKAGES)}"
    )


def start_chrome(browser: str, driver: str, profile: Path, width: int = 1400, height: int = 1000) -> Any:
    """A Selenium Chrome session on ``browser`` through ``driver``, console messages kept for ``get_log``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # Both paths are given, so Selenium Manager has nothing to look up; offline keeps it from trying.
    os.environ.setdefault("SE_OFFLINE", "true")
    os.environ.setdefault("SE_AVOID_STATS", "true")
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))
