"""How can a task be left without an answer?  Controller and client paths found by an audit
(issue 9), each answered now: results the client cannot read, submissions the controller
cannot take, a task whose record is gone."""

from __future__ import annotations

import ipylb
import pytest
from ipylb import wire
from ipylb.client.asyncresult import Outcome
from ipylb.error import RemoteError, WireError
from test_pending import TIMEOUT, Gate, wait_at_gate


@pytest.fixture
def gate():
    g = Gate()
    yield g
    g.close()


@pytest.mark.parametrize("meta", [
    ("t1", 0, "error", None, None, "", "", ("OnlyAName",)),  # an error this version cannot read
    ("t1", 0, "ok"),  # too short
    ("t1", 0, "error", None, None, "", "", None, None),  # an error without its report
])
def test_a_malformed_result_answers_its_task_with_an_error(meta):
    outcome = Outcome.received(meta, [], b"")
    assert outcome.meta[0] == "t1" and not outcome.ok
    error = outcome.error()
    assert isinstance(error, RemoteError) and error.ename == "WireError"
    assert "malformed" in error.evalue and "versions" in error.evalue


@pytest.mark.parametrize("meta", [None, (), (42, 0, "ok"), "t1"])
def test_a_result_naming_no_task_is_dropped_as_a_wire_error(meta):
    with pytest.raises(WireError, match="names no task"):
        Outcome.received(meta, [], b"")


def test_a_malformed_result_from_the_controller_still_ends_the_wait(rc, view, gate):
    """A result this client cannot read (a controller of another version) answers the task
    with an error instead of killing the receiving thread's handling of it halfway."""
    ar = view.apply_async(wait_at_gate, gate.port)
    conn = gate.running()
    msg_id = ar.msg_ids[0]
    rc._on_message(wire.RESULT, b"", (msg_id, 0, "error", None, None, "", "", ("Odd",)), [], b"")
    with pytest.raises(RemoteError, match="malformed") as e:
        ar.get(TIMEOUT)
    assert e.value.ename == "WireError"
    assert any(m.msg_id == msg_id for m in rc.failures)
    conn.sendall(b"late")  # the genuine result comes later: the first answer stands
    with ipylb.Client(rc.cluster_info["client_url"]) as other:
        assert other.get_result(msg_id).get(TIMEOUT) == "late"
    with pytest.raises(RemoteError, match="malformed"):
        ar.get(TIMEOUT)
