"""Hostile tasks combined with flags (walltime, retries, targets, follow, imap, chunks):
each caller gets an answer with a clear error within a bounded time, and every engine
serves on after (the fixture from test_hostile checks it after each test)."""

from __future__ import annotations

import time

import ipylb
import pytest
from ipylb.error import EngineError, WalltimeExceeded
from test_hostile import every_engine_serves_after, every_stream  # noqa: F401 - autouse: engines serve on


def test_a_task_that_blocks_sigint_leaves_later_tasks_interruptible(rc, view):
    """A task that blocked SIGINT in the engine's main thread (pthread_sigmask) made every
    later task on that engine deaf to walltime interrupts: the next task with a walltime
    cost its engine a restart (6 s) instead of being interrupted at 1 s."""

    def blocks():
        import signal

        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        return "blocked"

    first = view.apply_async(blocks)
    assert first.get(60) == "blocked"

    def sleeps():
        import time

        time.sleep(60)

    with view.temp_flags(follow=first, walltime=1):  # on the engine that blocked it
        ar = view.apply_async(sleeps)
    with pytest.raises(WalltimeExceeded, match="was interrupted") as info:
        ar.get(60)
    assert "restarted" not in str(info.value)
    assert ar.engine_id == first.engine_id and ar.engine_id in rc.ids


def test_a_task_that_makes_fds_1_and_2_non_blocking_leaves_later_prints_whole(view):
    """A task that set fds 1 and 2 non-blocking (os.set_blocking, as asyncio's
    connect_write_pipe(sys.stdout) does) and returned: a later task printing more than the
    capture pipe holds failed with BlockingIOError, on that engine for good."""

    def unblocks():
        import os

        os.set_blocking(1, False)
        os.set_blocking(2, False)
        return "non-blocking"

    first = view.apply_async(unblocks)
    assert first.get(60) == "non-blocking"

    def prints(n):
        import os
        import sys

        sys.stdout.write("o" * n)
        sys.stdout.flush()
        os.write(2, b"e" * n)  # fd level too (C code, child processes)
        return os.get_blocking(1), os.get_blocking(2)

    n = 3 << 20  # three times the pipe
    with view.temp_flags(follow=first):  # on the engine that did it
        ar = view.apply_async(prints, n)
    assert ar.get(60) == (True, True)
    assert ar.stdout == "o" * n and ar.stderr == "e" * n


@pytest.mark.parametrize("where", ["/dev/null", "a file"])
def test_a_task_that_points_fds_1_and_2_elsewhere_leaves_the_next_one_captured(view, where,
                                                                              tmp_path):
    """A task that dup2'd /dev/null (or a file) onto fds 1 and 2 and left them so made the
    output of every later task on its engine vanish (or land in that file)."""
    target = "/dev/null" if where == "/dev/null" else str(tmp_path / "out.txt")

    def redirects(target):
        import os

        print("before")
        fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        print("into the file")
        return "redirected"

    ar = view.apply_async(redirects, target)
    assert ar.get(60) == "redirected"
    assert ar.stdout == "before\n"
    with view.temp_flags(follow=ar):  # on the engine that redirected them
        after = view.apply_async(every_stream)
        assert after.get(60) == (1, 2)
    assert after.stdout == "py \u00e9\nfd\nchild\n" and after.stderr == "err\n"


def test_an_alarm_a_task_leaves_does_not_hit_the_next_task(view):
    """A task that set signal.alarm(1) and returned killed its engine (SIGALRM) in the middle
    of the next, innocent task, which failed with EngineError."""

    def arms():
        import signal

        signal.alarm(1)
        signal.setitimer(signal.ITIMER_REAL, 1.0)
        return "armed"

    first = view.apply_async(arms)
    assert first.get(60) == "armed"

    def innocent():
        import signal
        import time

        time.sleep(2)
        return signal.getitimer(signal.ITIMER_REAL)

    with view.temp_flags(follow=first):  # on the engine that armed it
        ar = view.apply_async(innocent)
    assert ar.get(60) == (0.0, 0.0)
    assert ar.engine_id == first.engine_id


@pytest.mark.parametrize("timer", ["ITIMER_VIRTUAL", "ITIMER_PROF"])
def test_a_cpu_timer_a_task_leaves_does_not_kill_the_engine_in_a_later_task(view, timer):
    """setitimer(ITIMER_VIRTUAL or ITIMER_PROF) left armed killed the engine (SIGVTALRM,
    SIGPROF: their default action ends the process) once a later, innocent task had used
    that much CPU: it failed with EngineError.  The same kind as a left-over alarm."""

    def arms(timer):
        import signal

        signal.setitimer(getattr(signal, timer), 0.3)
        return "armed"

    first = view.apply_async(arms, timer)
    assert first.get(60) == "armed"

    def burns(timer):
        import signal
        import time

        end = time.process_time() + 0.8
        while time.process_time() < end:
            pass
        return signal.getitimer(getattr(signal, timer))

    with view.temp_flags(follow=first):  # on the engine that armed it
        ar = view.apply_async(burns, timer)
    assert ar.get(60) == (0.0, 0.0)
    assert ar.engine_id == first.engine_id


def breaks_pickle():
    import pickle

    pickle.dumps = None
    return "broken"


def breaks_the_socket():
    import zmq

    zmq.Socket.send = zmq.Socket.send_multipart = None
    return "broken"


def breaks_ipylb_wire():
    import ipylb.wire

    ipylb.wire.send = None
    return "broken"


@pytest.mark.parametrize("breaks", [breaks_pickle, breaks_the_socket, breaks_ipylb_wire])
def test_a_task_that_breaks_what_its_engine_reports_with_still_gets_an_answer(breaks):
    """A task that broke pickle.dumps (which the engine packs every report with, its fallback
    error too) was never answered, and its engine took tasks it never answered while its
    heartbeat said all was well.  Now the engine exits: EngineError, and a new engine.
    The same for a task that breaks the sending itself (zmq.Socket.send = None, or
    ipylb.wire.send = None): its caller and every later one's waited forever.
    On a cluster of its own: the shared one's engine ids must stay 0 and 1."""
    with ipylb.Client(engines=1) as own:
        t0 = time.monotonic()
        ar = own.load_balanced_view().apply_async(breaks)
        with pytest.raises(EngineError, match="could not report a task's outcome"):
            ar.get(60)
        assert time.monotonic() - t0 < 60
        # the next task runs on the restarted engine (a new id; the old one may still be
        # listed for a moment: its departure reaches clients after its tasks' failures)
        after = own.load_balanced_view().apply_async(pow, 2, 5)
        assert after.get(120) == 32 and after.engine_id != ar.engine_id


class _SlowToPickle:
    """A result whose pickling takes long (a huge object graph would): it prints, then sleeps."""

    def __reduce__(self):
        import time

        print("pickling")
        time.sleep(60)
        return (int, (5,))


def test_a_result_slow_to_pickle_is_stopped_by_the_walltime_not_by_a_restart(rc, view):
    """Pickling the result ran after the task was marked ended, so the walltime interrupt was
    ignored and the engine was always restarted after the grace period (6 s): "did not stop
    within 5s of an interrupt", about a task whose function had returned."""

    def slow_result():
        return _SlowToPickle()

    t0 = time.monotonic()
    with view.temp_flags(walltime=1):
        ar = view.apply_async(slow_result)
    with pytest.raises(WalltimeExceeded, match="was interrupted") as info:
        ar.get(60)
    assert "restarted" not in str(info.value)
    assert time.monotonic() - t0 < 5
    assert ar.engine_id in rc.ids
    assert ar.stdout == "pickling\n"  # printed while making the result: the task's output



class _SlowToUnpickle:
    """An argument whose unpickling hangs (a __setstate__ that waits on something)."""

    def __reduce__(self):
        import time

        return (time.sleep, (60,))


def test_an_argument_slow_to_unpickle_meets_the_walltime(rc, view):
    """Arguments were unpickled before the task counted as started: one whose unpickling hung
    kept its engine busy and its caller waiting with no walltime applying at all."""

    def takes(arg):
        return arg

    t0 = time.monotonic()
    with view.temp_flags(walltime=1):
        ar = view.apply_async(takes, _SlowToUnpickle())
    with pytest.raises(WalltimeExceeded, match="was interrupted") as info:
        ar.get(60)
    assert "restarted" not in str(info.value)
    assert time.monotonic() - t0 < 5
    assert ar.engine_id in rc.ids
