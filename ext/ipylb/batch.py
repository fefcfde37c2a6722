"""``ipylb engine submit`` / ``ipylb engine cancel``: engines as a batch job.

Thin glue over the batch system a site already runs: a job script whose only work
is ``ipylb engine join`` (once per node, through the scheduler's own launcher for
multi-node jobs: ``srun``, ``pbsdsh``, ``blaunch``), submitted with ``sbatch``,
``qsub`` or ``bsub``.  The job's nodes read the cluster's connection file where
this host sees it, so it must be on a filesystem they share (the home directory,
as usual on HPC clusters); the key never appears on a command line.  Submitted
job ids are kept beside the connection file, so ``ipylb engine cancel`` can
cancel them (``scancel``, ``qdel``, ``bkill``).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from . import connection

SCHEDULERS = ("slurm", "pbs", "lsf")


@dataclass
class Job:
    """What to ask the batch system for."""

    engines: int
    cluster_file: Path
    nodes: int = 1
    time: str | None = None  # walltime, [HH:]MM:SS or minutes
    partition: str | None = None  # SLURM partition; PBS and LSF queue
    extra: tuple[str, ...] = ()  # more directives, passed through as the scheduler reads them
    name: str = "ipylb-engines"
    log_dir: Path | None = None


def _join_command(job: Job, per_node: int) -> str:
    """The command each node runs: this interpreter's ipylb, so the job gets the same
    installation (the norm where nodes share the filesystem)."""
    return shlex.join([sys.executable, "-m", "ipylb", "engine", "join", "-n", str(per_node),
                       "--cluster-file", str(job.cluster_file)])


def _per_node(job: Job) -> int:
    if job.engines < 1 or job.nodes < 1 or job.engines % job.nodes:
        raise ValueError(f"-n ({job.engines}) must be a positive multiple of --nodes "
                         f"({job.nodes}): every node runs the same number of engines")
    return job.engines // job.nodes


def _hms(time: str) -> str:
    """A walltime as HH:MM:SS (accepts minutes, MM:SS or HH:MM:SS); ValueError otherwise."""
    parts = time.split(":")
    if not 1 <= len(parts) <= 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"--time is minutes, MM:SS or HH:MM:SS, got {time!r}")
    if len(parts) == 1:
        return f"{int(parts[0]) // 60:02d}:{int(parts[0]) % 60:02d}:00"
    if len(parts) == 2:
        parts = ["0", *parts]
    return ":".join(f"{int(p):02d}" for p in parts)


def _lsf_time(hms: str) -> str:
    h, m, _s = hms.split(":")
    return f"-W {int(h)}:{m}"


# Per scheduler: directive prefix, how walltime and queue are asked for, and how the join
# command runs once on each node of a multi-node job.
_PREFIX = {"slurm": "#SBATCH", "pbs": "#PBS", "lsf": "#BSUB"}
_TIME = {"slurm": "--time={}".format, "pbs": "-l walltime={}".format, "lsf": _lsf_time}
_QUEUE = {"slurm": "--partition={}", "pbs": "-q {}", "lsf": "-q {}"}
_PER_NODE = {
    "slurm": "exec srun --ntasks-per-node=1 {}",
    "pbs": "exec pbsdsh -u -- {}",  # -u: once on each node
    "lsf": ("for host in $(echo $LSB_HOSTS | tr ' ' '\\n' | sort -u); do\n"
            '    blaunch "$host" {} &\ndone\nwait'),  # once per distinct host
}


def _resources(scheduler: str, job: Job, per: int, log: Path) -> list[str]:
    if scheduler == "slurm":
        return [f"--job-name={job.name}", f"--nodes={job.nodes}", "--ntasks-per-node=1",
                f"--cpus-per-task={per}", f"--output={log}/{job.name}-%j.log"]
    if scheduler == "pbs":
        return [f"-N {job.name}", f"-l select={job.nodes}:ncpus={per}", "-j oe", f"-o {log}/"]
    return [f"-J {job.name}", f"-n {job.engines}", f'-R "span[ptile={per}]"',
            f"-o {log}/{job.name}-%J.log"]


def script(scheduler: str, job: Job) -> str:
    """The job script for ``scheduler`` (slurm, pbs or lsf); ValueError for another, or for
    a request that cannot be met (see :func:`_per_node`, :func:`_hms`)."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    per = _per_node(job)
    cmd = _join_command(job, per)
    directives = _resources(scheduler, job, per, job.log_dir or job.cluster_file.parent)
    if job.time:
        directives.append(_TIME[scheduler](_hms(job.time)))
    if job.partition:
        directives.append(_QUEUE[scheduler].format(job.partition))
    directives += job.extra
    run = f"exec {cmd}" if job.nodes == 1 else _PER_NODE[scheduler].format(cmd)
    return "\n".join(["#!/bin/sh", *(f"{_PREFIX[scheduler]} {d}" for d in directives), "",
                      f"# {job.engines} ipylb engine(s) for the cluster of {job.cluster_file}",
                      run, ""])


SUBMIT = {"slurm": ["sbatch", "--parsable"], "pbs": ["qsub"], "lsf": ["bsub"]}
CANCEL = {"slurm": ["scancel"], "pbs": ["qdel"], "lsf": ["bkill"]}


def submit(scheduler: str, job: Job) -> str:
    """Submit the job script; returns the job id, recorded for :func:`cancel`.

    Raises RuntimeError with the scheduler's own message if it refuses, FileNotFoundError
    (reworded) if its command is not installed here."""
    text = script(scheduler, job)
    argv = SUBMIT[scheduler]
    try:
        if scheduler == "lsf":  # bsub reads the script (and its #BSUB lines) on stdin
            out = subprocess.run(argv, input=text, capture_output=True, text=True, timeout=60)
        else:
            path = job.cluster_file.parent / f"{job.name}.{scheduler}.sh"
            path.write_text(text)
            out = subprocess.run([*argv, str(path)], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise RuntimeError(f"`{argv[0]}` is not installed on this host: submit from a host of "
                           f"the {scheduler} cluster, or see the script with --dry-run") from None
    if out.returncode != 0:
        raise RuntimeError(f"{argv[0]} refused the job: {out.stderr.strip() or out.stdout.strip()}")
    job_id = _job_id(scheduler, out.stdout)
    record = _jobs_file(job.cluster_file)
    jobs = _read_jobs(record)
    jobs.append({"scheduler": scheduler, "id": job_id})
    connection.write(record, {"jobs": jobs})
    return job_id


def _job_id(scheduler: str, stdout: str) -> str:
    text = stdout.strip()
    if scheduler == "slurm":
        return text.split(";")[0]  # --parsable: "id" or "id;cluster"
    if scheduler == "lsf":  # "Job <123> is submitted to queue <normal>."
        m = re.search(r"<(\d+)>", text)
        return m.group(1) if m else text
    return text  # qsub: "123.server"


def _jobs_file(cluster_file: Path) -> Path:
    return cluster_file.with_name(cluster_file.stem + "-jobs.json")


def _read_jobs(path: Path) -> list[dict[str, str]]:
    try:
        return list(json.loads(path.read_text())["jobs"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def cancel(cluster_file: Path, job_id: str | None = None) -> list[str]:
    """Cancel the jobs submitted for this cluster (or just ``job_id``); returns their ids.
    RuntimeError if the scheduler refuses one (the others are still cancelled)."""
    record = _jobs_file(cluster_file)
    jobs = _read_jobs(record)
    if job_id is not None:
        chosen = [j for j in jobs if j["id"] == job_id]
        if not chosen:
            raise ValueError(f"job {job_id} was not submitted by `ipylb engine submit` for "
                             f"{cluster_file} (submitted: {', '.join(j['id'] for j in jobs) or 'none'})")
    else:
        chosen = jobs
    failed, done = [], []
    for j in chosen:
        out = subprocess.run([*CANCEL[j["scheduler"]], j["id"]], capture_output=True, text=True,
                             timeout=60)
        (done if out.returncode == 0 else failed).append((j, out.stderr.strip()))
    left = [j for j in jobs if j not in [d for d, _ in done]]
    if left:
        connection.write(record, {"jobs": left})
    else:
        record.unlink(missing_ok=True)
    if failed:
        raise RuntimeError("; ".join(f"job {j['id']}: {why}" for j, why in failed))
    return [j["id"] for j, _ in done]
