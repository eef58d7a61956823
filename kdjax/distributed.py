"""Multi-host start-up: one kdjax process per host (or per GPU), all running the same command.

JAX's multi-controller model: every process runs the same program, `jax.distributed.initialize`
connects them through a coordinator (process 0), after which `jax.devices()` lists the devices
of all processes and one jitted step spans them all. kdjax calls it

  - with `--coordinator HOST:PORT --num-processes N --process-id I` when they are given, or
  - with no arguments (JAX reads the cluster's environment) under SLURM (srun, more than one
    task), Open MPI (mpirun, more than one rank) or on a Cloud TPU VM,

and never otherwise, so a laptop or single-GPU run starts no coordinator service.
"""

from __future__ import annotations

import glob
import importlib.util
import os

import jax


def detect_cluster() -> str | None:
    """The multi-process launcher this process runs under: "slurm", "ompi", "tpu" or None.

    SLURM and Open MPI count only with more than one task: a single-task step needs no
    coordinator. The variables are those jax.distributed.initialize() itself reads.
    """
    env = os.environ
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
             "SLURM_LOCALID")
    if all(k in env for k in slurm) and int(env["SLURM_NTASKS"]) > 1:
        return "slurm"
    # Open MPI 4 publishes its launcher's address; Open MPI 5 does not (pass --coordinator).
    if "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "ompi"
    # A Cloud TPU VM: libtpu installed and TPU chips attached. JAX finds the pod slice's other
    # workers from the TPU metadata (one worker: a cluster of one, which is harmless).
    if importlib.util.find_spec("libtpu") and (glob.glob("/dev/accel*")
                                                or glob.glob("/dev/vfio/[0-9]*")):
        return "tpu"
    return None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> str | None:
    """Join the multi-process run, if any; returns how it was configured ("flags", a
    `detect_cluster()` name) or None for a single process. Call before any JAX computation."""
    flags = (coordinator, num_processes, process_id)
    if all(f is None for f in flags):
        cluster = detect_cluster()
        if cluster is None:
            return None
        _enable_cpu_collectives()
        jax.distributed.initialize()
        return cluster
    if None in flags:
        missing = [name for name, f in zip(("--coordinator", "--num-processes", "--process-id"),
                                           flags) if f is None]
        raise ValueError(f"multi-process runs need --coordinator, --num-processes and "
                         f"--process-id together; missing {' '.join(missing)}")
    host, sep, port = coordinator.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--coordinator={coordinator!r} must be HOST:PORT, e.g. "
                         f"--coordinator=10.0.0.1:1234 (the address of process 0)")
    if num_processes < 1:
        raise ValueError(f"--num-processes={num_processes} must be >= 1")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id={process_id} must be in [0, {num_processes - 1}] for "
                         f"--num-processes={num_processes}")
    _enable_cpu_collectives()
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
    return "flags"


def _enable_cpu_collectives() -> None:
    # CPU devices of different processes talk through gloo (the default in recent JAX, unset in
    # older ones); a user's choice (e.g. "mpi") is kept. GPUs and TPUs use NCCL / ICI regardless.
    if not jax.config.jax_cpu_collectives_implementation:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def is_primary() -> bool:
    """Process 0 writes the run's files (config, metrics, summary); all write checkpoints."""
    return jax.process_index() == 0
