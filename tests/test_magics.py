"""The IPython magics, driven through a real InteractiveShell against real engine kernels.

Most tests share the session's two-engine cluster through ``%lb_use rc``; the
lifecycle tests start (small) clusters of their own with ``%lb_start``, and one
runs a real Jupyter kernel to check that a restart or shutdown leaves no engine
behind.
"""

from __future__ import annotations

import re
import signal
import sys
import threading
import time

import ipylb
import pytest
from ipylb.error import ImpossibleDependency, RemoteError, TaskAborted
from IPython.core.interactiveshell import InteractiveShell
from procs import pid_alive, wait_gone


def sleep_then(x, delay):
    time.sleep(delay)
    return x


@pytest.fixture(scope="module")
def shell():
    """One in-process IPython shell for the module, with the extension loaded."""
    ip = InteractiveShell.instance()
    ok(ip, "%load_ext ipylb")
    yield ip
    ok(ip, "%unload_ext ipylb")


@pytest.fixture
def lb(shell, rc):
    """The shell with the magics using the session's cluster."""
    shell.user_ns["rc"] = rc
    ok(shell, "%lb_use rc")
    yield shell
    ok(shell, "%lb_stop")


def run(shell, src):
    return shell.run_cell(src, store_history=False)


def ok(shell, src):
    r = run(shell, src)
    assert r.success, r.error_in_exec or r.error_before_exec
    return r.result


def usage_error(shell, src, capsys):
    """Run ``src``; it must fail with a UsageError (shown as one line, no traceback)."""
    r = run(shell, src)
    err = r.error_in_exec or r.error_before_exec
    assert type(err).__name__ == "UsageError", err
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    return str(err)


def engine_pids(client):
    return [m["pid"] for m in client.engine_info().values()] + [client._local.proc.pid]


def magics_of(shell):
    return shell.magics_manager.registry["LbMagics"]


# -- before a cluster ------------------------------------------------------------------


@pytest.mark.parametrize("src", ["%%lb\n1 + 1", "%lbmap str range(3)", "%lb_dashboard"])
def test_magics_before_lb_start_say_to_start_one(shell, src, capsys):
    message = usage_error(shell, src, capsys)
    assert "%lb_start -n 4" in message and "ipylb.Client" in message


def test_lb_stop_without_a_cluster_says_so(shell, capsys):
    ok(shell, "%lb_stop")
    assert "no cluster to stop" in capsys.readouterr().out


def test_help_comes_from_magic_arguments(shell):
    """``%lb_start?`` and ``%%lb?`` show the magic's docstring, which magic_arguments
    fills with the usage and the options."""
    doc = shell.magics_manager.magics["line"]["lb_start"].__doc__
    assert "%lb_start [-n ENGINES] [--scheme SCHEME]" in doc and "owned by this" in doc
    doc = shell.magics_manager.magics["cell"]["lb"].__doc__
    for option in ("--after NAME", "--follow NAME", "--timeout", "--retries", "-b, --block",
                   "-a, --noblock", "-o NAME, --out NAME"):
        assert option in doc, option
    assert "%%lb [--after NAME" in doc  # a cell magic
    assert "%lbmap [-o NAME] FUNC ITERABLE" in shell.magics_manager.magics["line"]["lbmap"].__doc__


def test_unknown_option_shows_usage(shell, capsys):
    message = usage_error(shell, "%lb_start --bogus", capsys)
    assert "unrecognized arguments: --bogus" in message


# -- %%lb ------------------------------------------------------------------------------


def test_cell_result_is_the_last_expression_and_output_is_shown(lb, capsys):
    result = ok(lb, "%%lb\nimport sys\nprint('to stdout')\nprint('to stderr', file=sys.stderr)\n"
                    "x = 20\nx + 1")
    assert result == 21
    out = capsys.readouterr()
    assert "to stdout" in out.out and "to stderr" in out.err


def test_cell_runs_in_the_engines_namespace(lb):
    """A name a cell binds stays in that engine's user namespace for later cells there."""
    engine = ok(lb, "%%lb -o setter\nlb_test_value = 7\nipylb_engine_id")
    assert engine in (0, 1)
    assert ok(lb, "%%lb --follow setter\nlb_test_value * 6") == 42


def test_trailing_semicolon_and_statement_give_no_result(lb):
    assert ok(lb, "%%lb\n1 + 1;") is None
    assert ok(lb, "%%lb\ny = 3") is None


def test_ipython_syntax_in_the_cell(lb):
    assert ok(lb, "%%lb\nx = !echo hi\nx[0]") == "hi"


def test_remote_error_shows_the_remote_traceback(lb, capsys):
    r = run(lb, "%%lb\nprint('before')\ndef f():\n    return 1 / 0\nf()")
    assert isinstance(r.error_in_exec, RemoteError)
    assert r.error_in_exec.ename == "ZeroDivisionError"
    out = capsys.readouterr()
    shown = out.out + out.err
    assert "before" in shown
    assert "[engine " in shown and "ZeroDivisionError: division by zero" in shown
    assert "return 1 / 0" in shown and "<lb-cell" in shown  # the cell's own lines


def test_noblock_returns_the_asyncresult_and_binds_it(lb):
    ar = ok(lb, "%%lb -a -o ar_nb\n6 * 7")
    assert isinstance(ar, ipylb.AsyncResult)
    assert lb.user_ns["ar_nb"] is ar
    assert ar.get(10) == 42


def test_block_with_out_binds_and_returns_the_value(lb):
    assert ok(lb, "%%lb -b --out ar_b\n'v'") == "v"
    assert lb.user_ns["ar_b"].get(0) == "v"


def test_label_names_the_cells_task(lb, rc):
    assert ok(lb, "%%lb --label fit-model -o ar_l\n1") == 1
    ar = lb.user_ns["ar_l"]
    assert ar.metadata.label == "fit-model" and ar.label == "fit-model"
    assert rc.db_query({"label": "fit-model"}, keys=[]) == [{"msg_id": ar.msg_ids[0]}]
    assert ok(lb, "%%lb -o ar_nl\n2") == 2 and lb.user_ns["ar_nl"].metadata.label is None


def test_after_and_follow_resolve_names(lb, rc):
    ok(lb, "%%lb -a -o ar1\nimport time\ntime.sleep(0.3)\nipylb_engine_id")
    ok(lb, "%%lb -a -o ar2 --after=ar1\nimport time\ntime.time()")
    ar1, ar2 = lb.user_ns["ar1"], lb.user_ns["ar2"]
    assert ar2.get(10) >= ar1.metadata.completed.timestamp() - 0.01
    lb.user_ns["ar1_id"] = ar1.msg_ids[0]
    engine = ok(lb, "%%lb --follow ar1_id --after ar1 ar2\nipylb_engine_id")
    assert engine == ar1.get(0)


def test_unknown_dependency_name_is_a_usage_error_and_submits_nothing(lb, rc, capsys):
    before = len(rc.failures), rc.queue_status()
    done = sum(v["completed"] for k, v in before[1].items() if k != "unassigned")
    message = usage_error(lb, "%%lb --after no_such_name\n1", capsys)
    assert "no_such_name" in message
    lb.user_ns["not_a_result"] = 3
    message = usage_error(lb, "%%lb --follow not_a_result\n1", capsys)
    assert "not_a_result" in message and "int" in message
    status = rc.queue_status()
    assert sum(v["completed"] for k, v in status.items() if k != "unassigned") == done
    assert status["unassigned"] == 0


def test_impossible_dependency_shows_the_reason(lb, capsys):
    ok(lb, "%%lb -a -o bad\nraise ValueError('nope')")
    r = run(lb, "%%lb --after bad\n1")
    assert isinstance(r.error_in_exec, ImpossibleDependency)
    assert lb.user_ns["bad"].msg_ids[0] in capsys.readouterr().out


def test_after_takes_a_msg_id_as_itself(lb):
    ok(lb, "%%lb -a -o first_task\n1")
    msg_id = lb.user_ns["first_task"].msg_ids[0]
    assert ok(lb, f"%%lb --after {msg_id}\n'second'") == "second"


def test_after_a_named_dependency_keeps_its_settings(lb):
    """``--after cleanup_when`` with a Dependency that counts failure only."""
    ok(lb, "%%lb -a -o broken\nraise ValueError('nope')")
    lb.run_cell("from ipylb import Dependency\n"
                "cleanup_when = Dependency([broken], success=False, failure=True)")
    assert ok(lb, "%%lb --after cleanup_when\n'cleaned up'") == "cleaned up"


def test_bad_flags_are_usage_errors(lb, capsys):
    assert "timeout" in usage_error(lb, "%%lb --timeout -1\n1", capsys)
    assert "argument --retries" in usage_error(lb, "%%lb --retries x\n1", capsys)


def test_empty_cell_is_a_usage_error(lb, capsys):
    assert "empty" in usage_error(lb, "%%lb\n\n   \n", capsys)
    assert "empty" in usage_error(lb, "%%lb\n# only a comment\n", capsys)


def test_syntax_error_is_a_usage_error(lb, capsys):
    assert "line 1" in usage_error(lb, "%%lb\n1 +", capsys)


def test_interrupt_aborts_a_task_that_has_not_started(lb, rc, capsys):
    view = rc.load_balanced_view()
    blockers = view.map_async(sleep_then, [0, 1], [1.5, 1.5])
    main = threading.main_thread()

    def interrupt_when_waiting():
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            frame = sys._current_frames().get(main.ident)
            while frame is not None and frame.f_code.co_name != "_wait":
                frame = frame.f_back
            if frame is not None and rc.queue_status()["unassigned"] == 1:
                signal.pthread_kill(main.ident, signal.SIGINT)
                return
            time.sleep(0.01)

    t = threading.Thread(target=interrupt_when_waiting)
    t.start()
    r = run(lb, "%%lb -o ar_int\n'should never run'")
    t.join()
    assert isinstance(r.error_in_exec, KeyboardInterrupt)
    assert "aborted 1 task(s) that had not started" in capsys.readouterr().err
    ar = lb.user_ns["ar_int"]
    assert ar.ready() and isinstance(ar.error, TaskAborted)
    assert blockers.get(10) == [0, 1]  # the neighbours ran


def test_interrupting_a_cell_whose_task_runs_names_lb_interrupt(lb, rc, capsys):
    """Issue 10 item 9: the task goes on, and the hint names what a notebook that used the
    magics has to stop it (%lb_interrupt; it has no `rc` of its own), which then does."""
    from test_pending import Gate

    gate = Gate()
    main = threading.main_thread()
    running = threading.Event()

    def interrupt_once_running():
        gate.running()  # the cell's task has connected: it runs on an engine now
        running.set()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            frame = sys._current_frames().get(main.ident)
            while frame is not None and frame.f_code.co_name != "_wait":
                frame = frame.f_back
            if frame is not None:
                signal.pthread_kill(main.ident, signal.SIGINT)
                return
            time.sleep(0.01)

    t = threading.Thread(target=interrupt_once_running)
    t.start()
    try:
        r = run(lb, f"%%lb -o ar_running\nimport socket\n"
                    f"socket.create_connection(('127.0.0.1', {gate.port})).recv(64)")
        t.join()
        assert running.is_set() and isinstance(r.error_in_exec, KeyboardInterrupt)
        err = capsys.readouterr().err
        assert "interrupted: 1 task(s) already running go on (%lb_interrupt stops them; " \
               "-o NAME keeps a handle)" in err
        ar = lb.user_ns["ar_running"]
        assert not ar.ready()  # it goes on, as the hint says
        ok(lb, "%lb_interrupt")
        assert re.search(r"interrupted engine\(s\) \d+, where 1 unfinished task\(s\) of the magics",
                         capsys.readouterr().out)
        with pytest.raises(RemoteError, match="KeyboardInterrupt"):
            ar.get(30)
    finally:
        gate.close()


# -- %lbmap ----------------------------------------------------------------------------


def test_lbmap_equals_serial_map(lb):
    lb.user_ns["square"] = lambda x: x * x
    assert ok(lb, "%lbmap square range(10)") == [x * x for x in range(10)]
    assert ok(lb, "%lbmap lambda x: x + 1 [1, 2, 3]") == [2, 3, 4]


def test_lbmap_out_binds_the_map_result(lb):
    assert ok(lb, "%lbmap -o amr str (1, 2)") == ["1", "2"]
    assert isinstance(lb.user_ns["amr"], ipylb.AsyncMapResult)
    assert lb.user_ns["amr"].get(0) == ["1", "2"]


def test_lbmap_names_what_is_wrong(lb, capsys):
    assert "FUNC '3' is a int, not callable" in usage_error(lb, "%lbmap 3 range(3)", capsys)
    assert "ITERABLE '5' is a int, not iterable" in usage_error(lb, "%lbmap str 5", capsys)
    assert "FUNC 'nosuch'" in usage_error(lb, "%lbmap nosuch range(3)", capsys)
    assert "ITERABLE 'nosuch'" in usage_error(lb, "%lbmap str nosuch", capsys)
    assert "two expressions" in usage_error(lb, "%lbmap str", capsys)


# -- dashboard and adopting ------------------------------------------------------------


def test_lb_dashboard_shows_the_cluster(lb):
    dash = ok(lb, "%lb_dashboard")
    try:
        assert [r.engine_id for r in dash.rows] == [0, 1]
        assert dash.engines.value.count('class="ipylb-engine"') == 2
        assert "application/vnd.jupyter.widget-view+json" in dash._repr_mimebundle_()
    finally:
        dash.close()


def test_lb_use_needs_a_client(shell, capsys):
    shell.user_ns["not_a_client"] = object()
    assert "not an ipylb.Client" in usage_error(shell, "%lb_use not_a_client", capsys)
    assert "no variable named 'missing'" in usage_error(shell, "%lb_use missing", capsys)


def test_lb_stop_lets_an_adopted_client_run_on(lb, rc, capsys):
    ok(lb, "%lb_stop")
    assert "keeps running" in capsys.readouterr().out
    assert rc.load_balanced_view().apply_sync(int, "5") == 5


# -- the cluster's lifecycle -----------------------------------------------------------


def test_lb_start_twice_changes_nothing_and_lb_stop_stops_it(shell, capsys):
    ok(shell, "%lb_start -n 1")
    magics = magics_of(shell)
    client = magics.client
    pids = engine_pids(client)
    assert "started a cluster (1 engine" in capsys.readouterr().out
    ok(shell, "%lb_start -n 2")
    assert "already in use" in capsys.readouterr().out
    assert magics.client is client and len(client.ids) == 1
    assert ok(shell, "%%lb\n'alive'") == "alive"
    ok(shell, "%lb_stop")
    assert "stopped the cluster" in capsys.readouterr().out
    assert wait_gone(pids, 10), [p for p in pids if pid_alive(p)]
    assert magics.client is None


def test_unload_stops_the_cluster_and_removes_the_magics(shell, capsys):
    ok(shell, "%lb_start -n 1 --scheme lru")
    pids = engine_pids(magics_of(shell).client)
    ok(shell, "%unload_ext ipylb")
    try:
        assert wait_gone(pids, 10), [p for p in pids if pid_alive(p)]
        r = run(shell, "%lb_stop")
        assert not r.success  # the magic is gone
    finally:
        ok(shell, "%load_ext ipylb")


def test_unknown_scheme_is_a_usage_error(shell, capsys):
    assert "unknown scheme" in usage_error(shell, "%lb_start -n 1 --scheme nope", capsys)
    assert magics_of(shell).client is None


def test_kernel_restart_and_shutdown_leave_no_engines(tmp_path):
    """A real Jupyter kernel: %lb_start, restart the kernel, %lb_start, shut it down."""
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3", cwd=str(tmp_path))
    client = "get_ipython().magics_manager.registry['LbMagics'].client"
    pids_expr = f"[m['pid'] for m in {client}.engine_info().values()] + [{client}._local.proc.pid]"

    def start_and_get_pids():
        reply = kc.execute_interactive("%load_ext ipylb\n%lb_start -n 1", timeout=60,
                                       user_expressions={"pids": pids_expr})
        assert reply["content"]["status"] == "ok", reply["content"]
        pids = eval(reply["content"]["user_expressions"]["pids"]["data"]["text/plain"])
        assert pids and all(pid_alive(p) for p in pids)
        return pids

    try:
        pids = start_and_get_pids()
        km.restart_kernel(now=False)
        assert wait_gone(pids, 15), [p for p in pids if pid_alive(p)]
        kc.wait_for_ready(timeout=30)
        pids = start_and_get_pids()
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
    assert wait_gone(pids, 15), [p for p in pids if pid_alive(p)]


def test_interrupting_the_kernel_leaves_the_cluster_it_started_serving(tmp_path):
    """Jupyter's interrupt (the stop button; KernelManager.interrupt_kernel) signals the
    kernel's whole process group: the controller %lb_start had started in that group got the
    SIGINT and shut down, killing the cluster and the interrupted cell's task.  README: the
    task goes on; %lb_interrupt stops it."""
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3", cwd=str(tmp_path))
    try:
        reply = kc.execute_interactive("%load_ext ipylb\n%lb_start -n 1 -o rc", timeout=60)
        assert reply["content"]["status"] == "ok", reply["content"]
        # (stop_on_error=False: ipykernel would abort requests that reach it right after
        # the interrupt's error, and the next one is sent at once)
        msg_id = kc.execute("%%lb -o cell\nimport time\nprint('started', flush=True)\n"
                            "time.sleep(2)\n'ran on'", stop_on_error=False)
        deadline = time.monotonic() + 60
        while True:  # the task runs: its live output came
            msg = kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
            if msg["parent_header"].get("msg_id") == msg_id and "started" in str(
                    msg["content"].get("data", {}).get("text/plain", "")):
                break
        km.interrupt_kernel()
        reply = kc.get_shell_msg(timeout=60)
        assert reply["parent_header"]["msg_id"] == msg_id
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        reply = kc.execute_interactive("value = cell.get(60)\nafter = rc.load_balanced_view()"
                                       ".apply_sync(lambda: 6 * 7)", timeout=90,
                                       user_expressions={"r": "(value, after)"})
        assert reply["content"]["status"] == "ok", reply["content"]
        assert reply["content"]["user_expressions"]["r"]["data"]["text/plain"] == "('ran on', 42)"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)


def test_a_client_closed_elsewhere_is_forgotten(shell, rc, capsys):
    other = ipylb.Client(rc._local.connection_file)  # a second client of the session's cluster
    shell.user_ns["other"] = other
    ok(shell, "%lb_use other")
    other.close()
    assert "%lb_start -n 4" in usage_error(shell, "%%lb\n1", capsys)
    ok(shell, "%lb_stop")
    assert "no cluster to stop" in capsys.readouterr().out


def test_lb_walltime_interrupts_the_cell(lb):
    """``%%lb --walltime S`` (issue 12): the cell is interrupted past S seconds."""
    r = run(lb, "%%lb --walltime 1\nimport time\ntime.sleep(60)")
    assert type(r.error_in_exec).__name__ == "WalltimeExceeded", r.error_in_exec
    assert "walltime of 1s" in str(r.error_in_exec)
    assert ok(lb, "%%lb --walltime 5\n6 * 7") == 42


def held_then_python(port):
    """Wait for the test's word, then run Python bytecode: a SIGINT that reached the engine
    while it waited in recv (on another thread: recv went on) is raised here."""
    import socket

    word = socket.create_connection(("127.0.0.1", port)).recv(64)
    for _ in range(100_000):
        pass
    return word


def test_lb_interrupt_stops_only_the_magics_task_not_the_one_in_front(shell, capsys):
    """An engine may hold a cell's task queued behind a task it runs for another client
    (hwm > 1 or "auto"): %lb_interrupt interrupted that engine, so the other client's task
    failed with KeyboardInterrupt and the cell's ran anyway.  Now the engine is told which
    task: the one in front goes on; the cell's, once it runs, is the one interrupted."""
    from test_pending import Gate

    gate = Gate()
    rc = ipylb.Client(engines=1, hwm=2)  # one engine: the cell's task queues behind
    try:
        other = ipylb.Client(rc._local.connection_file)
        front = other.load_balanced_view().apply_async(held_then_python, gate.port)
        conn = gate.running()  # the other client's task runs on the only engine
        shell.user_ns["rc"] = rc
        ok(shell, "%lb_use rc")
        ok(shell, f"%%lb --noblock -o queued\nimport socket\n"
                  f"socket.create_connection(('127.0.0.1', {gate.port})).recv(64)")
        queued = shell.user_ns["queued"]
        deadline = time.monotonic() + 30
        while rc.queue_status()[rc.ids[0]]["queue"] < 1:  # queued behind the running one
            assert time.monotonic() < deadline, rc.queue_status()
            time.sleep(0.01)
        ok(shell, "%lb_interrupt")
        capsys.readouterr()
        conn.sendall(b"front")  # the task in front was not interrupted: it ends as it would
        assert front.get(30) == b"front"
        # The cell's task runs now, unless the first interrupt, asked for it while it was
        # queued, reached its engine only once it ran (the kernel's control channel is
        # asynchronous): either way it is the one interrupted, never the task in front.
        gate.server.settimeout(0.1)
        deadline = time.monotonic() + 60
        while not queued.ready():
            try:
                gate.conns.append(gate.server.accept()[0])
                break
            except TimeoutError:
                assert time.monotonic() < deadline, "the cell's task neither ran nor ended"
        if not queued.ready():  # (unless that late interrupt lands meanwhile)
            ok(shell, "%lb_interrupt")
            assert re.search(r"interrupted engine\(s\) \d+, where 1 unfinished task\(s\) of "
                             r"the magics|no task of the magics is running", capsys.readouterr().out)
        with pytest.raises(RemoteError, match="KeyboardInterrupt"):
            queued.get(30)
        assert rc.load_balanced_view().apply_sync(lambda: 6 * 7) == 42  # the engine serves on
        with pytest.raises(ValueError, match="engine_ids or jobs"):
            rc.interrupt([0], jobs=queued)
        other.close()
    finally:
        ok(shell, "%lb_stop")
        gate.close()
        rc.shutdown()
