"""`folder:PATH` sources: ImageFolder layouts, the seeded split, bad files, the stream."""

import logging
import os
import pickle
import re

import numpy as np
from PIL import Image
import pytest

from vitcls.data import embedded, folder, pipeline, sources
from vitcls.data import pp as pp_lib
from conftest import REPO


def _save(path, mode="RGB", value=(200, 100, 50), size=(10, 12)):
  """A constant image of `size` (w, h) in `mode`, format from the extension."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new(mode, size, value).save(path)
  return path


def _text(path, text="not an image"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  return path


def _flat(root, counts=None):
  """root/<class>/ with `counts` images each (mixed formats and nesting); returns root."""
  counts = counts or {"cat": 10, "dog": 5, "emu": 6}
  for c, (name, n) in enumerate(counts.items()):
    for i in reversed(range(n)):  # Created out of order: the index order must not care.
      ext = (".png", ".jpg", ".JPEG", ".bmp", ".webp")[i % 5]
      _save(os.path.join(root, name, f"{i:02d}{ext}"), value=(40 * c, 7 * i, 90))
  _save(os.path.join(root, "cat", "nested", "deep.png"))  # Recursive, as ImageFolder.
  _text(os.path.join(root, "cat", "notes.txt"))  # Not an image name: not listed.
  _save(os.path.join(root, "dog", ".hidden.png"))
  os.makedirs(os.path.join(root, ".cache"))
  return str(root)


def _split_layout(root, val_name="val"):
  """root/{train,val,test}/<class>/: train has a, b, c; val lacks c; test has a, c."""
  layout = {"train": {"a": 3, "b": 2, "c": 2}, val_name: {"a": 1, "b": 1},
            "test": {"a": 1, "c": 2}}
  for split, classes in layout.items():
    for name, n in classes.items():
      for i in range(n):
        _save(os.path.join(root, split, name, f"{split}{i}.png"), value=(i, i, i))
  return str(root)


def _ids(source):
  return [os.path.relpath(p, source.root) for p in source.paths]


def test_split_layout_names_labels_and_order(tmp_path):
  name = "folder:" + _split_layout(tmp_path)
  train = sources.get_source(name, "train")
  assert train.label_names == ["a", "b", "c"] and len(train) == 7
  assert _ids(train) == sorted(_ids(train))
  assert train.labels().tolist() == [0, 0, 0, 1, 1, 2, 2]
  ex = train[3]
  assert ex["image"].shape == (12, 10, 3) and ex["image"].dtype == np.uint8
  assert ex["label"] == 1 and ex["path"] == str(tmp_path / "train" / "b" / "train0.png")
  val = sources.get_source(name, "validation")  # Maps to the val folder.
  assert val.label_names == ["a", "b", "c"] and val.labels().tolist() == [0, 1]
  test = sources.get_source(name, "test")
  assert test.labels().tolist() == [0, 2, 2]  # "c" is label 2 in every split.
  assert sources.label_names(name, "test") == ["a", "b", "c"]
  assert sources.label_counts(name, "test").tolist() == [1, 0, 2]


def test_val_is_found_under_either_name(tmp_path):
  name = "folder:" + _split_layout(tmp_path, val_name="validation")
  assert len(sources.get_source(name, "val")) == 2
  assert len(sources.get_source(name, "validation")) == 2


def test_grey_and_rgba_become_rgb_uint8(tmp_path):
  _save(str(tmp_path / "grey" / "g.png"), "L", 77)
  _save(str(tmp_path / "rgba" / "r.png"), "RGBA", (10, 20, 30, 0))
  _save(str(tmp_path / "pal" / "p.png"), "P", 3)
  source = sources.get_source(f"folder:{tmp_path}", "train")  # 1 a class: all train.
  assert source.label_names == ["grey", "pal", "rgba"]
  images = [source[i]["image"] for i in range(len(source))]
  assert all(im.shape == (12, 10, 3) and im.dtype == np.uint8 for im in images)
  np.testing.assert_array_equal(images[0], np.full((12, 10, 3), 77, np.uint8))
  np.testing.assert_array_equal(images[2], np.broadcast_to(np.uint8([10, 20, 30]),
                                                           (12, 10, 3)))


def test_flat_layout_split_is_seeded_stratified_and_disjoint(tmp_path):
  name = "folder:" + _flat(tmp_path)
  train, test = sources.get_source(name, "train"), sources.get_source(name, "test")
  assert train.label_names == test.label_names == ["cat", "dog", "emu"]
  all_files = set(_ids(train)) | set(_ids(test))
  assert not set(_ids(train)) & set(_ids(test)) and len(all_files) == 11 + 5 + 6
  assert "cat/nested/deep.png" in all_files and "cat/notes.txt" not in all_files
  assert not any(".hidden" in f for f in all_files)
  # Per class round(20%) to test: 11 cat images -> 2, 5 dog -> 1, 6 emu -> 1.
  assert np.bincount(test.labels(), minlength=3).tolist() == [2, 1, 1]
  assert np.bincount(train.labels(), minlength=3).tolist() == [9, 4, 5]
  # It is embedded.stratified_split over the sorted files, fixed seed: the same twice.
  labels = np.repeat([0, 1, 2], [11, 5, 6])
  _, test_idx = embedded.stratified_split(labels, folder.TEST_FRACTION, folder.SPLIT_SEED)
  everything = sorted(all_files, key=lambda f: (f.split("/")[0], f))
  assert _ids(test) == [everything[i] for i in test_idx]
  again = sources.get_source(name, "test")
  assert again.paths == test.paths and again.labels().tolist() == test.labels().tolist()
  assert sources.get_source(name, "val").paths == test.paths  # The one held-out part.
  assert _ids(train) == sorted(_ids(train))


def test_examples_decode_lazily_and_pickle(tmp_path, monkeypatch):
  source = sources.get_source("folder:" + _flat(tmp_path), "train")
  opened = []
  real = folder._DECODE
  def spy(example, rng):
    opened.append(1)
    return real(example, rng)
  monkeypatch.setattr(folder, "_DECODE", spy)
  copy = pickle.loads(pickle.dumps(source))
  assert not opened and len(pickle.dumps(source)) < 5000  # Paths and ints only.
  ex = copy[4]
  assert len(opened) == 1
  np.testing.assert_array_equal(ex["image"], source[4]["image"])
  assert ex["path"] == source[4]["path"] and ex["label"] == source[4]["label"]


def test_a_pp_that_decodes_gets_the_files_bytes_and_the_same_batches(tmp_path):
  root = "folder:" + _flat(tmp_path)
  spec = "decode|inception_crop(8)|flip_lr|value_range(-1,1)"
  assert pp_lib.plan(spec).encoded_images and not pp_lib.plan("resize(8)").encoded_images
  encoded = sources.get_source(root, "train", encoded_images=True)
  with open(encoded.paths[3], "rb") as f:
    assert encoded[3]["image"] == f.read()
  decoded = sources.get_source(root, "train")
  batches = [pipeline.train_dataset(source, pp_lib.parse(spec), global_batch=4, seed=1)
             for source in (encoded, decoded)]
  for step in range(3):
    np.testing.assert_array_equal(batches[0][step]["image"], batches[1][step]["image"])


def test_files_that_do_not_decode_are_skipped_once_with_a_warning(tmp_path, caplog):
  root = _flat(tmp_path)
  good = _save(os.path.join(root, "cat", "zz_good.jpg"), size=(64, 64))
  with open(good, "rb") as f:
    data = f.read()
  with open(os.path.join(root, "cat", "truncated.jpg"), "wb") as f:
    f.write(data[:len(data) // 2])
  _text(os.path.join(root, "dog", "text.png"))
  open(os.path.join(root, "emu", "empty.jpg"), "wb").close()
  with caplog.at_level(logging.WARNING):
    train = sources.get_source("folder:" + root, "train")
    test = sources.get_source("folder:" + root, "test")
  skipped = {"cat/truncated.jpg", "dog/text.png", "emu/empty.jpg"}
  assert not skipped & (set(_ids(train)) | set(_ids(test)))
  assert len(train) + len(test) == 22 + 1  # The 22 images and zz_good.jpg.
  text = caplog.text
  assert sum(int(n) for n in re.findall(r"skipping (\d+) of", text)) == 3  # Both splits.
  assert all(s in text for s in skipped) and "empty file" in text
  for s in (train, test):
    for i in range(len(s)):  # Every indexed file decodes.
      assert s[i]["image"].dtype == np.uint8
  # The split is drawn over every image file, then the bad ones are dropped: a bad file
  # moves no good one between train and test.
  every = sorted(set(_ids(train)) | set(_ids(test)) | skipped,
                 key=lambda f: (f.split("/")[0], f))
  labels = np.array([["cat", "dog", "emu"].index(f.split("/")[0]) for f in every])
  _, test_idx = embedded.stratified_split(labels, folder.TEST_FRACTION, folder.SPLIT_SEED)
  assert _ids(test) == [every[i] for i in test_idx if every[i] not in skipped]


def test_a_file_that_turns_bad_later_is_a_clear_error(tmp_path):
  root = _flat(tmp_path)
  source = sources.get_source("folder:" + root, "train")
  with open(source.paths[0], "wb") as f:
    f.write(b"broken")
  with pytest.raises(folder.FolderError, match=r"cat.*no longer reads.*replace"):
    source[0]


def test_labels_read_no_image(tmp_path, monkeypatch):
  name = "folder:" + _flat(tmp_path)
  def fail(*a):
    raise AssertionError("decoded an image")
  monkeypatch.setattr(folder.FolderSource, "__getitem__", fail)
  assert sources.labels(name, "train").tolist() == [0] * 9 + [1] * 4 + [2] * 5
  assert sources.label_counts(name, "test").tolist() == [2, 1, 1]
  assert sources.label_counts(name, "test", num_classes=5).tolist() == [2, 1, 1, 0, 0]
  assert sources.label_names(name) == ["cat", "dog", "emu"]
  with pytest.raises(sources.LabelFeatureError, match="no feature 'labels'"):
    sources.labels(name, "train", key="labels")


def test_label_names_of_tfds_datasets():
  assert sources.label_names("digits") == [str(i) for i in range(10)]


@pytest.mark.parametrize("make, match", [
    (lambda p: str(p / "missing"), "does not exist"),
    (lambda p: str(p), "no sub-folders"),
    (lambda p: (os.makedirs(p / "a"), _save(str(p / "b" / "x.png")), str(p))[-1],
     r"class folder '.*a' has no images"),
    (lambda p: (_text(str(p / "a" / "x.txt")), str(p))[-1], "has no images"),
    (lambda p: (_save(str(p / "train" / "a" / "x.png")), _save(str(p / "dogs" / "x.png")),
                str(p))[-1], r"mixes split folders \(train\) with other folders \(dogs\)"),
    (lambda p: (_save(str(p / "train" / "a" / "x.png")), str(p))[-1],
     r"no 'test' split folder \(it has train\)"),
    (lambda p: (os.makedirs(p / "test"), _save(str(p / "train" / "a" / "x.png")),
                str(p))[-1], "split folder .* has no class folders"),
    (lambda p: (open(p / "a.png", "w").close(), str(p / "a.png"))[-1], "not a directory"),
])
def test_folder_errors_are_one_line_and_name_the_path(tmp_path, make, match):
  path = make(tmp_path)
  with pytest.raises(folder.FolderError, match=match) as e:
    sources.get_source(f"folder:{path}", "test")
  assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)


def test_split_names_and_empty_test_part(tmp_path):
  for c in ("a", "b"):
    for i in range(2):  # Two images a class: round(0.4) = 0 go to test.
      _save(str(tmp_path / c / f"{i}.png"))
  name = f"folder:{tmp_path}"
  assert len(sources.get_source(name, "train")) == 4
  with pytest.raises(folder.FolderError, match="no readable images.*3 or more"):
    sources.get_source(name, "test")
  with pytest.raises(folder.FolderError, match="not 'train\\[:50%\\]'"):
    sources.get_source(name, "train[:50%]")
  with pytest.raises(folder.FolderError, match="has no path"):
    sources.get_source("folder:", "train")


def test_train_stream_is_the_same_fresh_or_resumed(tmp_path):
  root = _flat(tmp_path)
  _save(os.path.join(root, "emu", "big.png"), size=(30, 20))  # Sizes differ: resized.
  source = sources.get_source("folder:" + root, "train")
  pp = pp_lib.parse("random_shift(1)|resize(8)|value_range(-1,1)|onehot(3)")
  fresh = pipeline.train_dataset(source, pp, global_batch=4, seed=3)
  for k in (0, 5, 11):  # Step 11 is past two epochs of 19 examples.
    resumed = pipeline.train_dataset(source, pp, global_batch=4, seed=3, start_step=k)[0]
    for key in ("image", "labels", "label", "path"):
      np.testing.assert_array_equal(fresh[k][key], resumed[key])
  assert fresh[0]["image"].shape == (4, 8, 8, 3)
  epoch = [p for k in range(5) for p in fresh[k]["path"]][:len(source)]
  assert sorted(epoch) == sorted(source.paths)  # One epoch is every file once.


def test_finetune_rgb_false_makes_folder_images_grey(tmp_path):
  """A grey checkpoint on a folder (which decodes to RGB): `rgb=False` alone gives it
  [H, W, 1] inputs, in training and in the evaluator."""
  from vitcls import configs  # pylint: disable=g-import-not-at-top
  root = _flat(tmp_path / "images")
  experiment = os.path.join(REPO, "experiments", "finetune.py")
  config = configs.resolve(configs.load_experiment(
      f"{experiment}:dataset=folder:{root},classes=3,res=24,rgb=False"))
  for split, spec in (("train", config.input.pp), ("test", config.evals.test.pp)):
    example = sources.get_source(config.input.data.name, split)[0]
    assert example["image"].shape[-1] == 3  # The folder's RGB.
    out = pp_lib.parse(spec)(example, np.random.default_rng(0))
    assert out["image"].shape == (24, 24, 1), (split, spec)
    assert out["labels"].shape == (3,)
  rgb = configs.resolve(configs.load_experiment(
      f"{experiment}:dataset=folder:{root},classes=3,res=24"))
  example = sources.get_source(rgb.input.data.name, "train")[0]
  assert pp_lib.parse(rgb.input.pp)(example, np.random.default_rng(0))["image"].shape == (
      24, 24, 3)


def test_a_split_without_some_classes_warns_once_naming_them(tmp_path, caplog):
  """Classes of 2 and 1 images have none in the flat layout's 20% test part: its per-class
  metrics can only describe the third class, and the user is told so when it opens."""
  for c, n in {"big": 20, "two": 2, "one": 1}.items():
    for i in range(n):
      _save(str(tmp_path / c / f"{i}.png"))
  root = str(tmp_path)
  name = "folder:" + root
  with caplog.at_level(logging.WARNING):
    train = sources.get_source(name, "train")
    test = sources.get_source(name, "test")
    sources.get_source(name, "test")  # Warned once.
  assert train.label_names == test.label_names == ["big", "one", "two"]
  assert sorted(set(test.labels().tolist())) == [0]
  lines = [r.getMessage() for r in caplog.records if "has no images of" in r.getMessage()]
  assert lines == [f"folder {root} split 'test' has no images of 2 of its 3 classes (one, "
                   f"two): its per-class metrics leave them out (n/a), so balanced and "
                   f"worst-class accuracy describe the other classes only; this folder has "
                   f"no split folders, so 20% of each class is held out, which needs 3 or "
                   f"more images of a class to hold out one"]


def test_class_names_come_from_folder_names_alone(tmp_path, monkeypatch):
  flat = _flat(tmp_path / "flat")
  split = _split_layout(tmp_path / "split")
  monkeypatch.setattr(folder, "_images_below", None)  # No image is listed.
  assert folder.class_names(flat) == ["cat", "dog", "emu"]
  assert folder.class_names(split) == ["a", "b", "c"]  # Over every split folder.
  assert sources.facts("folder:" + split) == sources.Facts(num_classes=3,
                                                           class_names=["a", "b", "c"])
