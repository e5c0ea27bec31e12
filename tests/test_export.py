"""Checkpoints out and back in: `vitcls.export` to npz, and `config.model_init` from a
workdir or an exported npz into a run at another resolution."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from vitcls import configs, export, train
from vitcls.run import build, checkpoint
from vitcls.errors import UserError
from vitcls.models import loading
from conftest import REPO, train_runlocal_mnist

FINETUNE = os.path.join(REPO, "experiments", "finetune.py")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A runlocal mnist5k ViT (28 px, patch 7: a 4x4 grid), trained for 6 steps."""
  return train_runlocal_mnist(tmp_path_factory)


def _leaves(tree):
  return loading.flatten(jax.device_get(tree))


def test_export_cli_writes_big_vision_npz_identical_to_the_checkpoint(trained, tmp_path):
  output = str(tmp_path / "exported.npz")
  proc = subprocess.run(
      [sys.executable, "-m", "vitcls.export", f"--workdir={trained}", f"--output={output}",
       "--step=3"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"Exported npz to {output}" in proc.stdout
  saved = _leaves(checkpoint.load_params(trained, 3))
  with np.load(output, allow_pickle=False) as npz:
    assert sorted(npz.files) == sorted(saved)
    assert "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel" in npz.files
    for name in npz.files:
      assert npz[name].tobytes() == np.asarray(saved[name]).tobytes(), name
  assert not np.array_equal(saved["head/kernel"],
                            _leaves(checkpoint.load_params(trained))["head/kernel"])


def test_export_errors_are_one_line(tmp_path, trained):
  with pytest.raises(UserError, match="no checkpoint in workdir"):
    export.export_npz(str(tmp_path), str(tmp_path / "x.npz"))
  with pytest.raises(UserError, match="has no checkpoint of step 4: it has steps 3, 6"):
    export.export_npz(trained, str(tmp_path / "x.npz"), step=4)


def _finetune_config(init, *overrides):
  arg = (f"init={init},dataset=digits,classes=10,res=42,rgb=False,steps=4,batch=16,"
         f"runlocal=True")
  return configs.resolve(configs.load_experiment(f"{FINETUNE}:{arg}"), list(overrides))


@pytest.mark.parametrize("source", ["workdir", "npz"])
def test_model_init_starts_from_the_checkpoint_on_a_new_patch_grid(trained, tmp_path, source):
  init, overrides = trained, []
  if source == "npz":  # An npz holds no architecture: the command line gives it.
    init = export.export_npz(trained, str(tmp_path / "mnist.npz"))
    model = configs.load_workdir_config(trained).model
    overrides = ["model.variant=None", "model.pool_type=gap"] + [
        f"model.{k}={v}" for k, v in model.items()]
  config = _finetune_config(init, *overrides)
  assert config.model.width == 32 and config.model.patch_size == 7  # From config.json.
  run = build.build(config)
  start = _leaves(run.init_state().params)
  saved = _leaves(checkpoint.load_params(trained))
  assert start["pos_embedding"].shape == (1, 36, 32)  # 42 px / patch 7: 6x6, was 4x4.
  np.testing.assert_allclose(
      start["pos_embedding"].reshape(6, 6, 32),
      loading.resample_grid(saved["pos_embedding"].reshape(4, 4, 32), (6, 6)), atol=1e-7)
  assert not np.any(start["head/kernel"]) and not np.any(start["head/bias"])  # Fresh head.
  assert np.any(saved["head/kernel"])
  for name, value in saved.items():
    if name != "pos_embedding" and not name.startswith("head/"):
      assert start[name].tobytes() == value.tobytes(), name


def test_finetune_experiment_runs_from_a_workdir(trained, tmp_path):
  final = train.train(_finetune_config(trained), str(tmp_path / "ft"))
  assert final["test/count"] == 359 and 0.0 <= final["test/top1"] <= 1.0


def test_savedmodel_export_of_a_workdir_serves_like_vitcls(trained, tmp_path):
  """uint8 RGB in, the eval pp and the model inside: the same probabilities as vitcls."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from vitcls import models  # pylint: disable=g-import-not-at-top
  from vitcls.data import sources  # pylint: disable=g-import-not-at-top
  from vitcls.data import pp as pp_lib  # pylint: disable=g-import-not-at-top
  output = export.export_savedmodel(trained, str(tmp_path / "served"))
  with open(os.path.join(output, "assets", "labels.txt")) as f:
    assert f.read().split() == [str(i) for i in range(10)]
  config = configs.load_workdir_config(trained)
  source = sources.get_source("mnist5k", "test")
  grey = np.stack([source[i]["image"] for i in range(5)])  # (5, 28, 28, 1) uint8
  pp = pp_lib.parse(config.evals.test.pp)
  images = np.stack([pp({"image": g, "label": 0}, None)["image"] for g in grey])
  model = models.build(config.model_name, config.num_classes, config.model)
  logits, _ = model.apply({"params": checkpoint.load_params(trained)}, images)
  expected = np.asarray(jax.nn.softmax(logits))
  served = tf.saved_model.load(output).signatures["serving_default"](
      images=tf.constant(np.repeat(grey, 3, axis=-1)))
  np.testing.assert_allclose(served["probabilities"].numpy(), expected, atol=1e-5)
  assert np.ptp(expected) > 1e-3  # Not the uniform output of a zero head.
