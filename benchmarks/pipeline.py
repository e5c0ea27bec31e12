"""Input pipeline speed, in images per second per host core, against what consumes it.

    python -m benchmarks.pipeline [--tiny]

(a) The default experiment (mnist5k, `random_shift(2)|value_range(-1,1)|onehot(10)`,
    batch 128): its input pipeline alone, batches delivered on the device as the trainer
    gets them (`run.batches(0)`), over the images per second the bare jitted train step
    consumes (one device-resident batch). Goal: >= 2, so input never holds the step back
    even with the cores shared. As configured, the split lives on the device
    (`input.on_device`): batches are example indices and the step gathers and shifts
    them. Informative: the host pipeline doing the pp (`input.on_device=False`) over its
    own step.
(b) ImageNet-style input on JPEGs of about 500x375 that this module writes (gradients,
    shapes and noise: 50-110 KB each, as photos of that size), through vitcls's grain
    pipeline with `decode|inception_crop(224)|flip_lr|randaug(2,10)|value_range(-1,1)`
    as the ImageNet experiments configure it (a worker process per core; the closing
    value_range left to the train step, `input.normalize_on_device`, so batches are
    uint8), against the same work in tf.data as big_vision does it
    (`benchmarks/tf_pp.py`: float32 batches), on the same files and batch, both
    delivered on the device alike. Goal: vitcls >= tf.data in img/s per core.
    Informative: the same per CPU-second actually used (fair when other work shares the
    machine), tf.data also shipping uint8, vitcls with threads instead of processes and
    with float32 batches, both without randaug, and tf.data with big_vision's fused
    decode-and-crop (it decodes only the crop).

Every pipeline may use every core this process may run on; per core is img/s divided by
their number. They run one after the other in this process, each to a steady state
first, then closed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import os
import shutil
import tempfile
import time
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from benchmarks import common

NAME = "pipeline"
DEFAULT_EXPERIMENT = "experiments/mnist5k_vit.py"
IMAGENET_PP = "decode|inception_crop({size})|flip_lr|randaug(2,10)|value_range(-1,1)"
NO_RANDAUG_PP = "decode|inception_crop({size})|flip_lr|value_range(-1,1)"


def host_cores() -> int:
  """The cores this process (and so its pipeline threads and workers) may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # Not on Linux.
    return os.cpu_count() or 1


def _repo() -> str:
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _take(it: Iterator, n: int) -> Any:
  """Pulls n batches and waits for the last one's arrays."""
  import jax  # pylint: disable=g-import-not-at-top
  for _ in range(n):
    batch = next(it)
  return jax.block_until_ready(batch)


def _close(it, settle: bool = True) -> None:
  """Stops a pipeline's threads and workers before the next one is timed.

  `settle`: collect what holds them and give them a moment to exit; tiny runs, whose
  timings mean nothing, skip it (a collection takes a quarter second there).
  """
  if hasattr(it, "close"):
    it.close()
  del it
  if settle:
    gc.collect()
    time.sleep(0.2)


# (a) The default experiment.

def pipeline_over_step(tiny: bool, overrides: list[str]) -> dict[str, Any]:
  """The default experiment's pipeline (with `overrides`) over its own bare train step."""
  import jax  # pylint: disable=g-import-not-at-top
  from vitcls import configs
  from vitcls.run import build  # pylint: disable=g-import-not-at-top
  arg = ":runlocal=True" if tiny else ""
  config = configs.resolve(configs.load_experiment(
      os.path.join(_repo(), DEFAULT_EXPERIMENT) + arg), overrides)
  run = build.build(config)
  batch_size = config.input.batch_size
  first = run.batches(0)
  fixed = next(first)
  _close(first, settle=not tiny)

  holder = {"state": run.init_state()}
  steps = 2 if tiny else 10

  def step():
    for _ in range(steps):
      holder["state"], metrics = run.train_step(holder["state"], fixed)
    jax.block_until_ready(metrics)

  step_t = common.time_it(step, repeats=2 if tiny else 5, warmup=1)
  del holder["state"]

  batches = run.batches(0)
  chunk = 2 if tiny else 20
  pipe_t = common.time_it(lambda: _take(batches, chunk), repeats=2 if tiny else 5,
                          warmup=1)
  _close(batches, settle=not tiny)
  cores = host_cores()
  step_rate, pipe_rate = step_t.rate(steps * batch_size), pipe_t.rate(chunk * batch_size)
  return {
      "config": DEFAULT_EXPERIMENT + arg, "overrides": overrides, "batch_size": batch_size,
      "on_device": bool(config.input.on_device), "cores": cores,
      "num_threads": config.input.num_threads, "num_workers": config.input.num_workers,
      "train_step": {"img_per_s": step_rate, "timing": step_t.as_dict(),
                     "steps_per_timing": steps},
      "pipeline": {"img_per_s": pipe_rate, "img_per_s_per_core": pipe_rate["median"] / cores,
                   "timing": pipe_t.as_dict(), "batches_per_timing": chunk},
      "pipeline_over_step": pipe_rate["median"] / step_rate["median"],
      "spread": f"{pipe_rate['low'] / step_rate['high']:.3g}-"
                f"{pipe_rate['high'] / step_rate['low']:.3g}",
  }


def default_experiment(tiny: bool) -> tuple[dict[str, Any], list[common.Row]]:
  """As configured (the split on the device: batches are example indices, augmented in
  the step), the goal; and with the host pipeline doing the pp, informative."""
  configured = pipeline_over_step(tiny, [])
  rows = [
      common.ratio_row(NAME, "mnist5k pipeline / train step, as configured",
                       configured["pipeline_over_step"], 2.0, configured["spread"]),
      common.Row(NAME, "mnist5k train step img/s, as configured (bare)",
                 configured["train_step"]["img_per_s"]["median"], "img/s"),
  ]
  if tiny:  # The same code with one override; its compilation would double a test's time.
    return {"configured": configured}, rows
  host = pipeline_over_step(tiny, ["input.on_device=False"])
  rows += [
      common.Row(NAME, "mnist5k host pipeline img/s per core (input.on_device=False)",
                 host["pipeline"]["img_per_s"]["median"] / host["cores"], "img/s"),
      common.ratio_row(NAME, "mnist5k host pipeline / its train step (on_device=False)",
                       host["pipeline_over_step"], None, host["spread"]),
  ]
  return {"configured": configured, "host_pipeline": host}, rows


# (b) ImageNet-style JPEGs: vitcls's grain pipeline against tf.data.

def natural_image(rng: np.random.Generator, height: int, width: int) -> Image.Image:
  """A photo-like RGB image: colour gradients and waves, blurred shapes, sensor noise.

  Its JPEG (quality 90) is 50-110 KB at 500x375, as ImageNet photos of that size, so
  decoding costs what it costs on real data; pure noise or flat colour would not.
  """
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
  img = np.empty((height, width, 3), np.float32)
  for c in range(3):
    gx, gy, phase = rng.uniform(-0.6, 0.6, 3)
    img[..., c] = (128 + 0.5 * gx * (xx - width / 2) + 0.5 * gy * (yy - height / 2)
                   + 30 * np.sin(xx / rng.uniform(20, 80) + 6 * phase))
  pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(pil)
  for _ in range(int(rng.integers(5, 15))):
    x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
    box = (x0, y0, x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 150)))
    fill = tuple(int(v) for v in rng.integers(0, 256, 3))
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
  pil = pil.filter(ImageFilter.GaussianBlur(1.0))
  noisy = np.asarray(pil, np.float32) + rng.normal(0, rng.uniform(8, 24), img.shape)
  return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def write_jpegs(root: str, count: int, size: tuple[int, int] = (375, 500),
                classes: int = 4, seed: int = 0) -> tuple[list[str], list[int]]:
  """`count` JPEGs in `root/train/<class>/`, a quarter of them portrait; (paths, labels).

  The layout is a vitcls image folder (`folder:root`, split train: every file). Image i
  is drawn from (seed, i), so the files are the same however many threads write them.
  """
  paths = [os.path.join(root, "train", f"class{i % classes}", f"{i:05d}.jpg")
           for i in range(count)]
  for label in range(min(classes, count)):
    os.makedirs(os.path.join(root, "train", f"class{label}"), exist_ok=True)

  def write(i: int) -> None:
    h, w = size if i % 4 else size[::-1]
    image = natural_image(np.random.default_rng((seed, i)), h, w)
    image.save(paths[i], "JPEG", quality=90)

  with concurrent.futures.ThreadPoolExecutor(host_cores()) as pool:
    list(pool.map(write, range(count)))  # NumPy and PIL release the GIL for most of it.
  return paths, [i % classes for i in range(count)]


def vitcls_batches(root: str, spec: str, batch: int, *, num_threads: int,
                   num_workers: int, prefetch: int, normalize_on_device: bool = True,
                   seed: int = 0) -> Iterator:
  """vitcls's training input over `folder:root`: grain, then global arrays on device.

  `normalize_on_device` as the config field (vitcls.run.build): the spec's closing
  value_range stays for the train step, and batches are uint8.
  """
  from vitcls import sharding  # pylint: disable=g-import-not-at-top
  from vitcls.data import pipeline, pp, sources  # pylint: disable=g-import-not-at-top
  if num_workers:
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags.
      flags.FLAGS.mark_as_parsed()
  # Planned as vitcls.run.build plans: a pp that begins with decode gets the files' bytes.
  plan = pp.plan(spec, lambda encoded: sources.get_source(f"folder:{root}", "train",
                                                          encoded_images=encoded),
                 normalize_on_device=normalize_on_device)
  ds = pipeline.train_dataset(plan.source, plan.host, global_batch=batch, seed=seed)
  mesh_sharding = sharding.batch_sharding(sharding.make_mesh([("data", -1)]))
  return pipeline.iterate(ds, mesh_sharding, num_threads=num_threads, prefetch=prefetch,
                          num_workers=num_workers)


def tf_batches(paths: list[str], labels: list[int], batch: int, *, size: int,
               randaug_layers: int, fused_decode: bool = False,
               uint8: bool = False) -> Iterator:
  """big_vision-style tf.data input, delivered on device the way vitcls's is.

  `uint8`: without the closing value_range, as vitcls's normalize_on_device ships it.
  """
  from benchmarks import tf_pp  # pylint: disable=g-import-not-at-top
  from vitcls import sharding  # pylint: disable=g-import-not-at-top
  from vitcls.data import pipeline  # pylint: disable=g-import-not-at-top
  ds = tf_pp.dataset(paths, labels, batch=batch, size=size, randaug_layers=randaug_layers,
                     fused_decode=fused_decode, uint8=uint8)
  mesh_sharding = sharding.batch_sharding(sharding.make_mesh([("data", -1)]))
  for local in ds.as_numpy_iterator():
    yield pipeline.to_global(local, mesh_sharding)


def _hide_gpus_from_tf() -> None:
  """tf.data is host-side; TF must not claim accelerator memory that JAX needs."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  with contextlib.suppress(RuntimeError, ValueError):
    tf.config.set_visible_devices([], "GPU")


def cpu_seconds() -> float:
  """CPU time (user + system) used so far by this process and its live children.

  The children are grain's worker processes; a figure per CPU-second is fair to
  pipelines with different numbers of threads on a machine shared with other work.
  """
  import psutil  # pylint: disable=g-import-not-at-top
  proc = psutil.Process()
  total = sum(proc.cpu_times()[:2])
  for child in proc.children(recursive=True):
    with contextlib.suppress(psutil.Error):
      total += sum(child.cpu_times()[:2])
  return total


def time_pipeline(make, chunk: int, repeats: int, warmup: int, settle: bool = True):
  """(wall Timing of `chunk` batches, CPU seconds over the timed chunks, a batch)."""
  it = make()
  try:
    for _ in range(warmup):
      _take(it, chunk)
    seconds, cpu_start = [], cpu_seconds()
    for _ in range(repeats):
      start = time.perf_counter()
      _take(it, chunk)
      seconds.append(time.perf_counter() - start)
    cpu = cpu_seconds() - cpu_start
    sample = {k: np.asarray(v) for k, v in next(it).items()}
  finally:
    _close(it, settle)
  timing = common.Timing(float(np.median(seconds)), min(seconds), max(seconds), repeats)
  return timing, cpu, sample


def _describe(sample: dict[str, np.ndarray]) -> dict[str, Any]:
  image = sample["image"]
  return {"shape": list(image.shape), "dtype": str(image.dtype),
          "min": float(image.min()), "max": float(image.max()),
          "label_shape": list(sample["label"].shape)}


def imagenet_style(tiny: bool) -> tuple[dict[str, Any], list[common.Row]]:
  """vitcls's grain pipeline against tf.data on the same JPEGs, and variants of both.

  The two pipelines of the goal run in turn, `rounds` times (each round's ratio is taken
  under the same load, and the median of those ratios is the figure); the variants once.
  """
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  _hide_gpus_from_tf()
  cores = host_cores()
  count, size, batch = (16, 32, 4) if tiny else (256, 224, 64)
  image_size = (48, 64) if tiny else (375, 500)
  # 512 images a timing: well past what the pipelines hold ready (tf.data's autotuned
  # prefetch, grain's buffers), which shorter timings would credit as speed.
  chunk, repeats, warmup, rounds = (1, 1, 1, 1) if tiny else (8, 3, 2, 3)
  # vitcls as the ImageNet experiments configure it: worker processes (one per core;
  # the GIL serialises the Python parts of decoding and RandAugment in threads), uint8
  # batches (input.normalize_on_device). Threads overlap what releases the GIL: two per
  # core, as vitcls's default of 4 on 2 cores.
  # Tiny runs (the test suite) start no processes: that takes seconds.
  processes = dict(num_threads=2, num_workers=0 if tiny else cores, prefetch=4)
  threads = dict(num_threads=2 * cores, num_workers=0, prefetch=4)
  full_pp, no_randaug_pp = IMAGENET_PP.format(size=size), NO_RANDAUG_PP.format(size=size)
  root = tempfile.mkdtemp(prefix="vitcls-bench-jpegs-")
  try:
    start = time.perf_counter()
    paths, labels = write_jpegs(root, count, image_size)
    write_s = time.perf_counter() - start
    kb = [os.path.getsize(p) / 1024 for p in paths]
    makers = {
        "vitcls": lambda: vitcls_batches(root, full_pp, batch, **processes),
        "tf_data": lambda: tf_batches(paths, labels, batch, size=size, randaug_layers=2),
        "vitcls_threads": lambda: vitcls_batches(root, full_pp, batch, **threads),
        "vitcls_float_batches": lambda: vitcls_batches(root, full_pp, batch, **processes,
                                                       normalize_on_device=False),
        "tf_data_uint8": lambda: tf_batches(paths, labels, batch, size=size,
                                            randaug_layers=2, uint8=True),
        "vitcls_no_randaug": lambda: vitcls_batches(root, no_randaug_pp, batch,
                                                    **processes),
        "tf_data_no_randaug": lambda: tf_batches(paths, labels, batch, size=size,
                                                 randaug_layers=0),
        "tf_data_fused_decode": lambda: tf_batches(paths, labels, batch, size=size,
                                                   randaug_layers=2, fused_decode=True),
    }
    order = ["vitcls", "tf_data"] * rounds + list(makers)[2:]
    if tiny:  # For the test suite: each kind of vitcls and tf.data pipeline once.
      order = ["vitcls", "tf_data", "vitcls_float_batches", "tf_data_uint8"]
    measured: dict[str, list[dict[str, Any]]] = {}
    for name in order:
      timing, cpu, sample = time_pipeline(makers[name], chunk, repeats, warmup,
                                          settle=not tiny)
      measured.setdefault(name, []).append({
          "img_per_s": timing.rate(chunk * batch)["median"],
          "img_per_cpu_s": chunk * batch * repeats / cpu if cpu > 0
                           else float("nan"),  # Tiny runs: below the clock's tick.
          "cpu_s": cpu, "timing": timing.as_dict(), "batch": _describe(sample)})
  finally:
    shutil.rmtree(root, ignore_errors=True)
  figures = {
      "images": count, "image_size_hw": list(image_size),
      "jpeg_kb": {"min": min(kb), "median": float(np.median(kb)), "max": max(kb)},
      "write_s": write_s, "batch_size": batch, "crop_size": size, "cores": cores,
      "pp": full_pp, "grain_threads": threads, "grain_processes": processes,
      "batches_per_timing": chunk, "timings_per_run": repeats, "rounds": rounds,
      "pipelines": measured,
  }
  label = f"{image_size[1]}x{image_size[0]} JPEG->{size}"
  return figures, _imagenet_rows(measured, cores, label)


def _median(runs: list[dict[str, Any]], key: str) -> float:
  return float(np.median([r[key] for r in runs]))


def _imagenet_rows(measured, cores: int, label: str) -> list[common.Row]:
  """Per-core img/s of the two main pipelines, then vitcls / tf.data ratios."""
  rows = []
  for name, who in (("vitcls", "vitcls grain, worker processes"), ("tf_data", "tf.data")):
    rates = [r["img_per_s"] / cores for r in measured[name]]
    rows.append(common.Row(NAME, f"{label}: {who} img/s per core",
                           float(np.median(rates)), "img/s",
                           f"{min(rates):.3g}-{max(rates):.3g} over rounds"))

  def ratio(a, b, figure, goal=None, key="img_per_s"):
    if a not in measured or b not in measured:
      return
    if len(measured[a]) == len(measured[b]) > 1:  # Paired rounds: the median ratio.
      each = [x[key] / y[key] for x, y in zip(measured[a], measured[b])]
      value, spread = float(np.median(each)), f"{min(each):.3g}-{max(each):.3g}"
    else:
      value, spread = _median(measured[a], key) / _median(measured[b], key), ""
    rows.append(common.ratio_row(NAME, figure, value, goal, spread))

  ratio("vitcls", "tf_data", "ImageNet-style vitcls / tf.data, img/s per core", 1.0)
  ratio("vitcls", "tf_data", "ImageNet-style vitcls / tf.data, img per CPU-second",
        key="img_per_cpu_s")
  ratio("vitcls", "tf_data_uint8",
        "ImageNet-style vitcls / tf.data also shipping uint8 (value_range in the step)")
  ratio("vitcls_threads", "tf_data", "ImageNet-style vitcls threads / tf.data")
  ratio("vitcls_float_batches", "tf_data",
        "ImageNet-style vitcls float32 batches (normalize_on_device=False) / tf.data")
  ratio("vitcls_no_randaug", "tf_data_no_randaug",
        "ImageNet-style vitcls / tf.data, both without randaug")
  ratio("vitcls", "tf_data_fused_decode",
        "ImageNet-style vitcls / tf.data with fused decode+crop")
  return rows


def run(tiny: bool) -> common.Result:
  """(a) the default experiment's input over its step, (b) ImageNet-style vitcls over tf.data."""
  default_figures, default_rows = default_experiment(tiny)
  imagenet_figures, imagenet_rows = imagenet_style(tiny)
  return common.Result(NAME, {"default_experiment": default_figures,
                              "imagenet_style": imagenet_figures},
                       default_rows + imagenet_rows, tiny=tiny)


if __name__ == "__main__":
  common.main(run)
