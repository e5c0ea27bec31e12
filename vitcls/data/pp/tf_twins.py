"""TF twins of the host ops, for the serving export (vitcls.serving).

Each factory takes its host op's arguments and returns an op on a batch of images
(tf.Tensor [batch, h, w, c] -> [batch, h', w', c']), or None when the op leaves the image
alone (label ops, ops on another key). The registry names an op's twin here
(`OpInfo.tf_twin`); TensorFlow is imported only when a twin op runs, so building the
list costs nothing.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from vitcls.data.pp.decode import DECODE_MODES
from vitcls.data.pp.image import check_method, check_rounding, normalize_constants

ImageOp = Callable[[Any], Any]  # tf.Tensor [batch, h, w, c] -> tf.Tensor [batch, h', w', c'].


def _on_image(key: str, op: ImageOp) -> Optional[ImageOp]:
  return op if key == "image" else None


def cast_like(images, dtype, rounding="nearest"):
  """float32 images -> `dtype`, rounded (or truncated, the host op's `rounding`) and
  clipped to its range when it is an integer."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if dtype.is_integer:
    if rounding == "nearest":
      images = tf.round(images)
    images = tf.clip_by_value(images, dtype.min, dtype.max)
  return tf.cast(images, dtype)  # tf.cast truncates what was not rounded.


def resize(size, width=None, key="image", method="bilinear",
           antialias=True, rounding="nearest") -> Optional[ImageOp]:
  """tf.image.resize with the host op's `antialias`, keeping the dtype as the host does.

  The host resizes with PIL, TF with its own kernels: with antialias=True they agree to a
  few 1e-4 of a pixel value on bilinear (so rounded uint8 pixels can differ by one), less
  closely on the other methods. antialias=False bilinear is TF's own kernel on the host
  (image.resize_bilinear_aliased); the combinations the host refuses are refused here.
  Serving matches the host exactly only when no resize happens (the input already has
  the pp's size).
  """
  hw = (int(size), int(size if width is None else width))
  check_method(method, antialias)
  check_rounding(rounding)
  def op(images):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    out = tf.image.resize(tf.cast(images, tf.float32), hw, method=method,
                          antialias=antialias)
    return cast_like(out, images.dtype, rounding)
  return _on_image(key, op)


def central_crop(size, width=None, key="image") -> Optional[ImageOp]:
  """The central window; an image smaller than it is kept whole (serving then resizes)."""
  h, w = int(size), int(size if width is None else width)
  def op(images):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    shape = tf.shape(images)
    top, left = tf.maximum((shape[1] - h) // 2, 0), tf.maximum((shape[2] - w) // 2, 0)
    return images[:, top:top + h, left:left + w]
  return _on_image(key, op)


def to_rgb(key="image") -> Optional[ImageOp]:
  """One channel repeated three times; three channels unchanged."""
  def op(images):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    return tf.tile(images, [1, 1, 1, 3]) if images.shape[-1] == 1 else images
  return _on_image(key, op)


def value_range(vmin=-1.0, vmax=1.0, in_min=0.0, in_max=255.0,
                key="image") -> Optional[ImageOp]:
  """[in_min, in_max] -> [vmin, vmax] in float32, the host's arithmetic in the same order."""
  scale = (vmax - vmin) / (in_max - in_min)
  def op(images):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    return (tf.cast(images, tf.float32) - in_min) * scale + vmin
  return _on_image(key, op)


def resize_small(size, key="image", method="bilinear",
                 antialias=True, rounding="nearest") -> Optional[ImageOp]:
  """Shorter side to `size` as the host's resize_small, then `resize`'s TF resize.

  The shape is the host's (`image.resize_small_shape`: the same float64 arithmetic and
  half-to-even rounding), computed per batch since serving takes any input size.
  """
  size = int(size)
  check_method(method, antialias)
  check_rounding(rounding)
  def op(images):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    hw = tf.cast(tf.shape(images)[1:3], tf.float64)
    new_hw = tf.cast(tf.round(hw * size / tf.reduce_min(hw)), tf.int32)
    out = tf.image.resize(tf.cast(images, tf.float32), new_hw, method=method,
                          antialias=antialias)
    return cast_like(out, images.dtype, rounding)
  return _on_image(key, op)


def normalize(mean, std, key="image") -> Optional[ImageOp]:
  """(x - 255 mean) / (255 std) in float32 with the host's constants: equal bit for bit."""
  mean255, std255 = normalize_constants(mean, std)
  def op(images):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    return (tf.cast(images, tf.float32) - mean255) / std255
  return _on_image(key, op)


def decode(key="image", channels=3) -> None:
  """Nothing to do: serving takes decoded uint8 RGB and makes the model's channels."""
  del key
  if channels not in DECODE_MODES:
    raise TypeError(f"channels must be 1 or 3, got {channels!r}")


def label_only(*args, **kwargs) -> None:
  """Ops that touch only labels (or drop keys): nothing to do on a served image."""
  del args, kwargs
