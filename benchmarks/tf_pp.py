"""big_vision-style tf.data input, the reference `benchmarks/pipeline.py` races vitcls against.

What big_vision feeds an ImageNet run with: per example, in `map(num_parallel_calls=
AUTOTUNE)`, `tf.io.decode_jpeg`, an Inception crop from `sample_distorted_bounding_box`
resized bilinearly to the output size, a random left-right flip, RandAugment, then
[-1, 1] floats; batched and prefetched. (big_vision's ImageNet configs use its fused
`decode_jpeg_and_inception_crop`, which decodes only the crop: `fused_decode=True`.)

RandAugment is written here in TF ops from vitcls's description of the operations
(`vitcls.data.pp.randaug`: big_vision's 16, their magnitudes, grey 128 fill, nearest
sampling), one operation drawn per layer with a `switch_case`, as big_vision draws one.
It matches vitcls's operations in kind and cost, not bit for bit: only speed is compared.
"""

from __future__ import annotations

import math
from typing import Sequence

import tensorflow as tf

MAX_LEVEL = 10.0
FILL = 128


def _blend(degenerate, image, factor: float):
  d = tf.cast(degenerate, tf.float32)
  out = d + factor * (tf.cast(image, tf.float32) - d)
  return tf.cast(tf.clip_by_value(out, 0.0, 255.0), tf.uint8)


def _grey(image):
  return tf.image.rgb_to_grayscale(image)


def _transform(image, coeffs):
  """Output pixel (x, y) takes input (a0 x + a1 y + a2, b0 x + b1 y + b2), grey outside."""
  transforms = tf.reshape(tf.cast(tf.stack(list(coeffs) + [0.0, 0.0]), tf.float32), [1, 8])
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=transforms, output_shape=tf.shape(image)[:2],
      fill_value=float(FILL), interpolation="NEAREST", fill_mode="CONSTANT")
  return out[0]


def _signed(value: float):
  return tf.where(tf.random.uniform([]) < 0.5, value, -value)


def _rotate(image, m):
  theta = _signed(m / MAX_LEVEL * 30.0) * (math.pi / 180)
  h, w = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
  cy, cx, c, s = (h - 1) / 2, (w - 1) / 2, tf.cos(theta), tf.sin(theta)
  return _transform(image, [c, -s, cx - c * cx + s * cy, s, c, cy - s * cx - c * cy])


def _auto_contrast(image, m):
  del m
  x = tf.cast(image, tf.float32)
  lo = tf.reduce_min(x, axis=[0, 1])
  hi = tf.reduce_max(x, axis=[0, 1])
  scaled = tf.floor((x - lo) * 255.0 / tf.maximum(hi - lo, 1.0))
  return tf.cast(tf.where(hi > lo, scaled, x), tf.uint8)


def _equalize_channel(ch):
  values = tf.cast(tf.reshape(ch, [-1]), tf.int32)
  hist = tf.math.bincount(values, minlength=256, maxlength=256)
  top = tf.gather(hist, tf.reduce_max(tf.where(hist > 0)))
  step = (tf.size(values) - top) // 255
  lut = (tf.cumsum(hist, exclusive=True) + step // 2) // tf.maximum(step, 1)
  lut = tf.cast(tf.clip_by_value(lut, 0, 255), tf.uint8)
  return tf.where(step == 0, ch, tf.gather(lut, tf.cast(ch, tf.int32)))


def _equalize(image, m):
  del m
  return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], axis=-1)


def _sharpness(image, m):
  x = tf.cast(image, tf.float32)[None]
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "VALID")[0]
  inner = tf.pad(tf.ones_like(smooth[..., :1]), [[1, 1], [1, 1], [0, 0]]) > 0
  smooth = tf.where(inner, tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]), x[0])
  return _blend(tf.cast(tf.clip_by_value(smooth, 0, 255), tf.uint8), image, _enhance(m))


def _cutout(image, m):
  pad = int(m / MAX_LEVEL * 40)
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  cy = tf.random.uniform([], 0, h, tf.int32)
  cx = tf.random.uniform([], 0, w, tf.int32)
  rows, cols = tf.range(h)[:, None], tf.range(w)[None, :]
  inside = (rows >= cy - pad) & (rows < cy + pad) & (cols >= cx - pad) & (cols < cx + pad)
  return tf.where(inside[..., None], tf.constant(FILL, tf.uint8), image)


def _solarize(image, threshold):
  x = tf.cast(image, tf.int32)
  return tf.cast(tf.where(x < threshold, x, 255 - x), tf.uint8)


def _posterize(image, m):
  shift = 8 - max(int(m / MAX_LEVEL * 4), 1)
  return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def _enhance(m: float) -> float:
  return m / MAX_LEVEL * 1.8 + 0.1


def _contrast(image, m):
  mean = tf.round(tf.reduce_mean(tf.cast(_grey(image), tf.float32)))
  return _blend(tf.fill(tf.shape(image), tf.cast(mean, tf.uint8)), image, _enhance(m))


def _solarize_add(image, m):
  x = tf.cast(image, tf.int32)
  added = tf.clip_by_value(x + int(m / MAX_LEVEL * 110), 0, 255)
  return tf.cast(tf.where(x < 128, added, x), tf.uint8)


OPS = {
    "AutoContrast": _auto_contrast,
    "Equalize": _equalize,
    "Invert": lambda img, m: 255 - img,
    "Rotate": _rotate,
    "Posterize": _posterize,
    "Solarize": lambda img, m: _solarize(img, int(m / MAX_LEVEL * 256)),
    "Color": lambda img, m: _blend(_grey(img), img, _enhance(m)),
    "Contrast": _contrast,
    "Brightness": lambda img, m: _blend(tf.zeros_like(img), img, _enhance(m)),
    "Sharpness": _sharpness,
    "ShearX": lambda img, m: _transform(img, [1.0, _signed(m / MAX_LEVEL * 0.3), 0.0,
                                               0.0, 1.0, 0.0]),
    "ShearY": lambda img, m: _transform(img, [1.0, 0.0, 0.0,
                                               _signed(m / MAX_LEVEL * 0.3), 1.0, 0.0]),
    "TranslateX": lambda img, m: _transform(img, [1.0, 0.0, -_signed(m / MAX_LEVEL * 100),
                                                   0.0, 1.0, 0.0]),
    "TranslateY": lambda img, m: _transform(img, [1.0, 0.0, 0.0, 0.0, 1.0,
                                                   -_signed(m / MAX_LEVEL * 100)]),
    "Cutout": _cutout,
    "SolarizeAdd": _solarize_add,
}


def randaug(image, num_layers: int = 2, magnitude: float = 10.0):
  """`num_layers` operations drawn uniformly from OPS, on a uint8 HW3 image."""
  ops = list(OPS.values())
  for _ in range(num_layers):
    index = tf.random.uniform([], 0, len(ops), tf.int32)
    image = tf.switch_case(index, [lambda f=f, x=image: f(x, magnitude) for f in ops])
    image.set_shape([None, None, 3])
  return image


def _crop_box(shape, area_min: float):
  begin, size, _ = tf.image.sample_distorted_bounding_box(
      shape, tf.zeros([0, 0, 4], tf.float32), area_range=(area_min / 100, 1.0),
      min_object_covered=0.0, use_image_if_no_bounding_boxes=True)
  return begin, size


def preprocess(data, *, size: int, randaug_layers: int, magnitude: float = 10.0,
               fused_decode: bool = False, area_min: float = 5, uint8: bool = False):
  """Encoded JPEG -> float32 [size, size, 3] in [-1, 1] (`uint8`: stop before that)."""
  if fused_decode:
    begin, crop = _crop_box(tf.image.extract_jpeg_shape(data), area_min)
    window = tf.stack([begin[0], begin[1], crop[0], crop[1]])
    image = tf.image.decode_and_crop_jpeg(data, window, channels=3)
  else:
    image = tf.io.decode_jpeg(data, channels=3)
    begin, crop = _crop_box(tf.shape(image), area_min)
    image = tf.slice(image, begin, crop)
  image = tf.image.resize(image, (size, size), method="bilinear")
  image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
  image = tf.image.random_flip_left_right(image)
  if randaug_layers:
    image = randaug(image, randaug_layers, magnitude)
  return image if uint8 else tf.cast(image, tf.float32) / 127.5 - 1.0


def dataset(paths: Sequence[str], labels: Sequence[int], *, batch: int, size: int,
            randaug_layers: int, fused_decode: bool = False, uint8: bool = False,
            seed: int = 0):
  """The whole tf.data pipeline: shuffled files, repeated, preprocessed, batched."""
  ds = tf.data.Dataset.from_tensor_slices((list(paths), list(labels)))
  ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True).repeat()

  def load(path, label):
    image = preprocess(tf.io.read_file(path), size=size, randaug_layers=randaug_layers,
                       fused_decode=fused_decode, uint8=uint8)
    return {"image": image, "label": label}

  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
  return ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
