"""Live output of running tasks (issue 15 item 5): real engine kernels, real sockets.

Outside a kernel, ``ar.display_outputs()`` on a running task prints each report as it comes
and returns when the task ends; in a Jupyter kernel, the output lands in a display of the
cell that asked, updated under that cell's parent header even while another cell runs.
"""

from __future__ import annotations

import sys
import threading
import time

import pytest
from ipylb.engine.capture import live_text
from ipylb.engine.health import LIVE_BYTES, LIVE_S

SKIPPED = "bytes of live output skipped"


class Recorder:
    """A stream that keeps each write with whether the task had finished when it came."""

    def __init__(self, ar):
        self.ar = ar
        self.writes: list[tuple[str, bool]] = []
        self.first = threading.Event()

    def write(self, text):
        self.writes.append((text, self.ar.ready()))
        self.first.set()
        return len(text)

    def flush(self):
        pass

    @property
    def text(self):
        return "".join(t for t, _ in self.writes)


def follow(ar, monkeypatch):
    """ar.display_outputs() with sys.stdout/sys.stderr recorded."""
    out, err = Recorder(ar), Recorder(ar)
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    try:
        ar.display_outputs()
    finally:
        monkeypatch.undo()
    return out, err


def lines_slowly(n, pause):
    import sys
    import time

    for i in range(n):
        print(f"line {i}", flush=True)
        print(f"warn {i}", file=sys.stderr, flush=True)
        time.sleep(pause)
    return n


def chatter(seconds, width):
    """Print without end for ``seconds`` (a millisecond's pause per line keeps the total
    under the engine's 8 MiB output limit, so the result holds it all)."""
    import time

    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        print(f"{i:08d}" + "x" * width, flush=True)
        i += 1
        time.sleep(0.001)
    return i


# -- the engine's cut of a report (pure) -------------------------------------------------------


def test_live_text_keeps_utf8_characters_whole():
    data = "aé€😀".encode()  # 1 + 2 + 3 + 4 bytes
    assert live_text(data, 0, 100) == ("aé€😀", 10, 4)
    for cut in range(1, 10):  # a character cut by the end waits for the next report
        text, end, chars = live_text(data[:cut], 0, 100)
        assert text.encode() == data[:end] and end <= cut and cut - end < 4
        assert chars == len(text)
        rest, end2, chars2 = live_text(data, end, 100, chars)
        assert text + rest == "aé€😀" and end2 == 10 and chars2 == 4


def test_live_text_counts_positions_in_characters_of_the_results_text():
    # invalid UTF-8 is one U+FFFD per maximal bad part in the result (Sink.take), whatever
    # the reports' cuts and skips were: the positions index that text
    data = b"\xff\xfe\xe2\x82ok\xf0\x9f" + "é".encode() * 30 + b"\xc3"
    full = data.decode("utf-8", "replace")
    for limit in (3, 7, 1000):
        for first in range(len(data) + 1):
            text, end, chars = live_text(data[:first], 0, limit)
            assert full.startswith(data[:end].decode("utf-8", "replace")) and chars == len(
                data[:end].decode("utf-8", "replace"))
            rest, end2, chars2 = live_text(data, end, limit, chars)
            assert end2 == len(data) - 1 and chars2 == len(full) - 1  # the lone \xc3 waits
            assert full.endswith(rest.split("\n")[-1] + "\ufffd")


def test_live_text_over_the_limit_keeps_the_newest_after_a_note():
    data = b"0123456789" * 10
    text, end, chars = live_text(data, 5, 20, 5)
    assert end == 100 and chars == 100
    note, kept = text.split("\n", 1)
    assert kept == "0123456789" * 2 and "75 " + SKIPPED in note
    # a kept part that starts inside a character skips that character's tail
    text, end, chars = live_text("é".encode() * 10, 0, 5)
    assert text.endswith("éé") and "é" * 3 not in text and end == 20 and chars == 10


# -- plain Python: printed as it comes -----------------------------------------------------------


def test_display_outputs_of_a_running_task_prints_as_it_comes(view, monkeypatch):
    ar = view.apply_async(lines_slowly, 8, 0.4)
    out, err = follow(ar, monkeypatch)
    assert ar.get() == 8
    full_out = "".join(f"line {i}\n" for i in range(8))
    full_err = "".join(f"warn {i}\n" for i in range(8))
    assert ar.stdout == full_out and ar.stderr == full_err  # the results: the full text
    # Partial output came while the task ran, in order, and nothing twice: what was printed
    # (the reports, then what the result held beyond them) is the full text exactly.
    assert out.writes[0][1] is False and err.writes[0][1] is False
    assert sum(not done for _, done in out.writes) >= 2
    assert out.text == full_out and err.text == full_err


def test_a_chatty_task_gets_a_bounded_number_of_capped_reports(view, monkeypatch):
    seconds = 2.0
    ar = view.apply_async(chatter, seconds, 1000)
    out, _err = follow(ar, monkeypatch)
    n = ar.get()
    assert len(ar.stdout) == n * 1009 and ar.stdout.count("\n") == n  # full: nothing lost
    live = [t for t, done in out.writes if not done]
    # One report per LIVE_S at most while the task printed (plus the first one, sent at once).
    assert 1 <= len(live) <= seconds / LIVE_S + 2, len(live)
    assert all(len(t.encode()) <= LIVE_BYTES + 200 for t in live)
    assert any(SKIPPED in t for t in live), "a chatty task's reports say what they skipped"
    # What came after the last report is printed once, and ends the text as the result does
    # (the last report may already hold the end, when the engine reported after the last
    # print: then nothing is left to print at the end).
    assert ar.stdout.endswith(out.writes[-1][0])


def invalid_utf8_slowly(n, pause):
    import os
    import time

    for i in range(n):
        os.write(1, b"\xff\xe2\x82 bad %d\n" % i)  # invalid UTF-8, then text
        os.write(2, b"\xc3(%d\n" % i)
        time.sleep(pause)
    return n


def test_invalid_utf8_is_printed_once_as_the_result_holds_it(view, monkeypatch):
    # The result's text has one U+FFFD per bad part, 3 bytes where the task wrote 1 or 2:
    # positions counted in bytes printed the text after the last report again.
    ar = view.apply_async(invalid_utf8_slowly, 6, 0.4)
    out, err = follow(ar, monkeypatch)
    assert ar.get() == 6
    assert ar.stdout == "".join(f"\ufffd\ufffd bad {i}\n" for i in range(6))
    assert ar.stderr == "".join(f"\ufffd({i}\n" for i in range(6))
    assert sum(not done for _, done in out.writes) >= 2  # live reports came
    assert out.text == ar.stdout and err.text == ar.stderr


def fails_first(flag):
    import os
    import time

    if not os.path.exists(flag):
        open(flag, "w").close()
        print("first attempt, which fails", flush=True)
        time.sleep(1.5)  # its output is reported
        raise RuntimeError("once")
    print("second attempt", flush=True)
    return "ok"


def test_a_retried_task_prints_its_last_attempt_in_full(view, monkeypatch, tmp_path):
    # The positions reported of the first attempt cut the second attempt's text (its
    # result's), which ended before any report of it: "second attempt" was never printed.
    with view.temp_flags(retries=1):
        ar = view.apply_async(fails_first, str(tmp_path / "flag"))
    out, _err = follow(ar, monkeypatch)
    assert ar.get() == "ok" and ar.stdout == "second attempt\n"
    assert out.writes[0] == ("first attempt, which fails\n", False)  # live, while it ran
    assert out.text.endswith("second attempt\n")


def test_display_outputs_of_a_finished_task_prints_it_once(view, monkeypatch):
    ar = view.apply_async(lines_slowly, 2, 0)
    ar.get()
    out, err = follow(ar, monkeypatch)
    assert out.text == "line 0\nline 1\n" and err.text == "warn 0\nwarn 1\n"


def tagged(tag, n, pause):
    import time

    for i in range(n):
        print(f"{tag} {i}", flush=True)
        time.sleep(pause)
    return tag


def test_watching_a_map_shows_each_task_as_it_ends(view, monkeypatch):
    amr = view.map_async(tagged, ["quick", "slow"], [1, 8], [0, 0.4])
    out, _err = follow(amr, monkeypatch)
    assert amr.get() == ["quick", "slow"]
    assert sorted(out.text.splitlines()) == sorted(amr.stdout[0].splitlines()
                                                   + amr.stdout[1].splitlines())
    assert [t for t, _ in out.writes if "slow" in t] and out.text.count("quick 0") == 1
    # the quick task's output is printed when it ends, not after the slow one
    assert ("quick 0\n", False) in out.writes, out.writes


def test_another_client_watches_a_task_it_did_not_submit(rc, view, monkeypatch):
    import ipylb

    ar = view.apply_async(lines_slowly, 6, 0.4)
    other = ipylb.Client(rc._local.connection_file)
    try:
        theirs = other.get_result(ar.msg_ids[0])
        out, err = follow(theirs, monkeypatch)
    finally:
        other.close()
    assert ar.get() == 6 and out.writes[0][1] is False
    assert out.text == ar.stdout and err.text == ar.stderr and ar.stdout.count("\n") == 6


def test_output_forged_by_a_key_holder_that_is_no_engine_reaches_no_client(rc, view,
                                                                           monkeypatch):
    """OUTPUT signed under the cluster key, for a watched running task, but from a socket
    that is no engine's health socket (nor an engine's main one): the controller drops it."""
    import json

    import zmq
    from ipylb import wire

    info = json.loads(open(rc._local.connection_file).read())
    ar = view.apply_async(lines_slowly, 6, 0.4)
    sent = threading.Event()

    def forge():  # spread over the task's run (2.4 s), while it is watched
        try:
            for ident in (b"engine-forged/health", b"engine-forged"):
                signer = wire.Signer(info["key"].encode(), ident, info["controller_id"].encode())
                s = zmq.Context.instance().socket(zmq.DEALER)
                s.setsockopt(zmq.IDENTITY, ident)
                s.setsockopt(zmq.LINGER, 0)
                s.connect(info["engine_url"])
                for _ in range(5):
                    wire.send(s, signer.pack(wire.OUTPUT, (ar.msg_ids[0], ("FORGED\n", 7),
                                                           ("", 0), time.time())))
                    time.sleep(0.2)
                s.close()
        finally:
            sent.set()

    threading.Thread(target=forge, daemon=True).start()
    out, _err = follow(ar, monkeypatch)
    assert sent.wait(30) and ar.get() == 6
    assert "FORGED" not in out.text and out.text == ar.stdout


def test_lb_cell_in_a_terminal_shell_prints_while_it_runs(rc, monkeypatch):
    """IPython without a kernel (a terminal): the blocking cell prints as output comes."""
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "ipylb")
    shell.user_ns["rc"] = rc
    shell.run_line_magic("lb_use", "rc")

    class Pending:  # what Recorder asks: has the cell's task finished?
        def ready(self):
            return shell.user_ns["lb_ar"].ready()

    out = Recorder(Pending())
    monkeypatch.setattr(sys, "stdout", out)
    try:
        r = shell.run_cell("%%lb -o lb_ar\nimport time\nfor i in range(5):\n"
                           "    print('tick', i, flush=True)\n    time.sleep(0.4)\n'end'",
                           store_history=False)
    finally:
        monkeypatch.undo()
        shell.run_line_magic("lb_stop", "")
        shell.run_line_magic("unload_ext", "ipylb")
    assert r.success and r.result == "end", r.error_in_exec
    full = "".join(f"tick {i}\n" for i in range(5))
    live = [t for t, done in out.writes if not done and "tick" in t]
    assert live and full.startswith("".join(live)), out.writes
    assert full in out.text and out.text.count("tick 0") == 1


# -- a real Jupyter kernel: the display of the cell that asked ---------------------------------


@pytest.fixture(scope="module")
def kernel(rc):
    """A real IPython kernel (jupyter_client) whose magics use the session's cluster."""
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3")
    try:
        setup = (f"import ipylb\nrc = ipylb.Client({str(rc._local.connection_file)!r})\n"
                 "%load_ext ipylb\n%lb_use rc")
        reply = kc.execute_interactive(setup, timeout=60)
        assert reply["content"]["status"] == "ok", reply["content"]
        yield kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def iopub_until_idle(kc, msg_id, timeout=120.0):
    """The iopub messages up to the idle status of request ``msg_id``, as they come."""
    got = []
    deadline = time.monotonic() + timeout
    while True:
        msg = kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        got.append(msg)
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "status" \
                and msg["content"]["execution_state"] == "idle":
            return got


def displays(msgs, display_id=None):
    return [m for m in msgs if m["msg_type"] in ("display_data", "update_display_data")
            and (display_id is None or m["content"]["transient"].get("display_id") == display_id)]


CELL = ("%%lb\nimport time\nfor i in range(5):\n    print('tick', i, flush=True)\n"
        "    time.sleep(0.5)\n'done'")
FULL = "".join(f"tick {i}\n" for i in range(5))


def test_lb_cell_streams_into_its_own_display(kernel):
    msg_id = kernel.execute(CELL)
    msgs = iopub_until_idle(kernel, msg_id)
    shown = displays(msgs)
    assert shown and shown[0]["msg_type"] == "display_data", [m["msg_type"] for m in msgs]
    did = shown[0]["content"]["transient"]["display_id"]
    updates = displays(msgs, did)[1:]
    assert all(m["msg_type"] == "update_display_data" for m in updates)
    assert all(m["parent_header"]["msg_id"] == msg_id for m in displays(msgs, did))
    texts = [m["content"]["data"]["text/plain"] for m in updates]
    # Partial output while the cell ran, growing in order; then the full output, once.
    partial = [t for t in texts if t != FULL]
    assert partial and all(FULL.startswith(t) for t in partial), texts
    assert texts[-1] == FULL
    assert all(len(a) <= len(b) for a, b in zip(texts, texts[1:])), texts
    # The stream is not printed a second time, and the result is the cell's value.
    streams = [m for m in msgs if m["msg_type"] == "stream"]
    assert not any("tick" in m["content"]["text"] for m in streams), streams
    results = [m for m in msgs if m["msg_type"] == "execute_result"]
    assert results and results[0]["content"]["data"]["text/plain"] == "'done'"


def test_display_outputs_updates_its_cell_while_another_cell_runs(kernel):
    started = kernel.execute(CELL.replace("%%lb\n", "%%lb --noblock -o ar\n"))
    iopub_until_idle(kernel, started)
    first = kernel.execute("ar.display_outputs()")  # returns at once
    # Another cell runs (a local sleep) while the task prints: the display still lands in
    # the first cell (its parent), never in the one running.
    second = kernel.execute("import time\ntime.sleep(4)")
    msgs = iopub_until_idle(kernel, second)
    if not any(m["content"]["data"]["text/plain"] == FULL for m in displays(msgs)):
        msgs += iopub_until(kernel, lambda m: m in displays([m])
                            and m["content"]["data"]["text/plain"] == FULL)
    shown = displays(msgs)
    assert shown and shown[0]["msg_type"] == "display_data"
    assert all(m["parent_header"]["msg_id"] == first for m in shown), [
        (m["msg_type"], m["parent_header"].get("msg_id")) for m in shown]
    busy = next(i for i, m in enumerate(msgs) if m["parent_header"].get("msg_id") == second
                and m["msg_type"] == "status")
    assert displays(msgs[busy:]), "nothing was shown while the other cell ran"
    did = shown[0]["content"]["transient"]["display_id"]
    assert displays(msgs, did) == shown  # one display, updated in place
    texts = [m["content"]["data"]["text/plain"] for m in shown]
    assert texts[-1] == FULL and texts.count(FULL) <= 2 and all(FULL.startswith(t) for t in texts)
    assert any(t != FULL for t in texts), "no partial output came while the task ran"
    reply = kernel.execute_interactive("assert ar.stdout == " + repr(FULL), timeout=30)
    assert reply["content"]["status"] == "ok", reply["content"]


def test_a_cell_that_prints_nothing_shows_no_empty_output(kernel):
    msg_id = kernel.execute("%%lb\nimport time\ntime.sleep(0.6)\n6 * 7")
    msgs = iopub_until_idle(kernel, msg_id)
    assert not displays(msgs), displays(msgs)
    results = [m for m in msgs if m["msg_type"] == "execute_result"]
    assert results and results[0]["content"]["data"]["text/plain"] == "42"


def iopub_until(kc, pred, timeout=120.0):
    """iopub messages up to the first for which ``pred`` is true."""
    got = []
    deadline = time.monotonic() + timeout
    while True:
        got.append(kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic())))
        if pred(got[-1]):
            return got
