"""IPython magics: ``%load_ext ipylb``, then ``%lb_start``, ``%%lb``, ``%lbmap``, ``%lb_dashboard``.

The magics keep one client per shell.  ``%lb_start`` starts a private cluster
that the kernel owns: ``%lb_stop``, ``%unload_ext ipylb`` and the kernel's exit
(shutdown or restart: an ``atexit`` hook) stop it, and the controller itself
exits if the kernel is killed outright, so no engine outlives its notebook.
``%lb_use rc`` adopts a client made with ``ipylb.Client(...)`` instead; the
magics never shut down a client they did not start.

``%lb_interrupt`` interrupts the engines running the magics' tasks (a notebook
that used ``%lb_start`` has no ``rc`` for ``rc.interrupt()``; ``%lb_start -o NAME``
binds the magics' client to NAME too).

``%%lb`` ships the cell's source, not a function: the engine runs it in its own
user namespace, like a cell typed there, and sends back the value of the last
expression (see :func:`run_source`).
"""

from __future__ import annotations

import ast
import atexit
import linecache
import re
import sys
import warnings
from collections.abc import Callable
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class, needs_local_scope
from IPython.core.magic_arguments import argument, kwds, magic_arguments, parse_argstring

from .client.asyncresult import AsyncResult
from .client.client import Client
from .client.live import LiveOutput
from .dependency import Dependency
from .error import TaskAborted

NO_CLUSTER = (
    "no ipylb cluster yet: run `%lb_start -n 4` to start one for this kernel "
    "(or make one with `rc = ipylb.Client(engines=4)` and adopt it with `%lb_use rc`)"
)
# After an interrupt and an abort request, how long to wait for the task's fate.
ABORT_GRACE_S = 1.0


def run_source(source: str, filename: str) -> Any:
    """Run cell source in this process's IPython user namespace (the engine's); return the
    value of the last expression, or None if the cell ends with a statement or a ``;``.

    Runs on the engine.  The source is put in ``linecache`` so that a traceback shows the
    lines of the cell, as it would for a cell typed into the engine.
    """
    from IPython import get_ipython

    shell = get_ipython()
    ns = shell.user_ns if shell is not None else sys.modules["__main__"].__dict__
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    tree = ast.parse(source, filename)
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr) and not source.rstrip().endswith(";"):
        last = ast.Expression(tree.body.pop().value)
    exec(compile(tree, filename, "exec"), ns)
    return None if last is None else eval(compile(last, filename, "eval"), ns)


# What a msg_id looks like (a client session, then a counter): accepted as itself by --after.
MSG_ID = re.compile(r"[0-9a-f]{16}-[0-9]+")


@magics_class
class LbMagics(Magics):
    """The ipylb magics and the one client they share."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.client: Client | None = None
        self.owned = False
        self.view: Any = None
        # Results of what the magics submitted and may still run (for %lb_interrupt).
        self.submitted: list[AsyncResult] = []

    # -- the cluster ---------------------------------------------------------------

    @magic_arguments()
    @argument("-n", "--engines", type=int, default=4,
              help="how many engine kernels to start (default: 4)")
    @argument("--scheme", default="leastload",
              help="load-balancing scheme: leastload (the default), lru, plainrandom, twobin, "
                   "weighted, pure")
    @argument("--hwm", default=None,
              help="tasks outstanding per engine: auto (the default: enough to hide the round "
                   "trip, queued tasks stolen back for idle engines), or at most this many "
                   "(1: one at a time; 0: no limit)")
    @argument("-o", "--out", metavar="NAME",
              help="also bind the magics' ipylb.Client to NAME (for rc.queue_status() etc.)")
    @line_magic
    def lb_start(self, line: str) -> None:
        """Start a private ipylb cluster (a controller and N engine kernels) owned by this
        kernel; it stops with %lb_stop, %unload_ext ipylb, or when the kernel exits."""
        args = parse_argstring(self.lb_start, line)
        if self._current() is not None:
            print(f"ipylb: a cluster is already in use here ({self._describe()}); "
                  "nothing changed. `%lb_stop` it first to start another.")
            return
        try:
            client = Client(engines=args.engines, scheme=args.scheme, hwm=args.hwm)
        except ValueError as e:
            raise UsageError(str(e).replace("engines must", "-n must", 1)) from None
        self._adopt(client, owned=True)
        atexit.register(self._stop_at_exit)
        if args.out:
            self.shell.user_ns[args.out] = client
        bound = f"; bound to {args.out}" if args.out else ""
        print(f"ipylb: started a cluster ({self._describe()}{bound})")

    @magic_arguments()
    @argument("name", help="a name in the namespace bound to an ipylb.Client")
    @line_magic
    def lb_use(self, line: str) -> None:
        """Use an existing ipylb.Client for the magics (it is never shut down by them)."""
        args = parse_argstring(self.lb_use, line)
        client = self._lookup(args.name)
        if not isinstance(client, Client):
            raise UsageError(f"{args.name} is a {type(client).__name__}, not an ipylb.Client")
        if self._current() is not None:
            print(f"ipylb: a cluster is already in use here ({self._describe()}); "
                  "nothing changed. `%lb_stop` it first.")
            return
        self._adopt(client, owned=False)
        print(f"ipylb: using the client's cluster ({self._describe()})")

    @line_magic
    def lb_stop(self, line: str = "") -> None:
        """Stop the cluster %lb_start started (or let go of the client %lb_use adopted)."""
        _no_arguments("%lb_stop", line)
        if self._current() is None:
            print("ipylb: no cluster to stop")
            return
        print(f"ipylb: {self.stop('%lb_stop')}")

    def stop(self, by: str) -> str:
        """Let go of the client, shutting it down if %lb_start started it.  ``by`` names
        what stopped it (``%lb_stop``, the extension's unload): results still awaited fail
        with a ClientClosed that says so.  Returns a sentence for the user."""
        client, owned = self.client, self.owned
        what = self._describe() if client is not None and not client.closed else "closed"
        self.client, self.view, self.owned = None, None, False
        self.submitted = []
        atexit.unregister(self._stop_at_exit)
        if client is None:
            return "no cluster in use"
        running = len(client.outstanding)
        if not owned:
            left = f"; its {running} unfinished task(s) go on" if running else ""
            return f"no longer using the client's cluster ({what}); it keeps running{left}"
        client.shutdown(reason=f"{by} stopped the magics' cluster")
        lost = (f"; {running} task(s) were still running and were stopped: their results "
                "raise ClientClosed" if running else "")
        head = "" if by == "%lb_stop" else f"{by}: "
        return f"{head}stopped the cluster ({what}){lost}"

    def _stop_at_exit(self) -> None:
        if self.client is not None and self.owned:
            self.client.shutdown(reason="the kernel exited")

    def _adopt(self, client: Client, owned: bool) -> None:
        self.client, self.owned = client, owned
        self.view = client.load_balanced_view()

    def _describe(self) -> str:
        assert self.client is not None
        n = len(self.client.ids)
        scheme = self.client.cluster_info.get("scheme", "?")
        return f"{n} engine{'s' if n != 1 else ''}, scheme {scheme}"

    def _current(self) -> Client | None:
        """The client in use, forgetting one that was closed behind the magics' back."""
        if self.client is not None and self.client.closed:
            self.stop("the client's close()")
        return self.client

    def _need_client(self) -> Client:
        client = self._current()
        if client is None:
            raise UsageError(NO_CLUSTER)
        return client

    def _lookup(self, name: str) -> Any:
        try:
            return self.shell.user_ns[name]
        except KeyError:
            raise UsageError(f"no variable named {name!r} in the notebook's namespace") from None

    # -- the dashboard -------------------------------------------------------------

    @line_magic
    def lb_dashboard(self, line: str = "") -> Any:
        """A live panel of the cluster: queue depth, engines, throughput, failures."""
        from .dashboard import Dashboard

        _no_arguments("%lb_dashboard", line)
        return Dashboard(self._need_client())

    @line_magic
    def lb_interrupt(self, line: str = "") -> None:
        """Interrupt the tasks the magics submitted (%%lb, %lbmap) that run now, like
        Jupyter's Kernel > Interrupt: a running task raises KeyboardInterrupt and fails;
        the engines serve on, and a task running in front of one of ours is not touched."""
        _no_arguments("%lb_interrupt", line)
        client = self._need_client()
        self.submitted = [ar for ar in self.submitted if not ar.ready()]
        outstanding = client.outstanding
        running = [m for ar in self.submitted for m in ar.msg_ids if m in outstanding]
        # By task, not by engine: an engine may hold one of ours queued behind a task it
        # runs for someone else (hwm="auto"), which an interrupt of the engine would stop.
        engines = client.interrupt(jobs=running) if running else []
        if not engines:
            print("ipylb: no task of the magics is running: nothing to interrupt")
            return
        print(f"ipylb: interrupted engine(s) {', '.join(map(str, engines))}, where "
              f"{len(running)} unfinished task(s) of the magics were")

    # -- running cells -------------------------------------------------------------

    @magic_arguments("%lb")  # a cell magic: its usage line reads %%lb
    @argument("--after", action="extend", nargs="+", default=[], metavar="NAME",
              help="run once these tasks are done: names of AsyncResults, Dependency objects "
                   "or msg_ids (as names of variables, or the msg_ids themselves)")
    @argument("--follow", action="extend", nargs="+", default=[], metavar="NAME",
              help="run on the engine where these tasks ran (names, as for --after)")
    @argument("--timeout", type=float, default=0,
              help="seconds the task may wait for its dependencies (0: forever)")
    @argument("--retries", type=int, default=0, help="attempts after a failure")
    @argument("--walltime", type=float, default=0, metavar="S",
              help="seconds the cell may run (0: no limit); then it is interrupted, and it "
                   "fails with WalltimeExceeded")
    @argument("--label", default=None, metavar="L",
              help="name the task (in its record, db_query, metadata and the dashboard)")
    @argument("-b", "--block", dest="block", action="store_true", default=True,
              help="wait and show the result (the default)")
    @argument("-a", "--noblock", dest="block", action="store_false",
              help="return the AsyncResult at once")
    @argument("-o", "--out", metavar="NAME", help="bind the AsyncResult to NAME")
    @cell_magic
    def lb(self, line: str, cell: str) -> Any:
        """Run this cell on an engine chosen by the load balancer, in the engine's
        namespace; blocking, the cell's result is the value of its last expression and
        the engine's stdout/stderr appear below it while the cell runs (live output,
        :mod:`ipylb.client.live`; the full output replaces it when the task ends)."""
        args = parse_argstring(self.lb, line)
        client = self._need_client()
        source = self.shell.transform_cell(cell)
        try:
            tree = ast.parse(source)
        except SyntaxError as e:
            raise UsageError(f"the cell does not parse: line {e.lineno}: {e.msg}") from None
        if not tree.body:
            raise UsageError("%%lb needs code in the cell: it is empty")
        after = self._dependency(args.after, "--after")
        follow = self._dependency(args.follow, "--follow")
        filename = f"<lb-cell {self.shell.execution_count}>"
        try:
            with self.view.temp_flags(after=after, follow=follow, timeout=args.timeout,
                                      retries=args.retries, walltime=args.walltime,
                                      label=args.label):
                ar = self.view.apply_async(run_source, source, filename)
        except (TypeError, ValueError) as e:
            raise UsageError(str(e)) from None
        self.submitted.append(ar)
        if args.out:
            self.shell.user_ns[args.out] = ar
        if not args.block:
            return ar
        # The cell's output while it runs, in this cell (in a kernel: a display that the
        # result's full output replaces; elsewhere: printed as it comes, then the rest).
        live = LiveOutput.start(ar)
        try:
            self._wait(client, ar, live.follow)
        finally:
            live.finish()
        return ar.get()

    def _dependency(self, names: list[str], option: str) -> list[Any]:
        """Resolve NAMEs to AsyncResults / msg_ids (a msg_id may also be given as itself);
        any other unknown name is a UsageError."""
        deps: list[Any] = []
        for name in names:
            if name not in self.shell.user_ns and MSG_ID.fullmatch(name):
                deps.append(name)
                continue
            value = self._lookup(name)
            items = value if isinstance(value, (list, tuple)) else [value]
            for item in items:
                if not isinstance(item, (AsyncResult, Dependency, str)):
                    raise UsageError(
                        f"{option} {name}: expected an AsyncResult, a Dependency or a msg_id string, "
                        f"got a {type(item).__name__}"
                    )
                deps.append(item)
        return deps

    def _wait(self, client: Client, ar: AsyncResult, wait: Callable[[], Any] | None = None) -> None:
        """Wait for ``ar`` (with ``wait``, default ``ar.wait``); on an interrupt, abort what
        has not started and say what happened."""
        try:
            (wait or ar.wait)()
        except KeyboardInterrupt:
            client.abort(ar)
            ar.wait(ABORT_GRACE_S)
            md = ar.metadata
            aborted = sum(isinstance(m.error, TaskAborted)
                          for m in (md if isinstance(md, list) else [md]))
            pending = len(ar.msg_ids) - ar.progress()
            parts = []
            if aborted:
                parts.append(f"aborted {aborted} task(s) that had not started")
            if pending:
                parts.append(f"{pending} task(s) already running go on "
                             "(%lb_interrupt stops them; -o NAME keeps a handle)")
            print("interrupted: " + ("; ".join(parts) or "every task had already finished"),
                  file=sys.stderr)
            raise

    # -- map -----------------------------------------------------------------------

    @magic_arguments()
    @kwds(usage="%(prog)s [-o NAME] FUNC ITERABLE")
    @argument("-o", "--out", metavar="NAME", help="bind the AsyncMapResult to NAME")
    @argument("exprs", nargs="+", metavar="FUNC ITERABLE",
              help="two Python expressions: a callable and an iterable, e.g. "
                   "`lambda x: x**2 range(8)`")
    @needs_local_scope
    @line_magic
    def lbmap(self, line: str, local_ns: dict[str, Any] | None = None) -> list[Any]:
        """list(map(FUNC, ITERABLE)), computed by the load balancer; FUNC and ITERABLE are
        evaluated in the notebook's namespace."""
        args = parse_argstring(self.lbmap, line)
        client = self._need_client()
        func_src, iterable_src = _two_expressions(" ".join(args.exprs))
        func = self._evaluate(func_src, "FUNC", local_ns)
        if not callable(func):
            raise UsageError(f"FUNC {func_src!r} is a {type(func).__name__}, not callable")
        iterable = self._evaluate(iterable_src, "ITERABLE", local_ns)
        try:
            items = list(iterable)
        except TypeError:
            raise UsageError(
                f"ITERABLE {iterable_src!r} is a {type(iterable).__name__}, not iterable"
            ) from None
        amr = self.view.map_async(func, items)
        self.submitted.append(amr)
        if args.out:
            self.shell.user_ns[args.out] = amr
        self._wait(client, amr)
        return amr.get()

    def _evaluate(self, expr: str, what: str, local_ns: dict[str, Any] | None) -> Any:
        try:
            return eval(expr, self.shell.user_ns, local_ns)
        except Exception as e:
            raise UsageError(f"{what} {expr!r} could not be evaluated: "
                             f"{type(e).__name__}: {e}") from None


def _no_arguments(magic: str, line: str) -> None:
    """A magic that takes no arguments refuses them rather than ignoring them."""
    if line.strip():
        raise UsageError(f"{magic} takes no arguments, got {line.strip()!r}")


def _two_expressions(text: str) -> tuple[str, str]:
    """Split ``text`` at the last space where both sides are Python expressions, so that
    ``%lbmap lambda x: x + 1 range(8)`` needs no quotes (a lambda's body would swallow
    the iterable were the first such space taken)."""
    for i in range(len(text) - 1, 0, -1):
        if text[i] == " " and _is_expression(text[:i]) and _is_expression(text[i + 1:]):
            return text[:i].strip(), text[i + 1:].strip()
    raise UsageError(f"%lbmap needs two expressions, FUNC and ITERABLE "
                     f"(e.g. `%lbmap str range(5)`), got {text!r}")


def _is_expression(text: str) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)
            ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        return False
    return bool(text.strip())


def load_ipython_extension(ipython: Any) -> None:
    """Register the magics with ``ipython`` (``%load_ext ipylb``)."""
    ipython.register_magics(LbMagics(ipython))


def unload_ipython_extension(ipython: Any) -> None:
    """Stop the cluster the magics started and remove the magics (``%unload_ext ipylb``)."""
    manager = ipython.magics_manager
    magics = manager.registry.pop("LbMagics", None)
    if magics is None:
        return
    if magics.client is not None:
        print(f"ipylb: {magics.stop('unloading the ipylb extension (%unload_ext/%reload_ext)')}")
    for table in manager.magics.values():
        for name in [n for n, f in table.items() if getattr(f, "__self__", None) is magics]:
            del table[name]
