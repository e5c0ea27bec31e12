"""`python -m vitcls.sweep --config=experiments/NAME.py[:arg] --workdir=DIR` checks every
member's config first with the trainer's gate, on the devices the members will see (any
member's problem fails the sweep before anything runs), then trains each member in
`DIR/<member name>` (`python -m vitcls.train` subprocesses, `--parallel` at a time) or
writes one SLURM job array for them (`--launcher=slurm`). It keeps `DIR/sweep.csv`,
`DIR/sweep.md` and `DIR/sweep.png` current as members finish. Running the same command
again skips the members that are done and resumes the others from their checkpoints,
so a sweep survives being killed, a reboot or a failed member fixed in between.
`--config.KEY=VALUE` given to the sweep applies to every member, before its own values.

This module is the command line only: it turns flags into calls of `members`, `table`,
`local` and `slurm`.
"""

from __future__ import annotations

import os
import shlex
import sys
from typing import Sequence

from absl import app

from vitcls import cluster, flags
from vitcls.run import workdir as wdir
from vitcls.sweep import builders
from vitcls.sweep import local
from vitcls.sweep import members as members_lib
from vitcls.sweep import slurm as slurm_lib
from vitcls.sweep import table as table_lib

FLAGS = flags.FLAGS
SweepError = builders.SweepError


def _define_flags() -> list[str]:
  """This CLI's flags (defined when it starts); their names."""
  return [
      *flags.define_run(),
      *flags.define_launcher(),
      flags.define("integer", "parallel", 1, "local: members trained at the same time."),
      flags.define("string", "metric", None, "Main metric of the table and plot; default: "
                   "the first */top1, else */map, else the first eval metric."),
      flags.define("bool", "collect", False, "Only write the table and plot from the "
                   "members' workdirs (e.g. after a SLURM sweep); run nothing."),
      *flags.define_slurm(),
      flags.define("integer", "max_parallel", None, "slurm: array tasks running at the "
                   "same time."),
  ]


def _load(overrides: Sequence[str], slurm: cluster.Slurm | None
          ) -> tuple[list, list]:
  """The members and their configs, checked by the trainer's gate where they will run:
  on the SLURM job's devices, or on this machine's (counted once the quick checks pass,
  so a typo is still reported at once). `--collect` only resolves them: they ran
  elsewhere, perhaps, with data this machine does not see."""
  f = FLAGS
  if f.collect:
    return members_lib.load_members(f.config, overrides, check=False)
  if slurm:
    return members_lib.load_members(f.config, overrides, num_devices=slurm.num_devices,
                                    process_count=slurm.nodes, local_files=False)
  members, resolved = members_lib.load_members(f.config, overrides)
  num_devices = local.device_count()
  if num_devices is None:
    print("[sweep] note: could not count this machine's devices; each member checks its "
          "own as it starts", flush=True)
  else:
    members_lib.check_devices(members, resolved, num_devices)
  return members, resolved


def sweep(overrides: Sequence[str]) -> int:
  """The CLI body, with flags parsed; returns the exit status."""
  f = FLAGS
  if not f.config or not f.workdir:
    raise SweepError("both --config=experiments/NAME.py and --workdir=DIR are required")
  launcher = f.launcher or "local"
  if launcher not in ("local", "slurm"):
    raise SweepError(f"got --launcher={launcher}: a sweep runs with --launcher=local "
                     f"(here) or --launcher=slurm (an sbatch job array)")
  if f.parallel < 1:
    raise SweepError(f"--parallel must be at least 1, got {f.parallel}")
  slurm = flags.slurm_from_flags() if launcher == "slurm" and not f.collect else None
  if slurm:
    slurm.check()
  members, resolved = _load(overrides, slurm)
  for key in members_lib.swept_keys(members):
    if any(o.partition("=")[0] == key for o in overrides):
      print(f"[sweep] note: --config.{key} is replaced by each member's own {key}",
            flush=True)
  if f.collect:
    os.makedirs(f.workdir, exist_ok=True)
    table = table_lib.collect(f.workdir, members,
                              [members_lib.planned_steps(c) for c in resolved], (), f.metric)
    table_lib.write_reports(f.workdir, table, f.config, overrides)
    print(f"Wrote {os.path.join(f.workdir, wdir.SWEEP_MARKDOWN)}, {wdir.SWEEP_CSV} and "
          f"{wdir.SWEEP_PLOT}")
    return 0
  if slurm:
    if f.max_parallel is not None and f.max_parallel < 1:
      raise SweepError(f"--max_parallel must be at least 1, got {f.max_parallel}")
    text = slurm_lib.slurm_script(f.config, f.workdir, members, overrides, slurm,
                                  python=f.python, max_parallel=f.max_parallel,
                                  job_name=f.job_name)
    os.makedirs(os.path.join(f.workdir, wdir.SLURM_DIR), exist_ok=True)
    path = os.path.join(f.workdir, wdir.SWEEP_SCRIPT)
    wdir.atomic_write(path, text, permissions=0o755)
    print(f"Wrote {path}: a job array of {len(members)} members x {slurm.nodes} node(s) "
          f"x {slurm.gpus_per_node} GPU(s). Submit it with:")
    print(f"sbatch {shlex.quote(path)}")
    collect_argv = [sys.executable, "-m", "vitcls.sweep", f"--config={f.config}",
                    f"--workdir={f.workdir}", *[f"--config.{o}" for o in overrides],
                    "--collect"]
    print(f"When the tasks end, write the table with:\n{shlex.join(collect_argv)}")
    return 0
  return local.LocalRunner(f.config, f.workdir, members, resolved, overrides, f.parallel,
                           f.metric).run()


def main(argv: Sequence[str]) -> int:
  """Runs the CLI in-process on `argv` (program name first); returns the exit status."""
  return flags.main_in_process(argv, _define_flags, sweep)


_OVERRIDES: list[str] = []


def run(argv: Sequence[str] | None = None) -> None:
  """Entry point shared by `python -m vitcls.sweep` and `vitcls sweep`."""
  app.run(lambda rest: flags.run_command(rest, _OVERRIDES, sweep), argv=argv,
          flags_parser=flags.parser(_OVERRIDES, _define_flags()))


if __name__ == "__main__":
  run()
