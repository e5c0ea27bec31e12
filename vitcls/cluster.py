"""Job scripts and commands that start vitcls on a cluster: SLURM sbatch scripts and the
Cloud TPU VM pod command. Used by `vitcls.launch` (one run) and `vitcls.sweep` (a job
array); nothing here talks to a cluster.

The cluster assumptions (one process per node seeing all its GPUs, a shared filesystem,
`srun --kill-on-bad-exit=1`) are stated in `vitcls.launch`'s docstring.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
from typing import Sequence

from vitcls.errors import UserError
from vitcls.run import workdir as wdir


class LaunchError(UserError):
  """A launcher option is missing or impossible."""


@dataclasses.dataclass
class Slurm:
  """Resources of one SLURM run (one job, or one task of a job array)."""
  nodes: int = 1
  gpus_per_node: int | None = None
  cpus_per_task: int | None = None
  time: str | None = None
  partition: str | None = None
  account: str | None = None
  sbatch_args: Sequence[str] = ()

  @property
  def num_devices(self) -> int:
    """The JAX devices of one run: every GPU of each of its nodes."""
    return self.nodes * (self.gpus_per_node or 0)

  def check(self) -> None:
    """Raises LaunchError for resources no SLURM run can use, before a script is written."""
    if self.nodes < 1:
      raise LaunchError(f"--nodes must be at least 1, got {self.nodes}")
    if not self.gpus_per_node or self.gpus_per_node < 1:
      raise LaunchError("--gpus_per_node=G is required with --launcher=slurm (the GPUs "
                        "each node gives the run; all of them are used by its one process)")
    if self.cpus_per_task is not None and self.cpus_per_task < 1:
      raise LaunchError(f"--cpus_per_task must be at least 1, got {self.cpus_per_task}")


# TPU generation (as in gcloud's accelerator types, `v4-32`) -> (TensorCores per JAX
# device, devices per host of a multi-host slice, most devices a single host has). The
# number in the type counts TensorCores (v2-v5p) or chips (v5e "v5litepod", v6e);
# v4 and v5p chips are one device of 2 cores (megacore).
_TPU_GENERATIONS = {"v2": (1, 8, 8), "v3": (1, 8, 8), "v4": (2, 4, 4), "v5p": (2, 4, 4),
                    "v5litepod": (1, 4, 8), "v6e": (1, 4, 8)}


def tpu_topology(accelerator_type: str) -> tuple[int, int]:
  """(JAX devices, processes) of a Cloud TPU VM slice, from its accelerator type
  (`v4-32`: 16 devices on 4 hosts), so a config is checked against them before launch."""
  generation, _, count = accelerator_type.strip().lower().rpartition("-")
  if generation not in _TPU_GENERATIONS or not count.isdigit() or int(count) < 1:
    raise LaunchError(f"--accelerator_type={accelerator_type} is not a TPU type vitcls "
                      f"knows: give one such as v4-32 ({', '.join(_TPU_GENERATIONS)}), or "
                      f"leave the flag out to skip checking the config against it")
  cores, per_host, single_host = _TPU_GENERATIONS[generation]
  if int(count) % cores:
    raise LaunchError(f"--accelerator_type={accelerator_type}: {generation} slices have a "
                      f"multiple of {cores} cores, e.g. {generation}-{8 * cores}")
  devices = int(count) // cores
  return devices, 1 if devices <= single_host else -(-devices // per_host)


def absolute_spec(spec: str) -> str:
  """`path.py[:arg]` with the path made absolute, for scripts run from elsewhere."""
  path, sep, arg = spec.partition(":")
  return os.path.abspath(path) + sep + arg


def train_argv(python: str, spec: str, workdir: str, overrides: Sequence[str]) -> list[str]:
  """The words of one distributed training command."""
  return [python, "-m", "vitcls.train", "--distributed", f"--config={spec}",
          f"--workdir={workdir}", *[f"--config.{o}" for o in overrides]]


def default_job_name(spec: str, prefix: str = "") -> str:
  """`prefix` + the experiment file's stem, characters SLURM dislikes made `_`."""
  stem = os.path.splitext(os.path.basename(spec.partition(":")[0]))[0]
  return prefix + "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)


def sbatch_script(*, job_name: str, slurm: Slurm, log_file: str, body: Sequence[str],
                  array: str | None = None, comment: Sequence[str] = ()) -> str:
  """A complete sbatch script: `#SBATCH` header, environment, then `body` lines."""
  slurm.check()
  lines = ["#!/bin/bash", *[f"# {c}" for c in comment]]
  header = [f"--job-name={job_name}"]
  if array:
    header.append(f"--array={array}")
  header += [f"--nodes={slurm.nodes}", "--ntasks-per-node=1",
             f"--gpus-per-node={slurm.gpus_per_node}"]
  if slurm.cpus_per_task:
    header.append(f"--cpus-per-task={slurm.cpus_per_task}")
  for name in ("time", "partition", "account"):
    if getattr(slurm, name):
      header.append(f"--{name}={getattr(slurm, name)}")
  header.append(f"--output={log_file}")
  for extra in slurm.sbatch_args:
    extra = extra.strip()
    if "\n" in extra or not extra.startswith("-"):
      raise LaunchError(f"--sbatch_args='{extra}' must be one sbatch option such as "
                        f"--qos=high")
    header.append(extra)
  lines += [f"#SBATCH {h}" for h in header]
  devices = ",".join(str(i) for i in range(slurm.gpus_per_node))
  lines += [
      "",
      "set -euo pipefail",
      "# One process per node sees all of its GPUs (jax would give it only GPU",
      "# $SLURM_LOCALID); the coordinator, process count and ids come from SLURM.",
      f"export JAX_LOCAL_DEVICE_IDS={devices}",
  ]
  if slurm.cpus_per_task:  # srun does not inherit --cpus-per-task from sbatch (>= 22.05).
    lines.append("export SRUN_CPUS_PER_TASK=\"$SLURM_CPUS_PER_TASK\"")
  lines += [f"cd {shlex.quote(os.getcwd())}", "", *body]
  return "\n".join(lines) + "\n"


def slurm_run_script(spec: str, workdir: str, overrides: Sequence[str], slurm: Slurm,
                     python: str | None = None, job_name: str | None = None) -> str:
  """The sbatch script of one multi-node run of `spec` in `workdir`."""
  workdir = os.path.abspath(workdir)
  spec = absolute_spec(spec)
  argv = train_argv(python or sys.executable, spec, workdir, overrides)
  return sbatch_script(
      job_name=job_name or default_job_name(spec, "vitcls-"), slurm=slurm,
      log_file=os.path.join(workdir, wdir.SLURM_DIR, "%x-%j.out"),
      comment=["vitcls: one training run; submit with sbatch, resubmit to resume."],
      body=["srun --kill-on-bad-exit=1 " + shlex.join(argv)])


def _remote_dir(path: str) -> str:
  """`path` quoted for a remote shell, keeping a leading `~/` expandable there."""
  if path == "~":
    return "~"
  if path.startswith("~/"):
    rest = path[2:]
    return "~/" + shlex.quote(rest) if rest else "~/"
  return shlex.quote(path)


def tpu_command(spec: str, workdir: str, overrides: Sequence[str], *, tpu: str, zone: str,
                project: str | None = None, repo_dir: str = "~/vitcls",
                python: str | None = None) -> str:
  """The gcloud command that starts the run on every worker of TPU VM `tpu`."""
  remote = (f"cd {_remote_dir(repo_dir)} && "
            + shlex.join(train_argv(python or "python3", spec, workdir, overrides)))
  words = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu, f"--zone={zone}"]
  if project:
    words.append(f"--project={project}")
  words += ["--worker=all", f"--command={remote}"]
  return shlex.join(words)
