"""Layers point one way: modules above the client (magics, dashboard, top, CLI, join,
soak, fuzz, bench) use the client, its views and results through public API only."""

import ast
import subprocess
import sys
from pathlib import Path

import ipylb
import pytest

PACKAGE = Path(ipylb.__file__).parent
ABOVE_THE_CLIENT = [
    "magics.py", "dashboard.py", "top.py", "cli.py", "join.py", "soak.py", "fuzz.py",
    *(f"bench/{p.name}" for p in sorted((PACKAGE / "bench").glob("*.py"))),
]


def _private_reaches(source: str) -> list[tuple[int, str]]:
    """``x._name`` where ``x`` is not ``self``/``cls``/``super()``, or ``getattr(x, "_name")``:
    a reach into another object's privates, by line.  Dunders and IPython's display hooks
    (``_repr_*_``) are public."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "setattr", "hasattr") and len(node.args) > 1
                and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
                and node.args[1].value.startswith("_") and not node.args[1].value.endswith("_")):
            found.append((node.lineno, f"{node.func.id}({ast.unparse(node.args[0])}, "
                                       f"{node.args[1].value!r})"))
            continue
        if not isinstance(node, ast.Attribute) or not node.attr.startswith("_"):
            continue
        if node.attr.endswith("_"):
            continue
        owner = node.value
        if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
            continue
        if (isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name)
                and owner.func.id == "super"):
            continue
        found.append((node.lineno, f"{ast.unparse(owner)}.{node.attr}"))
    return sorted(found)


def _private_imports(source: str) -> list[tuple[int, str]]:
    """``from ipylb.x import _name`` / ``from .x import _name``."""
    return [(node.lineno, f"{node.module}.{alias.name}")
            for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)
            and (node.level or (node.module or "").startswith("ipylb"))
            for alias in node.names
            if alias.name.startswith("_") and not alias.name.endswith("__")]


def test_the_checker_sees_a_private_reach():
    src = ("def f(rc, ar):\n    rc._pending\n    ar._outcomes[0]\n    self._ok\n    x.__len__\n"
           "    getattr(rc, '_local', None)\n    getattr(f, '__name__')\n")
    assert _private_reaches(src) == [(2, "rc._pending"), (3, "ar._outcomes"),
                                     (6, "getattr(rc, '_local')")]
    assert _private_imports("from .client.local import _engine_env, read_ready\n"
                            "from . import __version__\n") == [(1, "client.local._engine_env")]


def test_modules_above_the_client_use_public_api_only():
    bad = {}
    for name in ABOVE_THE_CLIENT:
        source = (PACKAGE / name).read_text()
        found = _private_reaches(source) + _private_imports(source)
        if found:
            bad[name] = found
    assert bad == {}


@pytest.mark.parametrize("entry", ["ipylb.engine.__main__", "ipylb.controller.__main__"])
def test_engine_and_controller_processes_do_not_import_the_client(entry):
    # `import ipylb` imports the client's names on first use (PEP 562): an engine kernel's
    # boot spent ~0.1 s of CPU importing a client it never uses (issue 14 item 7).
    code = (f"import sys, {entry}\n"
            "print(sorted(m for m in sys.modules if m.startswith(('ipylb.client', 'ipylb.dependency'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_client_names_of_ipylb_import_on_first_use():
    code = ("import sys, ipylb\nassert 'ipylb.client.client' not in sys.modules\n"
            "from ipylb import Client, LoadBalancedView, AsyncResult, require\n"
            "import ipylb.client.client as c\nassert Client is c.Client and ipylb.Client is Client\n"
            "assert set(ipylb.__all__) <= set(dir(ipylb))\n"
            "try:\n    ipylb.Nope\nexcept AttributeError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "module 'ipylb' has no attribute 'Nope'"
