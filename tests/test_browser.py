"""A real browser: 03-dashboard.ipynb in JupyterLab, in headless Chromium, driven by Playwright.

The server binds 127.0.0.1 with a random token and a temporary root, settings and
workspace directory.  The test runs the notebook up to (not including) its last
cell, watches the rendered dashboard while the tasks run (a labelled map, a failing task,
an impossible chain, a timeout, a walltime kill): the task stream, the progress bars and
the engine table must be drawn and change between two screenshots, saved to
``artifacts/``; then it runs the last cell (``dash.close(); rc.shutdown()``).  Every wait
is on something the page shows, with generous limits: this machine is often loaded.

Debian's ``chromium`` and Playwright from PyPI are needed: without them the test
is skipped locally and fails under CI=true.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _missing() -> str | None:
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} not found: apt-get install chromium"
    for module, package in (("playwright", "playwright"), ("jupyterlab", "jupyterlab")):
        try:
            __import__(module)
        except ImportError:
            return f"{package} is not installed: pip install -e '.[test]'"
    return None


@pytest.fixture(scope="module")
def browser_ready():
    reason = _missing()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the browser test must run in CI: {reason}")
        pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path, browser_ready):
    """A JupyterLab server on 127.0.0.1 serving a copy of the notebook; yields its base url
    and token."""
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(ROOT / "notebooks" / "03-dashboard.ipynb", root)
    settings = tmp_path / "settings"
    tracker = settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    tracker.parent.mkdir(parents=True)
    tracker.write_text(json.dumps({"windowingMode": "none"}))  # every cell in the DOM
    news = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text(json.dumps({"fetchNews": "false"}))  # no "get notified?" toast
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
           "JUPYTERLAB_SETTINGS_DIR": str(settings),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"),
           "IPYLB_PROGRESS": "1"}
    log = (tmp_path / "lab.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root",
         "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         "--LabApp.extension_manager=readonly",
         # Only the notebook's own kernel: with ipylb's engine kernelspec also installed, a
         # slow kernel start makes Lab ask which kernel to use.
         "--KernelSpecManager.allowed_kernelspecs=python3"],
        env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("JupyterLab did not start:\n" + (tmp_path / "lab.log").read_text())
                time.sleep(0.2)
        yield base, token
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@contextlib.contextmanager
def _notebook_page(lab: tuple[str, str], tmp_path: Path, notebook: str, height: int):
    """A headless Chromium page on ``notebook`` in the JupyterLab of ``lab``, its kernel
    idle; closed on exit."""
    from playwright.sync_api import sync_playwright

    base, token = lab
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_FLAGS, viewport={"width": 1280, "height": height},
        )
        try:
            page = context.new_page()
            page.set_default_timeout(300_000)  # (a loaded machine: waits end on events)
            # Should Lab still ask (its kernel not yet connected when "Run" is clicked), the
            # one kernel it may offer is the notebook's own.
            page.add_locator_handler(page.locator(".jp-Dialog", has_text="Select Kernel"),
                                     lambda dialog: dialog.locator(".jp-mod-accept").click())
            page.goto(f"{base}/lab/tree/{notebook}?token={token}")
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']")
            yield page
        finally:
            context.close()


def _run_all_above(page, cells) -> None:
    """Run the cells above the last one (Run menu), again should Lab not have taken the
    click (no cell started within 60 s on a loaded machine)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    started = page.locator(".jp-InputPrompt", has_text=re.compile(r"\[(\*|\d+)\]"))
    for _attempt in range(3):
        cells.last.click()
        page.locator(".lm-MenuBar-item", has_text="Run").click()
        page.locator(".lm-Menu-item[data-command='notebook:run-all-above']").click()
        try:
            started.first.wait_for(timeout=60_000)
            return
        except PlaywrightTimeout:
            continue


@pytest.mark.timeout(1500)
def test_dashboard_renders_and_updates_in_jupyterlab(lab, tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    with _notebook_page(lab, tmp_path, "03-dashboard.ipynb", 1600) as page:
        cells = page.locator(".jp-NotebookPanel .jp-Cell")
        _run_all_above(page, cells)

        # Watch the panel while the tasks run, until the cell that waits for them prints.
        dash = page.locator(".ipylb-dash").first
        depth = page.locator(".ipylb-queue-depth").first
        waiter = cells.filter(has_text="amr.wait_interactive()")
        failures = page.locator("tr.ipylb-failure")
        simulate = page.locator(".ipylb-sub[data-name='simulate'] .ipylb-counts").first
        bars = page.locator(".ipylb-stream svg g.curve")  # bqplot: a line per task (3 dummies)
        try:
            depth.wait_for(timeout=120_000)
        except Exception:  # what the page shows instead, for whoever reads the failure
            page.screenshot(path=str(ARTIFACTS / "browser-failure.png"), full_page=True)
            raise
        simulate.wait_for()  # the labelled map's progress bar
        page.locator(".ipylb-stream svg").first.wait_for()
        depths: list[int] = []
        progress: list[str] = []
        shots: list[bytes] = []
        live_shot = ARTIFACTS / "dashboard-live.png"
        live_shot.unlink(missing_ok=True)
        deadline = time.monotonic() + 900  # a backstop only
        while "WalltimeExceeded" not in waiter.locator(".jp-OutputArea").inner_text():
            assert time.monotonic() < deadline, "the notebook did not finish in 900 s"
            depths.append(int(depth.inner_text()))
            if simulate.count():
                progress.append(simulate.inner_text())
            if len(shots) < 2 and bars.count() > 10 and failures.count() >= 2 and (
                    not shots or progress[-1] != progress[0]):
                # mid-run, twice: stream, bars and table drawn, and different
                shots.append(dash.screenshot(path=str(live_shot)))
            page.wait_for_timeout(100)

        assert len(shots) == 2 and shots[0] != shots[1], "no two different live screenshots"
        page.locator("tr.ipylb-failure[data-ename='WalltimeExceeded']").wait_for()
        assert page.locator("tr.ipylb-engine").count() == 2
        assert len(set(progress)) >= 3, progress  # the map's bar moved, live
        assert max(depths) > 0, depths
        assert bars.count() > 10  # the task stream
        assert "CPU %" in page.locator("table.ipylb-engines").inner_text()
        enames = {failures.nth(i).get_attribute("data-ename") for i in range(failures.count())}
        assert enames == {"RuntimeError", "ImpossibleDependency", "DependencyTimeout",
                          "WalltimeExceeded"}
        assert "cannot run" in page.locator("tr.ipylb-failure[data-ename='ImpossibleDependency']").first.inner_text()
        assert "└─" in page.locator(".ipylb-tree").first.inner_text()  # the chain's tree
        page.screenshot(path=str(ARTIFACTS / "browser-03-dashboard.png"), full_page=True)
        page.locator(".ipylb-dash").first.screenshot(path=str(ARTIFACTS / "dashboard.png"))

        cells.last.click()
        page.locator(".lm-MenuBar-item", has_text="Run").click()
        page.locator(".lm-Menu-item[data-command='notebook:run-cell']").click()
        page.locator(".ipylb-summary", has_text="stopped").wait_for()


LIVE_CELL = ("%%lb\nimport time\nfor i in range(6):\n    print(f'live line {i}', flush=True)\n"
             "    time.sleep(0.8)")


@pytest.mark.timeout(900)
def test_live_output_shows_in_the_submitting_cell_while_it_runs(lab, tmp_path):
    """Issue 15 item 5 as a user sees it: a blocking ``%%lb`` cell in JupyterLab shows its
    task's lines while the task runs (the cell still busy), in that cell, each line once at
    the end."""
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("%load_ext ipylb\n%lb_start -n 1"),
        nbformat.v4.new_code_cell(LIVE_CELL),
        nbformat.v4.new_code_cell("%lb_stop"),  # (selected: the cells above it run)
    ], metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                "language": "python"}})
    nbformat.write(nb, tmp_path / "root" / "live.ipynb")
    with _notebook_page(lab, tmp_path, "live.ipynb", 1000) as page:
        cells = page.locator(".jp-NotebookPanel .jp-CodeCell")
        live = cells.nth(1)
        prompt = live.locator(".jp-InputPrompt").first
        output = live.locator(".jp-OutputArea")
        _run_all_above(page, cells)
        output.filter(has_text="live line 1").wait_for()
        # While the lines arrive the cell is still running: they are live, not the end.
        busy_text = output.inner_text()
        assert "[*]" in prompt.inner_text(), (prompt.inner_text(), busy_text)
        assert "live line 5" not in busy_text
        ARTIFACTS.mkdir(exist_ok=True)
        live.screenshot(path=str(ARTIFACTS / "browser-live-output.png"))
        live.locator(".jp-InputPrompt", has_text=re.compile(r"\[\d+\]")).wait_for()
        final = output.inner_text()
        assert [final.count(f"live line {i}") for i in range(6)] == [1] * 6, final
        assert page.locator(".jp-OutputArea-output", has_text="live line").count() >= 1
        # ... and nothing of it leaked into the other cells
        assert "live line" not in cells.nth(0).locator(".jp-OutputArea").inner_text()
