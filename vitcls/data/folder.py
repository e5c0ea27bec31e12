"""Image folders as sources: `folder:PATH` wherever a TFDS dataset name goes.

Two layouts (ImageFolder's, as torchvision reads it):

  PATH/<split>/<class>/**/*.jpg   split folders `train`, `val` (or `validation`), `test`;
                                  asking for `validation` opens `val` when that is the
                                  folder there, and the other way round.
  PATH/<class>/**/*.jpg           no split folders: `train` and `test` are a fixed
                                  stratified split of every class, 80% / 20%
                                  (`embedded.stratified_split` with TEST_FRACTION and
                                  SPLIT_SEED: the same on every machine). There is only
                                  one held-out part, so `val` and `validation` name it
                                  too: configs written for split folders run unchanged.

PATH is a split layout when every (non-hidden) sub-folder of it is a split name; a mix of
split folders and other folders is an error rather than a guess. Images are files ending
in .jpg, .jpeg, .png, .bmp or .webp (any case), found recursively below each class folder;
hidden files and folders (a leading '.') are ignored. The class names are the sorted
(by code point, so not locale-dependent) class-folder names, over the union of every
split folder, so a label means the same class in every split even if one split lacks a
class; label = index in that list. A split's files are ordered by label, then by their
path below the class folder (code point order again), so index i is the same file on
every machine. A split that lacks some classes (in the flat layout: classes of fewer
than 3 images, none held out) opens with a warning naming them, since its per-class
metrics can only describe the others; `class_names` reads the classes from the folder
names alone, for `vitcls.validate` to compare with the config's num_classes.

Opening a source checks every image file once (see `_check`), so that a file that does
not decode can never stop training mid-epoch: such files are skipped, with a count and a
warning that names a few. The check decodes each file (JPEGs at 1/8 scale), in threads:
at most the cost of one epoch of decoding (0.6 ms a 400x300 JPEG on one core here), so
seconds for folders of thousands to some tens of thousands of images; it is cached per
file (by size and modification time) for the life of the process, as the trainer and
each evaluator open their split. In the flat layout the split is drawn over every image
file before the check, so one file turning bad moves no other file between train and test.

A source holds only its paths, labels and class names, so it pickles cheaply into grain's
worker processes; it decodes a file only in `__getitem__`.
"""

from __future__ import annotations

import concurrent.futures
import os
from typing import Optional

from absl import logging
import numpy as np
from PIL import Image

from vitcls.data import embedded, pp
from vitcls.errors import UserError

PREFIX = "folder:"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
TEST_FRACTION = 0.2  # Of each class, in the flat layout.
SPLIT_SEED = 0
# The folders a split may live in, in the order tried.
SPLIT_FOLDERS = {
    "train": ("train",),
    "val": ("val", "validation"),
    "validation": ("validation", "val"),
    "test": ("test",),
}
_SPLIT_NAMES = frozenset(n for names in SPLIT_FOLDERS.values() for n in names)
_NAMED_IN_WARNING = 5  # Skipped files (or missing classes) a warning names.
# Images a class needs for the flat layout's split to hold one out: round(n * 0.2) >= 1.
_HELD_OUT_MIN = 3
_CHECK_THREADS = 8  # Decoding releases the GIL; more threads than cores only hide I/O.
_DECODE = pp.parse("decode(channels=3)")  # As the pp op decodes TFDS bytes.

_LAYOUT_HINT = ("give folder:PATH with PATH holding one folder of images per class "
                "(PATH/<class>/*.jpg) or split folders of those (PATH/train/<class>/*.jpg)")


class FolderError(UserError):
  """An image folder is missing, empty, oddly laid out, or holds a file that won't decode."""


def is_folder(name: str) -> bool:
  """True for a `folder:PATH` dataset name."""
  return isinstance(name, str) and name.startswith(PREFIX)


def path_of(name: str) -> str:
  """PATH of `folder:PATH`, with ~ expanded (relative paths are from the working dir)."""
  path = name[len(PREFIX):]
  if not path:
    raise FolderError(f"dataset name '{name}' has no path: {_LAYOUT_HINT}")
  return os.path.expanduser(path)


def _hidden(name: str) -> bool:
  return name.startswith(".")


def _subfolders(path: str) -> list[str]:
  return sorted(e.name for e in os.scandir(path)
                if not _hidden(e.name) and e.is_dir())


def _images_below(folder: str) -> list[str]:
  """Every image file below `folder` (recursively), sorted by relative path."""
  found = []
  for top, dirs, files in os.walk(folder, followlinks=True):
    dirs[:] = [d for d in dirs if not _hidden(d)]
    rel = os.path.relpath(top, folder)
    for f in files:
      if not _hidden(f) and f.lower().endswith(IMAGE_EXTENSIONS):
        found.append(f if rel == "." else os.path.join(rel, f))
  found.sort(key=lambda p: p.replace(os.sep, "/"))  # "/" sorts alike on every OS.
  return [os.path.join(folder, f) for f in found]


# Results of `_check` by (path, size, mtime_ns): files are checked once per process.
_CHECKED: dict[tuple[str, int, int], Optional[str]] = {}
_WARNED: set[tuple[str, ...]] = set()


def _check(path: str) -> Optional[str]:
  """None when `path` decodes as an image, else why not (one line).

  It decodes the whole file, because PIL's cheaper `verify()` checks PNG checksums only
  and lets a truncated JPEG through; JPEGs decode at 1/8 scale (`draft`), which still
  reads every byte of the compressed data. A file that passes decodes in `__getitem__`.
  """
  try:
    with Image.open(path) as img:
      if img.format == "JPEG":
        img.draft("RGB", (1, 1))
      img.load()
  except Image.UnidentifiedImageError:
    return "not an image format PIL reads"
  except Exception as e:  # pylint: disable=broad-except
    # Malformed files make PIL raise more than OSError (SyntaxError, struct.error,
    # DecompressionBombError, ...); whatever it raises, the file is not for training.
    return " ".join(str(e).split()) or type(e).__name__
  return None


def _check_all(paths: list[str]) -> list[Optional[str]]:
  """`_check` of every path (cached by size and modification time), in threads."""
  keys = []
  for p in paths:
    try:
      st = os.stat(p)
    except OSError:  # Gone (or unreadable) since it was listed: _check says why.
      keys.append((p, -1, -1))
      continue
    keys.append((p, st.st_size, st.st_mtime_ns))
  todo = [k for k in dict.fromkeys(keys) if k not in _CHECKED]
  if todo:
    with concurrent.futures.ThreadPoolExecutor(_CHECK_THREADS) as pool:
      for key, reason in zip(todo, pool.map(lambda k: _check(k[0]), todo)):
        _CHECKED[key] = "empty file" if key[1] == 0 else reason
  return [_CHECKED[k] for k in keys]


def _keep_readable(root: str, split: str, paths: list[str], labels: list[int]):
  """(paths, labels) of the files that decode; warns once about those that do not."""
  reasons = _check_all(paths)
  bad = [(p, r) for p, r in zip(paths, reasons) if r is not None]
  if bad and (root, split) not in _WARNED:
    _WARNED.add((root, split))
    named = "; ".join(f"{os.path.relpath(p, root)} ({r})" for p, r in bad[:_NAMED_IN_WARNING])
    more = f"; and {len(bad) - _NAMED_IN_WARNING} more" if len(bad) > _NAMED_IN_WARNING else ""
    logging.warning("folder %s split '%s': skipping %d of %d image files that do not "
                    "decode: %s%s", root, split, len(bad), len(paths), named, more)
  keep = [i for i, r in enumerate(reasons) if r is None]
  return [paths[i] for i in keep], [labels[i] for i in keep]


def _split_layout(root: str) -> bool:
  """True when PATH's sub-folders are split folders, False when they are classes."""
  subs = _subfolders(root)
  if not subs:
    raise FolderError(f"folder '{root}' has no sub-folders: {_LAYOUT_HINT}")
  splits = [s for s in subs if s in _SPLIT_NAMES]
  if splits and len(splits) < len(subs):
    others = [s for s in subs if s not in _SPLIT_NAMES]
    raise FolderError(f"folder '{root}' mixes split folders ({', '.join(splits)}) with "
                      f"other folders ({', '.join(others[:5])}): move the others into "
                      f"the split folders, or rename class folders named like splits")
  return bool(splits)


def _class_files(folder: str, classes: list[str], label_names: list[str]):
  """(paths, labels) of every image in `folder`/<class>; a class without any is an error."""
  paths, labels = [], []
  for name in classes:
    found = _images_below(os.path.join(folder, name))
    if not found:
      raise FolderError(f"class folder '{os.path.join(folder, name)}' has no images "
                        f"({', '.join(IMAGE_EXTENSIONS)}): add some or remove the folder")
    paths.extend(found)
    labels.extend([label_names.index(name)] * len(found))
  return paths, labels


def _split_folder(root: str, split: str) -> str:
  present = [s for s in _subfolders(root) if s in _SPLIT_NAMES]
  for name in SPLIT_FOLDERS.get(split, ()):
    if name in present:
      return os.path.join(root, name)
  raise FolderError(f"folder '{root}' has no '{split}' split folder (it has "
                    f"{', '.join(present)}): ask for one of those splits, or add "
                    f"'{root}/{split}/<class>/'")


def open_source(root: str, split: str, encoded: bool = False) -> "FolderSource":
  """The source of `split` of the image folder `root` (see the module docstring).

  encoded: images as their file's bytes, for a pp that begins with `decode`.
  """
  if split not in SPLIT_FOLDERS:
    raise FolderError(f"image folders have splits {', '.join(SPLIT_FOLDERS)}, not "
                      f"'{split}': set the split to one of those")
  root = os.path.abspath(root)
  label_names = class_names(root)
  if _split_layout(root):
    folder = _split_folder(root, split)
    classes = _subfolders(folder)
    if not classes:
      raise FolderError(f"split folder '{folder}' has no class folders: {_LAYOUT_HINT}")
    paths, labels = _class_files(folder, classes, label_names)
  else:
    paths, labels = _class_files(root, label_names, label_names)
    train, test = embedded.stratified_split(np.asarray(labels), TEST_FRACTION, SPLIT_SEED)
    chosen = train if split == "train" else test
    paths, labels = [paths[i] for i in chosen], [labels[i] for i in chosen]
  paths, labels = _keep_readable(root, split, paths, labels)
  if not paths:
    raise FolderError(f"split '{split}' of folder '{root}' has no readable images: add "
                      f"images (in the flat layout each class needs {_HELD_OUT_MIN} or more "
                      f"to put one in the 20% test part)")
  _warn_missing_classes(root, split, label_names, labels)
  return FolderSource(root, split, paths, labels, label_names, encoded)


def class_names(root: str) -> list[str]:
  """The class names of the image folder `root`, in label order (see the module docstring).

  Read from folder names alone, no image listed, so `vitcls.validate` compares them with
  the config's num_classes in milliseconds, before anything is opened.
  """
  root = os.path.abspath(root)
  if not os.path.isdir(root):
    what = "is not a directory" if os.path.exists(root) else "does not exist"
    raise FolderError(f"folder '{root}' {what}: {_LAYOUT_HINT}")
  if _split_layout(root):
    return sorted({c for s in _subfolders(root) if s in _SPLIT_NAMES
                   for c in _subfolders(os.path.join(root, s))})
  return _subfolders(root)


def _warn_missing_classes(root: str, split: str, label_names: list[str],
                          labels: list[int]) -> None:
  """Warns once when some classes have no image in `split`: a split that evaluates then
  measures only the others (per-class metrics leave them out), one that trains never
  shows them to the model."""
  present = set(labels)
  missing = [n for i, n in enumerate(label_names) if i not in present]
  if not missing or (root, split, "classes") in _WARNED:
    return
  _WARNED.add((root, split, "classes"))
  flat = "" if _split_layout(root) else (
      f"; this folder has no split folders, so {TEST_FRACTION:.0%} of each class is held "
      f"out, which needs {_HELD_OUT_MIN} or more images of a class to hold out one")
  named = ", ".join(missing[:_NAMED_IN_WARNING])
  if len(missing) > _NAMED_IN_WARNING:
    named += ", ..."
  effect = ("the model never trains on them" if split == "train" else
            "its per-class metrics leave them out (n/a), so balanced and worst-class "
            "accuracy describe the other classes only")
  logging.warning("folder %s split '%s' has no images of %d of its %d classes (%s): %s%s",
                  root, split, len(missing), len(label_names), named, effect, flat)


class FolderSource:
  """A grain random-access source over checked image files: len(), [i], labels().

  `[i]` is {"image": uint8 HxWx3 RGB (grey repeated, alpha dropped, as the `decode` op),
  "label": int, "path": str}; with `encoded`, "image" is the file's bytes, which a pp
  beginning with `decode` decodes (fused with the crops and resizes after it).
  `label_names` are the class names in label order.
  """

  def __init__(self, root: str, split: str, paths: list[str], labels: list[int],
               label_names: list[str], encoded: bool = False):
    self.root = root
    self.split = split
    self.encoded = encoded
    self.paths = tuple(paths)
    self._labels = tuple(int(x) for x in labels)
    self.label_names = list(label_names)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index) -> dict:
    index = int(index)
    path = self.paths[index]
    try:
      with open(path, "rb") as f:
        data = f.read()
      image = data if self.encoded else _DECODE({"image": data}, None)["image"]
    except (OSError, pp.DecodeError) as e:
      raise FolderError(f"image '{path}' no longer reads ({' '.join(str(e).split())}): "
                        f"replace or remove it and restart (files are checked when the "
                        f"folder is opened)") from e
    return {"image": image, "label": self._labels[index], "path": path}

  def labels(self) -> np.ndarray:
    """The label of every example by index (int64), without reading any image."""
    return np.asarray(self._labels, np.int64)

  def __repr__(self) -> str:
    return (f"FolderSource({self.root!r}, split={self.split!r}, {len(self)} images, "
            f"{len(self.label_names)} classes)")

