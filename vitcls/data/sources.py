"""Random-access example sources: TFDS datasets stored as ArrayRecord files.

`get_source("mnist5k", "train")` returns a `tfds.data_source` (len() and [i] give
decoded NumPy examples). Embedded datasets are prepared on first use; any other TFDS
name must already be prepared in the data dir, since nothing is downloaded at run time.
A name may carry a config and a version, as TFDS spells them: `NAME/CONFIG:1.0.0`.
Random access needs ArrayRecord (or Parquet) files, while `tfds build` writes TFRecord by
default and most existing copies (ImageNet's included) are TFRecord: such a copy is
recognised from its dataset_info.json and named in an error that gives the one
`tfds convert_format` command adding ArrayRecord files beside it, in place.
`folder:PATH` names an image folder instead (see `vitcls.data.folder`; the data dir plays
no part). `labels` / `label_counts` read a split's labels alone, leaving its images
undecoded; `label_names` gives the class names; `facts` gives what files alone tell of a
dataset (image shape, class count) for the config check, which must not open it.
"""

from __future__ import annotations

import json
import os
import shlex
from typing import NamedTuple

import numpy as np

from vitcls.data import embedded, folder
from vitcls.errors import UserError

_DEFAULT_DATA_DIR = "~/tensorflow_datasets"


class DatasetNotFoundError(UserError):
  """A dataset or split is not prepared in the data dir."""


class LabelFeatureError(UserError):
  """The feature asked for as the label is missing or is not one class id per example."""


def data_dir(explicit: str | None = None) -> str:
  """The TFDS data dir: explicit value, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  path = explicit or os.environ.get("TFDS_DATA_DIR") or _DEFAULT_DATA_DIR
  return os.path.expanduser(path)


def _root(explicit: str | None) -> str:  # For functions whose `data_dir` argument hides it.
  return data_dir(explicit)


def prepare_embedded(name: str, root: str) -> None:
  """Builds an embedded dataset into `root` in ArrayRecord format if not there yet.

  A copy already there is left as it is, whatever its file format: one in TFRecord
  format gets the conversion command from `get_source`, not a rebuild beside it.
  """
  cls = embedded.BUILDERS[name]
  if not cls(data_dir=root).data_path.exists():  # Format-free: reads any prepared copy.
    cls(data_dir=root, file_format="array_record").download_and_prepare(
        file_format="array_record")


def _hint(name: str, root: str) -> str:
  return (f"prepare it with `tfds build {name.split(':')[0]} --file_format=array_record "
          f"--data_dir={root}` (the tfds command line needs "
          f"`pip install \"vitcls[data]\"`; or point TFDS_DATA_DIR / config.input.data_dir "
          f"at the folder that holds it), or give folder:PATH for a folder of images; "
          f"built-in offline datasets: {', '.join(sorted(embedded.BUILDERS))}")


def _builder(name: str, root: str):
  """The TFDS builder of a dataset prepared in `root` (embedded ones prepared now)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if name in embedded.BUILDERS:
    prepare_embedded(name, root)
  try:
    builder = tfds.builder(name, data_dir=root)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DatasetNotFoundError(f"dataset '{name}' is unknown to TFDS and not in {root}: "
                               f"{_hint(name, root)}") from e
  if not builder.data_path.exists():
    if others := _versions_beside(builder.data_path):
      raise DatasetNotFoundError(
          f"dataset '{name}' is not prepared in {root} at version {builder.version}, but "
          f"{os.fspath(builder.data_path.parent)} holds version{'s' * (len(others) > 1)} "
          f"{', '.join(others)}: name the version, as '{name.split(':')[0]}:{others[-1]}', "
          f"wherever the config names the dataset")
    raise DatasetNotFoundError(f"dataset '{name}' is not prepared in {root}: "
                               f"{_hint(name, root)}")
  return builder


def _versions_beside(version_dir) -> list[str]:
  """The other versions prepared next to `version_dir`, oldest first.

  A TFDS release moves a dataset's default version (imagenet2012: 5.0.0, then 5.1.0)
  while copies prepared earlier keep theirs; `NAME:VERSION` reads them.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  found = []
  for info in version_dir.parent.glob("*/dataset_info.json"):
    try:
      found.append(tfds.core.Version(info.parent.name))
    except ValueError:  # Not a version folder.
      continue
  return [str(v) for v in sorted(found)]


def _convert_command(version_dir) -> str:
  """The shell command that adds ArrayRecord files to a prepared dataset, in place.

  `version_dir` is the folder holding one config and version (ROOT/NAME[/CONFIG]/VERSION).
  TFDS 4.9's `convert_format` writes the new shards beside the old ones in that folder
  and lists array_record under `alternativeFileFormats` in its dataset_info.json. (Its
  `--out_dir` is no way round a read-only copy: in 4.9.10 it writes the shards but no
  dataset_info.json, and still exits 0.)
  """
  return shlex.join(["tfds", "convert_format",
                     f"--dataset_version_dir={os.fspath(version_dir)}",
                     "--out_file_format=array_record"])


def _readable(name: str, root: str, builder) -> None:
  """Makes `builder` read a random-access copy, or raises the command that adds one.

  What is on disk is what dataset_info.json lists: `fileFormat` and, after an in-place
  `tfds convert_format`, `alternativeFileFormats`. TFDS 4.9.10 restores the second for
  builders built from files alone but not for builders whose code is imported (the
  embedded ones, imagenet2012, cifar10...), whose `as_data_source` then refuses the
  converted copy; pointing the info at the converted files is what `as_data_source`
  itself does once it sees them.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  info = builder.info
  if info.available_file_formats() & tfds.core.FileFormat.with_random_access():
    return
  written = info.as_proto.alternative_file_formats
  for fmt in ("array_record", "parquet"):
    if fmt in written:
      info.set_file_format(fmt, override=True, override_if_initialized=True)
      return
  stored = info.file_format.value if info.file_format else "tfrecord"
  fix = (f"convert it in place to ArrayRecord with `{_convert_command(builder.data_path)}` "
         f"(the tfds command line needs `pip install \"vitcls[data]\"`)")
  info_file = builder.data_path / "dataset_info.json"
  try:
    on_disk = json.loads(info_file.read_text())
  except (OSError, ValueError):
    on_disk = {}
  if on_disk and not on_disk.get("fileFormat"):
    # TFDS releases before the field existed (2021) wrote none, meaning TFRecord, and
    # `tfds convert_format` of TFDS 4.9 stops on the empty value.
    fix = (f"add \"fileFormat\": \"{stored}\" to {os.fspath(info_file)} (written by an "
           f"older TFDS, it names no format), then {fix}")
  raise DatasetNotFoundError(f"dataset '{name}' in {root} is stored as {stored} files, "
                             f"which random access cannot read: {fix}")


def _open(name: str, split: str, root: str, builder, decoders=None):
  """`builder.as_data_source(split)` (what `tfds.data_source` returns), or one error."""
  _readable(name, root, builder)
  try:
    return builder.as_data_source(split=split, decoders=decoders)
  except NotImplementedError as e:  # A case the check above did not foresee.
    raise DatasetNotFoundError(f"dataset '{name}' in {root} is not in ArrayRecord format: "
                               f"{_hint(name, root)}") from e
  except (ValueError, KeyError) as e:
    raise DatasetNotFoundError(f"dataset '{name}' has no split '{split}': {e}") from e


def get_source(name: str, split: str, data_dir_path: str | None = None, *,
               encoded_images: bool = False):
  """Returns the random-access source for TFDS `name`/`split`, or one clear error.

  `folder:PATH` gives a `folder.FolderSource` (its images checked as it opens).
  encoded_images: the "image" feature stays its encoded bytes (TFDS's SkipDecoding, as
    big_vision reads), for a pp that begins with `decode` (as `vitcls.data.pp.plan` decides):
    decoding then happens once, in the pp, fused with the crops and resizes after it.
  """
  if folder.is_folder(name):
    return folder.open_source(folder.path_of(name), split, encoded=encoded_images)
  root = data_dir(data_dir_path)
  builder = _builder(name, root)
  decoders = None
  if encoded_images:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    features = builder.info.features
    if "image" in features and isinstance(features["image"], tfds.features.Image):
      decoders = {"image": tfds.decode.SkipDecoding()}
  return _open(name, split, root, builder, decoders=decoders)


class Facts(NamedTuple):
  """What is known of a dataset before it is opened; None where it is not known.

  image_shape: (height, width, channels) when every image has it (not a folder's).
  num_classes: the label's class count; class_names: the names, where cheap to read.
  """
  image_shape: tuple[int, ...] | None = None
  num_classes: int | None = None
  class_names: list[str] | None = None


def facts(name: str, data_dir_path: str | None = None) -> Facts:
  """The `Facts` of dataset `name`, read from files alone, for `vitcls.validate`.

  Nothing is opened, built or imported beyond JSON: a folder's class folders
  (`folder.class_names`; its images' sizes vary), an embedded dataset's image shape,
  and a prepared TFDS dataset's features.json (the copy `NAME[/CONFIG]:VERSION` names,
  or the one version prepared when there is one). A folder that is not laid out as one
  raises its FolderError; a TFDS dataset not prepared has no facts.
  """
  if folder.is_folder(name):
    names = folder.class_names(folder.path_of(name))
    return Facts(num_classes=len(names), class_names=names)
  shape = None
  if name in embedded.BUILDERS:
    shape = tuple(embedded.BUILDERS[name].IMAGE_SHAPE)
  features = _features_on_disk(name, data_dir(data_dir_path))
  try:  # As TFDS 4.9 writes it; anything else is no fact.
    dims = [int(d) for d in features.get("image", {}).get("image", {})
            .get("shape", {}).get("dimensions", [])]
    label = features.get("label") or features.get("labels", {}).get(
        "sequence", {}).get("feature", {})
    count = int(label.get("classLabel", {}).get("numClasses", 0))
  except (AttributeError, TypeError, ValueError):
    dims, count = [], 0
  if dims and min(dims) > 0:  # -1: images of varying sizes.
    shape = tuple(dims)
  return Facts(image_shape=shape, num_classes=count or None)


def _features_on_disk(name: str, root: str) -> dict:
  """The features of `name`'s prepared copy in `root` as its features.json lists them."""
  base, _, version = name.partition(":")
  folder_path = os.path.join(root, base)
  versions = [version] if version else (
      sorted(v for v in os.listdir(folder_path)
             if os.path.isfile(os.path.join(folder_path, v, "features.json")))
      if os.path.isdir(folder_path) else [])
  if len(versions) != 1:  # None prepared, or several: which one TFDS reads is its call.
    return {}
  try:
    with open(os.path.join(folder_path, versions[0], "features.json")) as f:
      return json.load(f)["featuresDict"]["features"]
  except (OSError, ValueError, KeyError, TypeError):
    return {}


# Labels without images: class-balanced sampling and class statistics need the label of
# every example, and decoding every image of a split just to drop it would cost far more
# than the read itself (several times more even on 28x28 PNGs; far more on JPEGs).

_LABEL_READ_CHUNK = 1024  # Records per batched read: parallel reads, bounded memory.


def _skip_images(features, exclude: str | None = None) -> dict:
  """A TFDS `decoders` tree that leaves every image (in nested dicts too) as its bytes.

  Only Image features are skipped, and only outside sequences: in TFDS 4.9.10
  `SkipDecoding` is rejected on a FeaturesDict, Sequence or Video, so those stay decoded
  (they are rare next to a classification label, and decoding them is only slower).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  decoders = {}
  for k, feature in features.items():
    if k == exclude:
      continue
    if isinstance(feature, tfds.features.Image):
      decoders[k] = tfds.decode.SkipDecoding()
    elif isinstance(feature, tfds.features.FeaturesDict):
      if inner := _skip_images(feature):
        decoders[k] = inner
  return decoders


def _is_integer_scalar(feature) -> bool:
  try:
    return tuple(feature.shape) == () and np.issubdtype(feature.np_dtype, np.integer)
  except (AttributeError, TypeError):  # A FeaturesDict and the like: a dict of dtypes.
    return False


def _folder_label_key(name: str, key: str) -> None:
  if key != "label":
    raise LabelFeatureError(f"image folder '{name}' has no feature '{key}' to use as the "
                            f"label; its features are: image, label, path")


def _label_feature(name: str, root: str, key: str, builder=None):
  """(the TFDS features of `name`, its feature `key`), or an error listing the features."""
  features = (builder or _builder(name, root)).info.features
  if key not in features:
    raise LabelFeatureError(f"dataset '{name}' has no feature '{key}' to use as the "
                            f"label; its features are: {', '.join(sorted(features))}")
  return features, features[key]


def _read_labels(name: str, split: str, data_dir_path: str | None, key: str):
  """(labels by example index as int64, the number of classes declared or None)."""
  if folder.is_folder(name):
    _folder_label_key(name, key)
    source = folder.open_source(folder.path_of(name), split)
    return source.labels(), len(source.label_names)
  root = data_dir(data_dir_path)
  builder = _builder(name, root)
  features, feature = _label_feature(name, root, key, builder)
  if _is_class_sequence(feature):
    raise LabelFeatureError(f"feature '{key}' of dataset '{name}' holds a set of labels per "
                            f"example (multi-label): class-balanced sampling and class "
                            f"weights need one class id per example; turn them off")
  if not _is_integer_scalar(feature):
    raise LabelFeatureError(f"feature '{key}' of dataset '{name}' is not one integer per "
                            f"example ({type(feature).__name__}): give the key of a "
                            f"class label")
  source = _open(name, split, root, builder, decoders=_skip_images(features, exclude=key))
  n = len(source)
  out = np.empty(n, np.int64)
  for start in range(0, n, _LABEL_READ_CHUNK):
    indices = list(range(start, min(start + _LABEL_READ_CHUNK, n)))
    out[start:start + len(indices)] = [ex[key] for ex in source.__getitems__(indices)]
  return out, getattr(feature, "num_classes", None)


def _is_class_sequence(feature) -> bool:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return (isinstance(feature, tfds.features.Sequence)
          and isinstance(feature.feature, tfds.features.ClassLabel))


def labels(name: str, split: str, data_dir: str | None = None,
           key: str = "label") -> np.ndarray:
  """The label of every example of `name`/`split`, by index (int64), images undecoded.

  Index i is the example `get_source(name, split, data_dir)[i]` returns, so the array
  can drive sampling over that source (see `pipeline.train_dataset(balanced_labels=)`).
  A multi-label feature (a Sequence of ClassLabel, as mnist5k_pairs' `labels`) is a
  `LabelFeatureError`: there is no one label per example to give.
  """
  return _read_labels(name, split, data_dir, key)[0]


def label_counts(name: str, split: str, data_dir: str | None = None,
                 key: str = "label", num_classes: int | None = None) -> np.ndarray:
  """Examples per class of `name`/`split` (int64, length num_classes), images undecoded.

  `num_classes` defaults to the ClassLabel's (a folder's: its number of class folders),
  else to the largest label + 1, so a class with no example in this split still gets its
  0 whenever the dataset declares it.
  """
  values, declared = _read_labels(name, split, data_dir, key)
  if num_classes is None:
    num_classes = declared if declared is not None else int(values.max(initial=-1)) + 1
  outside = values[(values < 0) | (values >= num_classes)]
  if outside.size:
    raise LabelFeatureError(f"feature '{key}' of dataset '{name}' split '{split}' has "
                            f"label {int(outside[0])}, outside [0, {num_classes}): set "
                            f"num_classes to cover every label")
  return np.bincount(values, minlength=num_classes).astype(np.int64)


def label_names(name: str, split: str = "train", data_dir: str | None = None,
                key: str | None = None) -> list[str] | None:
  """The class names of `name` in label order, or None when its label has none.

  A folder's class-folder names; a TFDS ClassLabel's `names` (`key`, by default "label",
  else "labels"; a Sequence of ClassLabel gives its ClassLabel's). Names are the same for
  every split; `split` is opened for folders only, which checks it exists.
  """
  if folder.is_folder(name):
    _folder_label_key(name, key or "label")
    return list(folder.open_source(folder.path_of(name), split).label_names)
  root = _root(data_dir)
  if key is None:
    features = _builder(name, root).info.features
    key = "labels" if "label" not in features and "labels" in features else "label"
  _, feature = _label_feature(name, root, key)
  if _is_class_sequence(feature):
    feature = feature.feature
  names = getattr(feature, "names", None)
  return list(names) if names else None
