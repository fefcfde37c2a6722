"""Hostile tasks: whatever a task raises, returns or does to its streams, it gets an answer
that says what went wrong, and every engine serves on (issue 9, item 2 and "Also").

All tests share the session's two-engine cluster; after each one, every engine must take
work and ``queue_status()`` must be idle.  Task code is defined inside the tests (shipped by
value), as a notebook's would be.
"""

from __future__ import annotations

import threading
import time

import ipylb
import pytest
from ipylb.engine.capture import OUTPUT_LIMIT
from ipylb.engine.report import EVALUE_LIMIT, TRACEBACK_LIMIT
from ipylb.error import RemoteError, SerializationError
from test_pending import Gate, wait_at_gate


def meet(marker_dir, n):
    """Arrive, then wait until ``n`` tasks have arrived: ``n`` of these at once need ``n``
    engines serving at the same time."""
    import os
    import time
    import uuid

    open(os.path.join(marker_dir, uuid.uuid4().hex), "w").close()
    deadline = time.monotonic() + 60
    while len(os.listdir(marker_dir)) < n:
        if time.monotonic() > deadline:
            raise TimeoutError("not every engine took work")
        time.sleep(0.01)


@pytest.fixture(autouse=True)
def every_engine_serves_after(rc, view, tmp_path):
    yield
    ids = rc.ids
    assert len(ids) == 2
    marker_dir = tmp_path / "meet"
    marker_dir.mkdir()
    amr = view.map_async(meet, [str(marker_dir)] * len(ids), [len(ids)] * len(ids))
    amr.get(90)
    assert sorted(amr.engine_id) == ids
    status = rc.queue_status()
    assert status.pop("unassigned") == 0
    assert all(s["queue"] == 0 and s["tasks"] == 0 for s in status.values()), status


def failure(view, f, *args):
    """The RemoteError a task ends with (it must end, and fail)."""
    ar = view.apply_async(f, *args)
    assert ar.wait(90), "the task got no answer"
    assert not ar.successful()
    return ar, ar.exception()


# -- exceptions that resist being reported ------------------------------------------------


def test_an_exception_whose_str_fails_is_reported_with_a_fallback(view):
    """The issue's input: this hung forever and kept the engine busy."""

    class Odd(Exception):
        def __str__(self):
            raise ValueError("no str")

    def raises():
        raise Odd()

    _, err = failure(view, raises)
    assert isinstance(err, RemoteError) and err.ename == "Odd"
    assert err.evalue == "<str() failed: ValueError>"
    assert "in raises" in err.traceback and "Odd" in err.traceback


def test_str_and_repr_failing_str_returning_no_str_and_odd_notes(view):
    class Worse(Exception):
        def __str__(self):
            raise SystemExit("str leaves")

        def __repr__(self):
            raise RuntimeError("no repr")

    class NotText(Exception):
        def __str__(self):
            return 42

    def raises(kind):
        if kind == "worse":
            raise Worse()
        if kind == "not text":
            raise NotText()
        e = ValueError("with notes")
        e.__notes__ = [Worse(), "a note"] if kind == "notes" else 5
        raise e

    assert failure(view, raises, "worse")[1].evalue == "<str() failed: SystemExit>"
    assert failure(view, raises, "not text")[1].evalue == "<str() failed: TypeError>"
    notes = failure(view, raises, "notes")[1]
    assert notes.ename == "ValueError" and notes.evalue == "with notes <str() failed: SystemExit> a note"
    bad_notes = failure(view, raises, "bad notes")[1]
    assert bad_notes.ename == "ValueError" and bad_notes.evalue == "with notes"


def test_a_chain_whose_cause_cannot_be_formatted(view):
    class Odd(Exception):
        def __str__(self):
            raise ValueError("no str")

    def chained():
        try:
            raise Odd()
        except Odd as e:
            raise KeyError("outer") from e

    err = failure(view, chained)[1]
    assert err.ename == "KeyError" and err.evalue == "'outer'"
    assert "Odd: <exception str() failed>" in err.traceback
    assert "direct cause" in err.traceback


def test_an_exception_with_unpicklable_attributes(view):
    def raises():
        e = RuntimeError("holds a lock")
        e.lock = threading.Lock()
        raise e

    err = failure(view, raises)[1]
    assert (err.ename, err.evalue) == ("RuntimeError", "holds a lock")


@pytest.mark.parametrize("kind", ["exit", "exit-code", "keyboard", "generator", "base"])
def test_base_exceptions_raised_by_tasks_are_task_errors(view, kind):
    def leave(kind):
        import sys

        class Custom(BaseException):
            pass

        if kind == "exit":
            sys.exit()
        if kind == "exit-code":
            sys.exit(3)
        if kind == "keyboard":
            raise KeyboardInterrupt("by the task")
        if kind == "generator":
            raise GeneratorExit()
        raise Custom("custom")

    err = failure(view, leave, kind)[1]
    expected = {
        "exit": ("SystemExit", "the task called sys.exit(); the engine serves on"),
        "exit-code": ("SystemExit", "the task called sys.exit(3); the engine serves on"),
        "keyboard": ("KeyboardInterrupt", "by the task"),
        "generator": ("GeneratorExit", ""),
        "base": ("Custom", "custom"),
    }[kind]
    assert (err.ename, err.evalue) == expected


def test_recursion_depth_errors(view):
    def down(n):
        return down(n + 1)

    err = failure(view, down, 0)[1]
    assert err.ename == "RecursionError" and "maximum recursion depth" in err.evalue
    assert "Previous line repeated" in err.traceback


def test_a_huge_message_and_a_huge_traceback_are_cut_with_a_note(view):
    def huge_message():
        raise ValueError("v" * 10_000_000)

    def long_chain():
        e = None
        for i in range(3000):
            try:
                raise RuntimeError(f"link {i} " + "x" * 200) from e
            except RuntimeError as caught:
                e = caught
        raise e

    err = failure(view, huge_message)[1]
    assert err.evalue.startswith("v" * 1000) and "more characters cut by ipylb" in err.evalue
    assert len(err.evalue) < EVALUE_LIMIT + 100
    err = failure(view, long_chain)[1]
    assert "characters of traceback cut by ipylb" in err.traceback
    assert len(err.traceback) < TRACEBACK_LIMIT + 200
    assert "link 0 " in err.traceback and "link 2999 " in err.traceback  # both ends kept


# -- results that resist being pickled ----------------------------------------------------


@pytest.mark.parametrize("kind", ["lock", "reduce raises", "reduce exits", "reduce odd", "bad reduce"])
def test_results_that_do_not_pickle_fail_the_task_with_the_reason(view, kind):
    def give(kind):
        import threading

        class Odd(Exception):
            def __str__(self):
                raise ValueError("no str")

        class Stubborn:
            def __reduce__(self):
                if kind == "reduce raises":
                    raise ValueError("will not pickle")
                if kind == "reduce exits":
                    raise SystemExit(4)
                if kind == "reduce odd":
                    raise Odd()
                return "no_such_global_anywhere"

        return threading.Lock() if kind == "lock" else Stubborn()

    err = failure(view, give, kind)[1]
    assert err.ename == "SerializationError"
    assert "could not be pickled" in err.evalue and "Return a picklable value" in err.evalue
    why = {"lock": "cannot pickle '_thread.lock'", "reduce raises": "ValueError: will not pickle",
           "reduce exits": "SystemExit: 4", "reduce odd": "Odd: <str() failed: ValueError>",
           "bad reduce": "PicklingError"}[kind]
    assert why in err.evalue


def test_a_huge_result_arrives_whole(view):
    def big():
        return bytes(range(256)) * (64 * 1024 * 1024 // 256), list(range(1_000_000))

    data, numbers = view.apply_async(big).get(120)
    assert len(data) == 64 * 1024 * 1024 and data[:256] == bytes(range(256)) and data[-1] == 255
    assert numbers[-1] == 999_999


def test_a_result_that_does_not_unpickle_in_the_client_is_a_clear_error(rc, view):
    def give(how):
        import os

        pid = os.getpid()

        def rebuild(pid):
            import os

            if os.getpid() != pid:  # only in the client
                if how == "exit":
                    raise SystemExit("leaving the client")
                raise ImportError("only on the engine")
            return "fine"

        class OnlyHere:
            def __reduce__(self):
                return rebuild, (pid,)

        return OnlyHere()

    for how, why in [("import", "ImportError: only on the engine"),
                     ("exit", "SystemExit: leaving the client")]:
        ar = view.apply_async(give, how)
        with pytest.raises(SerializationError, match="could not be unpickled here") as info:
            ar.get(60)
        assert why in str(info.value)
        assert ar.successful()  # the task itself succeeded; only this client cannot read it
    assert view.apply_sync(lambda: "the client receives on") == "the client receives on"


# -- tasks that abuse their streams -------------------------------------------------------


@pytest.mark.parametrize("abuse", ["close sys.stdout", "close buffer", "close raw", "detach",
                                   "replace sys.stdout", "stdout None", "close fd 1",
                                   "close fd 2", "close both", "reconfigure"])
def test_a_task_that_breaks_its_streams_leaves_the_next_one_captured(view, abuse):
    def breaks(abuse):
        import io
        import os
        import sys

        print("before")
        if abuse == "close sys.stdout":
            sys.stdout.close()
        elif abuse == "close buffer":
            sys.stdout.buffer.close()
        elif abuse == "close raw":
            sys.stdout.buffer.raw.close()
        elif abuse == "detach":
            sys.stdout = io.TextIOWrapper(sys.stdout.detach(), encoding="latin-1")
        elif abuse == "replace sys.stdout":
            sys.stdout = object()
        elif abuse == "stdout None":
            sys.stdout = None
        elif abuse == "close fd 1":
            os.close(1)
        elif abuse == "close fd 2":
            os.close(2)
        elif abuse == "reconfigure":
            sys.stdout.reconfigure(encoding="latin-1")
        elif abuse == "close both":
            os.close(1)
            os.close(2)
        return abuse

    ar = view.apply_async(breaks, abuse)
    assert ar.get(60) == abuse
    assert ar.stdout == "before\n"
    with view.temp_flags(follow=ar):  # on the engine that was abused
        after = view.apply_async(every_stream)
        assert after.get(60) == (1, 2)
    assert after.stdout == "py \u00e9\nfd\nchild\n" and after.stderr == "err\n"


def every_stream():
    import os
    import subprocess
    import sys

    print("py \u00e9")
    os.write(1, b"fd\n")
    subprocess.run(["echo", "child"], check=True)
    print("err", file=sys.stderr)
    return sys.stdout.fileno(), sys.stderr.fileno()


def test_bytes_and_text_that_is_not_utf8(view):
    def writes():
        import sys

        sys.stdout.buffer.write(b"\xff\xfe raw\n")
        print("\udcff lone surrogate")
        sys.stdout.write(b"bytes to a text stream")

    ar, err = failure(view, writes)
    assert err.ename == "TypeError" and "must be str" in err.evalue
    assert ar.stdout == "\ufffd\ufffd raw\n\\udcff lone surrogate\n"


def test_output_over_the_limit_is_cut_with_a_note(view):
    def flood(n):
        import os

        block = b"y" * 65536
        for _ in range(n // len(block)):
            os.write(1, block)
        print("tail")
        return n

    n = OUTPUT_LIMIT + 2 * 65536
    ar = view.apply_async(flood, n)
    assert ar.get(120) == n
    assert ar.stdout.startswith("y" * OUTPUT_LIMIT)
    assert f"[ipylb: {n + 5 - OUTPUT_LIMIT} more bytes of stdout were dropped" in ar.stdout


def test_child_processes_write_to_their_task(view):
    def children():
        import subprocess
        import sys

        subprocess.run([sys.executable, "-c",
                        "import os, sys; print('py child'); sys.stdout.flush(); "
                        "os.write(2, b'child err\\n')"], check=True)
        subprocess.run("echo shell child; echo shell err >&2", shell=True, check=True)

    ar = view.apply_async(children)
    ar.get(60)
    assert ar.stdout == "py child\nshell child\n"
    assert ar.stderr == "child err\nshell err\n"


def test_a_child_that_outlives_its_task_writes_to_the_task_running_then(view, tmp_path):
    go, done = tmp_path / "go", tmp_path / "done"

    def spawn():
        import subprocess

        subprocess.Popen(["sh", "-c", f"while [ ! -e {go} ]; do sleep 0.02; done; "
                                      f"echo late; touch {done}"])
        print("spawned")

    def meanwhile():
        import os
        import time

        open(go, "w").close()
        deadline = time.monotonic() + 30
        while not os.path.exists(done):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        print("meanwhile")

    first = view.apply_async(spawn)
    first.get(60)  # the task ended without waiting for its child
    with view.temp_flags(follow=first):
        second = view.apply_async(meanwhile)
        second.get(60)
    assert first.stdout == "spawned\n"
    assert second.stdout == "late\nmeanwhile\n"


@pytest.mark.parametrize("how", ["SIG_IGN", "pthread_sigmask"])
def test_sigint_state_a_task_leaves_does_not_stop_interrupts(rc, view, tmp_path, how):
    """A task that ignores SIGINT (its handler) or blocks it (the thread's signal mask) and
    returns leaves the next task on its engine interruptible by rc.interrupt()."""

    def spoil(how):
        import signal

        if how == "SIG_IGN":
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        else:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        return how

    first = view.apply_async(spoil, how)
    assert first.get(60) == how
    marker = tmp_path / "started"

    def sleeps(path):
        import time

        open(path, "w").close()
        time.sleep(60)

    with view.temp_flags(follow=first):
        ar = view.apply_async(sleeps, str(marker))
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    t0 = time.monotonic()
    rc.interrupt([first.engine_id])
    with pytest.raises(RemoteError) as info:
        ar.get(30)
    assert info.value.ename == "KeyboardInterrupt"
    assert time.monotonic() - t0 < 20  # not when the sleep ends


# -- the controller's and the client's side ----------------------------------------------


def test_a_retry_after_an_exception_that_cannot_be_formatted(rc, view, tmp_path):
    """The first attempt fails in the worst way (its exception's str() raises); the task
    stays pending, another client waits for its final outcome, and the retry answers."""

    def odd_then_fine(marker):
        import os

        class Odd(Exception):
            def __str__(self):
                raise ValueError("no str")

        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return "second attempt"
        raise Odd()

    with view.temp_flags(retries=1):
        ar = view.apply_async(odd_then_fine, str(tmp_path / "first"))
    with ipylb.Client(rc.cluster_info["client_url"]) as other:
        assert other.get_result(ar.msg_ids[0]).get(90) == "second attempt"
    assert ar.get(90) == "second attempt"
    assert ar.metadata.status == "ok"


def test_done_callbacks_that_raise_or_block_hold_up_no_result(view):
    release = threading.Event()
    blocked, later = threading.Event(), threading.Event()

    def raises(_f):
        raise RuntimeError("a callback's bug")

    def blocks(_f):
        blocked.set()
        release.wait(120)

    gate = Gate()
    try:
        first = view.apply_async(wait_at_gate, gate.port)
        conn = gate.running()  # not finished until the test says so
        first.add_done_callback(raises)
        first.add_done_callback(blocks)
        conn.sendall(b"go")
        assert blocked.wait(90)
        second = view.apply_async(abs, -2)
        second.add_done_callback(lambda f: later.set())
        assert second.get(90) == 2 and later.wait(90)
        assert view.map_sync(abs, [-3, -4]) == [3, 4]
        assert first.get(90) == "go"
    finally:
        release.set()
        gate.close()


# -- what a task does to its engine's process (engine/guard.py) -------------------------


@pytest.fixture(scope="module")
def lone():
    """A one-engine cluster of its own, for tasks after which the engine is restarted (the
    shared cluster's engine ids must stay 0 and 1)."""
    with ipylb.Client(engines=1) as client:
        yield client


def new_engine(rc, old, timeout=120):
    """Wait until the one engine of ``rc`` is not ``old`` (it was restarted); its id."""
    deadline = time.monotonic() + timeout
    while rc.ids == [old] or not rc.ids:
        assert time.monotonic() < deadline, f"engine {old} was not restarted: {rc.ids}"
        time.sleep(0.05)
    assert len(rc.ids) == 1
    return rc.ids[0]


def stop_the_engine(how):
    import asyncio

    import IPython

    ip = IPython.get_ipython()
    if how == "loop.stop":
        asyncio.get_event_loop().stop()
    elif how == "io_loop.stop":
        ip.kernel.io_loop.stop()
    elif how == "exit_now":
        ip.exit_now = True
    elif how == "ask_exit":
        ip.ask_exit()
    elif how in ("exit()", "quit()"):  # IPython's, as a notebook's function calls them
        ip.user_ns[how[:-2]]()
    return how


@pytest.mark.parametrize("how", ["loop.stop", "io_loop.stop", "exit_now", "ask_exit", "exit()",
                                 "quit()"])
def test_a_task_that_stops_the_engines_loop_or_exits_the_kernel_is_told_and_the_engine_serves_on(
        view, how):
    """These ended the engine: the task "succeeded", and its engine's process exited with code
    0 (the next task there got EngineError: "exited with code 0")."""
    ar, err = failure(view, stop_the_engine, how)
    assert err.ename == "RuntimeError"
    if how.endswith("stop"):
        assert err.evalue.startswith("the task stopped the engine's event loop")
    else:
        assert err.evalue.startswith("the task asked the engine's kernel to exit")
    assert "serves on" in err.evalue
    with view.temp_flags(targets=ar.engine_id):  # the same engine, still serving, same id
        after = view.apply_async(every_stream)
        assert after.get(60) == (1, 2)
    assert after.engine_id == ar.engine_id
    assert after.stdout == "py \u00e9\nfd\nchild\n" and after.stderr == "err\n"


def test_a_loop_stop_scheduled_for_later_leaves_the_engine_serving(view):
    """The loop stops after the task answered: the engine starts it again (its log says so)."""

    def schedules_a_stop():
        import asyncio

        loop = asyncio.get_event_loop()
        loop.call_soon(loop.stop)
        return "scheduled"

    ar = view.apply_async(schedules_a_stop)
    assert ar.get(60) == "scheduled"
    with view.temp_flags(follow=ar):
        assert view.apply_async(pow, 2, 10).get(60) == 1024


def exits(status, catch):
    import os

    try:
        os._exit(status)
    except BaseException:
        if not catch:
            raise
    return "not reached" if not catch else "caught"


@pytest.mark.parametrize("catch", [False, True])
def test_os_exit_in_a_task_is_its_error_and_the_engine_is_restarted(lone, catch):
    """os._exit(0) ended the engine: "EngineError ... its process exited with code 0".  Now the
    task is answered with what it did, then the engine is restarted (as the task meant its
    process to end), and the tasks queued behind it on that engine run on the new one."""
    view = lone.load_balanced_view()
    old = lone.ids[0]
    ar = view.apply_async(exits, 3, catch)
    queued = [view.apply_async(pow, 2, i) for i in range(4)]
    with pytest.raises(RemoteError) as info:
        ar.get(60)
    assert info.value.ename == "RuntimeError"
    assert info.value.evalue.startswith("the task called os._exit(3), which ends the engine's "
                                        "process: ipylb answered the task with this error and "
                                        "restarts the engine")
    assert ar.engine_id == old
    assert [q.get(120) for q in queued] == [1, 2, 4, 8]
    new = new_engine(lone, old)
    assert new != old
    assert view.apply_async(every_stream).get(60) == (1, 2)


def test_os_exit_from_a_thread_says_no_one_asked_the_engine_to_stop(lone):
    def exits_from_a_thread():
        import os
        import threading
        import time

        threading.Thread(target=os._exit, args=(0,)).start()
        time.sleep(60)

    view = lone.load_balanced_view()
    old = lone.ids[0]
    ar = view.apply_async(exits_from_a_thread)
    with pytest.raises(ipylb.error.EngineError,
                       match="exited with code 0 although no one asked it to stop"):
        ar.get(60)
    new_engine(lone, old)
    assert view.apply_sync(pow, 3, 2) == 9


def leaks_fds(catch):
    """Opens files until the engine's RLIMIT_NOFILE is used up (a limit the task lowered for
    itself would be put back after it: see the resource limits test)."""
    import os

    global LEAKED
    LEAKED = []
    try:
        while True:
            LEAKED.append(os.open(os.devnull, os.O_RDONLY))
    except OSError as e:
        if catch == "wrap":  # as a library would: the EMFILE is the cause
            raise RuntimeError("could not open the data file") from e
        if not catch:
            raise
    return len(LEAKED)


def opens_files():
    import subprocess

    return subprocess.run(["echo", "opened"], capture_output=True, check=True).stdout


@pytest.fixture
def few_fds(lone):
    """Skip where the engine may open so many files that leaking them all takes long."""
    def soft():
        import resource

        return resource.getrlimit(resource.RLIMIT_NOFILE)[0]

    if not 0 < lone.load_balanced_view().apply_async(soft).get(60) <= 100_000:
        pytest.skip("the engines' RLIMIT_NOFILE is over 100,000")


@pytest.mark.parametrize("how", [False, "wrap"])
@pytest.mark.usefixtures("few_fds")
def test_a_task_that_leaks_every_file_descriptor_fails_saying_so_and_the_engine_restarts(lone,
                                                                                       how):
    """Leaking fds up to RLIMIT_NOFILE left the engine failing every later task that opened
    anything with EMFILE, for good.  (Also when the EMFILE is the cause of the task's error.)"""
    view = lone.load_balanced_view()
    old = lone.ids[0]
    with pytest.raises(RemoteError) as info:
        view.apply_async(leaks_fds, how).get(60)
    if how == "wrap":
        assert info.value.ename == "RuntimeError"
        assert "Too many open files" in info.value.traceback
    else:
        assert info.value.ename == "OSError" and "Too many open files" in info.value.evalue
    assert "[ipylb: the engine ran out of file descriptors (at least " in info.value.evalue
    assert "the engine is restarted to get them back]" in info.value.evalue
    new_engine(lone, old)
    assert view.apply_async(opens_files).get(60) == b"opened\n"


@pytest.mark.usefixtures("few_fds")
def test_a_task_that_leaks_every_file_descriptor_quietly_fails_and_the_next_one_runs(lone):
    """The leak is caught in the task, which returns: the engine's health thread noticed it
    within a second, so the task queued behind it failed with EMFILE first.  Now the engine
    looks after the task (it ran long enough to have opened what was left): the task fails
    saying what it left, and the one queued behind it runs on the restarted engine."""
    view = lone.load_balanced_view()
    old = lone.ids[0]
    ar = view.apply_async(leaks_fds, True)
    queued = view.apply_async(opens_files)
    with pytest.raises(RemoteError) as info:
        ar.get(60)
    assert info.value.ename == "RuntimeError"
    assert info.value.evalue.startswith("the task returned, but the engine ran out of file "
                                        "descriptors (at least ")
    assert "the engine is restarted to get them back" in info.value.evalue
    assert queued.get(120) == b"opened\n"
    assert queued.engine_id != old
    new_engine(lone, old)


def closes_everything():
    import os

    f = os.open(os.devnull, os.O_RDONLY)
    os.closerange(3, 4096)
    try:
        os.fstat(f)
    except OSError:
        return "the task's own descriptor was closed"
    return "the task's own descriptor is still open"


def test_a_task_that_closes_the_engines_descriptors_is_told_and_the_next_one_runs(lone):
    """os.closerange(3, 4096) closed the engine's zmq sockets: zmq aborted the process, and
    the task got "EngineError: ... killed by SIGABRT", which did not say why."""
    view = lone.load_balanced_view()
    old = lone.ids[0]
    ar = view.apply_async(closes_everything)
    queued = view.apply_async(pow, 2, 3)
    with pytest.raises(RemoteError) as info:
        ar.get(60)
    assert info.value.ename == "RuntimeError"
    assert info.value.evalue.startswith(
        "the task called os.closerange(3, 4096), which closes the engine's own file descriptors "
        "too (its sockets to the controller and its output pipes: ")
    assert "ipylb closed the others and kept those, answered the task with this error and " \
        "restarts the engine. Close only the descriptors the task opened" in info.value.evalue
    assert queued.get(120) == 8
    new_engine(lone, old)
    assert view.apply_async(opens_files).get(60) == b"opened\n"


def closes_each_descriptor():
    import os

    for fd in range(3, 4096):
        try:
            os.close(fd)
        except OSError:
            pass
    return "closed"


def test_a_task_that_closes_the_engines_descriptors_one_by_one_gets_an_error_that_says_so(lone):
    """The same with os.close (or C code): the engine cannot keep them, zmq aborts it; the
    error said only "killed by SIGABRT"."""
    view = lone.load_balanced_view()
    old = lone.ids[0]
    ar = view.apply_async(closes_each_descriptor)
    queued = view.apply_async(pow, 2, 3)
    with pytest.raises(ipylb.error.EngineError, match="killed by SIGABRT: C code aborted, e.g. "
                       "zmq's, when a task closed the engine's own file descriptors"):
        ar.get(60)
    assert queued.get(120) == 8
    new_engine(lone, old)


def clobbers(module, path):
    """Replaces ``module.path`` with None (keeping it in builtins._clobbered to put back)."""
    import builtins
    import importlib

    owner = importlib.import_module(module)
    *parents, name = path.split(".")
    for p in parents:
        owner = getattr(owner, p)
    builtins._clobbered = (owner, name, getattr(owner, name))
    setattr(owner, name, None)
    return "replaced"


def unclobbers():  # (no import statement: print.__self__ is the builtins module)
    owner, name, value = print.__self__._clobbered
    setattr(owner, name, value)


@pytest.mark.parametrize(("module", "path", "restarted"), [
    ("time", "monotonic", False),  # asyncio's loops: now bound to the engine's own
    ("selectors", "EpollSelector.select", True),  # the main loop fails between tasks
    ("hmac", "compare_digest", True),  # the engine cannot check the next task's signature
])
def test_a_task_that_replaces_what_the_engine_uses_between_tasks_hits_no_later_task(
        lone, module, path, restarted):
    """time.monotonic = None: the task returned, then the engine's event loop failed, and the
    next task (innocent) got "EngineError: ... stopped answering heartbeats".  Now the loops
    have their clock bound; what still breaks the engine between tasks (the loop's selector,
    what reads the next task) makes it leave with no task half run: the tasks sent to it run
    on the restarted engine, no retry used."""
    view = lone.load_balanced_view()
    old = lone.ids[0]
    assert view.apply_async(clobbers, module, path).get(60) == "replaced"
    queued = view.apply_async(pow, 2, 3)
    assert queued.get(120) == 8  # (on the old engine, if it came before the loop turned)
    if restarted:
        new_engine(lone, old)
    else:
        assert queued.engine_id == old
        with view.temp_flags(follow=queued):
            view.apply_async(unclobbers).get(60)
        time.sleep(1.5)  # the engine's health thread is fine too (it reports every second)
        assert lone.ids == [old]


def lowers_limits(hard):
    """Lowers the engine's CPU-time limit to 2 s over what it used, and its address space
    limit; returns the limits as they were."""
    import resource

    used = resource.getrusage(resource.RUSAGE_SELF)
    cpu = int(used.ru_utime + used.ru_stime) + 2
    before = [resource.getrlimit(r) for r in (resource.RLIMIT_CPU, resource.RLIMIT_AS)]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 100 if hard else before[0][1]))
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, before[1][1]))
    return before


def burns(seconds):
    """Burns CPU time; returns the limits then."""
    import resource
    import time

    t = time.process_time()
    while time.process_time() - t < seconds:
        pass
    return [resource.getrlimit(r) for r in (resource.RLIMIT_CPU, resource.RLIMIT_AS)]


def test_resource_limits_a_task_lowers_are_put_back_after_it(view):
    """A task lowered RLIMIT_CPU: a later task on its engine was killed by SIGXCPU ("EngineError:
    ... killed by SIGXCPU").  A task's limits now last for that task only, like its alarms."""
    ar = view.apply_async(lowers_limits, False)
    before = ar.get(60)
    with view.temp_flags(follow=ar):
        after = view.apply_async(burns, 2.0)
        assert after.get(120) == before
    assert after.engine_id == ar.engine_id


def test_a_task_that_lowers_a_hard_limit_gets_its_engine_restarted(lone):
    view = lone.load_balanced_view()
    old = lone.ids[0]
    with pytest.raises(RemoteError) as info:
        view.apply_async(lowers_limits, True).get(60)
    assert info.value.ename == "RuntimeError"
    assert info.value.evalue.startswith("the task lowered the engine's hard RLIMIT_CPU, which "
                                        "only a restart undoes")
    new = new_engine(lone, old)
    after = view.apply_async(burns, 3.0)  # past the limit the task set: not killed
    assert len(after.get(120)) == 2
    assert after.engine_id == new


# -- threads a task leaves behind ---------------------------------------------------------


def starts_a_chatty_thread(pool):
    """Starts a thread that prints until told to stop (builtins._chatty_stop), counting its
    lines in builtins._chatty; waits until it has printed once while this task runs."""
    import builtins
    import threading
    import time

    builtins._chatty, builtins._chatty_stop = 0, False

    def chatter():
        while not builtins._chatty_stop:
            print("stray", builtins._chatty)
            builtins._chatty += 1
            time.sleep(0.005)

    threading.Thread(target=chatter, daemon=True).start()
    if pool:  # a pool kept for later tasks: its workers run whatever task gives them work
        from concurrent.futures import ThreadPoolExecutor

        builtins._pool = ThreadPoolExecutor(1)
        builtins._pool.submit(print, "from the pool").result()
    while builtins._chatty < 1:
        time.sleep(0.001)
    print("started")
    return "started"


def while_it_chatters():
    """Prints, and returns once the left-over thread has printed 5 more lines meanwhile."""
    import builtins
    import time

    print("mine")
    seen = builtins._chatty
    deadline = time.monotonic() + 60
    while builtins._chatty < seen + 5:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    if hasattr(builtins, "_pool"):
        builtins._pool.submit(print, "pool work for this task").result()
    return "done"


def stop_chatter():
    import builtins

    builtins._chatty_stop = True
    pool = getattr(builtins, "_pool", None)
    if pool is not None:
        pool.shutdown()
        del builtins._pool


@pytest.mark.parametrize("pool", [False, True])
def test_a_thread_left_by_an_earlier_task_does_not_print_into_later_tasks(view, pool):
    """Its lines landed in the stdout of whatever task ran next on the engine (ipykernel 7
    does the same with cells: a thread has no parent header of its own and takes the latest).
    Now what a thread started by task A writes while A runs is A's, and what it writes after
    A ended goes to the engine's log; a pool's workers write into the task that gave them
    work."""
    first = view.apply_async(starts_a_chatty_thread, pool)
    try:
        assert first.get(60) == "started"
        assert first.stdout.startswith("stray 0\n") and first.stdout.endswith("started\n")
        assert ("from the pool\n" in first.stdout) is pool
        with view.temp_flags(follow=first):
            later = view.apply_async(while_it_chatters)
            assert later.get(60) == "done"
        assert later.stdout == ("mine\npool work for this task\n" if pool else "mine\n")
    finally:
        with view.temp_flags(targets=first.engine_id):
            view.apply_async(stop_chatter).get(60)


# -- a task that breaks what the engine itself uses ----------------------------------------


def test_a_watchdog_a_task_leaves_does_not_kill_the_engine_in_a_later_task(view):
    """faulthandler.dump_traceback_later(1, exit=True) left armed ended the engine a second
    later, in the middle of an innocent task (EngineError), like a left-over alarm."""

    def arms():
        import faulthandler

        faulthandler.dump_traceback_later(1, exit=True)
        return "armed"

    first = view.apply_async(arms)
    assert first.get(60) == "armed"

    def innocent():
        import time

        time.sleep(2)
        return "alive"

    with view.temp_flags(follow=first):
        ar = view.apply_async(innocent)
    assert ar.get(60) == "alive"
    assert ar.engine_id == first.engine_id


def floods(n):
    import sys

    sys.stdout.write("x" * n)
    return n


def test_a_task_that_patches_time_sleep_leaves_output_capture_working(lone):
    """time.sleep = None killed the engine's output reader thread: a later task printing more
    than the pipe holds (1 MiB) blocked in write for good, and its caller waited forever."""

    def patches():
        import time

        time.sleep, time.real_sleep = None, time.sleep
        return "patched"

    view = lone.load_balanced_view()
    assert view.apply_async(patches).get(60) == "patched"
    try:
        ar = view.apply_async(floods, 3 << 20)
        assert ar.get(60) == 3 << 20
        assert len(ar.stdout) == 3 << 20
        assert ar.stderr == ""  # no traceback of a dying reader thread
    finally:

        def unpatch():
            import time

            time.sleep = time.real_sleep

        view.apply_async(unpatch).get(60)


def test_a_task_that_breaks_what_its_engine_reads_with_leaves_no_task_unanswered(lone):
    """pickle.loads = None: the engine could not read any later message and dropped it, so
    every later task sent there waited forever.  Then the task it could not read failed with
    EngineError; it never ran, so now it runs on the restarted engine, no retry used."""

    def breaks_loads():
        import pickle

        pickle.loads = None
        return "broken"

    view = lone.load_balanced_view()
    old = lone.ids[0]
    assert view.apply_async(breaks_loads).get(60) == "broken"
    unread = view.apply_async(pow, 2, 3)
    assert unread.get(120) == 8
    assert unread.engine_id != old
    new_engine(lone, old)
    assert view.apply_async(opens_files).get(60) == b"opened\n"


@pytest.mark.parametrize("path", ["dup2", "set_blocking"])
def test_a_task_that_replaces_what_output_capture_uses_breaks_nothing(view, path):
    """os.dup2 = None broke the end of every task on the engine: each was answered with "could
    not report" for good; then (s17) the engine was restarted.  Capture binds them now."""
    ar = view.apply_async(clobbers, "os", path)
    assert ar.get(60) == "replaced"
    with view.temp_flags(follow=ar):
        after = view.apply_async(every_stream)
        assert after.get(60) == (1, 2)
        assert after.stdout == "py \u00e9\nfd\nchild\n" and after.stderr == "err\n"
        view.apply_async(unclobbers).get(60)
    assert after.engine_id == ar.engine_id


def test_a_task_that_breaks_what_its_engine_captures_with_gets_an_answer_and_a_new_engine(lone):
    """What ends a task's capture broken (here ipylb's own: the pipes' byte sinks): every task
    on the engine was answered "could not report", for good.  Now the first is, and then the
    engine is restarted."""

    def breaks_capture():
        from ipylb.engine import capture

        capture._Sink.take = None
        return "broken"

    view = lone.load_balanced_view()
    old = lone.ids[0]
    with pytest.raises(RemoteError, match="the engine could not report the outcome of task .*; "
                       "the engine is restarted"):
        view.apply_async(breaks_capture).get(60)
    new_engine(lone, old)
    assert view.apply_async(every_stream).get(60) == (1, 2)


def test_a_forked_child_that_returns_from_its_task_exits_instead_of_serving(view):
    """os.fork() in a task, both processes returning: the child went on as a second copy of
    the engine (its sockets and output pipes shared), running for good; now it exits when its
    task function ends, and what it printed reaches the output."""

    def forks(how):
        import os
        import sys

        pid = os.fork()
        if pid == 0:
            print("from the child")
            if how == "exit":
                sys.exit(3)
            if how == "raise":
                raise ValueError("in the child")
            return "child"
        _, status = os.waitpid(pid, 0)  # it ends by itself
        return os.waitstatus_to_exitcode(status)

    for how, status in (("return", 0), ("exit", 3), ("raise", 1)):
        ar = view.apply_async(forks, how)
        assert ar.get(60) == status
        assert ar.stdout == "from the child\n"

    def children():
        import psutil

        return [p.pid for p in psutil.Process().children(recursive=True)]

    with view.temp_flags(follow=ar):
        after = view.apply_async(children)
        assert after.get(60) == []
    assert after.engine_id == ar.engine_id


def test_an_engine_whose_task_ignores_termination_signals_still_stops_with_its_cluster():
    """A task that ignores SIGTERM, SIGINT, SIGHUP and SIGQUIT leaves nothing behind when the
    cluster shuts down (engines are stopped with SIGKILL through jupyter_client)."""
    from procs import wait_gone

    def ignores():
        import os
        import signal

        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(s, signal.SIG_IGN)
        return os.getpid()

    own = ipylb.Client(engines=1)
    try:
        pid = own.load_balanced_view().apply_async(ignores).get(60)
    finally:
        own.shutdown()
    assert wait_gone([pid], 30)


def test_a_task_that_breaks_sys_modules_ipylb_leaves_ipylbs_wrappers_working(lone):
    """sys.modules['ipylb'] = None on an engine made every later map chunk, @depend and
    @require task there fail to unpickle (DeserializationError: import of ipylb halted), for
    good: ipylb's wrappers are pickled by reference to its modules."""

    def breaks(names):
        import sys

        for name in names:
            sys.modules[name] = None
        return "broken"

    def square(x):
        return x * x

    def yes():
        return True

    view = lone.load_balanced_view()
    for names in (["ipylb"], ["ipylb.client.view", "ipylb.dependency"]):
        assert view.apply_async(breaks, names).get(60) == "broken"
        assert view.map_async(square, range(6), chunksize=2).get(60) == [0, 1, 4, 9, 16, 25]
        assert view.apply_async(breaks, names).get(60) == "broken"
        assert view.apply_async(ipylb.depend(yes)(square), 3).get(60) == 9
        assert view.apply_async(ipylb.require("os")(square), 4).get(60) == 16


def test_a_task_that_breaks_import_gets_its_engine_restarted_not_deaf(lone):
    """builtins.__import__ = None: when the engine then failed inside its receive callback,
    the socket's edge was consumed and no later task sent there was ever answered (heartbeat
    fine).  Then the task queued behind it failed with EngineError (the engine exited), or,
    when the controller sent it a task before it saw that, "its connection to the controller
    is gone".  Now the engine leaves having run nothing half: the task behind it runs on the
    restarted engine (whether receiving or reporting needs an import depends on what the
    engine ran before: the task that broke it may get an EngineError saying so)."""

    def breaks_import():
        import builtins

        builtins.real_import, builtins.__import__ = builtins.__import__, None
        return "broken"

    def restore():  # (no import statement: print.__self__ is the builtins module)
        b = print.__self__
        b.__import__ = getattr(b, "real_import", b.__import__)

    view = lone.load_balanced_view()
    old = lone.ids[0]
    for _ in range(3):
        ar = view.apply_async(breaks_import)
        queued = view.apply_async(pow, 2, 3)
        try:
            assert ar.get(60) == "broken"
        except ipylb.error.EngineError as e:  # its own report needed an import
            assert "a task broke what the engine uses to (a module function or class it " \
                "replaced, such as builtins.__import__" in str(e), str(e)
        assert queued.get(120) == 8  # never "EngineError: ... connection ... is gone"
        if lone.ids == [old]:  # it served on: put import back
            view.apply_async(restore).get(60)
        else:
            old = new_engine(lone, old)
    assert view.apply_async(pow, 2, 4).get(60) == 16


def holds_the_gil_later(marker):
    """Starts a thread that, once this task has ended and its engine has reported itself
    idle, holds the GIL for good in C code (libc's sleep called the way ctypes.pythonapi
    calls: without releasing the GIL); it creates ``marker`` just before."""
    import ctypes
    import threading
    import time

    def hog():
        time.sleep(2.5)  # its engine's health reports (every second) say it is idle
        open(marker, "w").close()
        ctypes.PyDLL(None).sleep(3600)

    threading.Thread(target=hog, daemon=True).start()
    return "started"


def test_an_engine_a_thread_freezes_between_tasks_is_restarted_and_its_tasks_run(
        monkeypatch, capfd, tmp_path):
    """A thread a task left holding the GIL in C code froze its engine while the heartbeat (a
    C thread) still answered: every task sent there waited forever.  Now the engine's idle
    watchdog (a C thread) ends it after IPYLB_FROZEN_S without Python, saying why; the task
    sent to it (never started) runs on the new engine."""
    monkeypatch.setenv("IPYLB_FROZEN_S", "4")
    marker = tmp_path / "hogging"
    with ipylb.Client(engines=1) as own:
        view = own.load_balanced_view()
        old = own.ids[0]
        assert view.apply_async(holds_the_gil_later, str(marker)).get(60) == "started"
        deadline = time.monotonic() + 60
        while not marker.exists():  # (the engine cannot tell: its Python is what stops)
            assert time.monotonic() < deadline
            time.sleep(0.05)
        queued = view.apply_async(pow, 2, 3)
        assert queued.get(120) == 8
        assert queued.engine_id != old
    err = capfd.readouterr().err
    assert "no Python ran in it for 4 s between tasks: a thread a task left holds the GIL in " \
        "C code (the tasks sent to it run elsewhere; its threads then: " in err
    assert 'in hog' in err  # the thread's traceback, where it holds the GIL


def holds_the_gil(seconds):
    """Holds the GIL in C code for ``seconds`` (no Python runs meanwhile, in any thread)."""
    import ctypes

    return ctypes.PyDLL(None).sleep(seconds)


def test_a_task_that_holds_the_gil_itself_is_reported_not_stopped(monkeypatch, capfd):
    """A task's own long C call that holds the GIL stops the engine's health reports too;
    that may be the task's work: the controller's log says so, and the task ends as it
    would (no restart).  (A first version restarted an engine whose last report said it was
    idle: that was this task, started since, and it ran again on every new engine.)"""
    monkeypatch.setenv("IPYLB_FROZEN_S", "2")
    with ipylb.Client(engines=1) as own:
        view = own.load_balanced_view()
        old = own.ids[0]
        ar = view.apply_async(holds_the_gil, 6)
        assert ar.get(60) == 0
        assert ar.engine_id == old and own.ids == [old]
        assert view.apply_async(pow, 2, 3).get(60) == 8
    err = capfd.readouterr().err
    assert "no Python has run in it for " in err  # (its last report may predate the task)
    assert "or a thread a task left); its tasks wait until it lets go" in err
