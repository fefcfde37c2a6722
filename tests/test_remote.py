"""Engines for a controller elsewhere, on loopback only (tests/test_multihost.py does it
across two network namespaces): addresses written for other hosts, `ipylb engine join`,
an unreachable controller explained, CurveZMQ on the controller's sockets.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import ipylb
import pytest
from ipylb import connection
from ipylb.error import NoCluster
from procs import IPYLB, ipylb_cmd, wait_gone
from test_cluster import runtime  # noqa: F401 - a fixture


@pytest.mark.parametrize(("bound", "location", "want"), [
    ("tcp://127.0.0.1:5000", None, "tcp://127.0.0.1:5000"),
    ("tcp://0.0.0.0:5000", "node7.example", "tcp://node7.example:5000"),
    ("tcp://0.0.0.0:5000", "fd00::7", "tcp://[fd00::7]:5000"),
    ("tcp://[::]:5000", "node7", "tcp://node7:5000"),
    ("tcp://10.0.0.3:5000", "gw.example", "tcp://gw.example:5000"),  # NAT: location wins
])
def test_connect_url(bound, location, want):
    assert connection.connect_url(bound, location) == want


def test_wildcard_is_replaced_by_a_routable_address():
    url = connection.connect_url("tcp://0.0.0.0:5000")
    host, port = connection.split_url(url)
    assert port == 5000 and host not in ("0.0.0.0", "*", "")
    assert host == connection.host_address()


@pytest.mark.parametrize(("host", "loop"), [
    ("127.0.0.1", True), ("127.3.4.5", True), ("localhost", True), ("[::1]", True),
    ("192.0.2.1", False), ("node7", False),
])
def test_is_loopback(host, loop):
    assert connection.is_loopback(host) is loop


def _start(profile: str, *extra: str) -> dict:
    out = ipylb_cmd("cluster", "start", "-n", "0", "--daemon", "--profile", profile, *extra)
    assert out.returncode == 0, out.stderr
    return json.loads(open(out.stdout.strip()).read())


def test_join_serves_until_the_controller_stops(runtime):  # noqa: F811
    info = _start("j", "--heartbeat-timeout", "3")
    path = runtime / "ipylb-j.json"
    join = subprocess.Popen([IPYLB, "engine", "join", "-n", "2", "--cluster-file", str(path)],
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        rc = ipylb.Client(path)
        rc.wait_for_engines(2, 120)
        engines = rc.engine_info()
        # Their Jupyter channels are on tcp (the controller pings them there), on the
        # address that routes to the controller: here loopback.
        assert all(e["heartbeat"].startswith("tcp://127.0.0.1:") for e in engines.values())
        assert sorted(rc.load_balanced_view().map_sync(lambda x: x + 1, range(6))) == [1, 2, 3,
                                                                                       4, 5, 6]
        # One engine killed: its heartbeat goes silent, the controller drops it, join says so.
        victim = engines[0]["pid"]
        rc.close()
        import os
        os.kill(victim, signal.SIGKILL)
        rc = ipylb.Client(path)
        deadline = time.monotonic() + 30
        while rc.ids != [1]:
            assert time.monotonic() < deadline, rc.ids
            time.sleep(0.1)
        rc.close()
        assert ipylb_cmd("cluster", "stop", "--profile", "j").returncode == 0
        _out, err = join.communicate(timeout=60)
    finally:
        join.kill()
    assert "2 engine(s) joined the cluster at " + info["engine_url"] in err
    assert "engine 0 ended: killed by SIGKILL" in err
    assert "engine 1 ended: its process exited with code 0" in err
    assert join.returncode == 1  # one engine died on its own
    assert wait_gone([e["pid"] for e in engines.values()])


def test_join_a_signal_stops_the_engines(runtime):  # noqa: F811
    _start("s")
    join = subprocess.Popen([IPYLB, "engine", "join", "--profile", "s"],
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        rc = ipylb.Client(profile="s")
        rc.wait_for_engines(1, 120)
        pid = rc.engine_info()[0]["pid"]
        join.send_signal(signal.SIGTERM)
        join.wait(60)
        assert join.returncode == 0
        assert wait_gone([pid])
        deadline = time.monotonic() + 30
        while rc.ids:  # the controller sees it go
            assert time.monotonic() < deadline
            time.sleep(0.1)
        rc.close()
    finally:
        join.kill()


def test_join_unreachable_controller_says_why(runtime, tmp_path):  # noqa: F811
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path / "gone.json"
    connection.write(path, {"key": "k", "controller_id": "c", "client_url":
                            f"tcp://127.0.0.1:{port}", "engine_url": f"tcp://127.0.0.1:{port}"})
    t = time.monotonic()
    out = ipylb_cmd("engine", "join", "--cluster-file", str(path), timeout=30)
    assert time.monotonic() - t < 10
    assert out.returncode == 1
    assert "listens on 127.0.0.1, a loopback address" in out.stderr
    assert "--ip 0.0.0.0" in out.stderr


def test_join_wrong_key_says_so(runtime, tmp_path):  # noqa: F811
    info = _start("k")
    path = tmp_path / "old.json"
    connection.write(path, {**info, "key": "not-the-key"})
    out = ipylb_cmd("engine", "join", "--cluster-file", str(path), "--timeout", "3")
    assert out.returncode == 1
    assert "not its current connection file" in out.stderr


def test_curve(runtime):  # noqa: F811
    info = _start("c", "--curve")
    assert len(info["curve_serverkey"]) == 40  # z85 of a 32-byte key
    engines = subprocess.Popen([IPYLB, "engine", "join", "-n", "1", "--profile", "c"],
                               stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        with ipylb.Client(profile="c") as rc:
            rc.wait_for_engines(1, 120)
            assert rc.load_balanced_view().apply_sync(lambda: 42) == 42
        # Without the server's key no handshake completes: not even a valid HMAC gets in.
        plain = runtime / "plain.json"
        connection.write(plain, {k: v for k, v in info.items() if k != "curve_serverkey"})
        with pytest.raises(NoCluster, match="no ipylb controller answered"):
            ipylb.Client(plain, timeout=3)
    finally:
        ipylb_cmd("cluster", "stop", "--profile", "c")
        engines.wait(60)


def test_plaintext_warning_only_off_loopback(runtime):  # noqa: F811
    _start("w")
    log = (runtime / "ipylb-w.log").read_text()
    assert "without --curve" not in log
    ipylb_cmd("cluster", "stop", "--profile", "w")
    # 0.0.0.0 with loopback written as the location: nothing leaves this machine.
    info = _start("w", "--ip", "0.0.0.0", "--location", "127.0.0.1")
    assert info["client_url"].startswith("tcp://127.0.0.1:")
    log = (runtime / "ipylb-w.log").read_text()
    assert log.count("authenticated (HMAC under the cluster key) but travels unencrypted") == 1


def test_kernelspec_install_and_engines_from_it(runtime):  # noqa: F811
    """Engines from another kernelspec (here jupyter_client's local provisioner, named
    explicitly): Client(kernel=), cluster start --kernel, engine add --kernel."""
    out = ipylb_cmd("kernelspec", "install", "--name", "my-engines", "--user",
                    "--provisioner", "local-provisioner")
    assert out.returncode == 0, out.stderr
    spec = json.loads((runtime / "data" / "kernels" / "my-engines" / "kernel.json").read_text())
    assert spec["argv"][1:] == ["-m", "ipylb.engine", "-f", "{connection_file}"]
    assert spec["metadata"]["kernel_provisioner"] == {"provisioner_name": "local-provisioner",
                                                      "config": {}}
    # A mark only engines started from this kernelspec have (jupyter_client puts a spec's
    # env into its kernels' environment): proof that --kernel/kernel= is used, not ignored.
    spec["env"] = {"IPYLB_TEST_SPEC": "my-engines"}
    (runtime / "data" / "kernels" / "my-engines" / "kernel.json").write_text(json.dumps(spec))

    def spec_mark():
        import os

        return os.environ.get("IPYLB_TEST_SPEC")

    with ipylb.Client(engines=1, kernel="my-engines") as rc:
        assert rc.load_balanced_view().apply_sync(spec_mark) == "my-engines"
    with ipylb.Client(engines=1) as rc:  # the default kernelspec has no such mark
        assert rc.load_balanced_view().apply_sync(spec_mark) is None
    # engine add --kernel on a cluster of the default kernelspec; engine add without it on a
    # cluster started with --kernel (the cluster's kernelspec is the default)
    for profile, start, add, expected in (("k2", [], ["--kernel", "my-engines"], [None, "my-engines"]),
                                          ("k3", ["--kernel", "my-engines"], [], ["my-engines"] * 2)):
        _start(profile, *start, "-n", "1")  # (the last -n wins)
        assert ipylb_cmd("engine", "add", "--profile", profile, *add).returncode == 0
        with ipylb.Client(profile=profile) as rc:
            rc.wait_for_engines(2, 60)
            marks = [rc.load_balanced_view(targets=e).apply_sync(spec_mark) for e in rc.ids]
        ipylb_cmd("cluster", "stop", "--profile", profile)
        assert marks == expected, (profile, marks)
    with pytest.raises(ValueError, match="no Jupyter kernelspec 'nope'"):
        ipylb.Client(engines=1, kernel="nope")
    bad = ipylb_cmd("kernelspec", "install", "--name", "x", "--provisioner", "no-such")
    assert bad.returncode == 1 and "no kernel provisioner 'no-such'" in bad.stderr


def test_fixed_ports(runtime):  # noqa: F811
    import socket

    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        pa, pb = a.getsockname()[1], b.getsockname()[1]
    info = _start("fp", "--client-port", str(pa), "--engine-port", str(pb))
    assert (info["client_url"], info["engine_url"]) == (f"tcp://127.0.0.1:{pa}",
                                                        f"tcp://127.0.0.1:{pb}")
    taken = ipylb_cmd("cluster", "start", "-n", "0", "--daemon", "--profile", "fp2",
                      "--client-port", str(pa))
    assert taken.returncode == 1 and "Address already in use" in taken.stderr
    ipylb_cmd("cluster", "stop", "--profile", "fp")


def test_join_by_url_and_key_file(runtime, tmp_path):  # noqa: F811
    info = _start("u")
    key = tmp_path / "key"
    key.write_text(info["key"] + "\n")
    key.chmod(0o644)
    out = ipylb_cmd("engine", "join", "--url", info["engine_url"], "--key-file", str(key))
    assert out.returncode == 1 and "chmod 600" in out.stderr
    key.chmod(0o600)
    wrong = tmp_path / "wrong"
    wrong.write_text("0" * 64)
    wrong.chmod(0o600)
    out = ipylb_cmd("engine", "join", "--url", info["engine_url"], "--key-file", str(wrong))
    assert out.returncode == 1 and "is not this cluster's" in out.stderr
    join = subprocess.Popen([IPYLB, "engine", "join", "--url", info["engine_url"],
                             "--key-file", str(key)],
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        with ipylb.Client(profile="u") as rc:
            rc.wait_for_engines(1, 120)
            assert rc.load_balanced_view().apply_sync(lambda: "joined") == "joined"
        # What it learned, kept private beside its other connection files.
        written = runtime / f"ipylb-joined-127.0.0.1-{connection.split_url(info['engine_url'])[1]}.json"
        assert oct(written.stat().st_mode & 0o777) == "0o600"
        assert {k: json.loads(written.read_text())[k] for k in
                ("key", "controller_id", "client_url", "engine_url")} == \
               {k: info[k] for k in ("key", "controller_id", "client_url", "engine_url")}
        assert ipylb_cmd("cluster", "stop", "--profile", "u").returncode == 0
        _out, err = join.communicate(timeout=60)
    finally:
        join.kill()
    assert join.returncode == 0, err


def test_join_ends_when_its_controller_is_killed(runtime):  # noqa: F811
    """No STOP comes from a SIGKILLed controller: the engines see their connection to it
    drop and leave, and join ends with them."""
    import os

    info = _start("kill")
    join = subprocess.Popen([IPYLB, "engine", "join", "--profile", "kill"],
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        with ipylb.Client(profile="kill") as rc:
            rc.wait_for_engines(1, 120)
            engine = rc.engine_info()[0]["pid"]
        for line in join.stderr:  # join has seen its engine registered: it serves now
            if "joined the cluster" in line:
                break
        os.kill(info["pid"], signal.SIGKILL)
        _out, err = join.communicate(timeout=60)
    finally:
        join.kill()
        (runtime / "ipylb-kill.json").unlink(missing_ok=True)
    assert "every engine has ended" in err
    assert wait_gone([engine])


def test_join_engines_are_interrupted_through_join(runtime):  # noqa: F811
    """The controller cannot signal a kernel that `ipylb engine join` started (on another
    host, in general): join relays its interrupts to the engine's KernelManager.  A task past
    its walltime is interrupted (KeyboardInterrupt, not the grace period's stop) and
    rc.interrupt() stops a running task; the engine serves on both times."""
    from ipylb.client.local import engine_env
    from ipylb.error import RemoteError, WalltimeExceeded
    from test_pending import Gate, wait_at_gate

    _start("intr")
    join = subprocess.Popen([IPYLB, "engine", "join", "--profile", "intr"], env=engine_env(),
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    gate = Gate()
    try:
        with ipylb.Client(profile="intr") as rc:
            rc.wait_for_engines(1, 120)
            [(engine_id, engine)] = rc.engine_info().items()
            view = rc.load_balanced_view()
            t0 = time.monotonic()
            with view.temp_flags(walltime=1):
                ar = view.apply_async(nap, 60)
            with pytest.raises(WalltimeExceeded) as info:
                ar.get(30)
            took = time.monotonic() - t0
            message = str(info.value)
            assert "interrupted (KeyboardInterrupt)" in message and "restarted" not in message
            assert took < 4.0, took  # the interrupt, not the 5 s grace and a stop
            ar = view.apply_async(wait_at_gate, gate.port)
            gate.running()  # the task runs now
            assert rc.interrupt() == [engine_id]
            with pytest.raises(RemoteError, match="KeyboardInterrupt"):
                ar.get(30)
            assert rc.ids == [engine_id]  # the same engine, same process, serves on
            assert view.apply_sync(os.getpid) == engine["pid"]
        assert ipylb_cmd("cluster", "stop", "--profile", "intr").returncode == 0
        _out, err = join.communicate(timeout=60)
    finally:
        gate.close()
        join.kill()
    assert join.returncode == 0, err
    assert "interrupting" not in err and "does not run" not in err  # nothing went wrong


def nap(seconds):
    import time

    time.sleep(seconds)
    return seconds


def _kernel_answers(info: dict, timeout: float) -> bool:
    """Whether the kernel of connection info ``info`` answers a kernel_info_request on its
    shell channel within ``timeout`` seconds (a jupyter_client client: CurveZMQ if ``info``
    has the keys, plain otherwise)."""
    import queue

    from jupyter_client import BlockingKernelClient

    kc = BlockingKernelClient()
    kc.load_connection_info(info)
    kc.start_channels(iopub=False, stdin=False, hb=False, control=False)
    try:
        msg_id = kc.kernel_info()
        while True:
            reply = kc.get_shell_msg(timeout=timeout)
            if reply["parent_header"].get("msg_id") == msg_id:
                return reply["content"]["status"] == "ok"
    except queue.Empty:
        return False
    finally:
        kc.stop_channels()


def test_curve_covers_the_engines_own_jupyter_channels(runtime):  # noqa: F811
    """With --curve, jupyter_client provisions CurveZMQ keys into each engine kernel's
    connection file, and its shell, iopub, stdin, control and heartbeat channels run
    encrypted: a client without the keys gets nothing from them (a valid HMAC key is not
    enough), one with them works; the controller pings the heartbeats under the keys (the
    engines stay registered past the heartbeat timeout) and interrupts through control."""
    from ipylb.error import WalltimeExceeded

    _start("cc", "--curve", "--heartbeat-timeout", "2")
    ipylb_cmd("engine", "add", "-n", "1", "--profile", "cc")  # local: ipc channels
    join = subprocess.Popen([IPYLB, "engine", "join", "--profile", "cc"],  # tcp channels
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        with ipylb.Client(profile="cc") as rc:
            rc.wait_for_engines(2, 120)
            kernels = {e["tag"]: json.loads(open(e["connection_file"]).read())
                       for e in rc.engine_info().values()}
            assert sorted(k["transport"] for k in kernels.values()) == ["ipc", "tcp"]
            for info in kernels.values():
                assert len(info["curve_publickey"]) == len(info["curve_secretkey"]) == 40
                plain = {k: v for k, v in info.items() if not k.startswith("curve_")}
                assert not _kernel_answers(plain, 3)  # > the heartbeat timeout, too
                assert _kernel_answers(info, 30)
            assert len({k["curve_publickey"] for k in kernels.values()}) == 2  # one per kernel
            assert len(rc.ids) == 2  # heartbeats answered under CurveZMQ all along
            view = rc.load_balanced_view()
            assert sorted(view.map_sync(lambda x: x * 2, range(8))) == list(range(0, 16, 2))
            def sleep_long():  # (by value: the controller's engine cannot import tests)
                import time

                time.sleep(60)

            for engine_id in rc.ids:  # interrupts reach both kinds (control channel, relayed)
                t0 = time.monotonic()
                with view.temp_flags(walltime=1, targets=engine_id):
                    ar = view.apply_async(sleep_long)
                with pytest.raises(WalltimeExceeded, match=r"interrupted \(KeyboardInterrupt\)"):
                    ar.get(30)
                assert time.monotonic() - t0 < 4.0
        ipylb_cmd("cluster", "stop", "--profile", "cc")
        _out, err = join.communicate(timeout=60)
    finally:
        ipylb_cmd("cluster", "stop", "--profile", "cc")
        join.kill()
    assert "1 engine(s) joined" in err
    assert "without encryption" not in err  # ipykernel's warning for plain tcp channels
