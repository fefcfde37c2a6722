"""Write the demo notebooks (without outputs) from the cells below.

Run ``python notebooks/build.py`` after editing a cell here; the ``.ipynb`` files
are what users open and what ``tests/test_notebooks.py`` executes.  A cell given
as ``("raises", source)`` is expected to fail (nbclient's ``raises-exception`` tag):
it shows how an error looks.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent


def md(text: str) -> tuple[str, str]:
    """A markdown cell."""
    return ("md", text)


QUICKSTART = [
    md("""# ipylb quickstart

`ipylb.Client(engines=2)` starts a controller and two engine kernels on this machine;
a `LoadBalancedView` runs each task on whichever engine the scheduler picks."""),
    """import time

import ipylb

rc = ipylb.Client(engines=2)
lview = rc.load_balanced_view()
rc.ids""",
    md("## Parallel map equals serial map"),
    """serial_result = list(map(lambda x: x**10, range(32)))
parallel_result = lview.map_sync(lambda x: x**10, range(32))
assert parallel_result == serial_result
parallel_result[:4]""",
    md("## `@parallel`: a function whose `.map` runs on the engines"),
    """@lview.parallel(block=True)
def f(x):
    return 10.0 * x**4

assert f.map(range(32)) == [10.0 * x**4 for x in range(32)]
f(3)  # one call is one task""",
    md("""## Iterating a map's results as they arrive

With `ordered=False`, items come in the order the engines finish them."""),
    """def slow_square(x):
    time.sleep(0.1 * (x % 3))
    return x * x

amr = lview.map_async(slow_square, range(8), ordered=False)
for y in amr:
    print(y, end=" ")
assert amr.get() == [x * x for x in range(8)]  # get() is in submission order""",
    md("## One task: its value, where it ran, what it printed"),
    """def greet(name):
    print("hello,", name)
    return len(name)

ar = lview.apply_async(greet, "ipylb")
ar.get(timeout=10), ar.metadata.engine_id, ar.stdout""",
    md("`wait_interactive()` shows a progress bar while a map runs:"),
    """amr = lview.map_async(slow_square, range(12))
amr.wait_interactive()
amr.get()""",
    "rc.shutdown()",
    md("""## The same with the magics

`%load_ext ipylb` adds the magics; `%lb_start -n 2` starts a cluster that belongs to this
kernel (it stops with `%lb_stop`, or when the kernel shuts down or restarts)."""),
    """%load_ext ipylb
%lb_start -n 2""",
    md("""`%%lb` runs a cell on an engine, in the engine's namespace. The value of the last
expression is the cell's result, and what the engine printed shows below the cell."""),
    """%%lb
print("hello from engine", ipylb_engine_id)
sum(x**10 for x in range(32))""",
    md("`%lbmap FUNC ITERABLE` is `list(map(FUNC, ITERABLE))` on the engines:"),
    """parallel_result = %lbmap lambda x: x**10 range(32)
assert parallel_result == serial_result""",
    md("""`-a` returns at once, `-o NAME` binds the AsyncResult, and `--after NAME` waits for
another task first:"""),
    """%%lb -a -o first
import time
time.sleep(0.5)
"first is done"
""",
    """%%lb --after first -o second
"second ran after the first"
""",
    "first.get(), second.metadata.started >= first.metadata.completed",
    md("A task that raises shows its remote traceback, like a local error:"),
    ("raises", """%%lb
def ratio(a, b):
    return a / b

ratio(1, 0)"""),
    "%lb_stop",
]

DEPENDENCIES = [
    md("""# Dependencies

*When* a task may run (`after`), *where* (`follow`), *whether* an engine can run it
(`@require`, `@depend`), and what happens when a dependency can never be met."""),
    """import time

import ipylb
from ipylb import Dependency, depend, require
from ipylb.error import DependencyTimeout, ImpossibleDependency

rc = ipylb.Client(engines=2)
view = rc.load_balanced_view()


def stamp(label, delay=0.2):
    \"\"\"A task that says when it ran.\"\"\"
    start = time.time()
    time.sleep(delay)
    return label, start, time.time()""",
    md("## `after`: run once other tasks have succeeded"),
    """a = view.apply_async(stamp, "a", 0.5)
with view.temp_flags(after=[a]):
    b = view.apply_async(stamp, "b")
assert b.get(10)[1] >= a.get()[2]  # b started after a ended
b.get()""",
    md("## `follow`: run where other tasks ran"),
    """with view.temp_flags(follow=[a]):
    c = view.apply_async(stamp, "c")
c.get(10)
assert c.engine_id == a.engine_id
c.engine_id""",
    md("""A `Dependency` says which outcomes count: here, run a clean-up only if a task
*failed*."""),
    """def broken():
    raise ValueError("something went wrong")

failed = view.apply_async(broken)
with view.temp_flags(after=Dependency([failed], success=False, failure=True)):
    cleanup = view.apply_async(lambda: "cleaning up after the failure")
cleanup.get(10)""",
    md("""## Functional dependencies

`@require` names modules (imported on the engine for the task) or functions;
`@depend(g, *args)` runs `g` on the engine first, and the task only runs where `g` does
not return `False`."""),
    """@require("math")
def hypotenuse(a, b):
    return math.sqrt(a * a + b * b)

view.apply_sync(hypotenuse, 3, 4)""",
    """def on_engine(i):
    return ipylb_engine_id == i  # bound in every engine's namespace


@depend(on_engine, 1)
def where():
    return ipylb_engine_id

[view.apply_async(where).get(10) for _ in range(4)]""",
    md("""## A DAG from a plain dict of edges

Each task lists the tasks it needs; submitting in topological order lets every task
name its parents' AsyncResults in `after`."""),
    """from graphlib import TopologicalSorter

edges = {
    "fetch": [],
    "clean": ["fetch"],
    "features": ["clean"],
    "stats": ["clean"],
    "report": ["features", "stats"],
}
results = {}
for name in TopologicalSorter(edges).static_order():
    with view.temp_flags(after=[results[parent] for parent in edges[name]]):
        results[name] = view.apply_async(stamp, name, 0.1)

rc.wait(list(results.values()), timeout=30)
for name, parents in edges.items():
    for parent in parents:
        assert results[name].get()[1] >= results[parent].get()[2], (parent, name)

t0 = min(ar.get()[1] for ar in results.values())
for name, ar in sorted(results.items(), key=lambda kv: kv[1].get()[1]):
    _, start, end = ar.get()
    print(f"{name:>9}  engine {ar.engine_id}  {start - t0:5.2f}s -> {end - t0:5.2f}s")""",
    md("""## An impossible dependency

`child` needs `broken_task` to succeed, and `grandchild` needs `child`. When
`broken_task` fails, both fail at once with `ImpossibleDependency`, and the message
names the root cause and the chain, instead of waiting forever."""),
    """broken_task = view.apply_async(broken)
with view.temp_flags(after=[broken_task]):
    child = view.apply_async(stamp, "child")
with view.temp_flags(after=[child]):
    grandchild = view.apply_async(stamp, "grandchild")

try:
    grandchild.get(10)
except ImpossibleDependency as e:
    print(f"{type(e).__name__}: {e}")""",
    md("Without the `try`, this is what the notebook shows:"),
    ("raises", "grandchild.get(10)"),
    md("""A module that no engine can import is impossible too (ipylb does not wait forever),
and a `timeout` bounds how long a task may wait for its dependencies:"""),
    """@require("no_such_module_anywhere")
def needs_missing_module():
    return 1

try:
    view.apply_sync(needs_missing_module)
except ImpossibleDependency as e:
    print(f"{type(e).__name__}: {e}")

slow = view.apply_async(stamp, "slow", 1.0)
with view.temp_flags(after=[slow], timeout=0.2):
    impatient = view.apply_async(stamp, "impatient")
try:
    impatient.get(10)
except DependencyTimeout as e:
    print(f"{type(e).__name__}: {e}")""",
    md("`rc.failures` keeps the recent failures (the dashboard lists them):"),
    """for m in rc.failures:
    print(m.msg_id, m.error.ename)""",
    "rc.shutdown()",
]

DASHBOARD = [
    md("""# The dashboard

`rc.dashboard()` (or `%lb_dashboard`) shows the cluster live: a progress bar per
submission (named by its `label`), the task stream (a lane per engine, a bar per task over
the last minute, coloured by label or function, failures marked), queue depth and
throughput over time, the engines' health (CPU, memory, current task) and the recent
failures with their reasons, impossible-dependency chains as trees. It updates from a
background thread, so the notebook stays free to run other cells. In a terminal,
`ipylb top` shows the same."""),
    """import random
import time

import ipylb

rc = ipylb.Client(engines=2)
view = rc.load_balanced_view()
dash = rc.dashboard()
dash""",
    md("## Heterogeneous tasks: short and long ones, a failure, an impossible chain, a timeout, "
       "a walltime kill"),
    """def work(seconds):
    time.sleep(seconds)
    return seconds


def flaky():
    raise RuntimeError("this task fails on purpose")


bad = view.apply_async(flaky)
with view.temp_flags(after=[bad]):
    doomed = view.apply_async(work, 0.1)      # ImpossibleDependency: bad fails
with view.temp_flags(after=[doomed]):
    doomed2 = view.apply_async(work, 0.1)     # ... and so does what waits for doomed

random.seed(5)
durations = [random.choice([0.05, 0.1, 0.3, 0.6]) for _ in range(40)]
with view.temp_flags(label="simulate"):
    amr = view.map_async(work, durations)
with view.temp_flags(after=[amr], timeout=0.5):
    impatient = view.apply_async(work, 0.1)   # DependencyTimeout: the map takes longer
with view.temp_flags(walltime=1.0, label="too slow"):
    slow = view.apply_async(work, 60)         # WalltimeExceeded: interrupted after 1 s""",
    md("While the tasks run, the notebook answers at once:"),
    """print(f"{len(dash.rows)} engines, {rc.queue_status()['unassigned']} tasks waiting for one")""",
    """amr.wait_interactive()
assert amr.get() == durations
for ar in (bad, doomed, doomed2, impatient, slow):
    try:
        ar.get(10)
    except ipylb.error.RemoteError as e:
        print(e.ename)""",
    md("`dash.close()` stops the panel's updates; shutting the client down stops it too."),
    """dash.close()
rc.shutdown()""",
]


def build(cells: list, name: str) -> None:
    """Write ``name`` from ``cells``: code strings, ``md(text)`` and ``("raises", code)``."""
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, cell in enumerate(cells):
        if isinstance(cell, str):
            c = new_code_cell(cell)
        elif cell[0] == "md":
            c = new_markdown_cell(cell[1])
        else:
            c = new_code_cell(cell[1], metadata={"tags": ["raises-exception"]})
        c["id"] = f"{name[:2]}-{i:02d}"
        nb.cells.append(c)
    nbformat.validate(nb)
    nbformat.write(nb, HERE / name)


if __name__ == "__main__":
    build(QUICKSTART, "01-quickstart.ipynb")
    build(DEPENDENCIES, "02-dependencies.ipynb")
    build(DASHBOARD, "03-dashboard.ipynb")
