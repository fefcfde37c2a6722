"""The ``ipylb`` command (also ``python -m ipylb``): ``ipylb demo``, ``ipylb bench``,
``ipylb cluster ...``, ``ipylb engine ...``, ``ipylb --version``.

A standalone cluster is a ``python -m ipylb.controller`` process with no parent to
watch, found through its profile's connection file in the Jupyter runtime
directory.  Every command that talks to it goes through an ordinary authenticated
Client, so the CLI needs nothing the key does not already grant.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import connection, limits
from .error import NoCluster


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help line ends with its default, as argparse's
    ArgumentDefaultsHelpFormatter writes it, unless the help already says the default in
    words (``--profile``'s "default: the cluster's") or the option is required: never a
    second, contradicting ``(default: None)``.  Used by every ``ipylb`` parser."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


# How long a running controller has to answer before its connection file counts as stale.
PING_TIMEOUT_S = 3.0
# How long `cluster start` and `engine add` wait for engines to register.
ENGINE_START_TIMEOUT_S = 120.0
# How long `cluster stop` waits for the controller (and so its engines) to be gone.
STOP_TIMEOUT_S = 30.0

USAGE = """usage: ipylb [-h] [-V] {demo,bench,soak,top,cluster,engine,kernelspec} ...

  demo           run the task interface's examples on local engines (ipylb demo --help)
  bench          measure ipylb beside ipyparallel (ipylb bench --help)
  soak           many tasks from two clients while engines are killed: lost = 0,
                 duplicates = 0? (ipylb soak --help)
  top            the cluster live in this terminal: queue, engines, failures; q quits
                 (ipylb top [--profile P])
  cluster        start, stop or inspect a standalone cluster (ipylb cluster --help)
  engine         add engines to a running cluster (ipylb engine add -n K), or run
                 engines here for a controller elsewhere (ipylb engine join --help)
  kernelspec     write a kernelspec for engines started by any kernel provisioner
  -V, --version  versions of ipylb, Python, ipykernel, jupyter_client, pyzmq, cloudpickle
  -h, --help     this text
"""


def version_text() -> str:
    """What ``ipylb --version`` prints: ipylb's version and those it depends on."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    lines = [f"ipylb {__version__}", f"Python {platform.python_version()} ({sys.executable})"]
    for dist in ("ipykernel", "jupyter_client", "pyzmq", "cloudpickle"):
        try:
            lines.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            lines.append(f"{dist} not installed")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Dispatch to a subcommand.  No subcommand, or an unknown one, exits with status 2
    and the usage (argparse's convention for a usage error)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    if argv and argv[0] in ("-V", "--version"):
        print(version_text())
        return
    if not argv:
        sys.stderr.write(USAGE + "ipylb: error: a subcommand is required\n")
        sys.exit(2)
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        from .demo import main as demo_main

        demo_main(rest)
    elif cmd == "bench":
        from .bench import main as bench_main

        bench_main(rest)
    elif cmd == "soak":
        from .soak import main as soak_main

        soak_main(rest)
    elif cmd == "top":
        from .top import main as top_main

        sys.exit(top_main(rest))
    elif cmd in ("cluster", "engine", "kernelspec"):
        args = _parser().parse_args(argv)
        try:
            sys.exit(args.func(args))
        except ValueError as e:  # a bad profile name or engine count
            sys.exit(f"ipylb: {e}")
    else:
        sys.stderr.write(USAGE + f"ipylb: error: unknown command {cmd!r}\n")
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    from .client.local import SCHEMES
    from .core.pipeline import DEFAULT_HWM

    fmt = HelpFormatter
    p = argparse.ArgumentParser(prog="ipylb", formatter_class=fmt)
    top = p.add_subparsers(dest="cmd", required=True)

    def profile(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--profile", default="default",
                        help="which cluster; its connection file is "
                             "ipylb-PROFILE.json in the Jupyter runtime directory")

    cluster = top.add_parser("cluster", help="a standalone cluster", formatter_class=fmt
                             ).add_subparsers(dest="action", required=True)
    start = cluster.add_parser("start", help="start a controller and its engines",
                               formatter_class=fmt)
    start.add_argument("-n", "--engines", type=int, default=os.cpu_count() or 1,
                       help="engines to start (one per CPU here); 0 starts none: tasks wait "
                            "until `ipylb engine add -n K`")
    start.add_argument("--scheme", default="leastload", choices=SCHEMES,
                       help="how the scheduler picks an engine for each task")
    start.add_argument("--hwm", type=_hwm, default=DEFAULT_HWM,
                       help="tasks outstanding per engine: auto (enough to hide the round "
                            "trip, measured; queued tasks stolen back for idle engines), or at "
                            "most this many (1: one at a time; 0: no limit)")
    start.add_argument("--ip", default="127.0.0.1",
                       help="address the controller listens on (127.0.0.1: this machine only; "
                            "0.0.0.0: every interface, for engines and clients on other hosts)")
    start.add_argument("--location", default=None,
                       help="host name or address other hosts reach the controller at "
                            "(default with --ip 0.0.0.0: this host's routable address)")
    start.add_argument("--client-port", type=int, default=0,
                       help="the port clients connect to (0: any free one); fixed ports suit "
                            "firewalls and Kubernetes Services")
    start.add_argument("--engine-port", type=int, default=0,
                       help="the port engines connect to (0: any free one)")
    start.add_argument("--curve", action="store_true",
                       help="encrypt the controller's sockets with CurveZMQ (keys made per "
                            "cluster, in the 0600 connection file)")
    start.add_argument("--kernel", default=None,
                       help="start engines from this kernelspec (its provisioner decides "
                            "where: `ipylb kernelspec install`); default ipylb-engine")
    start.add_argument("--heartbeat-timeout", type=float, default=10.0,
                       help="seconds of heartbeat silence before an engine counts as dead")
    start.add_argument("--db", default="memory", choices=["memory", "sqlite"],
                       help="where finished task records live: sqlite keeps them (and the "
                            "key) in the profile's directory, so a restart reloads them")
    limits.add_fault_options(start)
    start.add_argument("--max-frame-mb", type=int, default=256,
                       help="the largest frame (MiB) a client or engine may send the controller "
                            "(a larger one is refused before it is read); arrays between "
                            "processes of this machine go through shared memory, not frames")
    start.add_argument("--daemon", action="store_true",
                       help="run in the background: return once the engines are up")
    start.add_argument("--log-level", default="WARNING",
                       choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                       help="the controller's log level (its log: stderr, or a file with --daemon)")
    profile(start)
    start.set_defaults(func=cluster_start)
    stop = cluster.add_parser("stop", help="stop a running cluster and its engines",
                              formatter_class=fmt)
    profile(stop)
    stop.set_defaults(func=cluster_stop)
    status = cluster.add_parser("status", help="engines, queue and tasks done",
                                formatter_class=fmt)
    profile(status)
    status.set_defaults(func=cluster_status)

    engine = top.add_parser("engine", help="engines of a running cluster", formatter_class=fmt
                            ).add_subparsers(dest="action", required=True)
    add = engine.add_parser("add", help="start more engines for a running cluster",
                            formatter_class=fmt)
    add.add_argument("-n", "--engines", type=int, default=1, help="how many")
    add.add_argument("--kernel", default=None,
                     help="from this kernelspec (default: the cluster's)")
    profile(add)
    add.set_defaults(func=engine_add)
    join = engine.add_parser(
        "join", help="run engines on this host for a controller on another host (foreground)",
        formatter_class=fmt)
    join.add_argument("-n", "--engines", type=int, default=1, help="how many")
    where = join.add_mutually_exclusive_group()
    where.add_argument("--profile", default=None,
                       help="the cluster whose ipylb-PROFILE.json is in this host's Jupyter "
                            "runtime directory (default: default)")
    where.add_argument("--cluster-file", default=None,
                       help="the cluster's connection file (copied here, or on a shared "
                            "filesystem; keep it 0600: its key lets its reader run code)")
    where.add_argument("--url", default=None,
                       help="the controller's engine url (`ipylb cluster status` prints it), "
                            "with --key-file: the rest is asked from the controller")
    join.add_argument("--key-file", default=None,
                      help="a file (mode 0600) holding only the cluster key, for --url")
    join.add_argument("--ip", default=None,
                      help="where the engines' Jupyter channels listen; the controller must "
                           "reach it (default: this host's address on the route to the "
                           "controller)")
    join.add_argument("--timeout", type=float, default=60.0,
                      help="seconds the engines have to register")
    join.set_defaults(func=engine_join)
    ks = top.add_parser("kernelspec", help="kernelspecs for engines").add_subparsers(
        dest="action", required=True)
    inst = ks.add_parser("install", formatter_class=fmt,
                         help="write a kernelspec whose kernels are engines, for any provisioner")
    inst.add_argument("--name", required=True, help="the kernelspec's name")
    inst.add_argument("--provisioner", default=None,
                      help="a jupyter_client kernel provisioner, e.g. distributed-provisioner "
                           "(gateway_provisioners' SSH one); default: local processes")
    inst.add_argument("--provisioner-config", default="{}", type=json.loads,
                      help='its config, JSON, e.g. \'{"remote_hosts": ["node1", "node2"]}\'')
    inst.add_argument("--cluster-file", default=None,
                      help="the connection file the engines read (its path goes in the "
                           "kernelspec's env, never the key; it must be on a filesystem the "
                           "engines' hosts share)")
    inst.add_argument("--python", default=None,
                      help="the interpreter on the engines' hosts (default: this one)")
    inst.add_argument("--user", action="store_true",
                      help="install in the user's Jupyter data dir (default: this environment)")
    inst.set_defaults(func=kernelspec_install)
    sub = engine.add_parser(
        "submit", formatter_class=fmt,
        help="run engines as a batch job (SLURM, PBS, LSF) that runs `ipylb engine join`")
    sub.add_argument("-n", "--engines", type=int, required=True, help="how many, in all")
    sub.add_argument("--scheduler", required=True, choices=["slurm", "pbs", "lsf"],
                     help="the batch system that runs the job (required)")
    sub.add_argument("--nodes", type=int, default=1,
                     help="spread the engines over this many nodes (srun/pbsdsh/blaunch)")
    sub.add_argument("--time", default=None, help="walltime: minutes, MM:SS or HH:MM:SS")
    sub.add_argument("--partition", "--queue", default=None,
                     help="SLURM partition, PBS or LSF queue")
    sub.add_argument("--sbatch-arg", "--qsub-arg", "--bsub-arg", dest="extra", action="append",
                     default=[], help="one more directive for the job script, e.g. "
                                      "--sbatch-arg=--account=abc (repeatable)")
    sub.add_argument("--dry-run", action="store_true", help="print the job script, submit nothing")
    profile(sub)
    sub.add_argument("--cluster-file", default=None,
                     help="the connection file the job's nodes read (default: the profile's)")
    sub.set_defaults(func=engine_submit)
    can = engine.add_parser("cancel", formatter_class=fmt,
                            help="cancel the batch jobs `ipylb engine submit` started")
    profile(can)
    can.add_argument("--cluster-file", default=None,
                     help="the connection file the jobs were submitted for (default: the "
                          "profile's)")
    can.add_argument("--job", default=None, help="only this job id (default: all of them)")
    can.set_defaults(func=engine_cancel)
    return p


def _say(text: str) -> None:
    print(f"ipylb: {text}", file=sys.stderr, flush=True)


def _engines(n: int) -> str:
    return f"{n} engine" if n == 1 else f"{n} engines"


def _connect(path: Path) -> Any:
    """A Client of the cluster whose connection file is ``path``, or None if it is not
    running (no file, its pid is gone, or its controller does not answer)."""
    from .client.client import Client

    try:
        info = connection.read(path)
    except NoCluster:
        return None
    if not connection.pid_alive(info.get("pid")):
        return None
    try:
        return Client(path, timeout=PING_TIMEOUT_S)
    except NoCluster:
        return None


def _not_running(profile: str) -> int:
    _say(f"no cluster is running for profile {profile!r}; start one with "
         f"`ipylb cluster start -n 4 --profile {profile}`")
    return 1


# -- cluster start -------------------------------------------------------------------


def _hwm(text: str) -> int | str:
    """``--hwm``: an int >= 0 or ``auto`` (argparse says what is wrong otherwise)."""
    from .core.pipeline import parse_hwm

    try:
        return parse_hwm(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cluster_start(args: argparse.Namespace) -> int:
    """Start a controller and its engines, in the foreground or as a daemon."""
    hint = limits.check_engine_count(args.engines, "-n", minimum=0)  # ValueError: said by main()
    if hint:
        _say(hint)
    path = connection.profile_file(args.profile)
    rc = _connect(path)
    if rc is not None:
        pid, n = rc.cluster_info.get("pid"), len(rc.ids)
        rc.close()
        _say(f"a cluster is already running for profile {args.profile!r} (controller pid {pid}, "
             f"{_engines(n)}, {path}); it is left as it is. Stop it first with "
             f"`ipylb cluster stop --profile {args.profile}`, or pick another --profile.")
        return 1
    if path.exists():
        _say(f"replacing the stale connection file {path} (its cluster is gone)")
        path.unlink(missing_ok=True)
    cmd = [
        sys.executable, "-m", "ipylb.controller", "--connection-file", str(path),
        "--engines", str(args.engines), "--scheme", args.scheme, "--hwm", str(args.hwm),
        "--ip", args.ip, "--log-level", args.log_level,
        "--heartbeat-timeout", str(args.heartbeat_timeout),
        *limits.fault_argv(args),
    ]
    if args.location:
        cmd += ["--location", args.location]
    if args.curve:
        cmd.append("--curve")
    cmd += ["--client-port", str(args.client_port), "--engine-port", str(args.engine_port)]
    cmd += ["--max-frame-mb", str(args.max_frame_mb)]
    if args.kernel:
        cmd += ["--kernel", args.kernel]
    if args.db == "sqlite":
        cmd += ["--db-file", str(connection.profile_dir(args.profile) / "tasks.sqlite")]
    if args.daemon:
        log = connection.log_file(args.profile)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        # A session of its own: the shell's Ctrl-C and hang-up do not reach it.
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=fd, text=True, start_new_session=True)
        os.close(fd)
        rc = _wait_ready(proc, path, args.engines)
        if rc is None:
            _say(f"the controller's log: {log}")
            return 1
        rc.close()
        _say(f"cluster {args.profile!r} started: {_engines(args.engines)}, scheme {args.scheme} "
             f"(controller pid {proc.pid}, log {log}). Stop it with "
             f"`ipylb cluster stop --profile {args.profile}`.")
        _say_if_empty(args)
        print(path, flush=True)
        return 0
    # Foreground: the controller is our child and watches us, so whatever ends this
    # command (Ctrl-C, SIGTERM, a closed terminal) ends the cluster too.
    cmd += ["--parent-pid", str(os.getpid())]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    try:
        rc = _wait_ready(proc, path, args.engines)
        if rc is None:
            return 1
        rc.close()
        _say(f"cluster {args.profile!r} running: {_engines(args.engines)}, scheme {args.scheme}, "
             f"connection file {path}. Connect with ipylb.Client(profile={args.profile!r}); "
             "Ctrl-C stops it.")
        _say_if_empty(args)
        proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
    _say(f"cluster {args.profile!r} stopped")
    return 0


def _say_if_empty(args: argparse.Namespace) -> None:
    if args.engines == 0:
        _say(f"the cluster has no engines: tasks wait until "
             f"`ipylb engine add -n K --profile {args.profile}` adds some")


def _wait_ready(proc: subprocess.Popen, path: Path, engines: int) -> Any:
    """Wait for the controller's "ready" line, then for its engines to register.
    Returns a connected Client, or None (said why, and the controller is stopped)."""
    from .client.client import Client
    from .client.local import read_ready

    line = read_ready(proc)
    if line != "ready":
        proc.wait()
        _say(f"the controller failed to start: {line.removeprefix('error: ') or 'no output'}")
        return None
    try:
        rc = Client(path, timeout=PING_TIMEOUT_S)
    except NoCluster as e:
        _stop_process(proc.pid)
        _say(str(e))
        return None
    try:
        rc.wait_for_engines(engines, ENGINE_START_TIMEOUT_S, interactive=True)
    except (RuntimeError, TimeoutError) as e:
        rc.close()
        _stop_process(proc.pid)
        _say(f"engines failed to start, cluster stopped: {e}")
        return None
    return rc


# -- cluster stop ------------------------------------------------------------------


def cluster_stop(args: argparse.Namespace) -> int:
    """Ask the controller to shut down (it stops its engines); wait until it is gone."""
    path = connection.profile_file(args.profile)
    try:
        info = connection.read(path)
    except NoCluster:
        return _not_running(args.profile)
    pid = info.get("pid")
    if not connection.pid_alive(pid) or not _is_controller(pid):
        path.unlink(missing_ok=True)
        _say(f"removed the stale connection file {path}")
        return _not_running(args.profile)
    rc = _connect(path)
    asked = False
    if rc is not None:
        try:
            rc.stop_cluster(timeout=PING_TIMEOUT_S)
            asked = True
        except TimeoutError:
            pass
        rc.close()
    if not asked:  # a controller that does not answer: the signal it handles the same way
        _say(f"the controller (pid {pid}) does not answer; sending it SIGTERM")
        _stop_process(pid, wait=False)
    if not _wait_gone(pid, STOP_TIMEOUT_S):
        _say(f"the controller (pid {pid}) is still running after {STOP_TIMEOUT_S:.0f} s; "
             f"`kill -9 {pid}` ends it (its engines exit when it is gone)")
        return 1
    _say(f"cluster {args.profile!r} stopped")
    return 0


def _is_controller(pid: int) -> bool:
    """Whether ``pid`` runs an ipylb controller (a recycled pid must not be signalled)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"ipylb.controller" in f.read()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (macOS): trust the connection file
        return True


def _stop_process(pid: int, wait: bool = True) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    if wait:
        _wait_gone(pid, STOP_TIMEOUT_S)


def _wait_gone(pid: int, timeout: float) -> bool:
    """Poll until ``pid`` is gone: it is not our child, so there is nothing to wait() on."""
    deadline = time.monotonic() + timeout
    while connection.pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# -- cluster status, engine add ------------------------------------------------------


def cluster_status(args: argparse.Namespace) -> int:
    """Print the cluster's engines, queues and tasks done."""
    path = connection.profile_file(args.profile)
    rc = _connect(path)
    if rc is None:
        return _not_running(args.profile)
    try:
        qs, ids, info, hosts = rc.queue_status(), rc.ids, rc.cluster_info, rc.engine_info()
        stats = rc.controller_stats()
    finally:
        rc.close()
    engines = {k: v for k, v in qs.items() if isinstance(k, int)}
    print(f"cluster {args.profile!r}: controller pid {info.get('pid')}, "
          f"scheme {info.get('scheme')}, hwm {info.get('hwm')}")
    print(f"connection file: {path}")
    print(f"clients connect to {info.get('client_url')}, engines to {info.get('engine_url')}"
          f"{' (CurveZMQ)' if info.get('curve_serverkey') else ''}")
    print(f"engines: {len(ids)}")
    for e in sorted(engines):
        s = engines[e]
        host = connection.engine_host(hosts.get(e, {}))
        print(f"  engine {e} on {host}: queue {s['queue']}, tasks {s['tasks']}, "
              f"completed {s['completed']}, restarts {s.get('restarts', 0)}")
    print(f"unassigned: {qs.get('unassigned', 0)}")
    print(f"engine restarts: {sum(s.get('restarts', 0) for s in engines.values())}")
    print(f"tasks done: {sum(s['completed'] for s in engines.values())}")
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(stats["messages"].items(), key=lambda kn: -kn[1]))
    print(f"messages received: {stats['messages_received']}" + (f" ({kinds})" if kinds else ""))
    g = stats["gc"]
    print(f"controller GC: {g['policy']}, {g['frozen']} objects frozen, "
          f"{g['full_collections']} full collections")
    return 0


def engine_add(args: argparse.Namespace) -> int:
    """Start more engines for a running cluster and wait until they have registered."""
    limits.check_engine_count(args.engines, "-n")  # a ValueError is said by main()
    rc = _connect(connection.profile_file(args.profile))
    if rc is None:
        return _not_running(args.profile)
    try:
        before = len(rc.ids)
        if before + args.engines <= limits.MAX_ENGINES:
            hint = limits.check_engine_count(before + args.engines, "engines in all")
            if hint:
                _say(hint)
        rc.add_engines(args.engines, args.kernel)
        rc.wait_for_engines(before + args.engines, ENGINE_START_TIMEOUT_S, interactive=True)
        _say(f"added {_engines(args.engines)} to cluster {args.profile!r}: "
             f"{_engines(len(rc.ids))} now")
        return 0
    except (RuntimeError, TimeoutError, ValueError) as e:
        _say(f"adding engines failed: {e}")
        return 1
    finally:
        rc.close()


def engine_join(args: argparse.Namespace) -> int:
    """Run engines here for a cluster whose controller may be on another host."""
    from . import join

    if args.engines < 1:
        _say("-n must be at least 1")
        return 1
    try:
        path = join.resolve(args.profile, args.cluster_file, args.url, args.key_file)
        return join.join(path, args.engines, args.ip, args.timeout)
    except NoCluster as e:
        _say(str(e))
        return 1


def kernelspec_install(args: argparse.Namespace) -> int:
    """Write an engine kernelspec."""
    from . import kernelspec

    try:
        where = kernelspec.install(args.name, args.provisioner, args.provisioner_config,
                                   args.cluster_file, args.python, args.user)
    except ValueError as e:
        _say(str(e))
        return 1
    _say(f"installed kernelspec {args.name!r} in {where}; start engines from it with "
         f"`ipylb cluster start --kernel {args.name}` or `ipylb engine add --kernel {args.name}`")
    return 0


def _batch_cluster_file(args: argparse.Namespace) -> Path:
    return (Path(args.cluster_file).resolve() if args.cluster_file
            else connection.profile_file(args.profile))


def engine_submit(args: argparse.Namespace) -> int:
    """Write a job script running `ipylb engine join`; print it or submit it."""
    from . import batch

    path = _batch_cluster_file(args)
    job = batch.Job(args.engines, path, args.nodes, args.time, args.partition, tuple(args.extra),
                    name=f"ipylb-engines-{path.stem.removeprefix('ipylb-')}")
    try:
        if args.dry_run:
            print(batch.script(args.scheduler, job), end="")
            return 0
        connection.read(path)  # the cluster must exist before its engines are queued
        job_id = batch.submit(args.scheduler, job)
    except (RuntimeError, NoCluster) as e:
        _say(str(e))
        return 1
    _say(f"submitted {args.scheduler} job {job_id}: {_engines(args.engines)} register when it "
         f"starts (`ipylb cluster status --profile {args.profile}` shows them); "
         f"`ipylb engine cancel --profile {args.profile}` cancels it. Its nodes must see {path}.")
    print(job_id, flush=True)
    return 0


def engine_cancel(args: argparse.Namespace) -> int:
    """Cancel the batch jobs submitted for this cluster."""
    from . import batch

    try:
        ids = batch.cancel(_batch_cluster_file(args), args.job)
    except RuntimeError as e:
        _say(f"cancelling failed: {e}")
        return 1
    _say(f"cancelled job(s) {', '.join(ids)}" if ids else "no submitted jobs to cancel")
    return 0


if __name__ == "__main__":
    main()
