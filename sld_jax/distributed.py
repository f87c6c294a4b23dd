"""Multi-process start-up: ``jax.distributed.initialize`` from flags or environment.

The same command runs on one machine, a TPU pod slice or a GPU cluster:

* one process (the default): nothing to do;
* explicit: ``--coordinator_address=host:port --num_processes=N
  --process_id=i`` (or the environment variables ``SLD_COORDINATOR_ADDRESS``,
  ``SLD_NUM_PROCESSES``, ``SLD_PROCESS_ID``, ``SLD_LOCAL_DEVICE_IDS``);
* managed clusters: ``--distributed=auto`` (the default) also initializes
  when it sees a multi-host launcher (Cloud TPU pod workers, SLURM with more
  than one task, Open MPI with more than one rank); JAX then reads the
  coordinator and the process ids from that environment itself.

CPU-only multi-process runs (the two-process test on one machine) need CPU
collectives; ``gloo`` is switched on before initializing.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

from absl import logging
import jax

MODES = ("auto", "on", "off")
_CLUSTER_HINTS = (
    ("TPU_WORKER_HOSTNAMES", lambda v: "," in v),     # Cloud TPU pod slices
    ("MEGASCALE_COORDINATOR_ADDRESS", bool),           # multi-slice TPU
    ("SLURM_NTASKS", lambda v: v.isdigit() and int(v) > 1),
    ("OMPI_COMM_WORLD_SIZE", lambda v: v.isdigit() and int(v) > 1),
)


def _env_int(name: str) -> Optional[int]:
  value = os.environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def detected_cluster() -> Optional[str]:
  """The name of the first multi-host launcher variable found, if any."""
  for name, is_multi_host in _CLUSTER_HINTS:
    value = os.environ.get(name, "")
    if value and is_multi_host(value):
      return name
  return None


def initialize(mode: str = "auto",
               coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None,
               process_id: Optional[int] = None,
               local_device_ids: Optional[Sequence[int]] = None,
               initialization_timeout: int = 300) -> bool:
  """Connects this process to the others; returns whether it did.

  Arguments left as None are read from ``SLD_*`` environment variables; if
  still None, JAX's own cluster detection fills them in.

  Args:
    mode: "off" (never), "on" (always call ``jax.distributed.initialize``),
      "auto" (when a coordinator or process count is given, or a multi-host
      launcher is detected).
    coordinator_address: "host:port" of process 0's coordinator service.
    num_processes: total number of processes.
    process_id: this process's index in [0, num_processes).
    local_device_ids: devices this process drives (GPU clusters with one
      process per GPU).
    initialization_timeout: seconds to wait for every process to connect.
  """
  if mode not in MODES:
    raise ValueError(f"distributed mode must be one of {MODES}, got {mode!r}")
  coordinator_address = coordinator_address or os.environ.get("SLD_COORDINATOR_ADDRESS") or None
  if num_processes is None:
    num_processes = _env_int("SLD_NUM_PROCESSES")
  if process_id is None:
    process_id = _env_int("SLD_PROCESS_ID")
  if local_device_ids is None and os.environ.get("SLD_LOCAL_DEVICE_IDS"):
    local_device_ids = [int(i) for i in os.environ["SLD_LOCAL_DEVICE_IDS"].split(",")]

  if mode == "off":
    return False
  explicit = coordinator_address is not None or (num_processes or 1) > 1
  cluster = detected_cluster()
  if mode == "auto" and not explicit and cluster is None:
    return False
  if explicit and (coordinator_address is None or num_processes is None or process_id is None):
    raise ValueError(
        "multi-process run needs all of coordinator_address, num_processes and process_id "
        f"(got {coordinator_address!r}, {num_processes!r}, {process_id!r}); pass the "
        "--coordinator_address/--num_processes/--process_id flags or the SLD_* variables")

  # Collectives between CPU devices of different processes (harmless on
  # accelerators, where only the host-side CPU client uses it).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  logging.info("jax.distributed.initialize(coordinator=%s, num_processes=%s, process_id=%s)%s",
               coordinator_address, num_processes, process_id,
               f" [detected {cluster}]" if cluster else "")
  jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes,
      process_id=process_id, local_device_ids=local_device_ids,
      initialization_timeout=initialization_timeout)
  logging.info("process %d of %d; %d local of %d devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True

