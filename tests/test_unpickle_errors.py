"""A task whose function or argument does not unpickle on its engine (issue 10 item 4):
DeserializationError says what could not be unpickled, why, and the two ways out; it is
not mistaken for the task's own error, and shipping by value fixes it.

The module here is importable in this process only: it is written to a fresh directory
put on sys.path after the session's engines started (they inherited the sys.path of then).
"""

from __future__ import annotations

import importlib
import sys
import textwrap

import cloudpickle
import pytest
from ipylb.error import DeserializationError, RemoteError, SerializationError

SOURCE = textwrap.dedent("""
    class Thing:
        def __init__(self, n):
            self.n = n

    def triple(x):
        return 3 * x

    def size(thing):
        return thing.n
""")


@pytest.fixture
def client_only(rc, tmp_path, monkeypatch):
    """A module ``clientonly_h10`` importable here but not on the (already running) engines."""
    (tmp_path / "clientonly_h10.py").write_text(SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("clientonly_h10")
    yield mod
    if "clientonly_h10" in cloudpickle.list_registry_pickle_by_value():
        cloudpickle.unregister_pickle_by_value(mod)
    sys.modules.pop("clientonly_h10", None)


def test_a_function_the_engine_cannot_import(view, client_only):
    ar = view.apply_async(client_only.triple, 2)
    with pytest.raises(DeserializationError) as e:
        ar.get(30)
    err = e.value
    text = str(err)
    assert text.startswith(f"task {ar.msg_ids[0]} did not run: its function "
                           "(clientonly_h10.triple) could not be unpickled on the engine: "
                           "ModuleNotFoundError: No module named 'clientonly_h10'")
    assert "make it importable on the engines" in text
    assert "cloudpickle.register_pickle_by_value(clientonly_h10)" in text
    assert text.endswith(f"(on engine {err.engine_info['engine_id']})")
    # Still a RemoteError (ename, engine_info) and a SerializationError.
    assert isinstance(err, RemoteError) and isinstance(err, SerializationError)
    assert err.ename == "DeserializationError"
    assert ar.metadata.status == "error"


def test_an_argument_the_engine_cannot_import_is_named(view, client_only):
    ar = view.apply_async(pow, 2, client_only.Thing(5))
    with pytest.raises(DeserializationError,
                       match=r"positional argument 1 \(clientonly_h10.Thing\) "
                             r"could not be unpickled on the engine: ModuleNotFoundError") as e:
        ar.get(30)
    assert "positional argument 1 (clientonly_h10.Thing)" in str(e.value)
    ar = view.apply_async(len, [1, {"deep": [client_only.Thing(1)]}], key=client_only.Thing(2))
    with pytest.raises(DeserializationError) as e:
        ar.get(30)
    assert "positional argument 0 (clientonly_h10.Thing), keyword argument 'key' " \
           "(clientonly_h10.Thing) could not be unpickled" in str(e.value)


def test_shipping_by_value_is_the_way_out(view, client_only):
    cloudpickle.register_pickle_by_value(client_only)
    assert view.apply_async(client_only.triple, 2).get(30) == 6
    assert view.apply_async(client_only.size, client_only.Thing(7)).get(30) == 7


def test_the_tasks_own_import_error_is_still_its_own(view):
    def imports_missing():
        import no_such_module_h10  # noqa: F401

    with pytest.raises(RemoteError) as e:
        view.apply_async(imports_missing).get(30)
    assert e.value.ename == "ModuleNotFoundError"
    assert not isinstance(e.value, DeserializationError)
