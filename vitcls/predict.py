"""`python -m vitcls.predict --workdir=DIR --input=FILE_OR_FOLDER --output=preds.csv`.

Classifies image files with a workdir's checkpoint and writes one CSV row per file: its
path, the top-k labels (names where the dataset has them) with their probabilities, an
OOD score (the negative maximum softmax probability) and an "I don't know" flag when that
score is above the threshold chosen on in-distribution validation data: the ood
evaluator's `msp/threshold` when the run has one, else the score below which 95% of the
first evaluator's split falls. A file that cannot be read gets a row with its error; the
run never stops for one file. `--output` replaces only a predictions CSV (or an empty
file); it and the other flags are checked before the checkpoint is read.
"""

from __future__ import annotations

import csv
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app, logging
import jax
import numpy as np

from vitcls import flags, inspection, sharding
from vitcls.run import workdir as wdir
from vitcls.data import pp as pp_lib
from vitcls.data.pp import image as pp_image
from vitcls.errors import UserError

FLAGS = flags.FLAGS
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")
LAST_COLUMNS = ["ood_score", "ood_flag", "error"]  # After path and the top-k labels.


def _define_flags() -> list[str]:
  """This CLI's flags (defined when it starts); their names."""
  return [
      *flags.define_checkpoint(),
      flags.define("string", "input", None, "An image file, or a folder searched "
                   "recursively."),
      flags.define("string", "output", "predictions.csv", "The CSV to write."),
      flags.define("integer", "topk", 5, "Labels per row."),
      flags.define("integer", "batch_size", 64, "Images per forward pass."),
  ]


def columns(topk: int) -> list[str]:
  """The CSV's header."""
  labels = [f"{k}_{r}" for r in range(1, topk + 1) for k in ("label", "prob")]
  return ["path", *labels, *LAST_COLUMNS]


def is_predictions(path: str) -> bool:
  """A CSV this command wrote (its header), which a new one may replace."""
  try:
    with open(path, newline="", encoding="utf-8") as f:
      header = next(csv.reader([f.readline(1 << 16)]), [])
  except (OSError, UnicodeDecodeError, csv.Error):
    return False
  return header[:1] == ["path"] and header[-len(LAST_COLUMNS):] == LAST_COLUMNS


PREDICTIONS = wdir.Output("a predictions CSV", folder=False, is_own=is_predictions)


def check_flags(output: str, topk: int, batch_size: int) -> None:
  """Refuses bad values (UserError) before any work: a count below 1, an output that
  would replace what is not a predictions CSV."""
  for name, value in (("topk", topk), ("batch_size", batch_size)):
    if value < 1:
      raise UserError(f"--{name} must be a positive integer, got {value!r}")
  wdir.check_output(output, PREDICTIONS)


def list_images(path: str) -> list[str]:
  """`path` itself, or every file under the folder `path` with an image suffix, sorted."""
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise UserError(f"--input '{path}' is neither a file nor a folder")
  files = sorted(os.path.join(root, name) for root, _, names in os.walk(path)
                 for name in names if name.lower().endswith(IMAGE_SUFFIXES))
  if not files:
    raise UserError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under '{path}'")
  return files


def load_image(path: str, pp: pp_lib.Preprocess, image_shape) -> np.ndarray:
  """A file -> the model's float input: `pp` (decode + the eval pp), a resize if needed."""
  with open(path, "rb") as f:
    data = f.read()
  if not data:
    raise UserError("empty file")
  image = pp({"image": data, "label": 0}, np.random.default_rng(0))["image"]
  if image.shape != tuple(image_shape):
    image = pp_image.resize_image(
        np.asarray(image, np.float32), tuple(image_shape[:2]), "bilinear")
  return np.asarray(image, np.float32)


def _load_chunk(paths: list[str], pp: pp_lib.Preprocess, image_shape):
  """(model inputs of the files that load, {path: one-line error} of those that don't)."""
  images, errors = [], {}
  for path in paths:
    try:
      images.append(load_image(path, pp, image_shape))
    except (OSError, UserError, ValueError) as e:
      errors[path] = str(e).splitlines()[0] if str(e) else type(e).__name__
  return images, errors


def predict(workdir: str, inputs: str, output: str, *, topk: int = 5, step=None,
            batch_size: int = 64) -> dict[str, int]:
  """Writes the predictions CSV; returns {'predicted': n, 'failed': m, 'flagged': k}."""
  check_flags(output, topk, batch_size)
  files = list_images(inputs)
  config, model, params = inspection.load_run(workdir, step)
  mesh = sharding.make_mesh([("data", 1)], jax.devices()[:1])
  pp_spec, image_shape, names = inspection.serving_inputs(config)
  pp = pp_lib.parse(f"decode(channels={image_shape[-1]})|{pp_spec}")
  threshold = inspection.ood_threshold(workdir, config, model, params, mesh)
  forward = jax.jit(lambda p, x: jax.nn.softmax(model.apply({"params": p}, x)[0]))
  on_device = jax.device_put(params)  # Once, not with every batch.
  topk = min(topk, config.num_classes)
  rows, counts = [], {"predicted": 0, "failed": 0, "flagged": 0}
  chunks = [files[start:start + batch_size] for start in range(0, len(files), batch_size)]
  loaded = _load_chunk(chunks[0], pp, image_shape) if chunks else None
  for i, chunk in enumerate(chunks):
    images, errors = loaded
    if images:  # Dispatched, not waited for: the model runs while the next files load.
      batch = np.stack(images + [images[0]] * (batch_size - len(images)))  # One shape: one compile.
      pending = forward(on_device, batch)
    if i + 1 < len(chunks):
      loaded = _load_chunk(chunks[i + 1], pp, image_shape)
    if images:
      probs = np.asarray(pending)[:len(images)]
    good = iter(range(len(images)))
    for path in chunk:
      if path in errors:
        rows.append({"path": path, "error": errors[path]})
        counts["failed"] += 1
        continue
      p = probs[next(good)]
      order = np.argsort(-p)[:topk]
      score = float(-p.max())
      row = {"path": path, "ood_score": f"{score:.6f}", "ood_flag": int(score > threshold),
             "error": ""}
      for rank, c in enumerate(order, 1):
        row[f"label_{rank}"] = names[c] if names else str(c)
        row[f"prob_{rank}"] = f"{p[c]:.6f}"
      rows.append(row)
      counts["predicted"] += 1
      counts["flagged"] += row["ood_flag"]
  with wdir.atomic_file(output, "w", newline="", kind=PREDICTIONS) as f:
    writer = csv.DictWriter(f, fieldnames=columns(topk))
    writer.writeheader()
    writer.writerows(rows)
  if counts["failed"]:
    bad = [r["path"] for r in rows if r.get("error")][:3]
    logging.warning("Could not read %d of %d files (e.g. %s); their rows hold the error.",
                    counts["failed"], len(files), ", ".join(bad))
  return counts


def main(argv) -> None:
  """absl entry point: writes `--output` (CSV) for `--input`, prints counts; user errors exit 2."""
  del argv
  try:
    if not FLAGS.workdir or not FLAGS.input:
      raise UserError("both --workdir=DIR and --input=FILE_OR_FOLDER are required")
    counts = predict(FLAGS.workdir, FLAGS.input, FLAGS.output, topk=FLAGS.topk,
                     step=FLAGS.step, batch_size=FLAGS.batch_size)
  except UserError as e:
    print(f"vitcls: error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"Wrote {FLAGS.output}: {counts['predicted']} predicted, {counts['flagged']} "
        f"flagged as unlike the training data, {counts['failed']} unreadable.")


def run() -> None:
  """Entry point shared by `python -m vitcls.predict` and `vitcls predict`."""
  app.run(main, flags_parser=flags.parser(None, _define_flags()))


if __name__ == "__main__":
  run()
