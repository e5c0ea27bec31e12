"""Tests for vitcls/serving.py: the SavedModel serves what vitcls computes on the host.

The reference for every check is vitcls itself: the host pp (`pp_lib.parse`) per
example, then `model.apply`. Where serving resizes, the same resize is done here with
tf.image.resize before the host pipeline, since PIL and TF resize slightly differently.
Each SavedModel is written once per module and loaded once.
"""

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf

from vitcls import serving
from vitcls.data import pp as pp_lib
from vitcls.errors import UserError
from vitcls.models import vit
from vitcls.run import workdir as wdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RGB_SPEC = "value_range(-1,1)|onehot(4)"
RESIZE_SPEC = "resize(16)|value_range(-1,1)|onehot(4)"
GRAY_SPEC = "value_range(-1,1)|onehot(10)"
LABELS = ["cat", "dog", "bird", "fish"]


def _model(num_classes, image_shape, seed=0):
  """A tiny ViT (width 32, depth 1, patch 4) with a random head, so probabilities vary."""
  model = vit.Model(num_classes=num_classes, variant="mu/4", head_zeroinit=False)
  params = model.init(jax.random.key(seed), np.zeros((1, *image_shape), np.float32))
  return model, params["params"]


def _images(n, size, channels=3, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), np.uint8)


def _host_probs(model, params, images, spec):
  """vitcls on the host: the pp spec per example, then softmax of the model's logits."""
  pp = pp_lib.parse(spec)
  batch = np.stack([pp({"image": img, "label": 0}, np.random.default_rng(0))["image"]
                    for img in images])
  logits, _ = model.apply({"params": params}, batch, train=False)
  return np.asarray(jax.nn.softmax(logits))


def _tf_resize(images, size):
  """What serving's resizes do: antialiased bilinear in float32 (uint8 rounded back)."""
  out = tf.image.resize(tf.cast(images, tf.float32), (size, size), antialias=True).numpy()
  if images.dtype == np.uint8:
    out = np.clip(np.round(out), 0, 255).astype(np.uint8)
  return out


def _serve(loaded, images):
  out = loaded.signatures["serving_default"](images=tf.constant(images, tf.uint8))
  return {k: v.numpy() for k, v in out.items()}


class Export:
  def __init__(self, tmp_path_factory, name, num_classes, image_shape, spec, **kw):
    self.model, self.params = _model(num_classes, image_shape)
    self.spec = spec
    self.path = serving.export_savedmodel(
        str(tmp_path_factory.mktemp(name) / "export"), model=self.model,
        params=self.params, pp_spec=spec, image_shape=image_shape, **kw)
    self.loaded = tf.saved_model.load(self.path)


@pytest.fixture(scope="module")
def rgb(tmp_path_factory):
  return Export(tmp_path_factory, "rgb", 4, (16, 16, 3), RGB_SPEC, label_names=LABELS)


@pytest.fixture(scope="module")
def gray(tmp_path_factory):
  return Export(tmp_path_factory, "gray", 10, (28, 28, 1), GRAY_SPEC)


@pytest.fixture(scope="module")
def resized(tmp_path_factory):
  return Export(tmp_path_factory, "resize", 4, (16, 16, 3), RESIZE_SPEC)


@pytest.mark.parametrize("batch", [1, 3])
def test_rgb_matches_host_pipeline_at_any_batch(rgb, batch):
  images = _images(batch, 16, seed=batch)
  out = _serve(rgb.loaded, images)
  expected = _host_probs(rgb.model, rgb.params, images, RGB_SPEC)
  assert out["probabilities"].shape == (batch, 4)
  assert out["probabilities"].dtype == np.float32
  np.testing.assert_allclose(out["probabilities"], expected, atol=1e-5)
  np.testing.assert_allclose(out["probabilities"], jax.nn.softmax(out["logits"]), atol=1e-6)
  assert np.ptp(expected) > 1e-2  # Non-trivial: not a uniform zero-head output.


def test_gray_model_takes_rgb_with_equal_channels(gray):
  images = _images(3, 28, channels=1, seed=5)
  out = _serve(gray.loaded, np.repeat(images, 3, axis=-1))
  np.testing.assert_allclose(out["probabilities"],
                             _host_probs(gray.model, gray.params, images, GRAY_SPEC),
                             atol=1e-5)


def test_gray_model_takes_another_size(gray):
  images = _images(2, 40, channels=1, seed=6)
  out = _serve(gray.loaded, np.repeat(images, 3, axis=-1))
  pp = pp_lib.parse(GRAY_SPEC)
  host = np.stack([pp({"image": i, "label": 0}, np.random.default_rng(0))["image"]
                   for i in images])
  logits, _ = gray.model.apply({"params": gray.params}, _tf_resize(host, 28), train=False)
  np.testing.assert_allclose(out["probabilities"], jax.nn.softmax(logits), atol=1e-5)


def test_gray_model_takes_color_as_bt601_luma(gray):
  images = _images(2, 28, seed=7)
  luma = np.round(images.astype(np.float64) @ [0.299, 0.587, 0.114]).astype(np.uint8)
  out = _serve(gray.loaded, images)
  np.testing.assert_allclose(out["probabilities"],
                             _host_probs(gray.model, gray.params, luma[..., None], GRAY_SPEC),
                             atol=1e-5)
  assert sum(serving.LUMA_WEIGHTS) == pytest.approx(1.0)


@pytest.mark.parametrize("size", [16, 24])
def test_pp_resize_serves_any_size(resized, size):
  images = _images(2, size, seed=size)
  out = _serve(resized.loaded, images)
  expected = _host_probs(resized.model, resized.params, _tf_resize(images, 16), RESIZE_SPEC)
  np.testing.assert_allclose(out["probabilities"], expected, atol=1e-5)
  # PIL's resize (the host op itself) is close to TF's, not equal.
  np.testing.assert_allclose(
      out["probabilities"], _host_probs(resized.model, resized.params, images, RESIZE_SPEC),
      atol=2e-3)


def test_labels_asset_holds_names_in_order(rgb):
  path = os.path.join(rgb.path, "assets", serving.LABELS_FILE)
  with open(path, encoding="utf-8") as f:
    assert f.read().splitlines() == LABELS
  assert os.path.samefile(rgb.loaded.labels_file.asset_path.numpy().decode(), path)


def test_params_are_variables(rgb):
  loaded = tf.saved_model.load(rgb.path)  # Own copy: it is modified below.
  names = {v.name.split(":")[0]: v for v in loaded.variables}
  assert len(names) == len(jax.tree.leaves(rgb.params))
  np.testing.assert_array_equal(names["head/kernel"].numpy(), rgb.params["head"]["kernel"])
  # The signature reads the variables: a zero head gives uniform probabilities.
  names["head/kernel"].assign(tf.zeros_like(names["head/kernel"]))
  names["head/bias"].assign(tf.zeros_like(names["head/bias"]))
  np.testing.assert_allclose(_serve(loaded, _images(2, 16))["probabilities"], 0.25, atol=1e-6)


@pytest.mark.parametrize("op", ["random_crop(8)", "random_shift(2)", "flip_lr"])
def test_random_op_is_one_line_user_error(tmp_path, op):
  model, params = _model(4, (16, 16, 3))
  with pytest.raises(serving.ServingExportError) as e:
    serving.export_savedmodel(tmp_path / "export", model=model, params=params,
                              pp_spec=f"{op}|{RGB_SPEC}", image_shape=(16, 16, 3))
  assert isinstance(e.value, UserError)
  message = str(e.value)
  assert "\n" not in message and op.split("(")[0] in message and "eval pp" in message
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("spec, words", [
    ("sharpen(2)|value_range(-1,1)", ["'sharpen'", "no TF twin", "eval pp"]),
    ("inception_crop(32)|value_range(-1,1)", ["'inception_crop'", "is random"]),
    ("resize(16, method='lanczos')", ["resize", "method"]),
])
def test_unservable_pp_is_user_error(spec, words):
  with pytest.raises(serving.ServingExportError) as e:
    serving.image_ops(spec)
  assert "\n" not in str(e.value) and all(w in str(e.value) for w in words)


def test_wrong_label_count_is_user_error(tmp_path):
  model, params = _model(4, (16, 16, 3))
  with pytest.raises(serving.ServingExportError, match="3 label names .* 4 classes"):
    serving.export_savedmodel(tmp_path / "export", model=model, params=params,
                              pp_spec=RGB_SPEC, image_shape=(16, 16, 3),
                              label_names=LABELS[:3])


def test_refuses_to_replace_a_directory_or_file_that_is_not_a_savedmodel(tmp_path):
  model, params = _model(4, (16, 16, 3))
  (tmp_path / "notes.txt").write_text("keep me")
  kw = dict(model=model, params=params, pp_spec=RGB_SPEC, image_shape=(16, 16, 3))
  with pytest.raises(wdir.OutputError, match="exists and is not a SavedModel"):
    serving.export_savedmodel(tmp_path, **kw)
  with pytest.raises(wdir.OutputError, match="is a file, not a SavedModel"):
    serving.export_savedmodel(tmp_path / "notes.txt", **kw)
  assert os.listdir(tmp_path) == ["notes.txt"]
  assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_failed_export_leaves_the_old_one_whole_and_a_new_one_replaces_it(
    rgb, tmp_path, monkeypatch):
  target = tmp_path / "export"
  shutil.copytree(rgb.path, target)
  images = _images(2, 16)
  before = _serve(tf.saved_model.load(str(target)), images)["probabilities"]

  def broken_save(obj, export_dir, **kw):
    with open(os.path.join(export_dir, "saved_model.pb"), "wb") as f:
      f.write(b"half")
    raise OSError("disk full")

  kw = dict(model=rgb.model, params=rgb.params, pp_spec=RGB_SPEC, image_shape=(16, 16, 3))
  with monkeypatch.context() as m:
    m.setattr(tf.saved_model, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
      serving.export_savedmodel(target, label_names=LABELS, **kw)
  assert os.listdir(tmp_path) == ["export"]  # No temporary sibling left behind.
  after = _serve(tf.saved_model.load(str(target)), images)["probabilities"]
  np.testing.assert_array_equal(after, before)

  names = ["w", "x", "y", "z"]
  assert serving.export_savedmodel(str(target), label_names=names, **kw) == str(target)
  assert os.listdir(tmp_path) == ["export"]
  with open(target / "assets" / serving.LABELS_FILE, encoding="utf-8") as f:
    assert f.read().splitlines() == names


def test_importing_serving_does_not_import_tensorflow():
  code = ("import sys, vitcls.serving; "
          "assert not [m for m in sys.modules if m.startswith('tensorflow')]")
  subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


def test_signature_and_platforms(rgb):
  from tensorflow.core.protobuf import saved_model_pb2  # pylint: disable=g-import-not-at-top
  sig = rgb.loaded.signatures["serving_default"]
  spec = sig.structured_input_signature[1]["images"]
  assert (spec.dtype, spec.shape.as_list()) == (tf.uint8, [None, None, None, 3])
  assert set(sig.structured_outputs) == {"probabilities", "logits"}
  saved = saved_model_pb2.SavedModel()
  with open(os.path.join(rgb.path, "saved_model.pb"), "rb") as f:
    saved.ParseFromString(f.read())
  platforms = [list(node.attr["platforms"].list.s)
               for fn in saved.meta_graphs[0].graph_def.library.function
               for node in fn.node_def if node.op == "XlaCallModule"]
  assert platforms == [[b"CPU", b"CUDA", b"TPU"]]


def test_serves_with_tensorflow_alone(rgb):
  """A fresh process where jax, flax and vitcls cannot be imported gives the same output.

  (TensorFlow imports jax when it can, so the check blocks it rather than looking for it.)
  """
  images = _images(2, 16, seed=9)
  np.save(os.path.join(os.path.dirname(rgb.path), "images.npy"), images)
  code = (
      "import sys; sys.modules.update(dict.fromkeys(['jax', 'jaxlib', 'flax', 'vitcls'])); "
      "import numpy as np, tensorflow as tf; d = sys.argv[1]; "
      "f = tf.saved_model.load(d + '/export').signatures['serving_default']; "
      "p = f(images=tf.constant(np.load(d + '/images.npy')))['probabilities'].numpy(); "
      "np.save(d + '/probs.npy', p)")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  subprocess.run([sys.executable, "-c", code, os.path.dirname(rgb.path)], cwd="/", env=env,
                 check=True, timeout=300)
  probs = np.load(os.path.join(os.path.dirname(rgb.path), "probs.npy"))
  np.testing.assert_allclose(probs, _serve(rgb.loaded, images)["probabilities"], atol=1e-6)
