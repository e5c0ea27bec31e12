"""Random-access example sources: TFDS datasets stored as ArrayRecord files.

`get_source("mnist5k", "train")` returns a `tfds.data_source` (len() and [i] give
decoded NumPy examples). Embedded datasets are prepared on first use; any other TFDS
name must already be prepared in the data dir, since nothing is downloaded at run time.
"""

from __future__ import annotations

import os

from vitcls.data import embedded
from vitcls.errors import UserError

_DEFAULT_DATA_DIR = "~/tensorflow_datasets"


class DatasetNotFoundError(UserError):
  """A dataset or split is not prepared in the data dir."""


def data_dir(explicit: str | None = None) -> str:
  """The TFDS data dir: explicit value, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  path = explicit or os.environ.get("TFDS_DATA_DIR") or _DEFAULT_DATA_DIR
  return os.path.expanduser(path)


def prepare_embedded(name: str, root: str) -> None:
  """Builds an embedded dataset into `root` in ArrayRecord format if not there yet."""
  builder = embedded.BUILDERS[name](data_dir=root, file_format="array_record")
  if not builder.data_path.exists():
    builder.download_and_prepare(file_format="array_record")


def get_source(name: str, split: str, data_dir_path: str | None = None):
  """Returns the random-access source for TFDS `name`/`split`, or one clear error."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  root = data_dir(data_dir_path)
  if name in embedded.BUILDERS:
    prepare_embedded(name, root)
  hint = (f"prepare it with `tfds build {name.split(':')[0]} --file_format=array_record "
          f"--data_dir={root}` (or point TFDS_DATA_DIR / config.input.data_dir at the "
          f"folder that holds it); built-in offline datasets: "
          f"{', '.join(sorted(embedded.BUILDERS))}")
  try:
    builder = tfds.builder(name, data_dir=root)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DatasetNotFoundError(f"dataset '{name}' is unknown to TFDS and not in {root}: "
                               f"{hint}") from e
  if not builder.data_path.exists():
    raise DatasetNotFoundError(f"dataset '{name}' is not prepared in {root}: {hint}")
  try:
    return tfds.data_source(name, split=split, data_dir=root, download=False)
  except NotImplementedError as e:
    raise DatasetNotFoundError(
        f"dataset '{name}' in {root} is not in ArrayRecord format: {hint}") from e
  except (ValueError, KeyError) as e:
    raise DatasetNotFoundError(f"dataset '{name}' has no split '{split}': {e}") from e
