"""What a workdir holds and how it is written: the one owner of vitcls's on-disk names.

A training run's workdir:

  config.json           the resolved config (`CONFIG_FILE`)
  checkpoints/<step>/   orbax checkpoints; damaged ones go to checkpoints_broken/
  metrics.jsonl         one JSON object per logged step (`read_metrics`)
  superseded/           what a resume set aside: metrics past its checkpoint
                        (`vitcls.run.writers`), the config.json it replaced
                        (`vitcls.run.config_record`)
  report/               report.md, its PNGs, evaluate.json, artifacts/<eval>.npz
  train.lock            who trains here (`vitcls.run.lock`)
  slurm/, launch.sbatch what `vitcls.launch` wrote

A sweep's directory holds one such workdir per member (with its `sweep_member.json` and
`train.log`) beside `sweep.csv`, `sweep.md`, `sweep.png`, `sweep.sbatch` and its lock.

Every file another process may read while it changes is written with `atomic_file`
(a temporary sibling renamed over it), so readers see the old or the new content, never
half of it, and no temporary outlives the write, failed or not. A command's output at a
path the user chose is an `Output` kind: it replaces nothing but its own kind
(`check_output`). This module imports nothing heavy: sweeps and experiment files use it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from typing import Callable, Iterator
import uuid
import zipfile

from absl import logging

from vitcls.errors import UserError, shown

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


def superseded_config_path(workdir: str, step: int) -> str:
  """`WORKDIR/superseded/config_to_step_<step>[.<n>].json`, a name not taken yet: the
  config.json a resume from `step` replaced (it trained the steps up to `step`)."""
  base = os.path.join(workdir, SUPERSEDED_DIR, f"config_to_step_{step}")
  path, n = base + ".json", 0
  while os.path.exists(path):
    n += 1
    path = f"{base}.{n}.json"
  return path


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


# ------------------------------------------------------------------ outputs


class OutputError(UserError):
  """An output path holds something the command must not replace, or cannot hold a file.

  `problem` is the message without its fix, for commands that write where the user did
  not choose (and so give their own fix)."""

  def __init__(self, problem: str, fix: str | None = None):
    super().__init__(problem if fix is None else f"{problem}: {fix}")
    self.problem = problem


@dataclasses.dataclass(frozen=True)
class Output:
  """A kind of file or folder a command writes: what it is called in messages, whether it
  is a folder, and `is_own(path)`, true for an existing one of this kind (which a new one
  may replace: the user asked for it again). Anything else is the user's and is kept."""
  what: str
  folder: bool
  is_own: Callable[[str], bool]


def is_npz(path: str) -> bool:
  """An npz as numpy writes it: a zip of `.npy` members."""
  try:
    with zipfile.ZipFile(path) as z:
      return all(name.endswith(".npy") for name in z.namelist())
  except (OSError, zipfile.BadZipFile):
    return False


ANY_FILE = Output("a file", folder=False, is_own=lambda path: True)
ANY_FOLDER = Output("a folder", folder=True, is_own=lambda path: True)
NPZ = Output("an npz", folder=False, is_own=is_npz)


def _found(path: str) -> str:
  """What an existing path is, as messages say it."""
  if os.path.isdir(path):
    return "a folder"
  return "a file" if os.path.isfile(path) else "a special file (device, pipe or socket)"


def _is_empty(path: str) -> bool:
  return not os.listdir(path) if os.path.isdir(path) else os.path.getsize(path) == 0


def check_output(path: str, kind: Output = ANY_FILE) -> None:
  """Raises OutputError unless writing `kind` at `path` replaces nothing, something empty
  or `kind`'s own; or when a file stands where a folder above `path` must be. Cheap:
  commands call it before their work, so a bad path costs nothing."""
  if not kind.folder and path.endswith(("/", os.sep)):
    raise OutputError(f"{shown(path)} ends in '/', so it names a folder, not {kind.what}",
                      "give a file name")
  if not os.path.exists(path):  # Missing, or a link to nothing (the link is replaced).
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
      parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
      raise OutputError(f"cannot write {shown(path)}: {shown(parent)} is a file, not a "
                        f"folder", "choose another output path")
    return
  found = _found(path)
  if found != ("a folder" if kind.folder else "a file"):
    raise OutputError(f"{shown(path)} is {found}, not {kind.what}",
                      "choose another output path or remove it")
  if not _is_empty(path) and not kind.is_own(path):
    raise OutputError(f"{shown(path)} exists and is not {kind.what}",
                      "choose another output path or remove it")


# ------------------------------------------------------------------ atomic writes


def temp_path(path: str) -> str:
  """A fresh hidden sibling of `path` to write before renaming it over `path`.

  Random, so concurrent writers never share one; it names nothing of the target, so no
  reader's pattern (TensorBoard's `*tfevents*`, the report's `*.npz`) takes it for the
  real thing while it is half-written.
  """
  directory = os.path.dirname(os.path.abspath(path))
  return os.path.join(directory, f".vitcls-{uuid.uuid4().hex[:12]}.tmp")


def _remove(path: str) -> None:
  """Removes a file, link or folder if there; a cleanup, so it never raises."""
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  else:
    with contextlib.suppress(OSError):
      os.unlink(path)
  if os.path.lexists(path):
    logging.warning("Could not remove the temporary %s: delete it.", path)


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w", *, kind: Output = ANY_FILE,
                permissions: int | None = None, **open_kw) -> Iterator:
  """`with atomic_file(path) as f:` writes `f`, which replaces `path` when the block ends.

  Flushed to disk before the rename, so a crash leaves the old or the new file; on an
  error the temporary file is removed and `path` is left as it was. The parent folder is
  created if needed. What `path` holds is replaced only if it is `kind`'s (any file, by
  default; never a folder): else OutputError, before anything is written.
  """
  check_output(path, kind)
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
    _remove(tmp)
    raise


def atomic_write(path: str, data: str | bytes, *, kind: Output = ANY_FILE,
                 permissions: int | None = None) -> None:
  """Writes `data` (text or bytes) to `path` through `atomic_file`."""
  with atomic_file(path, "wb" if isinstance(data, bytes) else "w", kind=kind,
                   permissions=permissions) as f:
    f.write(data)


def atomic_dir(path: str, write: Callable[[str], None], *,
               kind: Output = ANY_FOLDER) -> None:
  """`write(tmp)` fills a fresh folder, which is then renamed to `path`.

  An existing `path` (only `kind`'s: `check_output`) is moved aside only once the new
  folder is complete, put back if the final rename fails, and deleted once the new one is
  in place, so `path` is never half-written or half-replaced (it is absent for the
  instant between the two renames) and no temporary is left, whatever fails. The folder
  is made with os.mkdir, not mkdtemp, so it gets the usual umask permissions, not 0700.
  """
  check_output(path, kind)
  tmp = temp_path(path)
  old = f"{tmp}.old"
  os.makedirs(os.path.dirname(tmp), exist_ok=True)
  os.mkdir(tmp)
  moved = committed = False
  try:
    write(tmp)
    if os.path.lexists(path):
      os.rename(path, old)
      moved = True
    os.rename(tmp, path)
    committed = True
  finally:
    _remove(tmp)  # Gone already once committed.
    if moved and committed:
      _remove(old)
    elif moved:
      os.rename(old, path)  # Should this fail too, `old` is kept: the only copy.


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
