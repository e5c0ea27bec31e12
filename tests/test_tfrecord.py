"""A TFRecord copy of a dataset: the error gives the command, which makes it trainable.

Most prepared TFDS datasets users hold are TFRecord files (`tfds build`'s default), which
random access cannot read. The error must name a command that works as printed: this
test runs exactly that text, then trains and evaluates on the converted copy.
"""

import json
import os
import re
import shlex
import subprocess
import sys
from typing import ClassVar

import numpy as np
import pytest
import tensorflow_datasets as tfds

from vitcls import configs, train
from vitcls.data import embedded, sources
from conftest import REPO, read_metrics


def _tfrecord_digits(root):
  """(images, labels) of the train split, prepared into `root` as TFRecord files."""
  builder = embedded.Digits(data_dir=root, file_format="tfrecord")
  builder.download_and_prepare(file_format="tfrecord")
  examples = list(tfds.as_numpy(builder.as_dataset(split="train", shuffle_files=False)))
  return (np.stack([e["image"] for e in examples]),
          np.array([e["label"] for e in examples]))


def test_tfrecord_copy_names_the_command_that_converts_it_in_place(tmp_path, monkeypatch):
  root = str(tmp_path / "data")
  # Nothing may fall back to the data dir of the environment: any read there would
  # prepare digits in it.
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "elsewhere"))
  images, labels = _tfrecord_digits(root)

  with pytest.raises(sources.DatasetNotFoundError) as e:
    sources.get_source("digits", "train", root)
  message = str(e.value)
  assert "\n" not in message and "tfrecord" in message
  assert 'pip install "vitcls[data]"' in message
  command = re.search(r"`([^`]*)`", message).group(1)
  version_dir = os.path.join(root, "digits", "1.0.0")
  assert command == (f"tfds convert_format --dataset_version_dir={version_dir} "
                     f"--out_file_format=array_record")

  argv = shlex.split(command)
  argv[0] = os.path.join(os.path.dirname(sys.executable), "tfds")
  proc = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  assert proc.returncode == 0, proc.stderr[-4000:]

  source = sources.get_source("digits", "train", root)
  assert type(source).__name__ == "ArrayRecordDataSource"
  np.testing.assert_array_equal(np.stack([source[i]["image"] for i in range(len(source))]),
                                images)
  np.testing.assert_array_equal([source[i]["label"] for i in range(len(source))], labels)

  experiment = os.path.join(REPO, "experiments", "digits_vit.py:runlocal=True")
  config = configs.resolve(configs.load_experiment(experiment), [
      "input.data_dir=" + root, "total_steps=2", "evals.test.every=2"])
  workdir = str(tmp_path / "workdir")
  final = train.train(config, workdir)  # Its evaluator reads config.input.data_dir too.
  assert final["test/count"] == 359
  assert [r["step"] for r in read_metrics(workdir) if "loss" in r] == [1, 2]
  assert not os.path.exists(tmp_path / "elsewhere" / "digits")


class TwoSizes(tfds.core.GeneratorBasedBuilder):
  """A dataset with configs, so that its files lie in ROOT/two_sizes/CONFIG/VERSION."""

  VERSION = tfds.core.Version("2.1.0")
  BUILDER_CONFIGS: ClassVar[list] = [tfds.core.BuilderConfig(name="small"),
                     tfds.core.BuilderConfig(name="big")]

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(2, 2, 1)),
        "label": tfds.features.ClassLabel(num_classes=2)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(4):
      yield i, {"image": np.full((2, 2, 1), i, np.uint8), "label": i % 2}


@pytest.mark.parametrize("name", ["two_sizes/big", "two_sizes/big:2.1.0"])
def test_the_command_names_the_config_and_version_folder(name, tmp_path):
  root = str(tmp_path)
  TwoSizes(config="big", data_dir=root, file_format="tfrecord").download_and_prepare()
  version_dir = os.path.join(root, "two_sizes", "big", "2.1.0")
  with pytest.raises(sources.DatasetNotFoundError,
                     match=re.escape(f"--dataset_version_dir={version_dir} ")):
    sources.labels(name, "train", root)


def test_a_copy_from_an_older_tfds_is_told_to_name_its_format_first(tmp_path):
  """TFDS wrote no fileFormat before 2021; convert_format stops on such a copy."""
  root = str(tmp_path)
  TwoSizes(config="small", data_dir=root, file_format="tfrecord").download_and_prepare()
  info_file = os.path.join(root, "two_sizes", "small", "2.1.0", "dataset_info.json")
  with open(info_file) as f:
    written = json.load(f)
  del written["fileFormat"]
  with open(info_file, "w") as f:
    json.dump(written, f)
  with pytest.raises(sources.DatasetNotFoundError) as e:
    sources.get_source("two_sizes", "train", root)
  assert f'add "fileFormat": "tfrecord" to {info_file}' in str(e.value)
  assert "tfds convert_format --dataset_version_dir=" in str(e.value)


def test_a_copy_at_another_version_is_named_with_the_fix(tmp_path):
  """As imagenet2012 5.0.0 copies under TFDS releases whose default is 5.1.0."""
  root = str(tmp_path)
  TwoSizes(config="big", data_dir=root, file_format="tfrecord").download_and_prepare()
  config_dir = os.path.join(root, "two_sizes", "big")
  os.rename(os.path.join(config_dir, "2.1.0"), os.path.join(config_dir, "2.0.0"))
  with pytest.raises(sources.DatasetNotFoundError) as e:
    sources.get_source("two_sizes/big", "train", root)
  assert (f"{config_dir} holds version 2.0.0: name the version, as "
          f"'two_sizes/big:2.0.0'") in str(e.value)
