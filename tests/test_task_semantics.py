"""Engines behave like a notebook kernel under real user code (issue 9, items 1, 3, 4):
a task's output is everything written to fds 1 and 2; data pickle handles round-trips;
state a task stored on its engine survives later tasks.  Real engine kernels."""

from __future__ import annotations

import pickle
import uuid

import cloudpickle
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ipylb import serialize
from ipylb.error import SerializationError
from jupyter_client import BlockingKernelClient


def interactive(source: str) -> dict:
    """Define functions as a notebook does: in a namespace whose ``__name__`` is ``__main__``."""
    ns = {"__name__": "__main__"}
    exec(source, ns)
    return ns


# -- 1. a task's output is a real stream ---------------------------------------------------


def every_writer():
    import ctypes
    import io
    import os
    import subprocess
    import sys

    print("print")
    os.write(1, b"os.write\n")
    subprocess.run(["echo", "child"], check=True)
    os.system("echo os.system")
    libc = ctypes.CDLL(None)
    libc.puts(b"libc puts")
    libc.fflush(None)
    print("no newline", end="")
    os.write(2, b"fd2\n")
    print("stderr", file=sys.stderr)
    subprocess.run(["sh", "-c", "echo child-err >&2"], check=True)
    return (sys.stdout.fileno(), sys.stderr.fileno(), sys.stdout.encoding,
            isinstance(sys.stdout.buffer, io.BufferedWriter))


def test_everything_written_to_fds_1_and_2_is_the_tasks_output_in_order(view):
    ar = view.apply_async(every_writer)
    assert ar.get(60) == (1, 2, "utf-8", True)
    assert ar.stdout == "print\nos.write\nchild\nos.system\nlibc puts\nno newline"
    assert ar.stderr == "fd2\nstderr\nchild-err\n"


def test_output_of_a_failing_task_is_kept(view):
    def fails():
        import os

        print("before")
        os.write(1, b"fd before\n")
        raise ValueError("late")

    ar = view.apply_async(fails)
    assert ar.wait(60) and not ar.successful()
    assert ar.stdout == "before\nfd before\n"


def test_large_output_is_read_to_the_end_before_the_result_is_sent(view):
    def chatty(n):
        import os

        for _ in range(n // 65536):
            os.write(1, b"x" * 65536)  # no newline, several pipe-fulls
        return n

    ar = view.apply_async(chatty, 3 * 1024 * 1024)
    assert ar.get(60) == 3 * 1024 * 1024
    assert ar.stdout == "x" * (3 * 1024 * 1024)


def test_a_stream_kept_from_an_earlier_task_writes_to_the_running_one(view):
    ns = interactive(
        "import logging, sys\n"
        "def keep(tag):\n"
        "    global KEPT, LOG\n"
        "    KEPT = sys.stdout\n"
        "    LOG = logging.getLogger(tag)\n"
        "    LOG.addHandler(logging.StreamHandler())  # holds sys.stderr of this task\n"
        "    LOG.propagate = False\n"
        "    print('first')\n"
        "def use():\n"
        "    KEPT.write('kept\\n')\n"
        "    LOG.warning('logged')\n"
        "    return KEPT is sys.stdout\n"
    )
    first = view.apply_async(ns["keep"], uuid.uuid4().hex)
    first.get(60)
    with view.temp_flags(follow=first):
        second = view.apply_async(ns["use"])
        assert second.get(60) is True
    assert first.stdout == "first\n" and first.stderr == ""
    assert second.stdout == "kept\n" and second.stderr == "logged\n"


def test_map_items_keep_their_own_fd_output(view):
    def item(i):
        import os

        os.write(1, f"fd {i}\n".encode())
        print(f"py {i}")
        return i

    amr = view.map_async(item, range(8))
    assert amr.get(60) == list(range(8))
    assert amr.stdout == [f"fd {i}\npy {i}\n" for i in range(8)]


def test_an_attached_console_still_sees_its_cells_output(rc, view):
    kc = BlockingKernelClient(connection_file=rc.engine_info()[rc.ids[0]]["connection_file"])
    kc.load_connection_file()
    kc.start_channels()
    seen: list[str] = []

    def hook(msg):
        if msg["msg_type"] == "stream":
            seen.append(msg["content"]["text"])

    try:
        kc.wait_for_ready(timeout=30)
        reply = kc.execute_interactive("print('from a cell')", timeout=30, output_hook=hook)
        assert reply["content"]["status"] == "ok"
    finally:
        kc.stop_channels()
    assert "".join(seen) == "from a cell\n"
    ar = view.apply_async(every_writer)
    ar.get(60)
    assert ar.stdout.startswith("print\n")  # tasks after the cell are captured as before


# -- 3. data that pickle handles round-trips ---------------------------------------------


def depth(x) -> int:
    """How deep single-item lists nest (iteratively: comparing them would recurse)."""
    n = 0
    while x:
        x, n = x[0], n + 1
    return n


def nest(n: int) -> list:
    x: list = []
    for _ in range(n):
        x = [x]
    return x


def deepest_pickle_accepts_here() -> int:
    lo, hi = 1, 10_000
    while lo < hi:
        mid = (lo + hi + 1) // 2
        try:
            pickle.dumps(nest(mid), 5)
            lo = mid
        except RecursionError:
            hi = mid - 1
    return lo


def test_a_list_that_contains_itself_round_trips_as_argument_and_result(view):
    a = [1]
    a.append(a)

    def check(x):
        assert x[1] is x
        y = [2]
        y.append(y)
        return x, y

    x, y = view.apply_sync(check, a)
    assert x[0] == 1 and x[1] is x
    assert y[0] == 2 and y[1] is y


def test_shared_references_and_cyclic_dicts_round_trip(view):
    shared = [1, 2]
    d: dict = {"k": shared}
    d["self"] = d
    out_shared, out_d = view.apply_sync(lambda s, dd: (s, dd), [shared, shared], d)
    assert out_shared[0] is out_shared[1] and out_shared[0] == [1, 2]
    assert out_d["self"] is out_d and out_d["k"] == [1, 2]


def test_nesting_as_deep_as_pickle_itself_accepts_round_trips(view):
    n = deepest_pickle_accepts_here()
    assert depth(view.apply_sync(lambda x: x, nest(n))) == n
    assert view.apply_sync(lambda x: depth(x), x=nest(n)) == n


def test_deeper_than_pickle_names_the_argument_and_why(view):
    with pytest.raises(SerializationError, match="keyword argument 'deep' .*nested deeper.*RecursionError"):
        view.apply_async(lambda deep: 0, deep=nest(50_000))
    with pytest.raises(SerializationError, match="positional argument 1 .*nested deeper"):
        view.apply_async(lambda a, b: 0, 1, nest(50_000))


def test_a_function_closing_over_data_as_deep_as_pickle_accepts_round_trips(view):
    n = deepest_pickle_accepts_here()
    deep = nest(n)
    assert view.apply_sync(lambda: depth(deep)) == n  # in a closure
    assert view.apply_sync(lambda d=deep: depth(d)) == n  # in a default
    assert view.map_sync(lambda i: depth(deep) + i, [0, 1], chunksize=2) == [n, n + 1]


def test_a_function_closing_over_data_deeper_than_pickle_says_so(view):
    deep = nest(50_000)

    def holds_deep(i=0):
        return deep

    for submit in (lambda: view.apply_async(holds_deep),
                   lambda: view.map_async(holds_deep, range(4), chunksize=2)):
        with pytest.raises(SerializationError) as e:
            submit()
        text = str(e.value)
        assert "could not pickle the function 'test_a_function_closing_over_data_deeper_than_" \
               "pickle_says_so.<locals>.holds_deep'" in text  # the map's function, not its chunks'
        assert "a value it closes over (or a default or global it uses) is nested deeper than " \
               "pickle can go (RecursionError), even with 100 more levels" in text
        assert text.endswith("nothing was sent.")


def test_a_result_nested_deeper_than_pickle_fails_the_task_only(view):
    def deep():
        x: list = []
        for _ in range(50_000):
            x = [x]
        return x

    ar = view.apply_async(deep)
    assert ar.wait(60) and not ar.successful()
    err = ar.exception()
    assert err.ename == "SerializationError" and "nested deeper than pickle can go" in err.evalue
    assert view.apply_sync(lambda: 7) == 7


plain = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text() | st.binary(),
    lambda kids: st.lists(kids, max_size=5) | st.tuples(kids, kids)
    | st.dictionaries(st.text(max_size=3), kids, max_size=4),
    max_leaves=30,
)


@settings(max_examples=200, deadline=None)
@given(plain, st.integers(0, 3))
def test_the_fast_path_never_accepts_less_than_cloudpickle(value, cycles):
    """Whatever shape plain data takes (cycles too), serialize round-trips it as cloudpickle does."""
    holder: list = [value]
    for _ in range(cycles):
        holder.append(holder)
    expected = cloudpickle.loads(cloudpickle.dumps(holder))
    got = serialize.loads(serialize.dumps(holder))
    assert repr(got) == repr(expected)
    assert all(got[i] is got for i in range(1, cycles + 1))


# -- 4. engine state survives; names only read follow the client ---------------------------


def test_load_once_state_survives_other_tasks_and_read_names_follow_the_client(view, tmp_path):
    tag = uuid.uuid4().hex[:8]
    ns = interactive(
        f"MODEL_{tag} = None\n"
        f"SCALE_{tag} = 2\n"
        f"LOADS = {str(tmp_path)!r}\n"
        "def load():\n"
        "    import os, uuid\n"
        "    open(os.path.join(LOADS, uuid.uuid4().hex), 'w').close()  # counted on disk\n"
        "    return lambda x: x * 10\n"
        "def predict(x):\n"
        f"    global MODEL_{tag}\n"
        f"    if MODEL_{tag} is None:\n"
        f"        MODEL_{tag} = load()\n"
        f"    return MODEL_{tag}(x)\n"
        "def scaled(x):\n"
        f"    return x * SCALE_{tag}\n"
    )

    def loads() -> int:
        return len(list(tmp_path.iterdir()))

    first = view.apply_async(ns["predict"], 1)
    assert first.get(60) == 10 and loads() == 1
    with view.temp_flags(follow=first):  # the same engine, deterministically
        assert view.apply_sync(ns["scaled"], 1) == 2
        assert view.apply_sync(ns["predict"], 2) == 20
        assert loads() == 1  # load() did not run again
        ns[f"SCALE_{tag}"] = 5  # a name the functions only read: the client's new value wins
        assert view.apply_sync(ns["scaled"], 1) == 5
        ns[f"MODEL_{tag}"] = None  # assigned with `global`: the engine's own, kept
        assert view.apply_sync(ns["predict"], 3) == 30
        assert loads() == 1
