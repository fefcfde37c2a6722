"""What engines a client starts inherit from it: its environment, PYTHONPATH merged with
its sys.path (API.md: "what imports in the client imports on the engines")."""

from __future__ import annotations

import os
import sys

import ipylb
from ipylb.client.local import engine_env


def engine_import(name):
    import importlib
    import os
    import sys

    return importlib.import_module(name).VALUE, os.environ["PYTHONPATH"], sys.path


def test_engine_env_puts_pythonpath_first_then_sys_path_without_duplicates(monkeypatch, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(a), str(b), "", str(a), "rel"]))
    monkeypatch.setattr(sys, "path", [str(b), "", "/usr/lib/x", str(a) + "/"])
    paths = engine_env()["PYTHONPATH"].split(os.pathsep)
    assert paths == [str(a), str(b), os.path.abspath("rel"), os.getcwd(), "/usr/lib/x"]


def test_engine_env_without_pythonpath_is_the_client_sys_path(monkeypatch):
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.setattr(sys, "path", ["/x", "/y", "/x"])
    assert engine_env()["PYTHONPATH"] == os.pathsep.join(["/x", "/y"])


def test_engines_import_from_the_pythonpath_the_client_set(monkeypatch, tmp_path):
    """The issue's input: PYTHONPATH set in the client before Client(engines=2)."""
    (tmp_path / "only_in_tmp_h9.py").write_text("VALUE = 'from tmp'\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with ipylb.Client(engines=2) as rc:
        view = rc.load_balanced_view()
        results = view.map_sync(lambda _: engine_import("only_in_tmp_h9"), range(2))
        assert {r[0] for r in results} == {"from tmp"}
        value, pythonpath, path = results[0]
        entries = pythonpath.split(os.pathsep)
        assert entries[0] == str(tmp_path)  # the client's PYTHONPATH first...
        assert len(entries) == len(set(entries))
        here = os.path.dirname(os.path.abspath(__file__))
        assert here in entries and here in path  # ... and the client's sys.path after it
