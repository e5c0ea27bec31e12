"""`python -m vitcls.launch`: the sbatch script or TPU pod command for one multi-host run.

Nothing here talks to a cluster: it checks the config (so a typo fails here, not after
an hour in the queue), then writes a script or prints a command for you to run. The
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
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
from typing import Sequence

from absl import app, flags

from vitcls import configs
from vitcls.errors import UserError

FLAGS = flags.FLAGS
_OVERRIDES: list[str] = []


class LaunchError(UserError):
  """A launcher option is missing or impossible."""


def define_flag(kind: str, name: str, default, help_text: str, **kw) -> None:
  """Defines `--name` unless another vitcls CLI already did (several share a process in
  tests); allow_override lets `vitcls.train`, which defines --config and --workdir at
  import, take the names over if it is imported later."""
  if name not in FLAGS:
    getattr(flags, f"DEFINE_{kind}")(name=name, default=default, help=help_text,
                                     allow_override=True, **kw)


def define_common_flags() -> None:
  """--config and --workdir (as `vitcls.train` has them) and --launcher."""
  define_flag("string", "config", None, "Experiment file, `path.py[:k=v,...]`.")
  define_flag("string", "workdir", None, "Where checkpoints and metrics go.")
  define_flag("string", "launcher", None, "vitcls.launch: slurm (write an sbatch script) or "
          "tpu (print the command for a Cloud TPU VM pod); vitcls.sweep: local (default: "
          "train here) or slurm (write an sbatch job array).")


def define_slurm_flags() -> None:
  """The SLURM options shared by `vitcls.launch` and `vitcls.sweep`."""
  define_flag("integer", "nodes", 1, "SLURM: nodes per run (one process per node).")
  define_flag("integer", "gpus_per_node", None, "SLURM: GPUs of each node the run uses.")
  define_flag("integer", "cpus_per_task", None, "SLURM: CPU cores per process (per node).")
  define_flag("string", "time", None, "SLURM: time limit, e.g. 24:00:00.")
  define_flag("string", "partition", None, "SLURM: partition.")
  define_flag("string", "account", None, "SLURM: account to charge.")
  define_flag("string", "job_name", None, "SLURM: job name; default: from the config file.")
  define_flag("multi_string", "sbatch_args", [], "SLURM: extra `#SBATCH` line, e.g. "
          "--sbatch_args=--qos=high (repeat the flag for more).")
  define_flag("string", "python", None, "The Python that runs vitcls on the cluster; "
          "default: this one (SLURM), python3 (TPU).")


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

  def check(self) -> None:
    """Raises LaunchError for resources no SLURM run can use, before a script is written."""
    if self.nodes < 1:
      raise LaunchError(f"--nodes must be at least 1, got {self.nodes}")
    if not self.gpus_per_node or self.gpus_per_node < 1:
      raise LaunchError("--gpus_per_node=G is required with --launcher=slurm (the GPUs "
                        "each node gives the run; all of them are used by its one process)")
    if self.cpus_per_task is not None and self.cpus_per_task < 1:
      raise LaunchError(f"--cpus_per_task must be at least 1, got {self.cpus_per_task}")

  @classmethod
  def from_flags(cls) -> Slurm:
    """The resources given by the flags of `define_slurm_flags`."""
    return cls(nodes=FLAGS.nodes, gpus_per_node=FLAGS.gpus_per_node,
               cpus_per_task=FLAGS.cpus_per_task, time=FLAGS.time,
               partition=FLAGS.partition, account=FLAGS.account,
               sbatch_args=list(FLAGS.sbatch_args))


def check_config(spec: str, overrides: Sequence[str]):
  """The resolved config of `spec` with `KEY=VALUE` overrides; raises on any bad key."""
  return configs.resolve(configs.load_experiment(spec), overrides)


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


def write_file(path: str, text: str, mode: int = 0o755) -> None:
  """Writes `text` atomically (temp file, then rename)."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
  with open(tmp, "w") as f:
    f.write(text)
  os.chmod(tmp, mode)
  os.replace(tmp, path)


def slurm_run_script(spec: str, workdir: str, overrides: Sequence[str], slurm: Slurm,
                     python: str | None = None, job_name: str | None = None) -> str:
  """The sbatch script of one multi-node run of `spec` in `workdir`."""
  workdir = os.path.abspath(workdir)
  path, sep, arg = spec.partition(":")
  spec = os.path.abspath(path) + sep + arg
  argv = train_argv(python or sys.executable, spec, workdir, overrides)
  return sbatch_script(
      job_name=job_name or default_job_name(spec, "vitcls-"), slurm=slurm,
      log_file=os.path.join(workdir, "slurm", "%x-%j.out"),
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


KEY_FLAGS = ("config", "workdir", "launcher", "nodes", "gpus_per_node", "cpus_per_task",
             "time", "partition", "account", "job_name", "sbatch_args", "python", "output",
             "tpu", "zone", "project", "repo_dir")


def _define_flags() -> None:
  define_common_flags()
  define_slurm_flags()
  define_flag("string", "output", None, "SLURM: where the script goes; default: "
          "WORKDIR/launch.sbatch.")
  define_flag("string", "tpu", None, "TPU: the TPU VM's name.")
  define_flag("string", "zone", None, "TPU: its zone, e.g. us-central2-b.")
  define_flag("string", "project", None, "TPU: its Google Cloud project; default: gcloud's.")
  define_flag("string", "repo_dir", "~/vitcls", "TPU: the vitcls checkout on every worker.")


def _launch(overrides: Sequence[str]) -> None:
  if not FLAGS.config or not FLAGS.workdir:
    raise LaunchError("both --config=experiments/NAME.py and --workdir=DIR are required")
  if FLAGS.launcher not in ("slurm", "tpu"):
    given = f"got --launcher={FLAGS.launcher}" if FLAGS.launcher else "--launcher is missing"
    raise LaunchError(f"{given}: pass --launcher=slurm (an sbatch script for GPU nodes) or "
                      f"--launcher=tpu (the command for a Cloud TPU VM pod)")
  if FLAGS.launcher == "tpu":
    missing = [f"--{n}" for n in ("tpu", "zone") if not FLAGS[n].value]
    if missing:
      raise LaunchError(f"--launcher=tpu needs {' and '.join(missing)}: the TPU VM's name "
                        f"and zone, as `gcloud compute tpus tpu-vm list` shows them")
    check_config(FLAGS.config, overrides)
    print(tpu_command(FLAGS.config, FLAGS.workdir, overrides, tpu=FLAGS.tpu,
                      zone=FLAGS.zone, project=FLAGS.project, repo_dir=FLAGS.repo_dir,
                      python=FLAGS.python))
    print(f"# Runs on all workers of {FLAGS.tpu} from {FLAGS.repo_dir}; --workdir="
          f"{FLAGS.workdir} must be on storage every worker sees (NFS, Filestore or a "
          f"gcsfuse mount at the same path).", file=sys.stderr)
    return
  slurm = Slurm.from_flags()
  slurm.check()
  check_config(FLAGS.config, overrides)
  text = slurm_run_script(FLAGS.config, FLAGS.workdir, overrides, slurm,
                          python=FLAGS.python, job_name=FLAGS.job_name)
  output = FLAGS.output or os.path.join(FLAGS.workdir, "launch.sbatch")
  os.makedirs(os.path.join(os.path.abspath(FLAGS.workdir), "slurm"), exist_ok=True)
  write_file(output, text)
  print(f"Wrote {output} ({slurm.nodes} node(s) x {slurm.gpus_per_node} GPU(s)); "
        f"submit it with:")
  print(f"sbatch {shlex.quote(output)}")


def _execute(argv_rest: Sequence[str], overrides: Sequence[str]) -> int:
  try:
    if len(argv_rest) > 1:
      raise LaunchError(f"unexpected argument(s) {' '.join(argv_rest[1:])}: flags look "
                        f"like --name=value")
    _launch(overrides)
  except UserError as e:
    print(f"vitcls: error: {e}", file=sys.stderr)
    return 2
  return 0


def parse(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Parses `argv` (program name first) into FLAGS, from a clean slate; returns (the
  arguments left, the `KEY=VALUE` config overrides). A bad flag is one UserError line."""
  overrides, rest = configs.split_overrides(argv)
  FLAGS.unparse_flags()
  try:
    return FLAGS(rest), overrides
  except flags.Error as e:
    raise LaunchError(f"{str(e).splitlines()[0]}: see --help for the flags") from e


def flags_parser(overrides: list[str], key_flags: Sequence[str] = ()):
  """An absl `flags_parser` for `app.run`: `--config.KEY=VALUE` go into `overrides`, a bad
  flag is one error line (exit 2), and `key_flags` are listed by --help."""
  def parse_or_exit(argv):
    for name in key_flags:  # --help lists the flags of the module named by argv[0].
      FLAGS.register_key_flag_for_module(argv[0], FLAGS[name])
    try:
      rest, overrides[:] = parse(argv)
    except UserError as e:
      print(f"vitcls: error: {e}", file=sys.stderr)
      sys.exit(2)
    return rest
  return parse_or_exit


def main(argv: Sequence[str]) -> int:
  """Runs the CLI in-process on `argv` (program name first); returns the exit status."""
  _define_flags()
  try:
    rest, overrides = parse(argv)
  except UserError as e:
    print(f"vitcls: error: {e}", file=sys.stderr)
    return 2
  return _execute(rest, overrides)


def run(argv: Sequence[str] | None = None) -> None:
  """Entry point shared by `python -m vitcls.launch` and `vitcls launch`."""
  _define_flags()
  app.run(lambda rest: _execute(rest, _OVERRIDES), argv=argv,
          flags_parser=flags_parser(_OVERRIDES, KEY_FLAGS))


if __name__ == "__main__":
  run()
