"""A sweep as one SLURM job array: task i trains member i in `SWEEP_DIR/<member name>`.

Nothing is submitted: the script is written for `sbatch`, and `--collect` later writes
the table from the members' workdirs. Resubmitting it resumes every member from its
checkpoint, as a rerun of a single `vitcls.launch` script does.
"""

from __future__ import annotations

import os
import shlex
import sys
from typing import Sequence

from vitcls import cluster
from vitcls.run import workdir as wdir
from vitcls.sweep import members as members_lib


def slurm_script(spec: str, workdir: str, members: Sequence[members_lib.Member],
                 common: Sequence[str], slurm: cluster.Slurm, python: str | None = None,
                 max_parallel: int | None = None, job_name: str | None = None) -> str:
  """One SLURM job array: task i trains member i, on `slurm.nodes` nodes."""
  workdir = os.path.abspath(workdir)
  spec = cluster.absolute_spec(spec)
  array = f"0-{len(members) - 1}" + (f"%{max_parallel}" if max_parallel else "")
  head = [python or sys.executable, "-m", "vitcls.train", "--distributed", f"--config={spec}"]
  body = ["# Task i trains member i: its workdir name and its overrides (shell words).",
          "NAMES=("]
  body += [f"  {shlex.quote(m.name)}" for m in members]
  body += [")", "OVERRIDES=("]
  body += [f"  {shlex.quote(shlex.join('--config.' + t for t in m.texts))}"
           for m in members]
  body += [")",
           'i="${SLURM_ARRAY_TASK_ID:?submit this script with sbatch}"',
           'eval "member_overrides=(${OVERRIDES[$i]})"',
           f"SWEEP_DIR={shlex.quote(workdir)}",
           # The sweep's own overrides, then the member's (empty-array safe on old bash).
           "srun --kill-on-bad-exit=1 " + shlex.join(head)
           + ' --workdir="$SWEEP_DIR/${NAMES[$i]}"'
           + "".join(" " + shlex.quote(f"--config.{o}") for o in common)
           + ' ${member_overrides[@]+"${member_overrides[@]}"}']
  return cluster.sbatch_script(
      job_name=job_name or cluster.default_job_name(spec, "sweep-"), slurm=slurm,
      array=array, log_file=os.path.join(workdir, wdir.SLURM_DIR, "%x-%A_%a.out"),
      comment=[f"vitcls sweep of {spec}: {len(members)} members, one array task each.",
               "Submit with sbatch; resubmitting resumes every member from its checkpoint."],
      body=body)
