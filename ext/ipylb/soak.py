"""``ipylb soak``: many tasks of every kind from two clients while engines are killed.

A private cluster (a controller process logging to a file, engines restarted through
jupyter_client with a policy that outlasts the chaos), two clients each submitting half of
the tasks from a thread of its own, a chaos thread that SIGKILLs a random engine every few
seconds, and optionally :class:`ipylb.fuzz.Fuzzer` at both controller sockets.  Then every
task is accounted for:

- ``lost``: no outcome by the deadline (must be 0);
- ``duplicates``: a result message received twice for one task, or a task that ran again
  after an attempt of it had succeeded (each attempt claims a marker file named by the
  task's token and attempt number; a success returns its attempt number), must be 0;
- errors are expected only where the rules say: ``EngineError`` for a task without retries
  left running on a killed engine, ``WalltimeExceeded`` for the tasks made to overrun,
  ``ImpossibleDependency`` for ``after``/``follow`` tasks whose parent (or its engine) died;
  anything else is ``unexpected`` (must be 0).

Also measured: the controller's RSS at start and end (psutil), tasks per second, and the
controller's own consistency check (the ``validate`` request) at the end.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import connection, wire
from .cli import HelpFormatter
from .client.client import Client
from .error import RemoteError

# The mix, per client: (kind, share of the tasks).  "long" tasks overrun their walltime on
# purpose.  No-ops go in maps of NOOP_MAP items; after chains and follow groups are CHAIN long.
MIX = (("noop", 0.40), ("sleep", 0.20), ("after", 0.12), ("follow", 0.08), ("retries", 0.12),
       ("walltime", 0.078), ("long", 0.002))
NOOP_MAP = 20
CHAIN = 5
WALLTIME_S = 2.0  # the walltime of "walltime" and "long" tasks
LONG_S = 30.0  # how long a "long" task would run without its walltime
EXPECTED = {  # kind -> errors that are a clear, rule-given outcome for it
    "noop": {"EngineError"}, "sleep": {"EngineError"},
    "after": {"EngineError", "ImpossibleDependency"},
    "follow": {"EngineError", "ImpossibleDependency"},
    "retries": {"EngineError"},  # only once its retries are used up (checked: attempts)
    "walltime": {"EngineError", "WalltimeExceeded"}, "long": {"WalltimeExceeded", "EngineError"},
}


def work(marks: str, token: str, seconds: float) -> tuple[str, int]:
    """A soak task: claim the next attempt number for ``token`` (a marker file made with
    O_EXCL, so two attempts never claim the same), run ``seconds``, return (token, attempt)."""
    attempt = 0
    while True:
        try:
            os.close(os.open(os.path.join(marks, f"{token}.{attempt}"),
                             os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            break
        except FileExistsError:
            attempt += 1
    if seconds:
        time.sleep(seconds)
    return token, attempt


class _CountingClient(Client):
    """A Client that counts the result messages it receives, per msg_id."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.delivered: Counter[str] = Counter()
        self.highest_engine = -1  # the highest engine id registered while we watched
        super().__init__(*args, **kwargs)

    def _on_result(self, meta: Any, bufs: list[Any], mac: bytes) -> None:
        self.delivered[meta[0]] += 1
        super()._on_result(meta, bufs, mac)

    def _on_message(self, kind: int, sender: bytes, meta: Any, bufs: list[Any], mac: bytes) -> None:
        if kind in (wire.EVENT, wire.WELCOME):
            ids = meta.get("engines") if kind == wire.WELCOME else \
                meta[1] if meta[0] == "engines" else \
                [meta[1]] if meta[0] == "engine_added" else None
            if ids:
                self.highest_engine = max(self.highest_engine, *ids)
        super()._on_message(kind, sender, meta, bufs, mac)


@dataclass
class _Task:
    kind: str
    token: str
    retries: int
    ar: Any


@dataclass
class SoakReport:
    """What a soak run found; ``ok`` is True when nothing was lost, duplicated or unexpected."""

    tasks: int = 0
    engines: int = 0
    seconds: float = 0.0
    kills: int = 0
    restarts: int = 0
    succeeded: int = 0
    lost: int = 0
    duplicate_results: int = 0
    duplicate_runs: int = 0
    errors: Counter = field(default_factory=Counter)  # "kind: ename" -> count
    unexpected: list[str] = field(default_factory=list)
    rss_start: int = 0
    rss_end: int = 0
    rss_purged: int = 0
    validate: dict[str, int] = field(default_factory=dict)
    fuzz: dict[str, int] = field(default_factory=dict)
    fuzz_frames: int = 0

    @property
    def duplicates(self) -> int:
        return self.duplicate_results + self.duplicate_runs

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicates or self.unexpected)

    @property
    def tasks_per_s(self) -> float:
        return self.tasks / self.seconds if self.seconds else 0.0

    def rows(self) -> list[tuple[str, str]]:
        """The summary as (what, value) rows."""
        mb = 1 << 20
        rows = [
            ("tasks", f"{self.tasks:,} from 2 clients"),
            ("engines", f"{self.engines} (restart on)"),
            ("engine kills (SIGKILL)", f"{self.kills}"),
            ("engine restarts", f"{self.restarts}"),
            ("succeeded", f"{self.succeeded:,}"),
            ("clear errors", ", ".join(f"{k} {v}" for k, v in sorted(self.errors.items())) or "0"),
            ("lost", f"{self.lost}"),
            ("duplicates", f"{self.duplicates} ({self.duplicate_results} results received twice, "
                           f"{self.duplicate_runs} tasks run again after a success)"),
            ("unexpected", f"{len(self.unexpected)}"),
            ("controller RSS start / end", f"{self.rss_start / mb:.1f} / {self.rss_end / mb:.1f} MiB"
                                           f" ({self.rss_purged / mb:.1f} once the records are "
                                           "purged)"),
            ("wall time", f"{self.seconds:.1f} s"),
            ("tasks/s", f"{self.tasks_per_s:,.0f}"),
            ("controller validate()", ", ".join(f"{k} {v}" for k, v in self.validate.items())
             or "not run"),
        ]
        if self.fuzz:
            rows.append(("fuzz messages (both sockets)",
                         ", ".join(f"{k} {v}" for k, v in self.fuzz.items())
                         + f"; {self.fuzz_frames} frames"))
        return rows


def _start_cluster(engines: int, runtime: Path, log: Path) -> tuple[subprocess.Popen, Path]:
    """A controller process of our own (it watches us), logging to ``log``; engines are
    restarted however often the chaos kills them."""
    from .client.local import engine_env, read_ready

    path = runtime / f"ipylb-soak-{os.getpid()}.json"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ipylb.controller", "--connection-file", str(path),
             "--engines", str(engines), "--parent-pid", str(os.getpid()), "--log-level", "INFO",
             "--restart-limit", "100000", "--restart-stable", "0.5"],
            stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True,
            env=engine_env())
    line = read_ready(proc)
    if line != "ready":
        raise RuntimeError(f"the soak's controller failed to start: {line} (log: {log})")
    return proc, path


def _submit(rc: Client, n: int, marks: str, rng: random.Random, tasks: list[_Task]) -> None:
    """Submit ``n`` tasks of the mix from ``rc``, appending them to ``tasks``."""
    view = rc.load_balanced_view()
    per_choice = {"noop": NOOP_MAP, "after": CHAIN, "follow": CHAIN}
    kinds = [k for k, _ in MIX]
    weights = [share / per_choice.get(k, 1) for k, share in MIX]
    prefix = f"{rc.session}-"
    i = 0

    def token() -> str:
        nonlocal i
        i += 1
        return f"{prefix}{i}"

    while i < n:
        [kind] = rng.choices(kinds, weights)
        if kind == "noop":  # a map of no-ops
            toks = [token() for _ in range(min(NOOP_MAP, n - i))]
            amr = view.map_async(work, [marks] * len(toks), toks, [0.0] * len(toks))
            for j, t in enumerate(toks):
                tasks.append(_Task(kind, t, 0, (amr, j)))
        elif kind == "sleep":
            t = token()
            tasks.append(_Task(kind, t, 0, view.apply_async(work, marks, t, rng.uniform(0.001, 0.02))))
        elif kind == "after":
            prev = None
            for _ in range(CHAIN):
                t = token()
                with view.temp_flags(after=prev):
                    prev = view.apply_async(work, marks, t, 0.002)
                tasks.append(_Task(kind, t, 0, prev))
        elif kind == "follow":
            t = token()
            parent = view.apply_async(work, marks, t, 0.002)
            tasks.append(_Task(kind, t, 0, parent))
            with view.temp_flags(follow=parent):
                for _ in range(CHAIN - 1):
                    t = token()
                    tasks.append(_Task(kind, t, 0, view.apply_async(work, marks, t, 0.002)))
        elif kind == "retries":
            t = token()
            with view.temp_flags(retries=3):
                tasks.append(_Task(kind, t, 3, view.apply_async(work, marks, t, 0.005)))
        else:  # walltime: most finish well within it, "long" ones overrun it
            t = token()
            with view.temp_flags(walltime=WALLTIME_S):
                seconds = LONG_S if kind == "long" else 0.01
                tasks.append(_Task(kind, t, 0, view.apply_async(work, marks, t, seconds)))


def _chaos(rc: Client, every: float, stop: threading.Event, rng: random.Random,
           counts: Counter) -> None:
    """SIGKILL a random engine every ``every`` seconds until ``stop``."""
    while not stop.wait(every):
        try:
            pids = [e["pid"] for e in rc.engine_info().values() if isinstance(e.get("pid"), int)]
        except Exception:  # the controller is busy or gone: the report will say
            continue
        if pids:
            try:
                os.kill(rng.choice(pids), signal.SIGKILL)
                counts["kills"] += 1
            except ProcessLookupError:
                pass


def _outcome(task: _Task) -> tuple[str, Any]:
    """("ok", value) or ("error", RemoteError) or ("lost", None)."""
    ar, index = (task.ar if isinstance(task.ar, tuple) else (task.ar, None))
    if index is not None:
        ar = ar.split()[index]  # a map's task, as a result of its own
    if not ar.ready():
        return "lost", None
    value = ar.get(0, return_exceptions=True)
    if index is not None:
        value = value[0]  # that task's one item (a map's get() is a list)
    return ("error" if isinstance(value, RemoteError) else "ok"), value


def run_soak(tasks: int = 20_000, engines: int = 4, kill_every: float = 2.0,
             fuzz_per_kind: int = 0, timeout: float = 600.0, seed: int = 0,
             log: Path | None = None) -> SoakReport:
    """Run a soak (see the module's docstring); ``timeout``: seconds to wait for the last
    results after the submissions.  Returns the report; raises only if the cluster cannot
    start."""
    import psutil

    work_dir = Path(tempfile.mkdtemp(prefix="ipylb-soak-"))
    marks = work_dir / "marks"
    marks.mkdir()
    log = log or work_dir / "controller.log"
    proc, path = _start_cluster(engines, connection.runtime_dir(), log)
    report = SoakReport(tasks=tasks, engines=engines)
    clients: list[_CountingClient] = []
    stop = threading.Event()
    counts: Counter[str] = Counter()
    try:
        controller = psutil.Process(proc.pid)
        clients = [_CountingClient(path), _CountingClient(path)]
        clients[0].wait_for_engines(engines, 120)
        report.rss_start = controller.memory_info().rss
        first_id = clients[0].highest_engine + 1
        chaos = threading.Thread(target=_chaos, args=(clients[0], kill_every, stop,
                                                      random.Random(seed + 1), counts),
                                 daemon=True, name="ipylb-soak-chaos")
        fuzzer = None
        if fuzz_per_kind:
            from .fuzz import Fuzzer

            fuzzer = Fuzzer(connection.read(path), per_kind=fuzz_per_kind, seed=seed)
            fuzzing = threading.Thread(target=fuzzer.run, kwargs={"stop": stop}, daemon=True,
                                       name="ipylb-soak-fuzz")
        t0 = time.monotonic()
        chaos.start()
        if fuzzer is not None:
            fuzzing.start()
        per_client: list[list[_Task]] = [[], []]
        submitters = [threading.Thread(target=_submit, args=(rc, n, str(marks),
                                                             random.Random(seed + 2 + k), out))
                      for k, (rc, n, out) in enumerate(zip(clients, (tasks // 2, tasks - tasks // 2),
                                                           per_client))]
        for s in submitters:
            s.start()
        for s in submitters:
            s.join()
        deadline = time.monotonic() + timeout
        for rc in clients:
            rc.wait(None, max(0.0, deadline - time.monotonic()))
        report.seconds = time.monotonic() - t0
        stop.set()
        chaos.join(30)
        if fuzzer is not None:
            fuzzing.join(60)
            report.fuzz, report.fuzz_frames = dict(fuzzer.sent), fuzzer.frames
        report.kills = counts["kills"]
        report.restarts = clients[0].highest_engine + 1 - first_id  # a restart is a new id
        report.validate = clients[0].validate(60)
        report.rss_end = controller.memory_info().rss
        _account(report, [t for ts in per_client for t in ts], clients, marks)
        clients[0].purge_results("all")  # what the records held, as opposed to a leak
        report.rss_purged = controller.memory_info().rss
    finally:
        stop.set()
        for rc in clients:
            rc.close()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(marks, ignore_errors=True)
    return report


def _account(report: SoakReport, tasks: list[_Task], clients: list[_CountingClient],
             marks: Path) -> None:
    """Every task's outcome, checked against the rules; duplicates from markers and counts."""
    attempts: Counter[str] = Counter()
    highest: dict[str, int] = {}
    for name in os.listdir(marks):
        token, _, n = name.rpartition(".")
        attempts[token] += 1
        highest[token] = max(highest.get(token, -1), int(n))
    report.tasks = len(tasks)
    for rc in clients:
        report.duplicate_results += sum(1 for n in rc.delivered.values() if n > 1)
    for task in tasks:
        status, value = _outcome(task)
        if status == "lost":
            report.lost += 1
        elif status == "ok":
            token, attempt = value
            if token != task.token:
                report.unexpected.append(f"{task.token}: returned another task's token {token}")
            report.succeeded += 1
            if highest.get(task.token, -1) > attempt:  # an attempt after the one that succeeded
                report.duplicate_runs += 1
        else:
            report.errors[f"{value.ename} ({task.kind})"] += 1
            if value.ename not in EXPECTED[task.kind]:
                report.unexpected.append(f"{task.token} ({task.kind}): {value}")
            elif value.ename == "EngineError" and attempts[task.token] < task.retries + 1 \
                    and task.retries:
                # Retries left: it must have run again (an attempt killed before it claimed
                # its marker is not seen, so this only flags what is certainly wrong).
                if attempts[task.token] == 0:
                    report.unexpected.append(f"{task.token}: EngineError with retries unused")


def print_report(report: SoakReport) -> None:
    """The summary table (rich's, if installed; plain text otherwise)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        for what, value in report.rows():
            print(f"{what:>32}  {value}")
    else:
        table = Table(title="ipylb soak", show_header=False)
        table.add_column(justify="right", style="bold")
        table.add_column()
        for what, value in report.rows():
            table.add_row(what, value)
        Console().print(table)
    for line in report.unexpected[:20]:
        print(f"  unexpected: {line}")
    print("PASS" if report.ok else "FAIL", flush=True)


def parser() -> argparse.ArgumentParser:
    """``ipylb soak``'s options (each help line ends with its default)."""
    p = argparse.ArgumentParser(prog="ipylb soak", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("-N", "--tasks", type=int, default=20_000, help="tasks in all (two clients)")
    p.add_argument("-n", "--engines", type=int, default=4, help="engines")
    p.add_argument("--kill-every", type=float, default=2.0,
                   help="seconds between SIGKILLs of a random engine (0: no chaos)")
    p.add_argument("--fuzz", type=int, default=0, metavar="PER_KIND",
                   help="also fuzz both controller sockets: messages of each kind per socket")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds to wait for the last results")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the task mix, the chaos thread's picks and the fuzzer: the "
                        "same seed makes the same choices")
    return p


def main(argv: list[str] | None = None) -> None:
    """``ipylb soak``: run the soak, print the summary; exit status 1 unless it passed."""
    p = parser()
    args = p.parse_args(argv)
    if args.tasks < 1 or args.engines < 1 or args.kill_every < 0:
        p.error("--tasks and --engines must be >= 1, --kill-every >= 0")
    report = run_soak(args.tasks, args.engines, args.kill_every or 1e9, args.fuzz,
                      args.timeout, args.seed)
    print_report(report)
    sys.exit(0 if report.ok else 1)
