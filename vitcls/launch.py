"""`python -m vitcls.launch`: the sbatch script or TPU pod command for one multi-host run.

Nothing here talks to a cluster: it checks the config against the devices and processes
it will run on (so a typo or a batch that does not split over 16 GPUs fails here, not
after an hour in the queue), then writes a script or prints a command for you to run. The
training code is the same everywhere; `--distributed` makes each process call
`jax.distributed.initialize()`, which reads the cluster from its environment.

Cluster assumptions, SLURM with GPUs (`--launcher=slurm`):
  * one task (process) per node (`--ntasks-per-node=1`), each seeing all the GPUs of its
    node. jax's SLURM detection would otherwise give each process only the GPU numbered
    by its local task id, so the script sets `JAX_LOCAL_DEVICE_IDS=0,...,G-1`. The
    coordinator (the first node, a port derived from the job id), the process count and
    ids come from SLURM's variables.
  * the repository, its Python environment and the workdir are on a filesystem every node
    mounts at the same path: the script uses the absolute paths of the machine that wrote
    it (`--python` to name another interpreter), and `cd`s to the directory it was
    written from. sbatch passes your environment on (TFDS_DATA_DIR included).
  * a task that dies ends the whole step (`srun --kill-on-bad-exit=1`), so no process
    waits forever for a dead peer; submitting the same script again resumes from the
    workdir's last checkpoint.

Cluster assumptions, Cloud TPU VM pods (`--launcher=tpu`):
  * vitcls is installed on every worker in the same directory (`--repo_dir`, default
    `~/vitcls`) with jax's TPU wheel; the printed `gcloud ... ssh --worker=all` command
    starts the same training command on all workers at once, which is what a TPU pod
    needs (jax finds the pod's topology by itself).
  * the workdir is on storage every worker sees at the same path: vitcls writes it with
    plain file I/O, so an NFS / Filestore mount or a gcsfuse-mounted bucket, not a gs://
    URL. Checkpoints are written by all workers together; metrics and reports by worker 0.
  * the data and `model_init` are the workers' too, so only the config's keys are checked
    here, and its batch and mesh on the slice when `--accelerator_type` (e.g. v4-32)
    says which; a SLURM script is checked by the trainer's whole gate, on the filesystem
    its nodes share.
"""

from __future__ import annotations

import os
import shlex
import sys
from typing import Sequence

from absl import app

from vitcls import cluster, configs, flags, validate
from vitcls.run import workdir as wdir

FLAGS = flags.FLAGS
_OVERRIDES: list[str] = []


def _define_flags() -> list[str]:
  """This CLI's flags (defined when it starts); their names."""
  return [
      *flags.define_run(),
      *flags.define_launcher(),
      *flags.define_slurm(),
      flags.define("string", "output", None, "SLURM: where the script goes; default: "
                   "WORKDIR/launch.sbatch."),
      flags.define("string", "tpu", None, "TPU: the TPU VM's name."),
      flags.define("string", "zone", None, "TPU: its zone, e.g. us-central2-b."),
      flags.define("string", "project", None, "TPU: its Google Cloud project; default: "
                   "gcloud's."),
      flags.define("string", "repo_dir", "~/vitcls", "TPU: the vitcls checkout on every "
                   "worker."),
      flags.define("string", "accelerator_type", None, "TPU: the slice's accelerator type, "
                   "e.g. v4-32 (`gcloud compute tpus tpu-vm describe` shows it): the config's "
                   "batch and mesh are checked against its devices and hosts."),
  ]


def _check(spec: str, overrides: Sequence[str], topology: tuple[int, int] | None) -> None:
  """The trainer's gate on the config the job will run, on its (devices, processes) when
  known; not whether its dataset and model_init exist on this machine: the nodes read
  their own disks (shared, or staged onto local scratch)."""
  bad: list[str] = []
  config = configs.resolve(configs.load_experiment(spec), overrides, errors=bad)
  num_devices, process_count = topology or (None, 1)
  validate.check(config, num_devices=num_devices, process_count=process_count, known=bad,
                 local_files=False)


def _launch(overrides: Sequence[str]) -> None:
  if not FLAGS.config or not FLAGS.workdir:
    raise cluster.LaunchError("both --config=experiments/NAME.py and --workdir=DIR are "
                              "required")
  if FLAGS.launcher not in ("slurm", "tpu"):
    given = f"got --launcher={FLAGS.launcher}" if FLAGS.launcher else "--launcher is missing"
    raise cluster.LaunchError(f"{given}: pass --launcher=slurm (an sbatch script for GPU "
                              f"nodes) or --launcher=tpu (the command for a Cloud TPU VM "
                              f"pod)")
  if FLAGS.launcher == "tpu":
    missing = [f"--{n}" for n in ("tpu", "zone") if not FLAGS[n].value]
    if missing:
      raise cluster.LaunchError(f"--launcher=tpu needs {' and '.join(missing)}: the TPU "
                                f"VM's name and zone, as `gcloud compute tpus tpu-vm list` "
                                f"shows them")
    topology = (cluster.tpu_topology(FLAGS.accelerator_type) if FLAGS.accelerator_type
                else None)
    _check(FLAGS.config, overrides, topology)
    print(cluster.tpu_command(FLAGS.config, FLAGS.workdir, overrides, tpu=FLAGS.tpu,
                              zone=FLAGS.zone, project=FLAGS.project,
                              repo_dir=FLAGS.repo_dir, python=FLAGS.python))
    print(f"# Runs on all workers of {FLAGS.tpu} from {FLAGS.repo_dir}; --workdir="
          f"{FLAGS.workdir} must be on storage every worker sees (NFS, Filestore or a "
          f"gcsfuse mount at the same path).", file=sys.stderr)
    return
  slurm = flags.slurm_from_flags()
  slurm.check()
  _check(FLAGS.config, overrides, (slurm.num_devices, slurm.nodes))
  text = cluster.slurm_run_script(FLAGS.config, FLAGS.workdir, overrides, slurm,
                                  python=FLAGS.python, job_name=FLAGS.job_name)
  output = FLAGS.output or os.path.join(FLAGS.workdir, wdir.LAUNCH_SCRIPT)
  os.makedirs(os.path.join(os.path.abspath(FLAGS.workdir), wdir.SLURM_DIR), exist_ok=True)
  wdir.atomic_write(output, text, permissions=0o755)
  print(f"Wrote {output} ({slurm.nodes} node(s) x {slurm.gpus_per_node} GPU(s)); "
        f"submit it with:")
  print(f"sbatch {shlex.quote(output)}")


def main(argv: Sequence[str]) -> int:
  """Runs the CLI in-process on `argv` (program name first); returns the exit status."""
  return flags.main_in_process(argv, _define_flags, _launch)


def run(argv: Sequence[str] | None = None) -> None:
  """Entry point shared by `python -m vitcls.launch` and `vitcls launch`."""
  app.run(lambda rest: flags.run_command(rest, _OVERRIDES, _launch), argv=argv,
          flags_parser=flags.parser(_OVERRIDES, _define_flags()))


if __name__ == "__main__":
  run()
