"""What a workdir holds and how it is written: the one owner of vitcls's on-disk names.

A training run's workdir:

  config.json           the resolved config (`CONFIG_FILE`)
  checkpoints/<step>/   orbax checkpoints; damaged ones go to checkpoints_broken/
  metrics.jsonl         one JSON object per logged step (`read_metrics`)
  superseded/           what a resume set aside (`vitcls.run.writers`)
  report/               report.md, its PNGs, evaluate.json, artifacts/<eval>.npz
  train.lock            who trains here (`vitcls.run.lock`)
  slurm/, launch.sbatch what `vitcls.launch` wrote

A sweep's directory holds one such workdir per member (with its `sweep_member.json` and
`train.log`) beside `sweep.csv`, `sweep.md`, `sweep.png`, `sweep.sbatch` and its lock.

Every file another process may read while it changes is written with `atomic_file`
(a temporary sibling renamed over it), so readers see the old or the new content, never
half of it. This module imports nothing heavy: sweeps and experiment files use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Callable, Iterator
import uuid

from absl import logging

# A training run's workdir.
CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = "checkpoints"
BROKEN_CHECKPOINTS_DIR = "checkpoints_broken"
METRICS_FILE = "metrics.jsonl"
SUPERSEDED_DIR = "superseded"
REPORT_DIR = "report"
REPORT_FILE = "report.md"  # In report/.
EVALUATE_FILE = "evaluate.json"  # The last `vitcls.evaluate` results, in report/.
ARTIFACTS_DIR = "artifacts"  # Evaluators' arrays for the plots, in report/.
TRAIN_LOCK_FILE = "train.lock"
SLURM_DIR = "slurm"  # SLURM's logs of `vitcls.launch` and sweep scripts.
LAUNCH_SCRIPT = "launch.sbatch"

# A sweep's directory.
SWEEP_LOCK_FILE = ".sweep.lock"
SWEEP_CSV = "sweep.csv"
SWEEP_MARKDOWN = "sweep.md"
SWEEP_PLOT = "sweep.png"
SWEEP_SCRIPT = "sweep.sbatch"
MEMBER_FILE = "sweep_member.json"  # In each member's workdir.
MEMBER_LOG = "train.log"  # In each member's workdir.


def config_path(workdir: str) -> str:
  """`WORKDIR/config.json`."""
  return os.path.join(workdir, CONFIG_FILE)


def checkpoints_dir(workdir: str) -> str:
  """`WORKDIR/checkpoints`, absolute (orbax wants absolute paths)."""
  return os.path.abspath(os.path.join(workdir, CHECKPOINTS_DIR))


def metrics_path(workdir: str) -> str:
  """`WORKDIR/metrics.jsonl`."""
  return os.path.join(workdir, METRICS_FILE)


def report_dir(workdir: str) -> str:
  """`WORKDIR/report`."""
  return os.path.join(workdir, REPORT_DIR)


def evaluate_path(workdir: str) -> str:
  """`WORKDIR/report/evaluate.json`."""
  return os.path.join(workdir, REPORT_DIR, EVALUATE_FILE)


def artifacts_dir(workdir: str) -> str:
  """`WORKDIR/report/artifacts`."""
  return os.path.join(workdir, REPORT_DIR, ARTIFACTS_DIR)


# ------------------------------------------------------------------ atomic writes


def temp_path(path: str) -> str:
  """A fresh hidden sibling of `path` to write before renaming it over `path`.

  Random, so concurrent writers never share one; it names nothing of the target, so no
  reader's pattern (TensorBoard's `*tfevents*`, the report's `*.npz`) takes it for the
  real thing while it is half-written.
  """
  directory = os.path.dirname(os.path.abspath(path))
  return os.path.join(directory, f".vitcls-{uuid.uuid4().hex[:12]}.tmp")


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w", *, permissions: int | None = None,
                **open_kw) -> Iterator:
  """`with atomic_file(path) as f:` writes `f`, which replaces `path` when the block ends.

  Flushed to disk before the rename, so a crash leaves the old or the new file; on an
  error the temporary file is removed and `path` is left as it was. The parent folder is
  created if needed.
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = temp_path(path)
  try:
    with open(tmp, mode, **open_kw) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    if permissions is not None:
      os.chmod(tmp, permissions)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def atomic_write(path: str, data: str | bytes, *, permissions: int | None = None) -> None:
  """Writes `data` (text or bytes) to `path` through `atomic_file`."""
  with atomic_file(path, "wb" if isinstance(data, bytes) else "w",
                   permissions=permissions) as f:
    f.write(data)


def atomic_dir(path: str, write: Callable[[str], None]) -> None:
  """`write(tmp)` fills a fresh folder, which is then renamed to `path`.

  An existing `path` is moved aside only once the new folder is complete, and put back if
  the final rename fails, so `path` is never half-written or half-replaced (it is absent
  for the instant between the two renames). The folder is made with os.mkdir, not
  mkdtemp, so it gets the usual umask permissions rather than 0700.
  """
  tmp = temp_path(path)
  os.makedirs(os.path.dirname(tmp), exist_ok=True)
  os.mkdir(tmp)
  try:
    write(tmp)
    if not os.path.lexists(path):
      os.rename(tmp, path)
      return
    old = f"{tmp}.old"
    os.rename(path, old)
    try:
      os.rename(tmp, path)
    except BaseException:
      os.rename(old, path)
      raise
    shutil.rmtree(old, ignore_errors=True)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)  # Gone already on success.


# ------------------------------------------------------------------ metrics.jsonl


def metrics_lines(path: str) -> list[tuple[str, dict | None]]:
  """(line, its row) for each non-blank line of a metrics file, each line ending in a
  newline; the row is None for a line that is not a JSON object (cut short by a kill).
  [] when the file does not exist."""
  try:
    with open(path) as f:
      lines = [l if l.endswith("\n") else l + "\n" for l in f if l.strip()]
  except FileNotFoundError:
    return []
  out = []
  for line in lines:
    try:
      row = json.loads(line)
    except ValueError:
      row = None
    out.append((line, row if isinstance(row, dict) else None))
  return out


def read_metrics(workdir: str) -> list[dict]:
  """Every row of the workdir's `metrics.jsonl`, in order; [] before anything is logged.

  A line that does not parse (the last one, when a kill cut it short) is skipped with a
  warning: a report or a sweep table of a killed run still reads everything before it.
  """
  path = metrics_path(workdir)
  rows = []
  for line, row in metrics_lines(path):
    if row is None:
      logging.warning("Skipped an unreadable line of %s (cut short by a kill?): %.80r",
                      path, line.rstrip("\n"))
    else:
      rows.append(row)
  return rows
