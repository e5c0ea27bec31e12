"""Metric writers: console, TensorBoard and `metrics.jsonl`, through clu.

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
from typing import Any, Callable, Mapping

import jax
import numpy as np
from clu import metric_writers

SUPERSEDED_DIR = "superseded"


class _Superseded:
  """Creates `WORKDIR/superseded/after_step_<N>[.<k>]/` on first use, once."""

  def __init__(self, workdir: str, step: int):
    self._workdir, self._step, self._path = workdir, step, None

  def __call__(self) -> str:
    if self._path is None:
      root = os.path.join(self._workdir, SUPERSEDED_DIR)
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


def _step_of_line(line: str) -> int | None:
  try:
    row = json.loads(line)
    return int(row.get("step", 0)) if isinstance(row, dict) else None
  except (ValueError, TypeError):
    return None  # A line cut short by a kill, or garbage.


def truncate_jsonl(path: str, resume_step: int, superseded: Callable[[], str]) -> int:
  """Keeps the lines of `path` whose step is <= resume_step; returns how many it dropped.

  The dropped lines (and unreadable ones) go to `superseded()/<name>`.
  """
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = [l if l.endswith("\n") else l + "\n" for l in f if l.strip()]
  keep, drop = [], []
  for line in lines:
    step = _step_of_line(line)
    (keep if step is not None and step <= resume_step else drop).append(line)
  if not drop:
    return 0
  with open(os.path.join(superseded(), os.path.basename(path)), "a") as f:
    f.writelines(drop)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(keep)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
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
  # pylint: disable=g-import-not-at-top
  from tensorboard.backend.event_processing import event_file_loader
  from tensorboard.compat.proto import event_pb2
  from tensorboard.summary.writer import record_writer
  # pylint: enable=g-import-not-at-top
  dropped = 0
  for path in event_files(workdir):
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
    # No "tfevents" in the temporary name: TensorBoard must not read it as an event file.
    tmp = os.path.join(workdir, f".events-rewrite-{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
      writer = record_writer.RecordWriter(f)
      for record in keep:
        writer.write(record)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
    dropped += len(drop)
  return dropped


class JsonlWriter(metric_writers.interface.MetricWriter):
  """Appends scalars as one JSON object per (step, call) to a file."""

  def __init__(self, path: str, resume_step: int | None = None):
    self._path = path
    if resume_step is not None:
      truncate_jsonl(path, resume_step,
                     _Superseded(os.path.dirname(os.path.abspath(path)), resume_step))
    self._file = open(path, "a")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    row = {"step": int(step)}
    row.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    self._file.write(json.dumps(row) + "\n")

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


def make_writer(workdir: str, resume_step: int | None = None):
  """Console + TensorBoard + JSONL on process 0; console only elsewhere.

  `resume_step`: the restored step, or None for a run from scratch; what the workdir's
  metrics hold past it is set aside first.
  """
  if jax.process_index() != 0:
    return metric_writers.LoggingWriter()
  step = resume_step or 0
  superseded = _Superseded(workdir, step)
  jsonl = os.path.join(workdir, "metrics.jsonl")
  truncate_jsonl(jsonl, step, superseded)
  truncate_event_files(workdir, step, superseded)
  return metric_writers.AsyncMultiWriter([
      metric_writers.LoggingWriter(),
      metric_writers.SummaryWriter(workdir),
      JsonlWriter(jsonl),
  ])
