"""Prediction at volume: `vitcls.predict.predict` on a folder of JPEGs, and serving latency.

    python -m benchmarks.predict [--tiny]

The model is the default experiment's (mnist5k, 28x28 grey, a 4-block ViT) trained for 2
steps in-process: its weights do not matter, and its forward pass is so cheap that any
per-file cost in `predict` (reading, decoding, preprocessing, writing rows) shows. The
images are 10,000 JPEGs of mnist5k training digits (each of the 4,000 used two or three
times): the files must add several times the fixed cost, or the noise of the two calls
swamps their difference.

- At volume: `predict` on one file and on all N, called in turn; the one-file call pays
  every fixed cost (config, checkpoint, the OOD threshold, compiling), so (N - 1) / the
  difference is the rate at which files go through, over the bare jitted forward pass
  (the softmax(model) `predict` runs) on a device-resident batch of `predict`'s batch
  size. Goal: >= 0.5.
- Informative: end-to-end img/s of one call on N files, and the fixed cost.
- Informative: latency of one image through the SavedModel export
  (`vitcls.export.export_savedmodel`), the median of many single-image calls after a
  warm-up, in ms.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np
from PIL import Image

from benchmarks import common

NAME = "predict"
DEFAULT_EXPERIMENT = "experiments/mnist5k_vit.py"


def _repo() -> str:
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_workdir(workdir: str, tiny: bool) -> str:
  """The default experiment, trained for 2 steps, in `workdir` (checkpoint, config, metrics).

  Tiny: its runlocal variant (6 steps: the train step `benchmarks.pipeline` compiles too,
  so a test session's compilation cache serves it), evaluated and saved at the end only.
  """
  from vitcls import configs
  from vitcls.run import loop  # pylint: disable=g-import-not-at-top
  arg, overrides = ":runlocal=True", ["evals.test.every=100", "checkpoint_every=100"]
  if not tiny:
    arg, overrides = "", ["total_steps=2", "schedule.warmup_steps=1"]
  config = configs.resolve(configs.load_experiment(
      os.path.join(_repo(), DEFAULT_EXPERIMENT) + arg), overrides)
  loop.train(config, workdir)
  return workdir


def write_digit_jpegs(folder: str, count: int) -> list[str]:
  """`count` mnist5k training digits (in order, round again) as grey JPEGs, a folder per
  label."""
  from vitcls.data import sources  # pylint: disable=g-import-not-at-top
  source = sources.get_source("mnist5k", "train")
  paths = []
  for i in range(count):
    example = source[i % len(source)]
    sub = os.path.join(folder, str(int(example["label"])))
    os.makedirs(sub, exist_ok=True)
    path = os.path.join(sub, f"{i:05d}.jpg")
    Image.fromarray(example["image"][..., 0]).save(path, "JPEG", quality=95)
    paths.append(path)
  return paths


def bare_forward(workdir: str, batch_size: int, repeats: int, calls: int):
  """Timing of `calls` forward passes (softmax of the model) on one on-device batch."""
  import jax  # pylint: disable=g-import-not-at-top
  from vitcls import configs, inspection, models
  from vitcls.run import checkpoint  # pylint: disable=g-import-not-at-top
  config = configs.load_workdir_config(workdir)
  model = models.build(config.model_name, config.num_classes, config.model)
  params = jax.device_put(checkpoint.load_params(workdir))
  _, image_shape, _ = inspection.serving_inputs(config)
  images = jax.device_put(np.random.default_rng(0).uniform(
      -1, 1, (batch_size, *image_shape)).astype(np.float32))
  forward = jax.jit(lambda p, x: jax.nn.softmax(model.apply({"params": p}, x)[0]))

  def run():
    for _ in range(calls):
      out = forward(params, images)
    jax.block_until_ready(out)

  return common.time_it(run, repeats=repeats, warmup=1), image_shape


def savedmodel_latency(workdir: str, output: str, image_shape, calls: int) -> dict[str, Any]:
  """Milliseconds per single-image call of the exported SavedModel, after a warm-up."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from vitcls import export  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  export.export_savedmodel(workdir, output)
  export_s = time.perf_counter() - start
  serve = tf.saved_model.load(output).signatures["serving_default"]
  rng = np.random.default_rng(0)
  images = [tf.constant(rng.integers(0, 256, (1, *image_shape[:2], 3), np.uint8))
            for _ in range(8)]
  for image in images:  # Warm-up: the first calls trace and optimise the graph.
    serve(images=image)
  seconds = []
  for i in range(calls):
    begin = time.perf_counter()
    serve(images=images[i % len(images)])["probabilities"].numpy()
    seconds.append(time.perf_counter() - begin)
  ms = np.asarray(seconds) * 1000
  return {"median_ms": float(np.median(ms)), "p10_ms": float(np.percentile(ms, 10)),
          "p90_ms": float(np.percentile(ms, 90)), "calls": calls, "export_s": export_s}


def _csv_rows(path: str) -> list[dict[str, str]]:
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def paired_calls(one_file, all_files, repeats: int) -> tuple[list[float], list[float]]:
  """Seconds of `one_file()` and `all_files()`, called in turn `repeats` times.

  In pairs, so that each difference (the per-file cost) is taken under the same load.
  """
  fixed, full = [], []
  for _ in range(repeats):
    for fn, seconds in ((one_file, fixed), (all_files, full)):
      start = time.perf_counter()
      fn()
      seconds.append(time.perf_counter() - start)
  return fixed, full


def run(tiny: bool) -> common.Result:
  """predict at volume / bare forward (goal >= 0.5), end-to-end img/s, fixed cost, SavedModel ms."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from vitcls import predict  # pylint: disable=g-import-not-at-top
  count, repeats, batch_size = (24, 1, 8) if tiny else (10_000, 7, 64)
  root = tempfile.mkdtemp(prefix="vitcls-bench-predict-")
  try:
    workdir = train_workdir(os.path.join(root, "workdir"), tiny)
    images = os.path.join(root, "images")
    paths = write_digit_jpegs(images, count)
    one = os.path.join(root, "one")
    os.makedirs(one)
    shutil.copy(paths[0], one)
    output = os.path.join(root, "predictions.csv")

    def call(folder):
      return lambda: predict.predict(workdir, folder, output, batch_size=batch_size)

    if not tiny:
      paired_calls(call(one), call(images), 1)  # Warm-up: files cached, threads started.
    fixed, full = paired_calls(call(one), call(images), repeats)  # The last call: all files.
    csv_rows = _csv_rows(output)
    forward_calls = 2 if tiny else 20
    forward, image_shape = bare_forward(workdir, batch_size, 2 if tiny else 5,
                                        forward_calls)
    latency = savedmodel_latency(workdir, os.path.join(root, "savedmodel"), image_shape,
                                 20 if tiny else 300)
  finally:
    shutil.rmtree(root, ignore_errors=True)

  forward_rate = forward.rate(forward_calls * batch_size)
  # Per repeat: the files beyond the first over the time they added.
  volume = [(count - 1) / (b - a) if b > a else float("nan") for a, b in zip(fixed, full)]
  volume_rate = float(np.median(volume))
  ratio = volume_rate / forward_rate["median"]
  fixed_t = common.Timing(float(np.median(fixed)), min(fixed), max(fixed), repeats)
  full_t = common.Timing(float(np.median(full)), min(full), max(full), repeats)
  figures = {
      "images": count, "image_shape": list(image_shape), "batch_size": batch_size,
      "csv_rows": len(csv_rows), "csv_errors": sum(1 for r in csv_rows if r["error"]),
      "predict_one_file": fixed_t.as_dict(), "predict_all_files": full_t.as_dict(),
      "predict_img_per_s_at_volume": {"median": volume_rate, "each": volume},
      "predict_img_per_s_end_to_end": count / full_t.median,
      "forward": {"img_per_s": forward_rate, "timing": forward.as_dict(),
                  "calls_per_timing": forward_calls},
      "predict_at_volume_over_forward": ratio, "savedmodel_latency": latency,
  }
  rows = [
      common.Row(NAME, "predict img/s at volume (fixed cost excluded)", volume_rate, "img/s",
                 f"{min(volume):.3g}-{max(volume):.3g}"),
      common.Row(NAME, "bare forward img/s (same batch, on device)", forward_rate["median"],
                 "img/s", f"{forward_rate['low']:.3g}-{forward_rate['high']:.3g}"),
      common.ratio_row(NAME, "predict at volume / bare forward", ratio, 0.5,
                       f"{min(volume) / forward_rate['high']:.3g}-"
                       f"{max(volume) / forward_rate['low']:.3g}"),
      common.Row(NAME, f"predict img/s end to end ({count} files)", count / full_t.median,
                 "img/s"),
      common.Row(NAME, "predict fixed cost (one file)", fixed_t.median, "s",
                 f"{fixed_t.low:.3g}-{fixed_t.high:.3g}"),
      common.Row(NAME, "SavedModel latency, one image", latency["median_ms"], "ms",
                 f"p10 {latency['p10_ms']:.3g}, p90 {latency['p90_ms']:.3g}"),
  ]
  return common.Result(NAME, figures, rows, tiny=tiny)


if __name__ == "__main__":
  common.main(run)
