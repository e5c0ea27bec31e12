"""Image ops on the host: crops, resizes, flips, value_range, normalize, random erasing.

They follow big_vision's and timm's definitions, and keep uint8 images uint8 until
`value_range` or `normalize`, so the work done in grain's worker processes stays cheap.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import numpy as np
from PIL import Image

from vitcls.data.pp.registry import Example, Op, PreprocessError, register


@dataclasses.dataclass(frozen=True)
class ImageOp:
  """An op on `example[key]`'s array.

  `on_pil`, where given, is the same op on a PIL image (L or RGB) of those uint8
  pixels, equal pixel for pixel and drawing the same numbers from the rng: `decode`
  runs such ops straight after it on the decoded PIL image, which skips copying the
  whole image into NumPy and back (see vitcls.data.pp.decode).
  """
  key: str
  fn: Callable[[np.ndarray, np.random.Generator], np.ndarray]
  on_pil: Optional[Callable[[Image.Image, np.random.Generator], Image.Image]] = None

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    example[self.key] = self.fn(np.asarray(example[self.key]), rng)
    return example


def on_key(key: str, fn: Callable[[np.ndarray, np.random.Generator], np.ndarray],
           on_pil=None) -> ImageOp:
  """The op applying `fn(array, rng)` to `example[key]` (`on_pil`: see `ImageOp`)."""
  return ImageOp(key, fn, on_pil)


def _hw(size, width=None) -> tuple[int, int]:
  return (int(size), int(size if width is None else width))


# The resize methods every resizing op takes, by name, here and in its TF twin.
RESIZE_METHODS = {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
                  "bicubic": Image.BICUBIC, "area": Image.BOX}


# Methods whose result depends on `antialias`: TF's area and nearest kernels ignore it
# (tf.image.resize), so they are the same either way here too.
NON_ANTIALIASED = ("bilinear", "area", "nearest")


def check_method(method: str, antialias: bool = True) -> None:
  """Raises TypeError unless `method` is one of `RESIZE_METHODS` and, with
  antialias=False, one this module computes without antialiasing."""
  if method not in RESIZE_METHODS:
    *first, last = RESIZE_METHODS
    raise TypeError(f"method must be {', '.join(first)} or {last}, not {method!r}")
  if not isinstance(antialias, bool):
    raise TypeError(f"antialias must be True or False, not {antialias!r}")
  if not antialias and method not in NON_ANTIALIASED:
    raise TypeError(f"antialias=False is implemented for method bilinear, area or "
                    f"nearest, not {method!r}")


# How a resize's float result becomes integer pixels: "nearest" rounds (PIL, torchvision);
# "truncate" clips then casts toward zero, as big_vision's `tf.cast(tf.clip_by_value(..))`
# after `tf.image.resize` (big_vision pp/ops_image.py:84-85, 102-103).
ROUNDINGS = ("nearest", "truncate")


def check_rounding(rounding: str) -> None:
  """Raises TypeError unless `rounding` is one of `ROUNDINGS`."""
  if rounding not in ROUNDINGS:
    raise TypeError(f"rounding must be {' or '.join(ROUNDINGS)}, not {rounding!r}")


def _to_dtype(out: np.ndarray, dtype, rounding: str) -> np.ndarray:
  """float `out` as `dtype`: integers rounded or truncated (`ROUNDINGS`), clipped."""
  if np.issubdtype(dtype, np.integer):  # In place: image-sized temporaries cost.
    info = np.iinfo(dtype)
    if rounding == "nearest":
      np.round(out, out=out)
    np.clip(out, info.min, info.max, out=out)  # Then astype truncates toward zero.
  return out.astype(dtype, copy=False)


def _half_pixel_taps(in_size: int, out_size: int):
  """TF's half-pixel-centre bilinear taps along one axis: (lower, upper, lerp).

  The arithmetic of TF's resize_bilinear (half_pixel_centers=True), in float32:
  in = (out + 0.5) * (in_size / out_size) - 0.5, the two neighbours clamped to the image
  and weighted by in - floor(in); no prefilter, so shrinking skips pixels (aliasing).
  """
  scale = np.float32(in_size) / np.float32(out_size)
  pos = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
  floor = np.floor(pos)
  lower = np.maximum(floor, 0).astype(np.int64)
  upper = np.minimum(np.ceil(pos), in_size - 1).astype(np.int64)
  return lower, upper, (pos - floor).astype(np.float32)


def resize_bilinear_aliased(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  """`tf.image.resize(img, hw, "bilinear", antialias=False)` in NumPy, float32 out.

  big_vision's resizes (its `resize`, `resize_small`, `inception_crop` default to
  antialias=False): each output pixel interpolates its 2x2 nearest input pixels
  whatever the scale, where PIL widens the kernel when shrinking.
  """
  x = img.astype(np.float32)
  top, bottom, ylerp = _half_pixel_taps(img.shape[0], hw[0])
  left, right, xlerp = _half_pixel_taps(img.shape[1], hw[1])
  xlerp = xlerp[None, :, None]
  def rows(r):
    return x[r][:, left] + (x[r][:, right] - x[r][:, left]) * xlerp
  t, b = rows(top), rows(bottom)
  return t + (b - t) * ylerp[:, None, None]


def resize_image(img: np.ndarray, hw: tuple[int, int], method: str,
                 antialias: bool = True, rounding: str = "nearest") -> np.ndarray:
  """Resizes an HWC array with PIL, keeping its dtype (antialias=False: see below).

  uint8 images with 1 or 3 channels are resized as one 8-bit PIL image, as torchvision
  and timm resize (their RandomResizedCrop and Resize): each of PIL's two passes rounds
  to 8 bits, which puts about one pixel in six one level away from resizing in float,
  at under two thirds of the cost. Other dtypes and channel counts go channel by
  channel through PIL's float32 mode. antialias=False with bilinear is TF's
  non-antialiased kernel (`resize_bilinear_aliased`). Integer results are rounded, or
  with rounding="truncate" truncated from the float result (never the 8-bit path).
  """
  if not antialias and method == "bilinear":
    return _to_dtype(resize_bilinear_aliased(img, hw), img.dtype, rounding)
  if img.dtype == np.uint8 and img.shape[-1] in (1, 3) and rounding == "nearest":
    return from_pil(to_pil(img).resize((hw[1], hw[0]), resample=RESIZE_METHODS[method]))
  channels = [
      np.asarray(Image.fromarray(img[..., c].astype(np.float32), mode="F").resize(
          (hw[1], hw[0]), resample=RESIZE_METHODS[method]))
      for c in range(img.shape[-1])]
  return _to_dtype(np.stack(channels, axis=-1), img.dtype, rounding)


def to_pil(img: np.ndarray) -> Image.Image:
  """An L or RGB PIL image of uint8 HW1 / HW3 pixels."""
  return Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)


def from_pil(img: Image.Image) -> np.ndarray:
  """uint8 HWC pixels of an L or RGB image."""
  arr = np.asarray(img)
  return arr[..., None] if arr.ndim == 2 else arr


def _pil_resize(method: str, antialias: bool, rounding: str = "nearest"):
  """PIL's resize of the fused decode path, or None where PIL's 8-bit resize cannot do
  it (aliased, truncated): the op then runs on arrays, after decode."""
  if (not antialias and method == "bilinear") or rounding != "nearest":
    return None
  return lambda pil, hw: pil.resize((hw[1], hw[0]), RESIZE_METHODS[method])


@register("resize", tf_twin="resize")
def resize(size, width=None, key="image", method="bilinear", antialias=True,
           rounding="nearest") -> Op:
  """Resizes to (size, width or size) with PIL (`method`: bilinear|nearest|bicubic|area).

  antialias: True (PIL, torchvision, timm, DeiT: the kernel widens when shrinking);
    False: TF's `tf.image.resize(..., antialias=False)`, big_vision's default (bilinear;
    area and nearest are the same either way; bicubic is refused).
  rounding: how integer images get their pixels back from the float result: "nearest"
    (PIL, torchvision) or "truncate" (big_vision's `tf.cast` after clipping).
  """
  hw = _hw(size, width)
  check_method(method, antialias)
  check_rounding(rounding)
  pil_resize = _pil_resize(method, antialias, rounding)
  return on_key(key, lambda img, rng: resize_image(img, hw, method, antialias, rounding),
                on_pil=pil_resize and (lambda pil, rng: pil_resize(pil, hw)))


def resize_small_shape(height: int, width: int, size: int) -> tuple[int, int]:
  """(h, w) with the shorter side `size` and the aspect kept, the other side rounded.

  `height * size / shorter` in float64, rounded half to even: the TF twin
  (vitcls.data.pp.tf_twins) does the same arithmetic, so both pick the same shape.
  """
  shorter = min(height, width)
  return (round(height * size / shorter), round(width * size / shorter))


@register("resize_small", tf_twin="resize_small")
def resize_small(size, key="image", method="bilinear", antialias=True,
                 rounding="nearest") -> Op:
  """Resizes so the shorter side is `size`, keeping the aspect ratio (big_vision's op).

  size: the shorter side after resizing; the longer is rounded to the nearest pixel.
  method: bilinear|nearest|bicubic|area, as `resize` (big_vision defaults to area; the
    usual ImageNet eval `resize_small(256)|central_crop(224)` is bilinear in timm).
  antialias, rounding: as `resize`.
  """
  size = int(size)
  check_method(method, antialias)
  check_rounding(rounding)
  pil_resize = _pil_resize(method, antialias, rounding)
  def pil_op(pil, rng):
    return pil_resize(pil, resize_small_shape(pil.height, pil.width, size))
  return on_key(key, lambda img, rng: resize_image(
      img, resize_small_shape(img.shape[0], img.shape[1], size), method, antialias,
      rounding),
                on_pil=pil_resize and pil_op)


@register("central_crop", tf_twin="central_crop")
def central_crop(size, width=None, key="image") -> Op:
  """Crops the central (size, width or size) window."""
  h, w = _hw(size, width)
  def crop(img, rng):
    top, left = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
    return img[top:top + h, left:left + w]
  return on_key(key, crop)


@register("random_crop", random=True, jax_twin="random_crop")
def random_crop(size, width=None, key="image") -> Op:
  """Crops a (size, width or size) window at a uniformly random position."""
  h, w = _hw(size, width)
  def crop(img, rng):
    top = rng.integers(0, img.shape[0] - h + 1)
    left = rng.integers(0, img.shape[1] - w + 1)
    return img[top:top + h, left:left + w]
  return on_key(key, crop)


@register("random_shift", random=True, jax_twin="random_shift")
def random_shift(max_px, key="image") -> Op:
  """Translates by up to `max_px` pixels each way, filling with zeros; same size out."""
  m = int(max_px)
  def shift(img, rng):
    padded = np.pad(img, ((m, m), (m, m), (0, 0)))
    dy, dx = rng.integers(0, 2 * m + 1, size=2)
    return padded[dy:dy + img.shape[0], dx:dx + img.shape[1]]
  return on_key(key, shift)


INCEPTION_ASPECT = (3 / 4, 4 / 3)  # Width / height, as TF's and torchvision's defaults.
CROP_TRIES = 10  # As torchvision's RandomResizedCrop and timm's RandomErasing.


def _central_fallback(height: int, width: int) -> tuple[int, int, int, int]:
  """The largest central crop whose aspect is within INCEPTION_ASPECT: (top, left, h, w)."""
  lo, hi = INCEPTION_ASPECT
  h, w = height, width
  if width / height < lo:
    h = min(height, round(width / lo))
  elif width / height > hi:
    w = min(width, round(height * hi))
  return (height - h) // 2, (width - w) // 2, h, w


def inception_crop_box(height: int, width: int, area_min: float, area_max: float,
                       rng: np.random.Generator) -> tuple[int, int, int, int]:
  """(top, left, h, w) of a random resized crop, torchvision's way (see `inception_crop`)."""
  log_lo, log_hi = math.log(INCEPTION_ASPECT[0]), math.log(INCEPTION_ASPECT[1])
  for _ in range(CROP_TRIES):
    area = height * width * rng.uniform(area_min, area_max) / 100
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
    if 0 < h <= height and 0 < w <= width:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  return _central_fallback(height, width)


# TF's sample_distorted_bounding_box defaults, which big_vision keeps (its ratio_min,
# ratio_max are 0.75, 1.33: pp/ops_image.py:200): 1.33, not 4/3.
TF_ASPECT = (0.75, 1.33)
TF_CROP_TRIES = 100


def _lrint(x: np.float32) -> int:
  """C's lrintf in the default rounding mode: to nearest, ties to even."""
  return int(np.rint(x))


def _tf_box_try(height: int, width: int, area_lo: np.float32, area_hi: np.float32,
                aspect: np.float32, rng: np.random.Generator):
  """One attempt of TF's GenerateRandomCrop: (top, left, h, w), or None if it fails.

  The float32 arithmetic of tensorflow/core/kernels/image/
  sample_distorted_bounding_box_op.cc (GenerateRandomCrop): the height, not the area,
  is uniform (an integer between the heights of the smallest and the largest area at
  this aspect, clamped to fit), the width is round(height * aspect), one step up or
  down mends a rounding that left the area range, and the offset is drawn from
  [0, side - crop) (TF's Uniform(n) excludes n: a crop never touches the bottom or right
  edge unless it spans the image).
  """
  f32 = np.float32
  min_area = area_lo * f32(width) * f32(height)
  max_area = area_hi * f32(width) * f32(height)
  h = _lrint(np.sqrt(min_area / aspect))
  max_h = _lrint(np.sqrt(max_area / aspect))
  if _lrint(f32(max_h) * aspect) > width:  # The largest height whose width fits.
    max_h = int((width + 0.5 - float(f32(1e-7))) / float(aspect))  # double, as in C++.
    if _lrint(f32(max_h) * aspect) > width:
      max_h -= 1
  max_h = min(max_h, height)
  h = min(h, max_h)
  if h < max_h:
    h += int(rng.integers(0, max_h - h + 1))
  w = _lrint(f32(h) * aspect)
  area = f32(w * h)
  if area < min_area:
    h += 1
    w = _lrint(f32(h) * aspect)
    area = f32(w * h)
  if area > max_area:
    h -= 1
    w = _lrint(f32(h) * aspect)
    area = f32(w * h)
  if area < min_area or area > max_area or not (0 < w <= width and 0 < h <= height):
    return None
  top = int(rng.integers(0, height - h)) if h < height else 0
  left = int(rng.integers(0, width - w)) if w < width else 0
  return top, left, h, w


def tf_crop_box(height: int, width: int, area_min: float, area_max: float,
                rng: np.random.Generator) -> tuple[int, int, int, int]:
  """(top, left, h, w) as big_vision's `inception_crop` samples it (sampling="tf").

  TF's `sample_distorted_bounding_box` with no boxes, min_object_covered=0 and
  use_image_if_no_bounding_boxes=True (big_vision pp/ops_image.py:180-185, 223-229):
  up to 100 attempts, each with an aspect (width / height) uniform in [0.75, 1.33] in
  float32, then `_tf_box_try`; the whole image when none fits. The draws are this rng's,
  not TF's Philox, so the boxes follow TF's distribution, not its sequence.
  """
  f32 = np.float32
  area_lo, area_hi = f32(area_min / 100), f32(area_max / 100)  # TF's float attrs.
  lo, hi = f32(TF_ASPECT[0]), f32(TF_ASPECT[1])
  for _ in range(TF_CROP_TRIES):
    aspect = rng.random(dtype=np.float32) * (hi - lo) + lo  # RandFloat() in [0, 1).
    box = _tf_box_try(height, width, area_lo, area_hi, aspect, rng)
    if box is not None:
      return box
  return 0, 0, height, width


# inception_crop's box samplers, by name.
CROP_SAMPLINGS = {"torchvision": inception_crop_box, "tf": tf_crop_box}


@register("inception_crop", random=True)
def inception_crop(size=None, area_min=5, area_max=100, key="image",
                   method="bilinear", antialias=True, sampling="torchvision",
                   rounding="nearest") -> Op:
  """Random resized crop ("Inception crop"), the ImageNet training crop.

  size: when given, the crop is resized to (size, size) with `method` (as `resize`).
  area_min, area_max: the crop's area bounds in percent of the image (big_vision's
    units; timm/torchvision's scale=(0.08, 1) is area_min=8).
  sampling: how the box is drawn.
    "torchvision" (RandomResizedCrop, which DeiT uses): the area uniform in
    [area_min, area_max] percent, the aspect ratio (width / height) log-uniform in
    [3/4, 4/3], the sides rounded to pixels; a box that does not fit is redrawn, up to
    10 tries, then the largest central crop with an aspect in [3/4, 4/3] is taken (the
    whole image when its own aspect is in range). The log-uniform aspect treats tall
    and wide crops alike.
    "tf" (big_vision's op: TF's sample_distorted_bounding_box, see `tf_crop_box`): the
    aspect uniform in [0.75, 1.33], then the height uniform over the integers giving
    an area in range (so the area is not uniform: its square root nearly is), 100
    tries, the whole image when none fits.
  antialias: as `resize` (torchvision's RandomResizedCrop resizes with PIL:
    antialiased; big_vision's op does not antialias).
  rounding: as `resize` (big_vision truncates).
  big_vision's `decode_jpeg_and_inception_crop(224)` and `inception_crop(224)` are
  `inception_crop(224, sampling='tf', antialias=False, rounding='truncate')`.
  """
  if not 0 < area_min <= area_max <= 100:
    raise TypeError(f"need 0 < area_min <= area_max <= 100 (percent), got {area_min}, "
                    f"{area_max}")
  if sampling not in CROP_SAMPLINGS:
    *first, last = CROP_SAMPLINGS
    raise TypeError(f"sampling must be {', '.join(first)} or {last}, not {sampling!r}")
  box = CROP_SAMPLINGS[sampling]
  hw = None if size is None else _hw(size)
  check_method(method, antialias)
  check_rounding(rounding)
  pil_resize = _pil_resize(method, antialias, rounding)
  def crop(img, rng):
    top, left, h, w = box(img.shape[0], img.shape[1], area_min, area_max, rng)
    out = img[top:top + h, left:left + w]
    return out if hw is None else resize_image(out, hw, method, antialias, rounding)
  def pil_op(pil, rng):
    top, left, h, w = box(pil.height, pil.width, area_min, area_max, rng)
    out = pil.crop((left, top, left + w, top + h))  # Not resize(box=): that reads
    # pixels around the box too.
    return out if hw is None else pil_resize(out, hw)
  return on_key(key, crop, on_pil=(pil_resize or None) and pil_op)


@register("flip_lr", random=True, jax_twin="flip_lr")
def flip_lr(key="image") -> Op:
  """Flips left-right with probability 1/2."""
  return on_key(key, lambda img, rng: img[:, ::-1] if rng.random() < 0.5 else img,
                on_pil=lambda pil, rng: (pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                                         if rng.random() < 0.5 else pil))


@register("to_rgb", tf_twin="to_rgb")
def to_rgb(key="image") -> Op:
  """Repeats a single channel three times; leaves 3-channel images alone."""
  return on_key(key, lambda img, rng: np.repeat(img, 3, axis=-1) if img.shape[-1] == 1
                else img)


@register("value_range", device_tail=True, jax_twin="value_range", tf_twin="value_range")
def value_range(vmin=-1.0, vmax=1.0, in_min=0.0, in_max=255.0, key="image") -> Op:
  """Maps [in_min, in_max] linearly to [vmin, vmax] as float32."""
  scale = (vmax - vmin) / (in_max - in_min)
  def op(img, rng):
    # In place on one fresh float32 array: the same float32 arithmetic as
    # (x - in_min) * scale + vmin, without three image-sized temporaries.
    out = img.astype(np.float32)
    out -= in_min
    out *= scale
    out += vmin
    return out
  return on_key(key, op)


def normalize_constants(mean, std) -> tuple[np.ndarray, np.ndarray]:
  """`normalize`'s mean and std in [0, 1] -> float32 (mean * 255, std * 255), checked."""
  mean255 = np.asarray(mean, np.float64) * 255
  std255 = np.asarray(std, np.float64) * 255
  if mean255.ndim > 1 or std255.ndim > 1:
    raise TypeError(f"mean and std must be numbers or lists of numbers, got {mean}, {std}")
  if not (std255 > 0).all():
    raise TypeError(f"std must be positive, got {std}")
  return mean255.astype(np.float32), std255.astype(np.float32)


@register("normalize", device_tail=True, jax_twin="normalize", tf_twin="normalize")
def normalize(mean, std, key="image") -> Op:
  """Per-channel standardisation of pixels in [0, 255]: float32 (x/255 - mean) / std.

  mean, std: numbers or one per channel, in the [0, 1] scale as published, e.g. ImageNet's
    normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) (timm's IMAGENET_DEFAULT_MEAN
    and _STD). The input is in [0, 255] (uint8), so the result equals timm's
    Normalize after ToTensor and big_vision's vgg_value_range (which takes the same
    constants times 255). Computed as (x - 255 mean) / (255 std) in float32, the
    arithmetic of its JAX and TF twins.
  """
  mean255, std255 = normalize_constants(mean, std)
  def norm(img, rng):
    for name, v in (("mean", mean255), ("std", std255)):
      if v.size not in (1, img.shape[-1]):
        raise PreprocessError(f"normalize got {v.size} {name} values for "
                              f"{img.shape[-1]}-channel images")
    return (img.astype(np.float32) - mean255) / std255
  return on_key(key, norm)


ERASE_MODES = ("pixel", "const")


def erasing_box(height: int, width: int, area_min: float, area_max: float,
                aspect_min: float, rng: np.random.Generator
                ) -> Optional[tuple[int, int, int, int]]:
  """(top, left, h, w) of a random erasing box, or None after 10 boxes that do not fit."""
  log_lo, log_hi = math.log(aspect_min), math.log(1 / aspect_min)
  for _ in range(CROP_TRIES):
    area = height * width * rng.uniform(area_min, area_max)
    aspect = math.exp(rng.uniform(log_lo, log_hi))  # height / width, as timm.
    h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
    if 0 < h < height and 0 < w < width:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  return None


@register("random_erasing", random=True)
def random_erasing(p=0.25, area_min=0.02, area_max=1 / 3, aspect_min=0.3, key="image",
                   mode="pixel") -> Op:
  """Random Erasing (Zhong et al. 2020) as DeiT trains with it (timm's RandomErasing).

  Goes after `normalize` or `value_range`: it works on float images, where its noise
  matches the normalised pixels.
  p: the probability of erasing one rectangle (DeiT: 0.25).
  area_min, area_max: its area is uniform in [area_min, area_max] of the image's.
  aspect_min: its aspect (height / width) is log-uniform in [aspect_min, 1 / aspect_min].
  Sides are rounded to pixels; a box not strictly inside the image is redrawn, up to 10
  tries, after which nothing is erased (as timm).
  mode: "pixel" fills with per-pixel standard-normal noise (DeiT's remode='pixel'),
    "const" with zeros (timm's default mode).
  """
  if not 0 <= p <= 1:
    raise TypeError(f"p must be in [0, 1], got {p}")
  if not 0 < area_min <= area_max <= 1:
    raise TypeError(f"need 0 < area_min <= area_max <= 1, got {area_min}, {area_max}")
  if not 0 < aspect_min <= 1:
    raise TypeError(f"aspect_min must be in (0, 1], got {aspect_min}")
  if mode not in ERASE_MODES:
    raise TypeError(f"mode must be {' or '.join(ERASE_MODES)}, not {mode!r}")
  def erase(img, rng):
    if not np.issubdtype(img.dtype, np.floating):
      raise PreprocessError(f"random_erasing works on float images, got {img.dtype}: put "
                            f"it after normalize or value_range")
    if not rng.random() < p:
      return img
    box = erasing_box(img.shape[0], img.shape[1], area_min, area_max, aspect_min, rng)
    if box is None:
      return img
    top, left, h, w = box
    out = img.copy()
    if mode == "pixel":
      out[top:top + h, left:left + w] = rng.standard_normal((h, w) + img.shape[2:])
    else:
      out[top:top + h, left:left + w] = 0
    return out
  return on_key(key, erase)
