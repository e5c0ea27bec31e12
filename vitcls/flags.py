"""Command-line flags of the vitcls CLIs, defined one way and parsed one way.

Each CLI (`vitcls.train`, `evaluate`, `predict`, `export`, `launch`, `sweep`) defines its
flags with `define` when it starts, not on import: several CLIs share a process in tests
and in the README runner, and a name several define (--workdir, --output) must have the
running CLI's meaning. `parser` is the `flags_parser` they all give `absl.app.run`:
`--config.KEY=VALUE` arguments become config overrides, a bad flag is one error line
(exit 2; a config field given as a flag, `--total_steps=5`, is shown as the override it
meant), and --help lists the CLI's own flags.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

from absl import flags

from vitcls import cluster
from vitcls.errors import UserError

FLAGS = flags.FLAGS


class FlagError(UserError):
  """A command-line flag is unknown or has a bad value."""


def _calling_module() -> str:
  """The module that called into this one, named as absl names it (the main module by its
  argv[0]), so each flag belongs to its CLI: its --help lists it, a runner removes it."""
  frame = sys._getframe(1)  # pylint: disable=protected-access
  while frame.f_globals.get("__name__") == __name__:
    frame = frame.f_back
  name = frame.f_globals.get("__name__")
  return sys.argv[0] if name == "__main__" else name


def define(kind: str, name: str, default, help_text: str, **kw) -> str:
  """Defines `--name` (absl's `DEFINE_<kind>`), replacing a flag of that name another CLI
  of this process defined, so the CLI that runs has its own default and help; returns
  `name`. The flag is registered as the calling CLI's (absl would name this module)."""
  if name in FLAGS:  # Replaced whole: absl keeps an old flag whose value was set.
    delattr(FLAGS, name)
  getattr(flags, f"DEFINE_{kind}")(name=name, default=default, help=help_text, **kw)
  FLAGS.register_flag_by_module(_calling_module(), FLAGS[name])
  return name


def define_run(workdir_help: str = "Where checkpoints and metrics go.") -> list[str]:
  """--config and --workdir, as the trainer and the launchers take them."""
  return [define("string", "config", None, "Experiment file, `path.py[:k=v,...]`."),
          define("string", "workdir", None, workdir_help)]


def define_launcher() -> list[str]:
  """--launcher, as `vitcls.launch` and `vitcls.sweep` take it."""
  return [define("string", "launcher", None, "vitcls.launch: slurm (write an sbatch "
                 "script) or tpu (print the command for a Cloud TPU VM pod); vitcls.sweep: "
                 "local (default: train here) or slurm (write an sbatch job array).")]


def define_checkpoint() -> list[str]:
  """--workdir (of a trained run) and --step, as evaluate, predict and export take them."""
  return [define("string", "workdir", None, "A vitcls workdir with checkpoints."),
          define("integer", "step", None, "Checkpoint step; default: the latest.")]


def define_slurm() -> list[str]:
  """The SLURM options shared by `vitcls.launch` and `vitcls.sweep`."""
  return [
      define("integer", "nodes", 1, "SLURM: nodes per run (one process per node)."),
      define("integer", "gpus_per_node", None, "SLURM: GPUs of each node the run uses."),
      define("integer", "cpus_per_task", None, "SLURM: CPU cores per process (per node)."),
      define("string", "time", None, "SLURM: time limit, e.g. 24:00:00."),
      define("string", "partition", None, "SLURM: partition."),
      define("string", "account", None, "SLURM: account to charge."),
      define("string", "job_name", None, "SLURM: job name; default: from the config file."),
      define("multi_string", "sbatch_args", [], "SLURM: extra `#SBATCH` line, e.g. "
             "--sbatch_args=--qos=high (repeat the flag for more)."),
      define("string", "python", None, "The Python that runs vitcls on the cluster; "
             "default: this one (SLURM), python3 (TPU)."),
  ]


def slurm_from_flags() -> cluster.Slurm:
  """The SLURM resources given by the flags of `define_slurm`."""
  return cluster.Slurm(nodes=FLAGS.nodes, gpus_per_node=FLAGS.gpus_per_node,
                       cpus_per_task=FLAGS.cpus_per_task, time=FLAGS.time,
                       partition=FLAGS.partition, account=FLAGS.account,
                       sbatch_args=list(FLAGS.sbatch_args))


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separates `--config.KEY=VALUE` arguments (returned as `KEY=VALUE`) from the rest."""
  overrides, rest = [], []
  for arg in argv:
    if arg.startswith("--config."):
      overrides.append(arg[len("--config."):])
    else:
      rest.append(arg)
  return overrides, rest


def parse(argv: Sequence[str], config_overrides: bool = True
          ) -> tuple[list[str], list[str]]:
  """Parses `argv` (program name first) into FLAGS, from a clean slate; returns (the
  arguments left, the `KEY=VALUE` config overrides). A bad flag is one UserError line;
  so is a `--config.KEY=VALUE` when not `config_overrides`."""
  overrides, rest = split_overrides(argv) if config_overrides else ([], list(argv))
  FLAGS.unparse_flags()
  try:
    return FLAGS(rest), overrides
  except flags.UnrecognizedFlagError as e:
    given = e.flagvalue or f"--{e.flagname}"  # The argument as typed.
    if config_overrides and _is_config_key(e.flagname):
      raise FlagError(f"unknown flag {given}: a config field is set with "
                      f"--config.KEY=VALUE: give {_as_override(given)}") from e
    raise FlagError(f"{str(e).splitlines()[0]}: see --help for the flags") from e
  except flags.Error as e:
    raise FlagError(f"{str(e).splitlines()[0]}: see --help for the flags") from e


def _is_config_key(name: str) -> bool:
  """Whether `name` (maybe dotted, `input.batch_size`) is a field of the config schema."""
  from vitcls import configs  # pylint: disable=g-import-not-at-top
  node = configs.defaults()
  for part in name.split("."):
    if not isinstance(node, configs.ConfigDict) or part not in node:
      return False
    if part in configs.FREE_FORM:  # Its keys belong to the model, optimiser, evaluator.
      return True
    node = node[part]
  return True


def _as_override(arg: str) -> str:
  """`--total_steps=5` as the override it was meant to be: `--config.total_steps=5`."""
  name, sep, value = arg.lstrip("-").partition("=")
  return f"--config.{name}={value if sep else 'VALUE'}"


def run_command(rest: Sequence[str], overrides: Sequence[str],
                command: Callable[[Sequence[str]], int | None]) -> int:
  """Runs `command(overrides)` after the flags are parsed; returns the exit status: its
  own (0 when it returns None), or 2 with one error line for a UserError or a stray
  positional argument."""
  try:
    if len(rest) > 1:
      raise FlagError(f"unexpected argument(s) {' '.join(rest[1:])}: flags look like "
                      f"--name=value")
    return command(overrides) or 0
  except UserError as e:
    print(f"vitcls: error: {e}", file=sys.stderr)
    return 2


def main_in_process(argv: Sequence[str], define_flags: Callable[[], object],
                    command: Callable[[Sequence[str]], int | None]) -> int:
  """A CLI run in this process on `argv` (program name first), as tests and the README
  runner do: its flags defined and parsed, then `run_command`; the exit status."""
  define_flags()
  try:
    rest, overrides = parse(argv)
  except UserError as e:
    print(f"vitcls: error: {e}", file=sys.stderr)
    return 2
  return run_command(rest, overrides, command)


def parser(overrides: list[str] | None, key_flags: Sequence[str] = ()):
  """The `flags_parser` of every CLI's `app.run`: `--config.KEY=VALUE` go into
  `overrides` (None: the CLI takes none), a bad flag is one error line (exit 2), and
  `key_flags` are listed by --help."""
  def parse_or_exit(argv):
    for name in key_flags:  # --help lists the flags of the module named by argv[0].
      FLAGS.register_key_flag_for_module(argv[0], FLAGS[name])
    try:
      rest, given = parse(argv, config_overrides=overrides is not None)
      if overrides is not None:
        overrides[:] = given
    except UserError as e:
      print(f"vitcls: error: {e}", file=sys.stderr)
      sys.exit(2)
    return rest
  return parse_or_exit
