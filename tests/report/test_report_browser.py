"""The report page in a real headless Chromium (Debian `chromium`): it loads without console
messages (errors, uncaught exceptions, blocked loads) and shows the expected rows.

Console detection: Chromium started with `--enable-logging=stderr --v=0` writes every
console message of the page to stderr as `...:CONSOLE:<line>] "<text>", source: <url>`
(`CONSOLE(<line>)` in some versions), uncaught exceptions and Content-Security-Policy
violations included. The report page logs nothing, so any such line is a failure; the
negative test proves a deliberate `console.error` is caught.
"""

from __future__ import annotations

import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from report_support import build_store

from sanitator.report import write_report

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="needs Debian's chromium at /usr/bin/chromium "
                                       "(apt-get install chromium; .ci/run installs it)")
CONSOLE = re.compile(r":CONSOLE[:(]\d+\)?\] (.*)")


def chromium(url: str, tmp_path: Path, *extra: str) -> tuple[str, list[str]]:
    """Load `url` headless; return the DOM after scripts ran and the console messages."""
    profile = tmp_path / "chromium-profile"
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
               "--enable-logging=stderr", "--v=0", *extra, url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, [m.group(1) for m in CONSOLE.finditer(done.stderr)]


class _Rows(HTMLParser):
    """Cell texts of each row of `<table id="models">`."""

    def __init__(self):
        super().__init__()
        self.rows: list[list[str]] = []
        self._in_table = self._in_body = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self._in_table = dict(attrs).get("id") == "models"
        elif self._in_table and tag == "tbody":
            self._in_body = True
        elif self._in_body and tag == "tr":
            self.rows.append([])
        elif self._in_body and tag == "td":
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.rows[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "table":
            self._in_table = self._in_body = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def test_console_errors_are_detected(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text("<!DOCTYPE html><html><body><p>hello</p>"
                    "<script>console.error('deliberate failure');</script></body></html>")
    dom, console = chromium(page.as_uri(), tmp_path, "--dump-dom")
    assert "hello" in dom
    assert any("deliberate failure" in message for message in console), console


def test_report_page_loads_cleanly_and_shows_the_models(tmp_path):
    store = build_store(tmp_path / "store")
    write_report(store, tmp_path / "out", mlflow_ui="http://mlflow.internal:5000")
    url = (tmp_path / "out" / "report.html").as_uri()
    dom, console = chromium(url, tmp_path, "--dump-dom")
    assert console == []
    parser = _Rows()
    parser.feed(dom)
    rows = parser.rows
    assert [(row[0], row[1]) for row in rows] == [
        ("backdoored", "acme/encoder-b"), ("clean", "zoo-clean"), ("clean", "acme/encoder-a"),
        ("error", "team/pickled"), ("unsupported", "acme/decoder"), ("skipped", "acme/huge")]
    assert rows[0][3] == "0.970" and rows[0][4] == "2 (cf, mn)"
    assert rows[0][5] == "c" * 12 and rows[0][7] == "e" * 12
    assert "pickle-only" in rows[3][8]
    assert dom.count('src="data:image/png;base64,') == 4

    shot = tmp_path / "report.png"
    _, console = chromium(url, tmp_path, f"--screenshot={shot}", "--window-size=1280,1600",
                          "--hide-scrollbars")
    assert console == []
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
