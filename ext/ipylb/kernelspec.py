"""``ipylb kernelspec install``: kernelspecs whose kernels are ipylb engines, started by
any jupyter_client kernel provisioner (``ipylb cluster start --kernel NAME``).

An engine needs the cluster's key.  It never travels on a command line (a remote
provisioner such as gateway_provisioners' ``DistributedProvisioner`` runs the
kernelspec's argv and exports its ``env`` in a shell command over SSH, which other
users of that host can read in the process list): the kernelspec's env names the
cluster's connection file, ``IPYLB_CLUSTER_FILE``, on a filesystem the engine's host
sees (home directories are shared on HPC clusters), and the file itself stays 0600.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

# gateway_provisioners' SSH provisioner, and the launcher script its kernelspecs run.
DISTRIBUTED = "distributed-provisioner"
ENGINE_CLASS = "ipylb.engine.kernel.EngineKernel"


def spec(name: str, python: str, provisioner: str | None, config: dict[str, Any],
         cluster_file: str | None, launcher: str | None = None) -> dict[str, Any]:
    """The kernel.json of an engine kernelspec.  ``launcher``: the path of
    gateway_provisioners' launch_ipykernel.py, for the distributed provisioner."""
    if provisioner == DISTRIBUTED:
        # Its launcher starts IPKernelApp with our kernel class, listens on 0.0.0.0 and
        # sends its connection info back (encrypted) to the provisioner's response address.
        argv = [python, launcher or "{resource_dir}/launch_ipykernel.py",
                "--kernel-id", "{kernel_id}", "--port-range", "{port_range}",
                "--response-address", "{response_address}", "--public-key", "{public_key}",
                "--kernel-class-name", ENGINE_CLASS]
    else:
        argv = [python, "-m", "ipylb.engine", "-f", "{connection_file}"]
    kernel: dict[str, Any] = {
        "argv": argv,
        "display_name": f"ipylb engine ({name})",
        "language": "python",
        "interrupt_mode": "signal",
        # ipylb.engine serves its channels under the CurveZMQ keys of its connection file
        # (IPKernelApp's); the SSH launcher's kernel reads none.
        "metadata": {"debugger": False} if provisioner == DISTRIBUTED else
                    {"debugger": False, "supported_encryption": ["curve"]},
        "env": {"IPYLB_CLUSTER_FILE": cluster_file} if cluster_file else {},
    }
    if provisioner == DISTRIBUTED:  # its parent is a shell that exits at once: do not watch it
        kernel["env"]["IPYLB_DETACHED"] = "1"
    if provisioner:
        kernel["metadata"]["kernel_provisioner"] = {"provisioner_name": provisioner,
                                                    "config": config}
    return kernel


def _distributed_scripts() -> list[Path]:
    try:
        import gateway_provisioners
    except ImportError:
        raise ValueError(f"--provisioner {DISTRIBUTED} is gateway_provisioners' SSH "
                         "provisioner: `pip install gateway_provisioners` first") from None
    # Assembled as its own ssh kernelspecs are: the python launcher, then the shared
    # server_listener.py over the placeholder of the same name.
    root = Path(gateway_provisioners.__file__).parent / "kernel-launchers"
    scripts = [*(root / "python" / "scripts").glob("*.py"), *(root / "shared" / "scripts").glob("*.py")]
    if not (root / "python" / "scripts" / "launch_ipykernel.py").exists():
        raise ValueError(f"gateway_provisioners has no launch_ipykernel.py under {root}")
    return scripts


def install(name: str, provisioner: str | None = None, config: dict[str, Any] | None = None,
            cluster_file: str | None = None, python: str | None = None,
            user: bool = False) -> str:
    """Write kernelspec ``name`` (in the user's Jupyter data dir with ``user``, else this
    environment's); returns where.  ValueError for a provisioner that is not installed."""
    from importlib.metadata import entry_points

    from jupyter_client.kernelspec import KernelSpecManager

    installed = {e.name for e in entry_points(group="jupyter_client.kernel_provisioners")}
    if provisioner and provisioner not in installed:
        raise ValueError(f"no kernel provisioner {provisioner!r} is installed here "
                         "(`jupyter kernelspec provisioners` lists those that are)")
    if cluster_file is not None:  # it may not exist yet: a profile's file is rewritten each start
        cluster_file = str(Path(cluster_file).expanduser().resolve())
    with tempfile.TemporaryDirectory() as tmp:
        launcher = None
        if provisioner == DISTRIBUTED:
            launcher = "{resource_dir}/launch_ipykernel.py"
            for script in _distributed_scripts():  # the launcher and its listener
                shutil.copy(script, Path(tmp) / script.name)
        kernel = spec(name, python or sys.executable, provisioner, config or {}, cluster_file,
                      launcher)
        (Path(tmp) / "kernel.json").write_text(json.dumps(kernel, indent=1))
        where = KernelSpecManager().install_kernel_spec(tmp, name, user=user,
                                                        prefix=None if user else sys.prefix)
    if launcher is not None:  # remote provisioners do not expand {resource_dir}: a real path
        kernel["argv"][1] = str(Path(where) / "launch_ipykernel.py")
        (Path(where) / "kernel.json").write_text(json.dumps(kernel, indent=1))
    return where
