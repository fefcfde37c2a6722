"""``ipylb bench``'s reference farms and its side-by-side table (real worker processes)."""

from ipylb.bench import farm


class _Renamed(farm.ProcessPool):
    name = "other pool"


def test_process_pool_reference_runs_the_workloads_it_can_and_table_has_a_ratio_per_reference():
    lines: list[str] = []
    medians = farm.compare([farm.ProcessPool(), _Renamed()], rounds=1, engines=2,
                           workloads=["latency", "payload", "dag"], out=lines.append)
    pool = medians["ProcessPool"]
    # dag needs dependencies, which a bare pool does not have: skipped, not faked.
    assert "dag_tasks_per_s" not in pool
    assert pool["payload_MB_per_s"] > 0 and pool["latency_p50_ms"] > 0
    header = next(line for line in lines if line.startswith("metric"))
    assert "/other pool" in header
    row = next(line for line in lines if line.startswith("payload_MB_per_s"))
    ratio = float(row.split()[3])
    assert abs(ratio - pool["payload_MB_per_s"] / medians["other pool"]["payload_MB_per_s"]) <= 0.005


def test_a_stopped_farm_lets_go_of_its_round():
    """Between rounds nothing of a stopped farm is kept: its client (or pool), with every
    result of the round, is freed before the next farm runs (held, they made the bench's
    garbage collections take seconds under load, stalling the next farm: stall.md)."""
    import gc
    import weakref

    import ipylb

    f = farm.Ipylb()
    farm.run_round(f, 1, ["latency"])
    assert not hasattr(f, "rc")
    pool = farm.ProcessPool()
    farm.run_round(pool, 1, ["latency"])
    assert not hasattr(pool, "pool")
    rc = ipylb.Client(engines=1)  # what the farm held: freed once dropped (no cycle keeps it)
    assert rc.load_balanced_view().apply_sync(abs, -1) == 1
    rc.shutdown()
    ref = weakref.ref(rc)
    del rc
    gc.collect()
    assert ref() is None
