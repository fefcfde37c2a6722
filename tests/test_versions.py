"""The version handshake (issue 10 item 1): a client or engine of another Python (or
ipylb, or cloudpickle) is refused when it connects, with a message naming both sides and
what to do, before any task is sent; the cluster and its engines are unharmed.

The client test runs a real client under another Python version.  It needs only pyzmq,
cloudpickle and jupyter_client there (ipylb itself is imported from this checkout), in a
venv made once and kept in pytest's cache directory; without another Python, it skips.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import ipylb
import pytest
import zmq
from ipylb import compat, wire
from ipylb.error import VersionMismatch

IPYLB = str(Path(sys.executable).with_name("ipylb"))
EXT = str(Path(ipylb.__file__).parent.parent)
HERE = f"{sys.version_info[0]}.{sys.version_info[1]}"


def _other_pythons() -> list[str]:
    """Interpreters of another major.minor than this one: pyenv's first, then PATH's."""
    found = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.*/bin/python3")))
    found += [p for v in ("3.12", "3.13", "3.10") if (p := shutil.which(f"python{v}"))]
    out = []
    for p in found:
        v = subprocess.run([p, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                           capture_output=True, text=True).stdout.strip()
        if v and v != HERE and tuple(map(int, v.split("."))) >= (3, 10):
            out.append(p)
    return out


@pytest.fixture(scope="session")
def other_python(request) -> str:
    """A venv of another Python version with what ipylb's client imports; made once and
    cached in pytest's cache directory (about 10 s the first time)."""
    candidates = _other_pythons()
    if not candidates:
        pytest.skip(f"no Python other than {HERE} (3.10+) found in ~/.pyenv/versions or on PATH")
    base = candidates[0]
    venv = Path(request.config.cache.mkdir("ipylb-other-python")) / Path(base).parent.parent.name
    python = venv / "bin" / "python"
    ready = venv / "ipylb-ready"
    if not ready.exists():
        shutil.rmtree(venv, ignore_errors=True)
        made = subprocess.run([base, "-m", "venv", str(venv)], capture_output=True, text=True)
        if made.returncode != 0:
            pytest.skip(f"could not make a venv of {base}: {made.stderr.strip()[-300:]}")
        pip = subprocess.run([str(python), "-m", "pip", "install", "-q", "pyzmq", "cloudpickle",
                              "jupyter_client"], capture_output=True, text=True, timeout=600)
        if pip.returncode != 0:
            pytest.skip(f"could not install pyzmq, cloudpickle, jupyter_client for {base}: "
                        f"{pip.stderr.strip()[-300:]}")
        ready.touch()
    return str(python)


@pytest.fixture
def standalone(tmp_path, monkeypatch):
    """A standalone one-engine cluster in a private runtime directory."""
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "data"))
    r = subprocess.run([IPYLB, "cluster", "start", "-n", "1", "--daemon", "--profile", "vers"],
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    yield tmp_path
    subprocess.run([IPYLB, "cluster", "stop", "--profile", "vers"], capture_output=True,
                   timeout=60)


CLIENT = textwrap.dedent("""
    import sys
    import ipylb
    from ipylb.error import VersionMismatch

    def loop(n):
        total = 0
        for i in range(n):
            total += i
        return total

    try:
        rc = ipylb.Client(profile="vers")
    except VersionMismatch as e:
        print("refused:", e)
        sys.exit(0)
    print("accepted:", rc.load_balanced_view().apply_sync(loop, 10))
""")


def test_a_client_of_another_python_is_refused_before_anything_is_sent(other_python, standalone):
    env = {**os.environ, "PYTHONPATH": EXT}
    r = subprocess.run([other_python, "-c", CLIENT], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    other = subprocess.run([other_python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                           capture_output=True, text=True).stdout.strip()
    out = r.stdout.strip()
    assert out.startswith("refused: this client runs Python " + other), out
    assert f"the cluster's controller runs Python {HERE}" in out
    assert f"Use the cluster's Python ({sys.executable})" in out
    # Nothing reached the engine: it is the same one, it has run nothing, and it serves.
    rc = ipylb.Client(profile="vers")
    try:
        assert rc.ids == [0]
        assert rc.queue_status()[0]["completed"] == 0
        assert rc.load_balanced_view().apply_sync(sum, range(10)) == 45
    finally:
        rc.close()


def test_a_client_of_another_ipylb_is_refused(rc, monkeypatch):
    """The same handshake for ipylb's own version (the wire protocol), in process."""
    real = compat.versions
    monkeypatch.setattr(compat, "versions", lambda: {**real(), "ipylb": "0.0.0-other"})
    with pytest.raises(VersionMismatch, match="this client runs Python .*ipylb 0.0.0-other, "
                                              "cloudpickle .*but the cluster's controller runs"):
        ipylb.Client(rc._local.connection_file, timeout=10)
    monkeypatch.undo()
    assert rc.load_balanced_view().apply_sync(pow, 2, 4) == 16  # the cluster is unharmed


def test_mismatch_names_both_sides():
    ours = compat.versions()
    assert compat.mismatch(ours, dict(ours), "the cluster's controller", "this client") is None
    text = compat.mismatch(ours, {**ours, "cloudpickle": "0.0.1"}, "this client",
                           "the cluster's controller")
    assert text.startswith(f"the cluster's controller runs Python {HERE}, ipylb "
                           f"{ipylb.__version__}, cloudpickle 0.0.1, but this client runs")
    assert "unknown versions" in compat.mismatch(ours, None, "the cluster's controller", "x")


def refuse_an_engine(rc, caught: list) -> tuple[int, str]:
    """Register an engine of "Python 3.99" on a real socket; the answer's (kind, reason)
    once the clients' warning is in ``caught`` too."""
    info = rc._local.info
    key, controller = info["key"].encode(), info["controller_id"].encode()
    ident = b"engine-from-elsewhere-" + os.urandom(4).hex().encode()
    signer = wire.Signer(key, ident, controller)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, ident)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(info["engine_url"])
    try:
        meta = {"pid": 4242, "hostname": "elsewhere", "connection_file": "", "tag": "",
                "heartbeat": "", "shm_domain": None,
                "versions": {**compat.versions(), "python": "3.99", "executable": "/x/python"}}
        wire.send(sock, signer.pack(wire.REGISTER, meta))
        assert sock.poll(10_000), "no answer to the registration"
        kind, _sender, reason, _bufs, _mac = signer.unpack(wire.recv(sock))
    finally:
        sock.close()
    deadline = time.monotonic() + 10
    while not any("refused" in str(w.message) for w in caught):  # on the callback thread
        assert time.monotonic() < deadline, "clients were not warned"
        time.sleep(0.01)
    return kind, reason


def test_an_engine_of_another_python_is_refused_at_registration(rc):
    """A registration whose versions differ gets REFUSED with the reason (the engine says
    it and stops); clients are warned, and no engine id is given out."""
    before = rc.ids
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kind, reason = refuse_an_engine(rc, caught)
    warned = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert kind == wire.REFUSED
    assert warned == [f"the cluster refused an engine: {reason}"]
    assert reason.startswith("an engine (pid 4242 on elsewhere) runs Python 3.99")
    assert f"the cluster's controller runs Python {HERE}" in reason
    assert rc.ids == before
    assert rc.load_balanced_view().apply_sync(pow, 3, 3) == 27


def test_a_warning_hook_that_blocks_holds_up_no_result(rc):
    """The refusal's warning runs warnings.showwarning, which is user code (a logging
    bridge, IPython's display): it ran on the thread that receives results, so a hook that
    blocks held up every result (issue 9 item 6's kind).  Now it runs off that thread."""
    entered, release = threading.Event(), threading.Event()
    caught: list = []

    def hook(message, category, filename, lineno, file=None, line=None):
        caught.append(warnings.WarningMessage(message, category, filename, lineno))
        entered.set()
        release.wait(120)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = hook
        try:
            refuse_an_engine(rc, caught)
            assert entered.is_set()  # the hook blocks now
            assert rc.load_balanced_view().apply_async(pow, 2, 5).get(30) == 32
        finally:
            release.set()
