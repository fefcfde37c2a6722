"""The demo notebooks run top to bottom in a real kernel against real engines.

nbclient fails on any cell error except in cells tagged ``raises-exception``
(those show what an error looks like); the tests then check what a few cells
printed, so a notebook that runs but shows the wrong thing fails too.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def execute(name: str) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    # "python3" is the kernel of the interpreter running the tests (jupyter_client
    # runs the kernelspec's "python" as sys.executable), so it imports ipylb.
    NotebookClient(nb, kernel_name="python3", timeout=120,
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return nb


def text_of(cell: nbformat.NotebookNode) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif out["output_type"] == "error":
            parts.append("\n".join(out["traceback"]))
        elif "data" in out:
            parts.append(out["data"].get("text/plain", ""))
    return "\n".join(parts)


def cell_with(nb: nbformat.NotebookNode, snippet: str) -> nbformat.NotebookNode:
    return next(c for c in nb.cells if c.cell_type == "code" and snippet in c.source)


def test_notebooks_are_committed_without_outputs():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code and not any(c.outputs or c.execution_count for c in code), path.name


def test_quickstart():
    nb = execute("01-quickstart.ipynb")
    assert "hello from engine" in text_of(cell_with(nb, 'print("hello from engine"'))
    assert str(sum(x**10 for x in range(32))) in text_of(cell_with(nb, 'print("hello from engine"'))
    assert "('first is done', True)" in text_of(cell_with(nb, "first.get(), second"))
    error = text_of(cell_with(nb, "ratio(1, 0)"))
    assert "ZeroDivisionError" in error and "return a / b" in error and "[engine " in error


def test_dependencies():
    nb = execute("02-dependencies.ipynb")
    assert text_of(cell_with(nb, "@depend(on_engine, 1)")).strip() == "[1, 1, 1, 1]"
    impossible = text_of(cell_with(nb, "grandchild = view.apply_async"))
    assert "ImpossibleDependency: " in impossible and "failed" in impossible
    shown = text_of(next(c for c in nb.cells if c.source.strip() == "grandchild.get(10)"))
    assert "ImpossibleDependency" in shown
    later = text_of(cell_with(nb, "no_such_module_anywhere"))
    assert "refused by all 2 engines" in later and "DependencyTimeout" in later


def test_dashboard_notebook():
    nb = execute("03-dashboard.ipynb")
    shown = cell_with(nb, "dash = rc.dashboard()").outputs
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in shown)
    assert text_of(cell_with(nb, "print(f\"{len(dash.rows)} engines")).startswith("2 engines")
    assert text_of(cell_with(nb, "amr.wait_interactive()")).split() == [
        "RuntimeError", "ImpossibleDependency", "ImpossibleDependency", "DependencyTimeout",
        "WalltimeExceeded"]
