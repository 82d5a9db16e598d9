"""How a training process joins its ``jax.distributed`` job (no flags here, so tests can
call it with any environment).

Sources, first match wins:

1. explicit ``coordinator_address`` (with ``num_processes`` and ``process_id``), from
   launch.train's flags;
2. a SLURM step of more than one task (``launch/slurm.sbatch``): ``SLURM_NTASKS`` and
   ``SLURM_PROCID`` (set by srun for each task) and ``FACEDIFF_COORDINATOR_HOST`` /
   ``FACEDIFF_COORDINATOR_PORT`` (default 12355; set by the sbatch script to the
   allocation's first node);
3. ``auto`` (``--distributed``): ``jax.distributed.initialize()`` with no arguments,
   which finds the other hosts of a Cloud TPU VM slice by itself (``launch/tpu_vm.sh``).

Otherwise (one process, or a one-task SLURM step) nothing is initialised.
"""

from __future__ import annotations

from typing import Any, Mapping

DEFAULT_PORT = 12355


def initialize_args(
  env: Mapping[str, str],
  *,
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  auto: bool = False,
) -> dict[str, Any] | None:
  """The keyword arguments for ``jax.distributed.initialize`` ({} = no arguments), or
  None when this process runs alone."""
  if coordinator_address is not None:  # None counts: jax fills them in where it can
    return dict(
      coordinator_address=coordinator_address,
      num_processes=num_processes,
      process_id=process_id,
    )
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
    host = env.get("FACEDIFF_COORDINATOR_HOST")
    if not host:
      raise ValueError(
        f"SLURM_NTASKS={env['SLURM_NTASKS']} but FACEDIFF_COORDINATOR_HOST is not set: "
        "start multi-task SLURM jobs with launch/slurm.sbatch (it sets it to the first "
        "node of the allocation)"
      )
    if "SLURM_PROCID" not in env:
      raise ValueError("SLURM_NTASKS is set but SLURM_PROCID is not: start the tasks with srun")
    port = int(env.get("FACEDIFF_COORDINATOR_PORT") or DEFAULT_PORT)
    return dict(
      coordinator_address=f"{host}:{port}",
      num_processes=int(env["SLURM_NTASKS"]),
      process_id=int(env["SLURM_PROCID"]),
    )
  if auto:
    return {}
  return None


def initialize(env: Mapping[str, str], **kwargs) -> dict[str, Any] | None:
  """Calls ``jax.distributed.initialize`` as ``initialize_args`` says; returns its
  arguments (None: not called)."""
  args = initialize_args(env, **kwargs)
  if args is not None:
    import jax  # noqa: PLC0415

    jax.distributed.initialize(**args)
  return args
