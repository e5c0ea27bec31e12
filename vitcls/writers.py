"""Metric writers: console, TensorBoard and `metrics.jsonl`, through clu.

`metrics.jsonl` holds one JSON object per logged step (`{"step": s, "loss": ...}`), the
format reports and tests read. On resume, lines past the restored step are dropped first,
so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np
from clu import metric_writers


class JsonlWriter(metric_writers.interface.MetricWriter):
  """Appends scalars as one JSON object per (step, call) to a file."""

  def __init__(self, path: str, resume_step: int | None = None):
    self._path = path
    if resume_step is not None and os.path.exists(path):
      with open(path) as f:
        kept = [l for l in f if l.strip() and json.loads(l).get("step", 0) <= resume_step]
      tmp = path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(kept)
      os.replace(tmp, path)
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
  """Console + TensorBoard + JSONL on process 0; console only elsewhere."""
  if jax.process_index() != 0:
    return metric_writers.LoggingWriter()
  return metric_writers.AsyncMultiWriter([
      metric_writers.LoggingWriter(),
      metric_writers.SummaryWriter(workdir),
      JsonlWriter(os.path.join(workdir, "metrics.jsonl"), resume_step),
  ])
