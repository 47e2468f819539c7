"""A headless Chromium that loads a page and reads the text it renders, for the browser tests.

The dashboards under test are JavaScript apps (optuna-dashboard is React, TensorBoard's plugins
are web components): their content exists only once the scripts have fetched the data, and
TensorBoard's sits inside shadow roots, which neither the served HTML nor ``--dump-dom`` shows.
So Debian's ``chromium`` runs under its ``chromedriver`` (Selenium), and the page's text is
collected through shadow roots and same-origin frames until every expected string is there.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

# Every text node of the document, descending into shadow roots and same-origin iframes.
_RENDERED_TEXT = """
const out = [];
function walk(node) {
  if (node.nodeType === Node.TEXT_NODE) { out.push(node.textContent); return; }
  if (node.nodeName === 'SCRIPT' || node.nodeName === 'STYLE') return;
  if (node.shadowRoot) walk(node.shadowRoot);
  if (node.nodeName === 'IFRAME') { try { walk(node.contentDocument); } catch (e) {} }
  for (const child of node.childNodes) walk(child);
}
walk(document);
return out.join(' ').replace(/\\s+/g, ' ');
"""


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Return once ``url`` answers; raise if ``proc`` (the server) ends or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode} before {url} answered")
        with contextlib.suppress(OSError):
            urllib.request.urlopen(url, timeout=2).close()
            return
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


@contextlib.contextmanager
def server(cmd: list[str], url: str, cwd: Path, log: Path) -> Iterator[subprocess.Popen]:
    """Run a server (``cmd``) until the block ends, once ``url`` answers; its output goes to ``log``."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_http(url, proc)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def chromium(profile: Path) -> Iterator:
    """A headless Chromium session (a Selenium driver) with its own profile directory."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # No sandbox: CI runs as root, where Chromium's sandbox refuses to start. The rest keeps
    # it off the network beyond the page under test.
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1600,1200",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def rendered_text(driver, url: str, expected: list[str], timeout: float = 60.0) -> str:
    """Load ``url`` and return its rendered text once it holds every string of ``expected``
    (or whatever it holds after ``timeout`` seconds, for the caller's assertion to show)."""
    driver.get(url)
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = driver.execute_script(_RENDERED_TEXT)
        if all(s in text for s in expected):
            break
        time.sleep(0.25)
    return text
