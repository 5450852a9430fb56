"""Joining a multi-process run through jax.distributed (JAX is the distributed engine)."""

import glob
import importlib.util
import os

import jax
from absl import logging


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Explicit flags win; on a TPU VM pod or under SLURM, JAX detects the cluster itself.

  With no flags and no detectable cluster this is a single-process run.
  """
  if coordinator_address or num_processes is not None or process_id is not None:
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
  elif _in_cluster():
    jax.distributed.initialize()
  else:
    return
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def _in_cluster() -> bool:
  """SLURM with several tasks, or a Cloud TPU VM (where JAX finds the slice's hosts from
  the metadata server; on a single-host VM it simply finds one process)."""
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")  # GKE TPU pods
  if len([h for h in hosts.split(",") if h]) > 1:
    return True
  # A Cloud TPU VM: the TPU runtime is installed and TPU chips are attached.
  return importlib.util.find_spec("libtpu") is not None and bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))
