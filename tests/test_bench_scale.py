"""Scale benchmarks (issue 14 items 5 and 7): a swarm of engine identities against a real
controller, and many real engine kernels (``ipylb bench --kernels``)."""

import glob
import os
import tempfile

import pytest
from ipylb.bench import kernels, main, swarm


def test_swarm_identities_register_answer_heartbeats_and_run_every_task():
    # 40 identities in 4 processes speaking the engine protocol to a real controller:
    # every one registers, the controller's heartbeats keep them alive through the idle
    # window, and a map of 600 no-ops comes back complete (measure() checks every value).
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "ipylb-swarm-*")))
    fig = swarm.measure(40, 600, idle_s=1.0, latency_n=20)
    # The swarm's heartbeat socket files are gone with it (the controller stopped it).
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "ipylb-swarm-*"))) <= before
    assert fig["register_s"] < 60
    assert fig["tasks_per_s"] > 0 and fig["latency_p50_ms"] > 0
    assert fig["rss_MB"] > 0


@pytest.mark.parametrize("argv, said", [
    (["--kernels", "4", "--workloads", "map"], "--workloads has no effect with --kernels"),
    (["--kernels", "4", "--core"], "--core, --kernels are different runs"),
    (["--kernels", "0"], "--kernels and --tasks must be at least 1"),
    (["--tasks", "10"], "--tasks has no effect with the farm run"),
])
def test_bench_kernels_options_refused_with_a_reason(argv, said, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert said in capsys.readouterr().err


@pytest.mark.slow
def test_64_engine_kernels_register_and_run_an_8000_task_map():
    # Issue 14 item 7: on this 2-core machine they register in 13-18.5 s at load 4-35 (20 s
    # is the aim; the assertion leaves room for a more loaded one); measure() checks all 64
    # registered and every result of the map.
    lines: list[str] = []
    fig = kernels.main(1, 64, 8000, out=lines.append)
    assert fig["startup_s"] < 60
    assert fig["map_tasks_per_s"] > 0
    assert 0 < fig["controller_rss_MB"] < 500
    assert any(line.startswith("64 engine kernels") for line in lines)
