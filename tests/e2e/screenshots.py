"""Take the README's screenshots of the dashboard (docs/images/*.png) with the browser setup
of the e2e tests: Debian's chromium driven by Playwright, against ``fillgate serve`` on the
demo database.

    .venv/bin/python tests/e2e/screenshots.py            # writes docs/images/dashboard-*.png
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright
from rich.console import Console

from fillgate import Limits, apply_plan, make_plan
from fillgate.config import Target, parse_url
from fillgate.demo import FillCustomerEmail, run_demo
from fillgate.stamp import connect

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "docs" / "images"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="fillgate-shots-"))
    db = work / "demo.db"
    run_demo(Console(file=io.StringIO()), path=db, rows=5000)
    target = Target("demo", parse_url(f"sqlite:///{db}", "demo"), "demo")
    conn = connect(target)
    planned = make_plan(conn, FillCustomerEmail, out=work / "again.plan")
    applied = apply_plan(conn, planned.path, Limits(batch_size=150, pause_ms=40))
    cfg = work / "fillgate.toml"
    cfg.write_text(f'[targets.demo]\nurl = "sqlite:///{db}"\nenvironment = "demo"\n')
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    server = subprocess.Popen([sys.executable, "-m", "fillgate", "--config", str(cfg), "serve", "--port", str(port),
                               "--cache-dir", str(work / "cache")], env=env, cwd=work)
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(base + "/", timeout=2)
                break
            except OSError:
                time.sleep(0.1)
        OUT.mkdir(parents=True, exist_ok=True)
        key = ",".join(str(k) for k in planned.samples["change"][0]["key"])
        shots = [
            ("targets", "/", "main"),
            ("runs", "/t/demo/runs", "table.runs"),
            ("run", f"/t/demo/runs/{applied.run.run_id}", "#throughput canvas"),
            ("plan", f"/t/demo/plans/{planned.run.run_id}?kind=preserved", "table.plan-lines"),
            ("history", f"/t/demo/history?table=customers&key={key}", "table.history"),
            ("revert", f"/t/demo/runs/{applied.run.run_id}/revert", "p.summary"),
        ]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            for name, url, ready in shots:
                page.goto(base + url)
                page.wait_for_selector(ready, timeout=60000)
                page.screenshot(path=str(OUT / f"dashboard-{name}.png"))
                print(f"wrote {OUT / f'dashboard-{name}.png'}")
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
