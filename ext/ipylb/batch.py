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


def script(scheduler: str, job: Job) -> str:
    """The job script for ``scheduler`` (slurm, pbs or lsf)."""
    per = _per_node(job)
    cmd = _join_command(job, per)
    log = job.log_dir or job.cluster_file.parent
    lines = ["#!/bin/sh"]
    if scheduler == "slurm":
        lines += [f"#SBATCH --job-name={job.name}", f"#SBATCH --nodes={job.nodes}",
                  "#SBATCH --ntasks-per-node=1", f"#SBATCH --cpus-per-task={per}",
                  f"#SBATCH --output={log}/{job.name}-%j.log"]
        if job.time:
            lines.append(f"#SBATCH --time={_hms(job.time)}")
        if job.partition:
            lines.append(f"#SBATCH --partition={job.partition}")
        lines += [f"#SBATCH {a}" for a in job.extra]
        run = f"exec {cmd}" if job.nodes == 1 else f"exec srun --ntasks-per-node=1 {cmd}"
    elif scheduler == "pbs":
        lines += [f"#PBS -N {job.name}", f"#PBS -l select={job.nodes}:ncpus={per}",
                  "#PBS -j oe", f"#PBS -o {log}/"]
        if job.time:
            lines.append(f"#PBS -l walltime={_hms(job.time)}")
        if job.partition:
            lines.append(f"#PBS -q {job.partition}")
        lines += [f"#PBS {a}" for a in job.extra]
        # pbsdsh -u: once on each node of the job.
        run = f"exec {cmd}" if job.nodes == 1 else f"exec pbsdsh -u -- {cmd}"
    elif scheduler == "lsf":
        lines += [f"#BSUB -J {job.name}", f"#BSUB -n {job.engines}",
                  f'#BSUB -R "span[ptile={per}]"', f"#BSUB -o {log}/{job.name}-%J.log"]
        if job.time:
            h, m, _s = _hms(job.time).split(":")
            lines.append(f"#BSUB -W {int(h)}:{m}")
        if job.partition:
            lines.append(f"#BSUB -q {job.partition}")
        lines += [f"#BSUB {a}" for a in job.extra]
        # blaunch once per distinct host of the allocation.
        run = (f"exec {cmd}" if job.nodes == 1 else
               "for host in $(echo $LSB_HOSTS | tr ' ' '\\n' | sort -u); do\n"
               f"    blaunch \"$host\" {cmd} &\ndone\nwait")
    else:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    lines += ["", f"# {job.engines} ipylb engine(s) for the cluster of {job.cluster_file}", run, ""]
    return "\n".join(lines)


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
