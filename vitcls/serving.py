"""TF SavedModel export, so a trained classifier serves from raw pixels without vitcls.

Serving stacks (TF Serving, Vertex AI, a plain `tf.saved_model.load`) take a SavedModel,
and a client should send the image it has rather than re-implement our host
preprocessing. So the `serving_default` signature takes `images`, uint8 RGB
[batch, height, width, 3] (any batch, any size, one size per call), and does in TF what
evaluation does on the host:

  1. RGB -> the model's channel count: 3 is unchanged; 1 is luma, ITU-R BT.601
     (0.299 R + 0.587 G + 0.114 B, weights summing to 1, rounded back to uint8 as PIL's
     convert("L") does), so a gray image sent as RGB gives back its own pixels;
  2. the image ops of the eval pp, each by the TF twin its registry entry names
     (vitcls.data.pp.tf_twins), in order; label ops are skipped; random (training) ops
     are refused;
  3. a bilinear resize to the model's input size when the image is not already that
     size, so any input size works even when the pp has no resize;
  4. the model, converted by jax2tf with its params as variables, then a softmax.

It returns `probabilities` and `logits`, float32 [batch, num_classes]. Class names, when
given, are the asset `assets/labels.txt`, one per line in class index order.

TensorFlow is imported only by the code that builds the graph, so importing this module
costs nothing until a SavedModel is written.
"""

from __future__ import annotations

import os
import tempfile
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vitcls.data import pp
from vitcls.data.pp import registry
from vitcls.data.pp.tf_twins import ImageOp, cast_like
from vitcls.errors import UserError
from vitcls.run import workdir as wdir

LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601, as PIL's convert("L").
PLATFORMS = ("cpu", "cuda", "tpu")  # The SavedModel runs on any of these.
LABELS_FILE = "labels.txt"


class ServingExportError(UserError):
  """The model or its pp cannot be exported for serving."""


def is_savedmodel(path: str) -> bool:
  """A folder holding a SavedModel (what a new export may replace)."""
  return os.path.isfile(os.path.join(path, "saved_model.pb"))


SAVEDMODEL = wdir.Output("a SavedModel", folder=True, is_own=is_savedmodel)


def image_ops(pp_spec: str) -> list[ImageOp]:
  """The TF twins (`OpInfo.tf_twin`) of the image ops of `pp_spec`, in order.

  A random op, an op without a twin or bad arguments raise ServingExportError naming it.
  """
  ops = []
  for text, name, args, kwargs in pp.plan(pp_spec).calls:
    entry = registry.get(name)
    if entry is None or entry.random or entry.tf_twin is None:
      why = "is random" if entry is not None and entry.random else "has no TF twin"
      twins = registry.available_ops(lambda e: e.tf_twin is not None)
      raise ServingExportError(
          f"pp op '{name}' {why}: the serving export takes the eval pp, made of "
          f"{', '.join(twins)}; pass the eval pp spec (e.g. config.evals.<name>.pp)")
    try:
      op = entry.tf_factory()(*args, **kwargs)
    except TypeError as e:
      raise ServingExportError(f"bad arguments for pp op '{text}': {e}") from e
    if op is not None:
      ops.append(op)
  return ops


def _to_channels(images, channels: int):
  """uint8 RGB -> uint8 with `channels` (3: unchanged; 1: BT.601 luma, rounded)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if channels == 3:
    return images
  luma = tf.reduce_sum(tf.cast(images, tf.float32) * tf.constant(LUMA_WEIGHTS), axis=-1,
                       keepdims=True)
  return cast_like(luma, tf.uint8)


def _fit(images, hw: tuple[int, int]):
  """float32 images of the model's size: bilinear (antialiased) resize only if not already."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  images = tf.cast(images, tf.float32)
  if tuple(images.shape[1:3]) == hw:
    return images
  same = tf.reduce_all(tf.shape(images)[1:3] == hw)
  out = tf.cond(same, lambda: images,
                lambda: tf.image.resize(images, hw, method="bilinear", antialias=True))
  return tf.ensure_shape(out, [None, *hw, images.shape[-1]])


def preprocess_tf(images, ops: Sequence[ImageOp], image_shape: Sequence[int]):
  """uint8 RGB [batch, h, w, 3] -> the model's float32 input [batch, *image_shape]."""
  images = _to_channels(images, image_shape[-1])
  for op in ops:
    images = op(images)
  return _fit(images, tuple(image_shape[:2]))


def _logits_fn(model, treedef) -> Callable:
  """(flat params, images) -> logits: the JAX function that jax2tf converts."""
  def logits(leaves, images):
    params = jax.tree_util.tree_unflatten(treedef, leaves)
    return model.apply({"params": params}, images, train=False)[0]
  return logits


def _variable_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _serving_module(model, params, ops, image_shape, labels_path: Optional[str]):
  """A tf.Module holding the params as variables and the `serve` function."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top

  class Serving(tf.Module):
    # A plain attribute instead of tf.Module's property, so the list is saved with the
    # model and `tf.saved_model.load(dir).variables` lists the params (TF Hub convention).
    variables = None

  module = Serving()
  with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
  module.variables = [
      tf.Variable(np.asarray(jax.device_get(x)), trainable=False, name=_variable_name(p))
      for p, x in with_paths]
  if labels_path is not None:
    module.labels_file = tf.saved_model.Asset(labels_path)
  # with_gradient=False: serving needs no TF gradient, and saving one would trace and
  # store the VJP too. Only the batch is symbolic: the size is fixed by _fit.
  logits_tf = jax2tf.convert(
      _logits_fn(model, treedef), polymorphic_shapes=[None, "(batch, ...)"],
      with_gradient=False, native_serialization_platforms=PLATFORMS)

  @tf.function(autograph=False, input_signature=[
      tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
  def serve(images):
    logits = logits_tf(list(module.variables), preprocess_tf(images, ops, image_shape))
    return {"probabilities": tf.nn.softmax(logits, axis=-1), "logits": logits}

  module.serve = serve
  return module


def _check_image_shape(image_shape) -> tuple[int, int, int]:
  shape = tuple(image_shape)
  if (len(shape) != 3 or not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape)
      or shape[-1] not in (1, 3)):
    raise ServingExportError(f"image_shape must be (height, width, channels) with 1 or 3 "
                             f"channels, got {image_shape}")
  return tuple(int(d) for d in shape)


def _num_classes(model, params, image_shape) -> int:
  """The logits width, by shape inference only (also checks params fit the model)."""
  spec = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  logits = jax.eval_shape(lambda p, x: model.apply({"params": p}, x, train=False)[0],
                          params, spec)
  return int(logits.shape[-1])


def _check_labels(label_names, num_classes: int) -> list[str]:
  names = [str(n) for n in label_names]
  if len(names) != num_classes:
    raise ServingExportError(f"got {len(names)} label names for a model with {num_classes} "
                             f"classes: pass one name per class, in class index order")
  bad = [n for n in names if "\n" in n or "\r" in n]
  if bad:
    raise ServingExportError(f"label name {bad[0]!r} has a line break: labels.txt holds one "
                             f"name per line")
  return names


def export_savedmodel(output_dir, *, model, params, pp_spec: str,
                      image_shape: Sequence[int],
                      label_names: Optional[Sequence[str]] = None) -> str:
  """Writes a SavedModel that serves `model` on uint8 RGB images; returns output_dir.

  output_dir: replaced only when it is a SavedModel or an empty folder (else OutputError).
  model/params: a vitcls classifier (`model.apply({'params': params}, images,
    train=False)` -> (logits, aux)) and its params, fetchable to the host.
  pp_spec: the eval preprocessing, e.g. "resize(224)|value_range(-1,1)|onehot(1000)".
  image_shape: the model's input (height, width, channels), channels 1 or 3.
  label_names: class names in index order, saved as assets/labels.txt.
  The signature `serving_default` maps `images` uint8 [batch, h, w, 3] to `probabilities`
  and `logits`, float32 [batch, num_classes]; see the module docstring for the steps.
  """
  output_dir = os.fspath(output_dir)
  wdir.check_output(output_dir, SAVEDMODEL)  # Before any work.
  image_shape = _check_image_shape(image_shape)
  ops = image_ops(pp_spec)
  num_classes = _num_classes(model, params, image_shape)
  labels = None if label_names is None else _check_labels(label_names, num_classes)

  def write(tmp):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    with tempfile.TemporaryDirectory() as scratch:
      labels_path = None
      if labels is not None:
        labels_path = os.path.join(scratch, LABELS_FILE)
        with open(labels_path, "w", encoding="utf-8") as f:
          f.write("".join(f"{n}\n" for n in labels))
      module = _serving_module(model, params, ops, image_shape, labels_path)
      tf.saved_model.save(module, tmp, signatures={"serving_default": module.serve})

  wdir.atomic_dir(output_dir, write, kind=SAVEDMODEL)
  return output_dir
