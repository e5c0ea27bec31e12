"""Label reading without images, and class-balanced sampling of the training stream."""

import pickle

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from vitcls import configs, validate
from vitcls.data import pipeline, sources
from vitcls.data import pp as pp_lib
from vitcls.errors import UserError


def _read_labels(source):
  return np.array([source[i]["label"] for i in range(len(source))])


# Labels and label counts.

@pytest.mark.parametrize("name, split", [("mnist5k", "train"), ("digits", "train"),
                                         ("digits", "test")])
def test_labels_and_counts_equal_reading_every_example(name, split):
  expected = _read_labels(sources.get_source(name, split))
  got = sources.labels(name, split)
  assert got.dtype == np.int64
  np.testing.assert_array_equal(got, expected)  # By index, not just as a multiset.
  counts = sources.label_counts(name, split)
  assert counts.dtype == np.int64 and counts.tolist() == np.bincount(expected).tolist()
  if name == "mnist5k":
    assert counts.tolist() == [400] * 10


def test_labels_are_read_without_decoding_images(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("an image was decoded")
  monkeypatch.setattr(tfds.features.Image, "decode_example_np", refuse)
  monkeypatch.setattr(tfds.features.Image, "decode_example", refuse)
  with pytest.raises(AssertionError, match="decoded"):  # The patch does catch decoding,
    sources.get_source("digits", "test")[0]  # pylint: disable=expression-not-assigned
  assert sources.label_counts("digits", "test").sum() == 359  # yet labels need none.


def test_nested_images_are_skipped_and_other_features_kept(tmp_path):
  class NestedImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(2, 2, 1)),
          "extra": tfds.features.FeaturesDict({
              "thumb": tfds.features.Image(shape=(1, 1, 1)), "n": np.int64}),
          "objects": tfds.features.Sequence({"cls": tfds.features.ClassLabel(
              num_classes=2)}),
          "label": tfds.features.ClassLabel(num_classes=4)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(9):
        yield i, {"image": np.zeros((2, 2, 1), np.uint8),
                  "extra": {"thumb": np.zeros((1, 1, 1), np.uint8), "n": i},
                  "objects": {"cls": [1] * (i % 3)}, "label": i % 3}

  NestedImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare(
      file_format="array_record")
  features = tfds.builder("nested_images", data_dir=str(tmp_path)).info.features
  decoders = sources._skip_images(  # pylint: disable=protected-access
      features, exclude="label")
  assert set(decoders) == {"image", "extra"} and set(decoders["extra"]) == {"thumb"}
  labels = sources.labels("nested_images", "train", str(tmp_path))
  assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
  # The ClassLabel declares 4 classes, so the unseen class 3 is counted too.
  counts = sources.label_counts("nested_images", "train", str(tmp_path))
  assert counts.tolist() == [3, 3, 3, 0]
  for key in ["objects", "extra"]:
    with pytest.raises(sources.LabelFeatureError, match=f"'{key}' .* not one integer"):
      sources.labels("nested_images", "train", str(tmp_path), key=key)


def test_missing_label_key_is_one_clear_error():
  with pytest.raises(sources.LabelFeatureError) as e:
    sources.labels("mnist5k", "train", key="digit")
  message = str(e.value)
  assert isinstance(e.value, UserError) and "\n" not in message
  assert "no feature 'digit'" in message and "its features are: image, label" in message


def test_num_classes_pads_counts_and_rejects_labels_beyond_it():
  counts = sources.label_counts("digits", "test", num_classes=12)
  assert len(counts) == 12 and counts[10:].tolist() == [0, 0] and counts.sum() == 359
  with pytest.raises(sources.LabelFeatureError, match=r"outside \[0, 5\)"):
    sources.label_counts("digits", "test", num_classes=5)


# Class-balanced sampling.

_IMBALANCED = np.array([0] * 5 + [1] * 50 + [2] * 500)


class _LabelledSource:
  """Example i carries its index as `id` (kept by every pp op) and label `labels[i]`."""

  def __init__(self, labels):
    self.labels = np.asarray(labels)

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    return {"image": np.full((2, 2, 1), i, np.int32), "label": int(self.labels[i]),
            "id": i}


def _balanced(global_batch=30, seed=0, labels=_IMBALANCED, pp="", **kw):
  return pipeline.train_dataset(_LabelledSource(labels), pp_lib.parse(pp),
                                global_batch=global_batch, seed=seed,
                                balanced_labels=labels, **kw)


def _stream_ids(ds, steps):
  return np.concatenate([ds[k]["id"] for k in range(steps)])


def test_every_class_gets_an_equal_share():
  ids = _stream_ids(_balanced(global_batch=100), 100)  # 10,000 positions.
  shares = np.bincount(_IMBALANCED[ids], minlength=3) / len(ids)
  np.testing.assert_allclose(shares, 1 / 3, atol=0.02)
  blocks = _IMBALANCED[ids[:9999]].reshape(-1, 3)  # Exactly: each block of 3 is 0, 1, 2.
  assert (np.sort(blocks, axis=1) == [0, 1, 2]).all()
  assert len({tuple(b) for b in blocks[:30]}) > 1  # In an order that varies by block.


def test_class_ids_need_not_be_contiguous():
  labels = np.array([9] * 40 + [3] * 4)
  ids = _stream_ids(_balanced(global_batch=10, labels=labels), 20)
  assert np.bincount(labels[ids]).tolist()[3::6] == [100, 100]


def test_each_class_runs_through_its_examples_without_replacement():
  ids = _stream_ids(_balanced(global_batch=30), 34)  # 1020 positions: 340 per class.
  for c, size in [(0, 5), (1, 50)]:
    visits = ids[_IMBALANCED[ids] == c]
    epochs = visits[:len(visits) // size * size].reshape(-1, size)
    members = np.flatnonzero(_IMBALANCED == c)
    for epoch in epochs:  # Every example once per epoch, in a fresh order each epoch.
      assert sorted(epoch) == members.tolist()
    assert len({tuple(e) for e in epochs}) > 1
  big = ids[_IMBALANCED[ids] == 2]
  assert len(set(big)) == len(big) == 340  # Not one repeat before its epoch ends.


def test_the_stream_is_a_pure_function_of_seed_and_position():
  full = _balanced(global_batch=12, pp="random_shift(1)")
  fresh = pipeline.BalancedSource(_LabelledSource(_IMBALANCED), _IMBALANCED, seed=0)
  for k in [0, 1, 7, 123_456_789]:
    resumed = _balanced(global_batch=12, pp="random_shift(1)", start_step=k)
    batch = full[k]
    for key in ["id", "image", "label"]:
      np.testing.assert_array_equal(resumed[0][key], batch[key])
    assert batch["id"].tolist() == [fresh.index(i) for i in range(12 * k, 12 * (k + 1))]
  again = pickle.loads(pickle.dumps(fresh))  # As grain's worker processes receive it.
  assert [again.index(i) for i in range(50)] == [fresh.index(i) for i in range(50)]
  other = _balanced(global_batch=12, seed=1)
  assert _stream_ids(other, 3).tolist() != _stream_ids(full, 3).tolist()


@pytest.mark.parametrize("process_count", [2, 3])
def test_processes_hold_contiguous_slices_of_the_balanced_batch(process_count):
  whole = _balanced(global_batch=12, pp="random_shift(1)", start_step=4)
  parts = [_balanced(global_batch=12, pp="random_shift(1)", start_step=4,
                     process_index=p, process_count=process_count)
           for p in range(process_count)]
  for k in range(3):
    for key in ["id", "image"]:
      np.testing.assert_array_equal(
          np.concatenate([part[k][key] for part in parts]), whole[k][key])


def test_large_classes_use_the_index_shuffle_and_stay_without_replacement():
  size = pipeline._SMALL_PERMUTATION + 3  # pylint: disable=protected-access
  labels = np.array([0] * size + [1] * 2)
  source = pipeline.BalancedSource(_LabelledSource(labels), labels, seed=5)
  visits = [source.index(i) for i in range(2 * size) if labels[source.index(i)] == 0]
  assert sorted(visits) == list(range(size))


@pytest.mark.parametrize("labels, message", [
    (np.zeros(3, np.int64), "one label per example"),
    (np.array([0, -1, 1, 2]), "non-negative integer labels"),
    (np.array([0.0, 1.0, 1.0, 2.0]), "non-negative integer labels"),
])
def test_bad_balanced_labels_are_an_error(labels, message):
  with pytest.raises(ValueError, match=message):
    pipeline.train_dataset(_LabelledSource([0, 1, 1, 2]), pp_lib.parse(""),
                           global_batch=2, seed=0, balanced_labels=labels)


def test_without_balanced_labels_the_stream_is_unchanged():
  """The default path is the plain grain shuffle, built exactly as before this option."""
  source = sources.get_source("digits", "train")
  pp = pp_lib.parse("random_shift(1)|value_range(-1,1)|onehot(10)")
  for p in range(2):
    ds = pipeline.train_dataset(source, pp, global_batch=16, seed=3, start_step=5,
                                process_index=p, process_count=2)
    before = grain.MapDataset.source(source).seed(3).shuffle().repeat().random_map(pp)
    before = before.batch(8, drop_remainder=True)[p::2][5:]
    for k in range(3):
      for key in ["image", "labels"]:
        np.testing.assert_array_equal(ds[k][key], before[k][key])


# Repeated augmentation (DeiT's RASampler): each example k times, each copy augmented anew.

class _Draw:
  """A pp that records the first draw of its rng: copies differ iff their rngs do."""

  def __call__(self, example, rng):
    return {**example, "draw": rng.integers(2**62)}


def _repeated(n=23, global_batch=12, repeats=3, pp=None, labels=None, **kw):
  labels = np.zeros(n, np.int64) if labels is None else labels
  return pipeline.train_dataset(_LabelledSource(labels), pp or _Draw(),
                                global_batch=global_batch, seed=4, repeats=repeats, **kw)


def _positions(ds, global_batch, count):
  """The example id at each of the first `count` stream positions (whole batches read)."""
  steps = -(-count // global_batch)
  return np.concatenate([ds[k]["id"] for k in range(steps)])[:count]


@pytest.mark.parametrize("n, global_batch, repeats", [(23, 12, 3), (40, 12, 3), (9, 4, 2),
                                                      (7, 2, 3)])
def test_every_cycle_of_k_epochs_holds_every_example_exactly_k_times(n, global_batch,
                                                                      repeats):
  cycles = 3
  ids = _positions(_repeated(n, global_batch, repeats), global_batch, cycles * repeats * n)
  for cycle in ids.reshape(cycles, repeats * n):
    assert np.bincount(cycle, minlength=n).tolist() == [repeats] * n
  orders = [tuple(dict.fromkeys(cycle)) for cycle in ids.reshape(cycles, -1)]
  assert len(set(orders)) == cycles  # A fresh order each cycle.


@pytest.mark.parametrize("n, global_batch, repeats", [(23, 12, 3), (48, 12, 3),
                                                      (30, 16, 2), (3, 12, 3)])
def test_copies_are_batch_size_over_k_apart_within_one_or_two_batches(n, global_batch,
                                                                      repeats):
  ids = _positions(_repeated(n, global_batch, repeats), global_batch, 2 * repeats * n)
  width = global_batch // repeats
  for start in (0, repeats * n):  # Each cycle on its own: an example recurs in the next.
    cycle = ids[start:start + repeats * n]
    for example in range(n):
      where = start + np.flatnonzero(cycle == example)
      gaps = set(np.diff(where).tolist())
      allowed = [{width}, {width + n % width}] if n >= width else [{n}]  # Last block: + rest.
      assert gaps in allowed, (example, where)
      assert where[-1] - where[0] < 2 * global_batch
      batches = where // global_batch
      assert batches[-1] - batches[0] <= (1 if gaps == {width} else 2)
      if n % width == 0 and global_batch % repeats == 0:  # Blocks are whole batches:
        assert len(set(where // global_batch)) == 1  # all copies in one step, as DeiT's.
      if n >= width:  # With P = k processes: one copy on each.
        assert len(set((where // (global_batch // repeats)).tolist())) == repeats


def test_each_copy_gets_its_own_augmentation_rng():
  ds = _repeated(23, 12, 3)
  batches = [ds[k] for k in range(12)]  # 144 positions: two whole cycles (138) and more.
  ids = np.concatenate([b["id"] for b in batches])
  draws = np.concatenate([b["draw"] for b in batches])
  assert len(set(draws.tolist())) == len(draws)  # Every position its own rng.
  images = np.concatenate([b["image"] for b in batches])
  np.testing.assert_array_equal(images[:, 0, 0, 0], ids)  # Each copy is its example.
  shifted = _repeated(23, 12, 3, pp=pp_lib.parse("random_shift(1)"),
                      labels=np.zeros(23, np.int64))
  assert shifted[0]["image"].shape == (12, 2, 2, 1)


def test_repeated_stream_resumes_exactly_at_any_step():
  full = _repeated(23, 12, 3)
  for k in [0, 1, 5, 11, 12, 123_456_789]:
    resumed = _repeated(23, 12, 3, start_step=k)
    batch = full[k]
    for key in ["id", "image", "draw"]:
      np.testing.assert_array_equal(resumed[0][key], batch[key])
  window = _repeated(23, 12, 3, start_step=7)  # Steps 7..11 after a restart at 7.
  for k in range(7, 12):
    np.testing.assert_array_equal(window[k - 7]["draw"], full[k]["draw"])
  stream = pipeline.example_stream(_LabelledSource(np.zeros(23)), 4, repeats=3,
                                   global_batch=12)
  again = pickle.loads(pickle.dumps(stream))  # As grain's worker processes receive it.
  assert [again[i]["id"] for i in range(80)] == [stream[i]["id"] for i in range(80)]


@pytest.mark.parametrize("process_count", [2, 3])
def test_processes_hold_contiguous_slices_of_the_repeated_batch(process_count):
  whole = _repeated(23, 12, 3, start_step=4)
  parts = [_repeated(23, 12, 3, start_step=4, process_index=p,
                     process_count=process_count) for p in range(process_count)]
  for k in range(8):
    for key in ["id", "image", "draw"]:
      np.testing.assert_array_equal(
          np.concatenate([part[k][key] for part in parts]), whole[k][key])


def test_one_repeat_leaves_both_streams_bitwise_as_before():
  source = _LabelledSource(np.arange(50) % 3)
  for p in range(2):  # The plain grain shuffle, built exactly as before this option.
    before = grain.MapDataset.source(source).seed(3).shuffle().repeat().random_map(_Draw())
    before = before.batch(8, drop_remainder=True)[p::2][5:]
    ds = pipeline.train_dataset(source, _Draw(), global_batch=16, seed=3, start_step=5,
                                process_index=p, process_count=2, repeats=1)
    for k in range(8):  # 128 positions: across epochs of 50.
      for key in ["id", "draw"]:
        np.testing.assert_array_equal(ds[k][key], before[k][key])
  balanced = _balanced(global_batch=12, repeats=1)
  fresh = pipeline.BalancedSource(_LabelledSource(_IMBALANCED), _IMBALANCED, seed=0)
  assert _stream_ids(balanced, 3).tolist() == [fresh.index(i) for i in range(36)]


def test_repeats_over_balanced_sampling_repeat_each_balanced_position():
  k, n = 2, len(_IMBALANCED)
  once = _stream_ids(_balanced(global_batch=15), n // 15)  # The first n positions.
  twice = _stream_ids(_balanced(global_batch=15, repeats=k), k * n // 15)
  assert np.array_equal(np.bincount(twice, minlength=n), k * np.bincount(once, minlength=n))
  shares = np.bincount(_IMBALANCED[twice], minlength=3) / len(twice)
  np.testing.assert_allclose(shares, 1 / 3, atol=0.01)


def test_an_epoch_stays_the_dataset_length_with_repeats():
  config = configs.defaults()
  config.total_epochs = 3.0
  config.input.batch_size = 100
  plain = configs.total_steps(config, 1000)
  config.input.repeated_augmentation = 3
  assert configs.total_steps(config, 1000) == plain == 30  # DeiT: epochs of len(dataset).


@pytest.mark.parametrize("value, message", [
    (0, "config.input.repeated_augmentation must be >= 1 (1: off; DeiT uses 3), got 0"),
    (-2, "config.input.repeated_augmentation must be >= 1 (1: off; DeiT uses 3), got -2"),
    (3.0, "config.input.repeated_augmentation must be an integer, got 3.0"),
    ("3", "config.input.repeated_augmentation must be an integer, got '3'"),
    (True, "config.input.repeated_augmentation must be an integer, got True"),
])
def test_validate_rejects_a_bad_repeat_count_in_one_line(value, message):
  config = configs.defaults()
  with config.unlocked(), config.ignore_type():
    config.input.repeated_augmentation = value
  found = [p for p in validate.problems(config, local_files=False)
           if "repeated_augmentation" in p]
  assert found == [message]
  config = configs.defaults()
  config.input.repeated_augmentation = 3
  assert not [p for p in validate.problems(config, local_files=False)
              if "repeated_augmentation" in p]
