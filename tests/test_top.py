"""``ipylb top`` driven in a real terminal: a tmux pane runs it against a standalone
cluster while tasks run; the pane's text is captured and checked; ``q`` ends it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import ipylb
import pytest

IPYLB = str(Path(sys.executable).with_name("ipylb"))
pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (.ci/run)")


def nap(t):
    import time

    time.sleep(t)
    return t


def fail():
    raise ValueError("top test")


for _f in (nap, fail):  # pickled by value: engines cannot import this test module
    _f.__module__ = "__main__"


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True,
                          timeout=30).stdout


def pane_until(session: str, predicate, timeout: float = 60.0, what: str = "") -> str:
    """Capture the pane until ``predicate(text)`` holds (the screen redraws every 0.5 s)."""
    deadline = time.monotonic() + timeout
    while True:
        text = tmux("capture-pane", "-p", "-t", session)
        if predicate(text):
            return text
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}; the pane shows:\n{text}")
        time.sleep(0.2)


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "data"))
    out = subprocess.run([IPYLB, "cluster", "start", "-n", "2", "--daemon", "--profile", "top"],
                         capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    try:
        yield "top"
    finally:
        subprocess.run([IPYLB, "cluster", "stop", "--profile", "top"], capture_output=True,
                       timeout=60)


def test_top_shows_the_cluster_live_and_q_quits(cluster):
    session = f"ipylb-top-{uuid.uuid4().hex[:8]}"
    env = {k: os.environ[k] for k in ("JUPYTER_RUNTIME_DIR", "JUPYTER_DATA_DIR", "PATH")}
    env.update(COLUMNS="160", LINES="40")  # (a detached pane may be 80 wide whatever -x says)
    cmd = " ".join(f"{k}={v}" for k, v in env.items()) + f" {IPYLB} top --profile {cluster}"
    tmux("new-session", "-d", "-s", session, "-x", "160", "-y", "40", cmd)
    try:
        with ipylb.Client(profile=cluster) as rc:
            view = rc.load_balanced_view()
            pane_until(session, lambda t: "queue depth" in t and "engine" in t, what="the table")
            view.apply_async(fail).wait(60)
            with view.temp_flags(label="long-nap"):
                long = view.apply_async(nap, 8.0)
            text = pane_until(session, lambda t: "long-nap" in t and " busy" in t
                              and "failures (last minute)" in t, what="the running task")
            assert "ipylb top · profile top" in text and "q quits" in text
            row = next(line for line in text.splitlines() if "long-nap" in line).split()
            engine = int(row[1]) if row[0] in "│|┃" else int(row[0])
            assert f" {rc.engine_info()[engine]['pid']} " in " ".join(row)
            assert "fail" in text.split("failures (last minute)")[1]
            tmux("send-keys", "-t", session, "q")
            deadline = time.monotonic() + 30
            while subprocess.run(["tmux", "has-session", "-t", session],
                                 capture_output=True).returncode == 0:
                assert time.monotonic() < deadline, "q did not end ipylb top"
                time.sleep(0.2)
            assert long.get(60) == 8.0
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
