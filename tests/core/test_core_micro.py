"""The core micro benchmark runs end to end and prints its table (tiny sizes here)."""

from __future__ import annotations

from ipylb.bench import core_micro


def test_micro_benchmark_prints_a_row_per_engine_count_and_size_and_pair_costs(capsys):
    core_micro.main(["--sizes", "200,400", "--engines", "2,5", "--repeats", "300", "--runs", "1"])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [(r[0], r[1]) for r in rows] == [("2", "200"), ("2", "400"), ("5", "200"), ("5", "400")]
    assert all(float(r[4].replace(",", "")) > 0 for r in rows)  # overall events/s
    # µs/event with the default GC, under the controller's GC policy, and with the GC paused
    assert all(len(r) == 11 and min(map(float, r[5:8])) > 0 for r in rows)
    assert "µs/event with the controller's GC policy, slowest / fastest:" in out
    assert "µs/event with the default GC, slowest / fastest:" in out
    pairs = {line.split()[0]: line.split()[1:] for line in out.splitlines()
             if line.split() and line.split()[0] in core_micro.SCHEMES}
    assert set(pairs) == set(core_micro.SCHEMES)
    assert all(len(v) == 3 and float(v[0]) > 0 for v in pairs.values())  # E=2, E=5, ratio



def test_workload_mixes_plain_and_dependent_tasks_on_earlier_ones():
    subs = core_micro._workload(500, seed=1)
    deps = [s for s in subs if s.after is not None]
    assert 150 < len(deps) < 350
    index = {s.task_id: i for i, s in enumerate(subs)}
    assert all(index[d] < index[s.task_id] for s in deps for d in s.after.ids)


def test_run_dag_completes_every_task():
    ts, tc, events = core_micro.run_dag(300, engines=3)
    assert events == 600 and ts > 0 and tc > 0
