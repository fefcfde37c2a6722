"""Two "hosts" on one machine: network namespaces A and B joined by a veth pair, with
addresses from TEST-NET-1 (192.0.2.0/24, RFC 5737: used by no real network).

Every process of the test that sends to 192.0.2.x runs inside A or B (``ip netns
exec``), never in the machine's own namespace.  B's processes also get a /dev/shm of
their own (``unshare -m`` and a fresh tmpfs), so, as on another machine, they share no
memory segments with A: payloads must travel inline.

Used by tests/test_multihost.py and by ``python tests/netns.py bench``, which measures
engines in B beside engines in A with the same command.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

A_IP, B_IP = "192.0.2.1", "192.0.2.2"
IPYLB = str(Path(sys.executable).with_name("ipylb"))


def unavailable() -> str | None:
    """Why two namespaces cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    if shutil.which("unshare") is None:
        return "`unshare` (util-linux) is not installed"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


class Hosts:
    """Namespaces ``a`` and ``b``; :meth:`run` / :meth:`popen` put a command in one."""

    def __init__(self, root: Path) -> None:
        tag = f"{os.getpid() % 100000}"
        self.ns = {"a": f"ipylb{tag}a", "b": f"ipylb{tag}b"}
        self.root = root
        self.runtime = {h: root / h for h in "ab"}
        self.extra_env: dict[str, str] = {}
        for d in self.runtime.values():
            d.mkdir(mode=0o700, exist_ok=True)

    def up(self) -> None:
        a, b = self.ns["a"], self.ns["b"]
        va, vb = f"{a[:-1][-10:]}va", f"{b[:-1][-10:]}vb"
        _ip("netns", "add", a)
        _ip("netns", "add", b)
        _ip("link", "add", va, "type", "veth", "peer", "name", vb)
        _ip("link", "set", va, "netns", a)
        _ip("link", "set", vb, "netns", b)
        for ns, dev, addr in ((a, va, A_IP), (b, vb, B_IP)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", dev, "up")

    def down(self) -> None:
        """Kill whatever still runs in the namespaces, then delete them (and the veth)."""
        for ns in self.ns.values():
            out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            for pid in out.stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def argv(self, host: str, argv: list[str]) -> list[str]:
        ns = ["ip", "netns", "exec", self.ns[host]]
        if host == "b":  # a /dev/shm of its own, as on another machine
            return [*ns, "unshare", "-m", "sh", "-c",
                    'mount -t tmpfs -o size=256m tmpfs /dev/shm && exec "$@"', "sh", *argv]
        return [*ns, *argv]

    def env(self, host: str) -> dict[str, str]:
        return {**os.environ, "JUPYTER_RUNTIME_DIR": str(self.runtime[host]),
                "JUPYTER_DATA_DIR": str(self.root / "data"), "IPYLB_PROGRESS": "0",
                **self.extra_env}

    def run(self, host: str, argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(host, argv), env=self.env(host), capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def popen(self, host: str, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self.argv(host, argv), env=self.env(host),
                                stdin=subprocess.DEVNULL, text=True, **kw)

    def start_cluster(self, profile: str, ip: str = A_IP, *extra: str, engines: int = 0) -> Path:
        """A controller in A (no engines of its own); returns a copy of its connection
        file in B's runtime dir (as a user copies it, or a shared filesystem shows it)."""
        out = self.run("a", [IPYLB, "cluster", "start", "-n", str(engines), "--daemon", "--ip", ip,
                             "--profile", profile, "--heartbeat-timeout", "3", *extra])
        assert out.returncode == 0, out.stderr
        src = self.runtime["a"] / f"ipylb-{profile}.json"
        dst = self.runtime["b"] / f"{profile}.json"
        shutil.copy(src, dst)
        os.chmod(dst, 0o600)
        return dst

    def stop_cluster(self, profile: str) -> None:
        self.run("a", [IPYLB, "cluster", "stop", "--profile", profile])


def ssh_unavailable() -> str | None:
    """Why an sshd cannot be started in B (None: it can)."""
    missing = [t for t in ("/usr/sbin/sshd", "ssh-keygen") if shutil.which(t) is None]
    if missing:
        return f"not installed: {', '.join(missing)} (apt-get install openssh-server)"
    try:
        import gateway_provisioners  # noqa: F401
    except ImportError:
        return "gateway_provisioners is not installed (pip install gateway_provisioners)"
    return None


def start_sshd(h: Hosts) -> dict[str, str]:
    """An sshd in B on 192.0.2.2:22 with a throw-away host key, accepting a throw-away user
    key for root; returns the environment (HOME with that key and B's host key in
    known_hosts) under which paramiko, in A, logs in to B.  h.down() ends it."""
    d = h.root / "ssh"
    home = h.root / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    d.mkdir(mode=0o700)
    for key in (d / "host_key", home / ".ssh" / "id_ed25519"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                       check=True, timeout=30)
    (d / "authorized_keys").write_text((home / ".ssh" / "id_ed25519.pub").read_text())
    host_pub = (d / "host_key.pub").read_text().split()
    (home / ".ssh" / "known_hosts").write_text(f"{B_IP} {host_pub[0]} {host_pub[1]}\n")
    (d / "sshd_config").write_text("\n".join([
        f"ListenAddress {B_IP}", "Port 22", f"HostKey {d / 'host_key'}",
        f"AuthorizedKeysFile {d / 'authorized_keys'}", "PermitRootLogin prohibit-password",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no",
        "StrictModes no", f"PidFile {d / 'sshd.pid'}", "",
    ]))
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    proc = h.popen("b", ["/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config")],
                   stderr=open(d / "sshd.log", "w"))
    wait_for(lambda: (d / "sshd.pid").exists() or proc.poll() is not None, 30, "sshd start")
    assert proc.poll() is None, (d / "sshd.log").read_text()
    return {"HOME": str(home), "GP_REMOTE_USER": "root", "GP_SSH_PORT": "22",
            "GP_RESPONSE_IP": A_IP, "KERNEL_LAUNCH_TIMEOUT": "40", "GP_KERNEL_LOG_DIR": str(h.root),
            # gateway_provisioners refuses kernels for root by default; CI runs as root.
            "GP_UNAUTHORIZED_USERS": "nobody"}


@contextlib.contextmanager
def hosts(root: Path) -> Iterator[Hosts]:
    h = Hosts(root)
    try:
        h.up()
        yield h
    finally:
        h.down()


def wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def bench(rounds: int = 3) -> None:
    """Latency and map throughput of 2 engines in B (another "host") beside 2 engines in A
    (the controller's host), same driver command, with and without --curve; rounds
    alternate A/B, medians printed."""
    import json
    import statistics
    import tempfile

    driver = str(Path(__file__).with_name("multihost_driver.py"))
    figures: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp, hosts(Path(tmp)) as h:
        for curve in (False, True):
            profile = "curve" if curve else "plain"
            cluster_file = h.start_cluster(profile, A_IP, *(["--curve"] if curve else []))
            try:
                for _ in range(rounds):
                    for where in "ab":
                        join = h.popen(where, [IPYLB, "engine", "join", "-n", "2",
                                               "--cluster-file", str(cluster_file)],
                                       stderr=subprocess.DEVNULL)
                        out = h.run("a", [sys.executable, driver, "bench", str(cluster_file), "2"],
                                    timeout=600)
                        join.send_signal(signal.SIGTERM)
                        join.wait(60)
                        assert out.returncode == 0, out.stderr
                        figures.setdefault((profile, where), []).append(json.loads(out.stdout))
                        time.sleep(4)  # the controller drops the engines (heartbeat timeout)
            finally:
                h.stop_cluster(profile)
    print(f"{'':22}{'latency p50 ms':>16}{'p99 ms':>10}{'map tasks/s':>14}")
    for (profile, where), runs in figures.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        name = f"{profile}, engines in {where.upper()}"
        print(f"{name:22}{med['latency_p50_ms']:16.2f}{med['latency_p99_ms']:10.2f}"
              f"{med['map_tasks_per_s']:14.0f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "bench":
        bench(int(sys.argv[2]) if len(sys.argv) > 2 else 3)
