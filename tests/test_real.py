"""ImageNet-ReaL: the metric against sets counted by hand, the evaluator on a tiny
`imagenet2012_real` written with TFDS's own builder features."""

import jax.numpy as jnp
import numpy as np
import pytest

from vitcls import configs, evaluators, metrics, sharding


def _by_hand(logits, sets):
  """top1, count, skipped with Python sets and a loop: independent of real_accuracy."""
  right = seen = 0
  for row, labels in zip(logits.tolist(), sets):
    if not labels:
      continue
    best = max(range(len(row)), key=lambda k: (row[k], -k))  # First maximum.
    seen += 1
    right += best in labels
  return right / seen, seen, len(sets) - seen


def test_real_accuracy_matches_a_count_by_hand():
  rng = np.random.default_rng(0)
  n, k = 500, 12
  logits = rng.integers(0, 4, size=(n, k)).astype(np.float32)  # Many ties.
  sets = [set(rng.choice(k, size=rng.integers(0, 4), replace=False).tolist())
          for _ in range(n)]
  multihot = np.zeros((n, k), np.float32)
  for i, labels in enumerate(sets):
    multihot[i, sorted(labels)] = 1.0
  got = metrics.real_accuracy(logits, multihot)
  top1, count, skipped = _by_hand(logits, sets)
  assert skipped > 0 and (got.count, got.skipped) == (count, skipped)
  assert got.top1 == pytest.approx(top1, abs=1e-12)


def test_real_accuracy_edge_cases():
  assert np.isnan(metrics.real_accuracy(np.zeros((2, 3)), np.zeros((2, 3))).top1)
  assert metrics.real_accuracy([[0, 1, 0]], [[0, 1, 1]]) == (1.0, 1, 0)
  with pytest.raises(ValueError, match="same"):
    metrics.real_accuracy(np.zeros((2, 3)), np.zeros((2, 4)))


class _Nearest:
  """A stand-in model: predicts the class 40 * round(mean pixel / 40)."""

  def apply(self, variables, images, train=False):
    del variables, train
    pred = 40.0 * jnp.round(images.reshape(images.shape[0], -1).mean(axis=1) / 40.0)
    logits = -(jnp.arange(1000)[None, :] - pred[:, None]) ** 2
    return logits, {"pre_logits": logits[:, :4]}


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory):
  """`imagenet2012_real` (validation, 7 images) as TFDS defines it, in ArrayRecord."""
  import tensorflow_datasets as tfds
  from tensorflow_datasets.datasets.imagenet2012_real import (
      imagenet2012_real_dataset_builder as real_builder)
  # (constant pixel value, real_label): the model predicts the pixel value.
  rows = [(0, [0]), (40, [40, 41]), (80, [7]), (120, []), (160, [160]), (200, []),
          (240, [3, 9])]

  path = str(tmp_path_factory.mktemp("real"))
  features = real_builder.Builder(data_dir=path).info.features  # TFDS's own definition.

  class Tiny(real_builder.Builder, skip_registration=True):
    name = "imagenet2012_real"

    def _info(self):  # The parent's reads metadata files beside this test's module.
      return tfds.core.DatasetInfo(builder=self, features=features,
                                   supervised_keys=("image", "real_label"))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"validation": self._generate_examples(None, None, None)}

    def _generate_examples(self, archive, original_labels, real_labels):
      for i, (value, labels) in enumerate(rows):
        yield i, {"image": np.full((8, 8, 3), value, np.uint8), "original_label": 0,
                  "real_label": labels, "file_name": f"ILSVRC2012_val_{i:08d}.JPEG"}

  Tiny(data_dir=path, file_format="array_record").download_and_prepare(
      file_format="array_record")
  assert "real_label" in tfds.builder("imagenet2012_real", data_dir=path).info.features
  return path


def test_real_evaluator_end_to_end(real_dir):
  """5 labelled images, 3 predictions in their sets; the 2 empty sets skipped."""
  train_config = configs.resolve(configs.ConfigDict(), [f"input.data_dir={real_dir}"])
  config = evaluators.resolve("real", configs.ConfigDict(dict(
      type="real", batch_size=4,
      pp="decode|multihot(1000,key='real_label',key_result='labels')")))
  assert (config.data, config.split) == ("imagenet2012_real", "validation")
  mesh = sharding.make_mesh([("data", -1)])
  evaluator = evaluators.get("real").Evaluator(
      config, model=_Nearest(), train_config=train_config, mesh=mesh,
      batch_sharding=sharding.batch_sharding(mesh))
  result = evaluator.run({})
  assert result.scalars["top1"] == pytest.approx(3 / 5)
  assert (result.scalars["count"], result.scalars["skipped"]) == (5.0, 2.0)
  assert np.isfinite(result.scalars["loss"]) and result.arrays == {}
