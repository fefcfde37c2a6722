"""Engines as batch jobs: `ipylb engine submit` job scripts for SLURM, PBS and LSF
(--dry-run), and a real one-node SLURM cluster (tests/slurm.py, root only) on which a
submitted job's engines register, run a map, and go when `ipylb engine cancel` ends it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import ipylb
import pytest
from test_cluster import IPYLB, ipylb_cmd, runtime  # noqa: F401 - a fixture

sys.path.insert(0, str(Path(__file__).parent))
import slurm  # noqa: E402

JOIN = f"{sys.executable} -m ipylb engine join"


def dry(*args: str) -> str:
    out = ipylb_cmd("engine", "submit", "--dry-run", "--cluster-file", "/shared/c.json", *args)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_slurm_script_one_node():
    text = dry("-n", "3", "--scheduler", "slurm", "--time", "90", "--partition", "debug",
               "--sbatch-arg=--account=abc")
    lines = text.splitlines()
    assert lines[0] == "#!/bin/sh"
    for want in ("#SBATCH --nodes=1", "#SBATCH --cpus-per-task=3", "#SBATCH --time=01:30:00",
                 "#SBATCH --partition=debug", "#SBATCH --account=abc"):
        assert want in lines
    assert lines[-1] == f"exec {JOIN} -n 3 --cluster-file /shared/c.json"


def test_slurm_script_multi_node_uses_srun():
    text = dry("-n", "8", "--nodes", "4", "--scheduler", "slurm")
    assert "#SBATCH --nodes=4" in text and "#SBATCH --ntasks-per-node=1" in text
    assert text.splitlines()[-1] == \
        f"exec srun --ntasks-per-node=1 {JOIN} -n 2 --cluster-file /shared/c.json"


def test_pbs_script():
    text = dry("-n", "8", "--nodes", "2", "--scheduler", "pbs", "--time", "10:00", "--queue", "q1")
    lines = text.splitlines()
    for want in ("#PBS -l select=2:ncpus=4", "#PBS -l walltime=00:10:00", "#PBS -q q1"):
        assert want in lines
    assert lines[-1] == f"exec pbsdsh -u -- {JOIN} -n 4 --cluster-file /shared/c.json"


def test_lsf_script():
    text = dry("-n", "8", "--nodes", "2", "--scheduler", "lsf", "--time", "2:30:00")
    lines = text.splitlines()
    for want in ("#BSUB -n 8", '#BSUB -R "span[ptile=4]"', "#BSUB -W 2:30"):
        assert want in lines
    assert f'blaunch "$host" {JOIN} -n 4 --cluster-file /shared/c.json &' in text


@pytest.mark.parametrize(("args", "why"), [
    (("-n", "3", "--nodes", "2"), "must be a positive multiple of --nodes"),
    (("-n", "2", "--time", "1h"), "--time is minutes, MM:SS or HH:MM:SS"),
])
def test_bad_requests_are_refused(args, why):
    out = ipylb_cmd("engine", "submit", "--dry-run", "--scheduler", "slurm", *args)
    assert out.returncode == 1 and why in out.stderr


def test_submit_without_a_cluster_says_so(runtime):  # noqa: F811
    out = ipylb_cmd("engine", "submit", "-n", "2", "--scheduler", "slurm", "--profile", "none")
    assert out.returncode == 1 and "no ipylb cluster connection file" in out.stderr


@pytest.mark.skipif(slurm.unavailable() is not None, reason=str(slurm.unavailable()))
def test_slurm_job_engines_register_run_and_go_on_cancel(runtime, tmp_path):  # noqa: F811
    with slurm.cluster(tmp_path / "slurm") as env:
        os.environ["SLURM_CONF"] = env["SLURM_CONF"]  # for the ipylb commands below
        try:
            out = ipylb_cmd("cluster", "start", "-n", "0", "--daemon", "--profile", "s",
                            "--heartbeat-timeout", "3")
            assert out.returncode == 0, out.stderr
            out = ipylb_cmd("engine", "submit", "-n", "2", "--scheduler", "slurm",
                            "--profile", "s", "--time", "10")
            assert out.returncode == 0, out.stderr
            job_id = out.stdout.strip()
            assert job_id.isdigit()
            with ipylb.Client(profile="s") as rc:
                rc.wait_for_engines(2, 120)
                v = rc.load_balanced_view()
                assert v.map_sync(lambda x: 3 * x, range(10)) == [3 * x for x in range(10)]
                # The engines run inside the job.
                jobs = {v.apply_sync(lambda: os.environ.get("SLURM_JOB_ID")) for _ in range(4)}
                assert jobs == {job_id}
                out = ipylb_cmd("engine", "cancel", "--profile", "s")
                assert out.returncode == 0, out.stderr
                assert f"cancelled job(s) {job_id}" in out.stderr
                deadline = time.monotonic() + 60
                while rc.ids:  # the controller sees them go
                    assert time.monotonic() < deadline, rc.ids
                    time.sleep(0.2)
            queue = subprocess.run(["squeue", "-h", "-j", job_id], env=env, capture_output=True,
                                   text=True)
            assert job_id not in queue.stdout
            again = ipylb_cmd("engine", "cancel", "--profile", "s")
            assert "no submitted jobs to cancel" in again.stderr
        finally:
            os.environ.pop("SLURM_CONF", None)
            ipylb_cmd("cluster", "stop", "--profile", "s")
