"""Smoke tests of the input, prediction and checkpoint benchmarks at tiny sizes: they run, write their
JSON, and what each compares is comparable. Tiny timings mean nothing: none is asserted."""

import json
import os

import numpy as np

from benchmarks import checkpoint_cost, common, pipeline, predict


def _written(result, tmp_path):
  path = common.write(result, str(tmp_path))
  assert os.path.basename(path) == f"{result.name}_tiny.json"
  with open(path) as f:
    data = json.load(f)
  assert data["tiny"] and data["rows"] and data["machine"]["cpus"]
  return data


def _goals(data):
  return {r["figure"]: r["goal"] for r in data["rows"] if r["goal"]}


def test_pipeline_compares_batches_of_the_same_kind(tmp_path):
  data = _written(pipeline.run(tiny=True), tmp_path)
  goals = _goals(data)
  assert goals["mnist5k pipeline / train step, as configured"] == ">= 2"
  assert goals["ImageNet-style vitcls / tf.data, img/s per core"] == ">= 1"
  runs = data["figures"]["imagenet_style"]["pipelines"]
  # vitcls ships uint8 (input.normalize_on_device) as tf_data_uint8 does; the float32
  # pair does value_range on the host. Each is the batch its trainer would take.
  kinds = {"vitcls": "uint8", "tf_data_uint8": "uint8", "tf_data": "float32",
           "vitcls_float_batches": "float32"}
  assert set(runs) == set(kinds)
  for name, (run,) in runs.items():
    batch = run["batch"]
    assert batch["shape"] == [4, 32, 32, 3] and batch["dtype"] == kinds[name], name
    low, high = (0, 255) if kinds[name] == "uint8" else (-1, 1)
    assert low <= batch["min"] < batch["min"] + (high - low) / 4 < batch["max"] <= high, name
    assert batch["label_shape"] == [4], name
    assert run["img_per_s"] > 0, name


def test_benchmark_jpegs_are_photo_sized(tmp_path):
  """500x375 JPEGs of 40-160 KB, as ImageNet's: decoding them costs what photos cost."""
  paths, labels = pipeline.write_jpegs(str(tmp_path), 4)
  kb = [os.path.getsize(p) / 1024 for p in paths]
  assert all(40 < k < 160 for k in kb), kb
  assert labels == [0, 1, 2, 3]


def test_tf_randaug_operations_keep_uint8_images_of_the_same_shape():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from benchmarks import tf_pp  # pylint: disable=g-import-not-at-top
  image = tf.constant(np.random.default_rng(0).integers(0, 256, (12, 16, 3), np.uint8))
  for name, op in tf_pp.OPS.items():
    out = op(image, 10.0)
    assert out.dtype == tf.uint8 and tuple(out.shape) == (12, 16, 3), name
  np.testing.assert_array_equal(tf_pp.OPS["Invert"](image, 10.0), 255 - image.numpy())


def test_predict_writes_a_row_per_image(tmp_path):
  data = _written(predict.run(tiny=True), tmp_path)
  figures = data["figures"]
  assert figures["csv_rows"] == figures["images"] == 24 and figures["csv_errors"] == 0
  assert _goals(data) == {"predict at volume / bare forward": ">= 0.5"}
  assert figures["savedmodel_latency"]["median_ms"] > 0
  assert figures["image_shape"] == [28, 28, 1]



def test_checkpoint_cost_sets_the_checksums_beside_a_save_of_the_same_state(tmp_path):
  result = checkpoint_cost.run(tiny=True)
  figures = result.figures
  # ViT-Ti/16, 1,000 classes: 5,717,416 parameters at 224 px with a class token (197
  # position embeddings of width 192); pooled by GAP (no class token) at 32 px there are
  # 4 position embeddings; times 3 (params, AdamW's mu and nu).
  assert figures["numbers"] == 3 * (5_717_416 - 192 - (197 - 4) * 192)
  sums = min(t["median"] for t in figures["checksums_s"])
  assert figures["checksums_over_save"] == sums / figures["save_s"]["median"]
  assert figures["checksums_over_restore"] == sums / figures["restore_s"]["median"]
  data = _written(result, tmp_path)
  assert [r["unit"] for r in data["rows"]] == ["ms", "x", "x"]
