"""Metric writers: console, TensorBoard and `metrics.jsonl`, through clu.

clu's writers import TensorFlow (3 to 4 s on a CPU host, most of a warm launch), so the
loop opens them through `DeferredWriter`: the import runs in a background thread once
the first step is under way, and training does not wait for it.

`metrics.jsonl` holds one JSON object per logged step (`{"step": s, "loss": ...}`), the
format reports and tests read. A resumed run re-logs every step after its checkpoint, so
both `metrics.jsonl` and the workdir's TensorBoard event files first lose what they hold
past the restored step (everything, when the run starts from scratch): each reads as one
uninterrupted run. TensorBoard's own clean-up cannot be relied on for that: its Python
loader (`--load_fast=false`, EventAccumulator, notebooks) purges on a SessionLog.START only,
which TF2 summary writers never write, so it shows a resumed run's steps twice; its fast
loader drops a series' later points only when that same series is logged again at an
earlier step (an eval that the resumed run logs at other steps, or no more, stays). So the
files are rewritten, each atomically (a temporary file renamed over the old one). What is dropped is
kept, not deleted: `WORKDIR/superseded/after_step_<N>[.<k>]/` gets the dropped JSONL lines
and the dropped events (as TFRecord files of Event protos, named so that TensorBoard does
not show them as a run).
"""

from __future__ import annotations

import glob
import json
import os
import threading
from typing import Any, Callable, Mapping

import jax
import numpy as np

from vitcls.run import workdir as wdir



class _Superseded:
  """Creates `WORKDIR/superseded/after_step_<N>[.<k>]/` on first use, once."""

  def __init__(self, workdir: str, step: int):
    self._workdir, self._step, self._path = workdir, step, None

  def __call__(self) -> str:
    if self._path is None:
      root = os.path.join(self._workdir, wdir.SUPERSEDED_DIR)
      os.makedirs(root, exist_ok=True)
      for k in range(10_000):
        path = os.path.join(root, f"after_step_{self._step}" + (f".{k}" if k else ""))
        try:
          os.mkdir(path)
        except FileExistsError:
          continue
        self._path = path
        break
      else:
        raise OSError(f"no free name under {root}")
    return self._path


def _step_of_row(row: dict | None) -> int | None:
  try:
    return int(row.get("step", 0)) if row is not None else None
  except (ValueError, TypeError):
    return None  # A line cut short by a kill, or garbage.


def truncate_jsonl(path: str, resume_step: int, superseded: Callable[[], str]) -> int:
  """Keeps the lines of `path` whose step is <= resume_step; returns how many it dropped.

  The dropped lines (and unreadable ones) go to `superseded()/<name>`.
  """
  keep, drop = [], []
  for line, row in wdir.metrics_lines(path):
    step = _step_of_row(row)
    (keep if step is not None and step <= resume_step else drop).append(line)
  if not drop:
    return 0
  with open(os.path.join(superseded(), os.path.basename(path)), "a") as f:
    f.writelines(drop)
  with wdir.atomic_file(path) as f:
    f.writelines(keep)
  return len(drop)


def event_files(workdir: str) -> list[str]:
  """The TensorBoard event files the trainer wrote into `workdir` (not its sub-folders)."""
  return sorted(p for p in glob.glob(os.path.join(workdir, "*tfevents*")) if os.path.isfile(p))


def truncate_event_files(workdir: str, resume_step: int,
                         superseded: Callable[[], str]) -> int:
  """Drops the events with step > resume_step from the workdir's event files, rewriting
  each affected file atomically; returns how many events it dropped.

  The dropped events go to `superseded()/events.<i>.tfrecord` (TFRecord of Event protos).
  A record cut short at the end of a file (a kill mid-write) is left out of a rewrite.
  """
  paths = event_files(workdir)
  if not paths:
    return 0
  # pylint: disable=g-import-not-at-top
  from tensorboard.backend.event_processing import event_file_loader
  from tensorboard.compat.proto import event_pb2
  from tensorboard.summary.writer import record_writer
  # pylint: enable=g-import-not-at-top
  dropped = 0
  for path in paths:
    keep, drop = [], []
    for record in event_file_loader.RawEventFileLoader(path).Load():
      step = event_pb2.Event.FromString(record).step
      (drop if step > resume_step else keep).append(record)
    if not drop:
      continue
    folder = superseded()
    aside = os.path.join(folder, f"events.{len(glob.glob(os.path.join(folder, 'events.*')))}"
                                 f".tfrecord")
    with open(aside, "wb") as f:
      writer = record_writer.RecordWriter(f)
      for record in drop:
        writer.write(record)
    # The temporary name holds no "tfevents": TensorBoard does not read it as events.
    with wdir.atomic_file(path, "wb") as f:
      writer = record_writer.RecordWriter(f)
      for record in keep:
        writer.write(record)
    dropped += len(drop)
  return dropped


class JsonlWriter:
  """Appends scalars as one JSON object per (step, call) to a file.

  A clu MetricWriter by its methods (clu's multi-writers only call them), without
  subclassing clu's interface, so that this module imports no TensorFlow.
  """

  def __init__(self, path: str):
    self._file = open(path, "a")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    """One line: the step and every scalar as a float."""
    row = {"step": int(step)}
    row.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    self._file.write(json.dumps(row) + "\n")

  def write_summaries(self, step, values, metadata=None):
    """No-op: `metrics.jsonl` holds scalars only."""

  def write_images(self, step, images):
    """No-op: `metrics.jsonl` holds scalars only."""

  def write_videos(self, step, videos):
    """No-op: `metrics.jsonl` holds scalars only."""

  def write_audios(self, step, audios, *, sample_rate):
    """No-op: `metrics.jsonl` holds scalars only."""

  def write_texts(self, step, texts):
    """No-op: `metrics.jsonl` holds scalars only."""

  def write_histograms(self, step, arrays, num_buckets=None):
    """No-op: `metrics.jsonl` holds scalars only."""

  def write_hparams(self, hparams):
    """No-op: the resolved config is in `config.json`."""

  def flush(self):
    """Hands the lines written so far to the OS (a kill after this keeps them)."""
    self._file.flush()

  def close(self):
    """Closes the file; the writer is unusable afterwards."""
    self._file.close()


def _truncate_for_resume(workdir: str, resume_step: int | None) -> str:
  """Sets aside what `metrics.jsonl` and the event files hold past `resume_step`."""
  step = resume_step or 0
  superseded = _Superseded(workdir, step)
  jsonl = wdir.metrics_path(workdir)
  truncate_jsonl(jsonl, step, superseded)
  truncate_event_files(workdir, step, superseded)
  return jsonl


def _open_writers(workdir: str, jsonl: str | None):
  """Console + TensorBoard + JSONL (`jsonl` set: process 0), or the console alone."""
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  if jsonl is None:
    return metric_writers.LoggingWriter()
  return metric_writers.AsyncMultiWriter([
      metric_writers.LoggingWriter(),
      metric_writers.SummaryWriter(workdir),
      JsonlWriter(jsonl),
  ])


class DeferredWriter:
  """The run's writers (console, TensorBoard and JSONL on process 0; the console alone
  elsewhere) and clu's progress report, opened without delaying training.

  The metrics are set aside for the resume at once; clu (with TensorFlow) is imported in
  a background thread when `start()` is called, which the loop does once its first step
  is dispatched, so the import overlaps the steps instead of preceding them. Until then
  `progress` skips (clu's report starts its clock on its first call) and every other call
  waits for the import. Only the loop's own thread may call it, and that thread must not
  import anything itself until the import is done: two threads importing modules that
  import each other can fail, so the loop's steps (which import nothing) are the only
  overlap.
  """

  def __init__(self, workdir: str, resume_step: int | None, total_steps: int,
               every_steps: int):
    self._workdir, self._total, self._every = workdir, total_steps, every_steps
    self._jsonl = (_truncate_for_resume(workdir, resume_step)
                   if jax.process_index() == 0 else None)
    self._thread: threading.Thread | None = None
    self._failure: BaseException | None = None
    self._writer = None
    self._progress = None

  def start(self) -> None:
    """Starts importing clu in the background (once)."""
    if self._thread is None:
      self._thread = threading.Thread(target=self._import, name="vitcls-writers",
                                       daemon=True)
      self._thread.start()

  def _import(self) -> None:
    try:
      # pylint: disable=g-import-not-at-top,unused-import
      from clu import metric_writers, periodic_actions  # noqa: F401
    except BaseException as e:  # pylint: disable=broad-except
      self._failure = e

  def _ready(self, wait: bool) -> bool:
    """Opens the writers once the import is done; waits for it when `wait`."""
    if self._writer is not None:
      return True
    self.start()
    if not wait and self._thread.is_alive():
      return False
    self._thread.join()
    if self._failure is not None:
      raise self._failure
    from clu import periodic_actions  # pylint: disable=g-import-not-at-top
    self._writer = _open_writers(self._workdir, self._jsonl)
    self._progress = periodic_actions.ReportProgress(
        num_train_steps=self._total, writer=self._writer, every_steps=self._every)
    return True

  def progress(self, step: int) -> None:
    """clu's ReportProgress (steps/s, ETA) once the writers are open; skipped before."""
    if self._ready(wait=False):
      self._progress(step)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Writes to every writer (starting the import if needed, and waiting for it)."""
    self._ready(wait=True)
    self._writer.write_scalars(step, scalars)

  def flush(self) -> None:
    """Flushes every writer (waiting for them to open); nothing to do before `start`."""
    if self._thread is not None:
      self._ready(wait=True)
      self._writer.flush()

  def close(self) -> None:
    """Flushes and closes every writer; nothing to do before `start`."""
    if self._thread is not None:
      self._ready(wait=True)
      self._writer.close()
