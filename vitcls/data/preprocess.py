"""Preprocessing ops on the host, chosen by a string spec.

A spec is ops joined by `|`, each a call with literal arguments, e.g.
`random_shift(2)|resize(32)|value_range(-1,1)|onehot(10)`. Ops come from a registry
(`@register`), so adding one is adding a function; an unknown op or bad arguments is a
`PreprocessError` that names the op and lists the known ones.

Every op maps `(example: dict, rng: np.random.Generator) -> dict` on one NumPy example.
Random ops draw only from `rng`, which the pipeline derives from (seed, position in the
stream), so preprocessing is reproducible per example.

The ImageNet-style ops (`decode`, `resize_small`, `inception_crop`, `randaug` from
`vitcls.data.randaug`, `normalize`, `random_erasing`) follow big_vision's and timm's
definitions; image ops keep uint8 images uint8 until `value_range` or `normalize`, so the
work done in grain's worker processes stays cheap.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import math
from typing import Any, Callable, Optional

import numpy as np
from PIL import Image

from vitcls.errors import UserError, shown

Example = dict[str, Any]
Op = Callable[[Example, np.random.Generator], Example]

_REGISTRY: dict[str, Callable[..., Op]] = {}


class PreprocessError(UserError):
  """A preprocessing spec names an unknown op or gives it bad arguments."""


class DecodeError(UserError):
  """An example's image is not a readable image (corrupt or truncated bytes)."""


def register(name: str):
  """Registers `factory(*args, **kw) -> op` under `name` for use in specs."""
  def wrap(factory):
    _REGISTRY[name] = factory
    return factory
  return wrap


def available_ops() -> list[str]:
  """Names of the registered ops, listed by errors about an unknown op."""
  return sorted(_REGISTRY)


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """A parsed spec: callable on one example with a NumPy generator."""
  spec: str
  ops: tuple[Op, ...]

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    example = dict(example)
    for op in self.ops:
      example = op(example, rng)
    return example


def _parse_call(text: str) -> tuple[str, tuple, dict]:
  try:
    node = ast.parse(text, mode="eval").body
  except SyntaxError as e:
    raise PreprocessError(f"cannot parse pp op {shown(text)}: write ops like 'resize(32)'") from e
  if isinstance(node, ast.Name):
    return node.id, (), {}
  if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
    raise PreprocessError(f"cannot parse pp op {shown(text)}: write ops like 'resize(32)'")
  try:
    args = tuple(ast.literal_eval(a) for a in node.args)
    kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
  except ValueError as e:
    raise PreprocessError(f"pp op {shown(text)} takes literal arguments only") from e
  return node.func.id, args, kwargs


def _calls(spec: str) -> list[tuple[str, str, tuple, dict]]:
  """(text, name, args, kwargs) of each op of `spec`, in order; empty ops skipped."""
  texts = (t.strip() for t in spec.split("|"))
  return [(text, *_parse_call(text)) for text in texts if text]


def parse(spec: str) -> Preprocess:
  """Parses `op1(...)|op2(...)` into a `Preprocess`; errors name the bad op."""
  ops = []
  for text, name, args, kwargs in _calls(spec):
    if name not in _REGISTRY:
      raise PreprocessError(f"unknown pp op {shown(name)} in {shown(spec)}: known ops are "
                            f"{', '.join(available_ops())}")
    try:
      ops.append(_REGISTRY[name](*args, **kwargs))
    except (TypeError, ValueError, ArithmeticError) as e:
      raise PreprocessError(f"bad arguments for pp op {shown(text)}: {shown(e)}") from e
  return Preprocess(spec, tuple(_fuse_decode(ops)))


# `input.on_device` (vitcls.data.device_pp) splits a spec before its first op that draws
# from the rng: the prefix runs once per example on the host, the rest in the train step,
# where only ops with a JAX twin can run. Both lists live here, JAX-free, for validation.
RANDOM_OPS = ("random_crop", "random_shift", "inception_crop", "flip_lr", "randaug",
              "random_erasing")
ON_DEVICE_OPS = ("drop", "flip_lr", "keep", "normalize", "onehot", "random_crop",
                 "random_shift", "value_range")


def op_arguments(name: str, args: tuple, kwargs: dict) -> dict[str, Any]:
  """The registered op `name`'s arguments by name, defaults filled in."""
  bound = inspect.signature(_REGISTRY[name]).bind(*args, **kwargs)
  bound.apply_defaults()
  return dict(bound.arguments)


def decodes_first(spec: str) -> bool:
  """Whether `spec` begins with `decode` of the "image" key: its source may then hand
  over encoded images (`sources.get_source(encoded_images=True)`)."""
  calls = _calls(spec)
  if not calls:
    return False
  _, name, args, kwargs = calls[0]
  return name == "decode" and op_arguments(name, args, kwargs).get("key") == "image"


# `input.normalize_on_device`: the spec's closing value_range / normalize run in the
# train step instead, so batches cross to the device as uint8, a quarter of the bytes.
DEVICE_TAIL_OPS = ("value_range", "normalize")
_LABEL_OPS = ("onehot", "multihot", "keep", "drop")  # May follow them; they stay on host.


def split_device_tail(spec: str) -> tuple[str, list[tuple[str, str, tuple, dict]]]:
  """(spec without its closing value_range / normalize ops, those ops as calls).

  Closing: after them come only label ops (onehot, multihot, keep, drop), which touch
  other keys and stay in the host spec, in their order. A spec with no such ops gives
  (spec, []). Whether the image really is uint8 there is for the caller to check.
  """
  calls = _calls(spec)
  start = len(calls)
  while start > 0 and calls[start - 1][1] in DEVICE_TAIL_OPS + _LABEL_OPS:
    start -= 1
  tail = [c for c in calls[start:] if c[1] in DEVICE_TAIL_OPS]
  host = [c[0] for c in calls if not any(c is t for t in tail)]
  return "|".join(host), tail


def split_for_device(spec: str) -> tuple[str, list[tuple[str, str, tuple, dict]]]:
  """(host prefix spec, [(text, name, args, kwargs)] of the rest) for `input.on_device`.

  Raises PreprocessError naming the first op after a random one that has no JAX twin.
  """
  calls = _calls(spec)
  first = next((i for i, c in enumerate(calls) if c[1] in RANDOM_OPS), len(calls))
  for text, name, _, _ in calls[first:]:
    if name not in ON_DEVICE_OPS:
      raise PreprocessError(
          f"input.on_device: pp op {shown(text)} comes after the first random op and has "
          f"no on-device version (those are {', '.join(ON_DEVICE_OPS)}): move it before "
          f"the random ops or set config.input.on_device=False")
  return "|".join(c[0] for c in calls[:first]), calls[first:]


def _hw(size, width=None) -> tuple[int, int]:
  return (int(size), int(size if width is None else width))


@dataclasses.dataclass(frozen=True)
class ImageOp:
  """An op on `example[key]`'s array.

  `on_pil`, where given, is the same op on a PIL image (L or RGB) of those uint8
  pixels, equal pixel for pixel and drawing the same numbers from the rng: `parse`
  runs such ops straight after `decode` on the decoded PIL image, which skips copying
  the whole image into NumPy and back (see `_DecodeThenPil`).
  """
  key: str
  fn: Callable[[np.ndarray, np.random.Generator], np.ndarray]
  on_pil: Optional[Callable[[Image.Image, np.random.Generator], Image.Image]] = None

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    example[self.key] = self.fn(np.asarray(example[self.key]), rng)
    return example


def _on_key(key: str, fn: Callable[[np.ndarray, np.random.Generator], np.ndarray],
            on_pil=None) -> ImageOp:
  return ImageOp(key, fn, on_pil)


_RESAMPLE = {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
             "bicubic": Image.BICUBIC, "area": Image.BOX}


def _resize_image(img: np.ndarray, hw: tuple[int, int], method: str) -> np.ndarray:
  """Resizes an HWC array with PIL, keeping its dtype.

  uint8 images with 1 or 3 channels are resized as one 8-bit PIL image, as torchvision
  and timm resize (their RandomResizedCrop and Resize): each of PIL's two passes rounds
  to 8 bits, which puts about one pixel in six one level away from resizing in float,
  at under two thirds of the cost. Other dtypes and channel counts go channel by
  channel through PIL's float32 mode.
  """
  if img.dtype == np.uint8 and img.shape[-1] in (1, 3):
    return from_pil(to_pil(img).resize((hw[1], hw[0]), resample=_RESAMPLE[method]))
  channels = [
      np.asarray(Image.fromarray(img[..., c].astype(np.float32), mode="F").resize(
          (hw[1], hw[0]), resample=_RESAMPLE[method]))
      for c in range(img.shape[-1])]
  out = np.stack(channels, axis=-1)
  if np.issubdtype(img.dtype, np.integer):  # In place: image-sized temporaries cost.
    info = np.iinfo(img.dtype)
    np.clip(np.round(out, out=out), info.min, info.max, out=out)
  return out.astype(img.dtype, copy=False)


def to_pil(img: np.ndarray) -> Image.Image:
  """An L or RGB PIL image of uint8 HW1 / HW3 pixels."""
  return Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)


def from_pil(img: Image.Image) -> np.ndarray:
  """uint8 HWC pixels of an L or RGB image."""
  arr = np.asarray(img)
  return arr[..., None] if arr.ndim == 2 else arr


def _check_method(method: str) -> None:
  if method not in ("bilinear", "nearest", "bicubic", "area"):
    raise TypeError(f"method must be bilinear, nearest, bicubic or area, not {method!r}")


@register("resize")
def _resize(size, width=None, key="image", method="bilinear") -> Op:
  """Resizes to (size, width or size) with PIL (`method`: bilinear|nearest|bicubic|area)."""
  hw = _hw(size, width)
  _check_method(method)
  return _on_key(key, lambda img, rng: _resize_image(img, hw, method),
                 on_pil=lambda pil, rng: pil.resize((hw[1], hw[0]), _RESAMPLE[method]))


def resize_small_shape(height: int, width: int, size: int) -> tuple[int, int]:
  """(h, w) with the shorter side `size` and the aspect kept, the other side rounded.

  `height * size / shorter` in float64, rounded half to even: the TF twin in
  vitcls.serving does the same arithmetic, so both pick the same shape.
  """
  shorter = min(height, width)
  return (round(height * size / shorter), round(width * size / shorter))


@register("resize_small")
def _resize_small(size, key="image", method="bilinear") -> Op:
  """Resizes so the shorter side is `size`, keeping the aspect ratio (big_vision's op).

  size: the shorter side after resizing; the longer is rounded to the nearest pixel.
  method: bilinear|nearest|bicubic|area, as `resize` (big_vision defaults to area; the
    usual ImageNet eval `resize_small(256)|central_crop(224)` is bilinear in timm).
  """
  size = int(size)
  _check_method(method)
  def on_pil(pil, rng):
    h, w = resize_small_shape(pil.height, pil.width, size)
    return pil.resize((w, h), _RESAMPLE[method])
  return _on_key(key, lambda img, rng: _resize_image(
      img, resize_small_shape(img.shape[0], img.shape[1], size), method), on_pil=on_pil)


@register("central_crop")
def _central_crop(size, width=None, key="image") -> Op:
  """Crops the central (size, width or size) window."""
  h, w = _hw(size, width)
  def crop(img, rng):
    top, left = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
    return img[top:top + h, left:left + w]
  return _on_key(key, crop)


@register("random_crop")
def _random_crop(size, width=None, key="image") -> Op:
  """Crops a (size, width or size) window at a uniformly random position."""
  h, w = _hw(size, width)
  def crop(img, rng):
    top = rng.integers(0, img.shape[0] - h + 1)
    left = rng.integers(0, img.shape[1] - w + 1)
    return img[top:top + h, left:left + w]
  return _on_key(key, crop)


@register("random_shift")
def _random_shift(max_px, key="image") -> Op:
  """Translates by up to `max_px` pixels each way, filling with zeros; same size out."""
  m = int(max_px)
  def shift(img, rng):
    padded = np.pad(img, ((m, m), (m, m), (0, 0)))
    dy, dx = rng.integers(0, 2 * m + 1, size=2)
    return padded[dy:dy + img.shape[0], dx:dx + img.shape[1]]
  return _on_key(key, shift)


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
  """(top, left, h, w) of a random resized crop; see `inception_crop` for the sampling."""
  log_lo, log_hi = math.log(INCEPTION_ASPECT[0]), math.log(INCEPTION_ASPECT[1])
  for _ in range(CROP_TRIES):
    area = height * width * rng.uniform(area_min, area_max) / 100
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
    if 0 < h <= height and 0 < w <= width:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  return _central_fallback(height, width)


@register("inception_crop")
def _inception_crop(size=None, area_min=5, area_max=100, key="image",
                    method="bilinear") -> Op:
  """Random resized crop ("Inception crop"), the ImageNet training crop.

  size: when given, the crop is resized to (size, size) with `method` (as `resize`).
  area_min, area_max: the crop's area is uniform in [area_min, area_max] percent of the
    image (big_vision's units; timm/torchvision's scale=(0.08, 1) is area_min=8).
  The aspect ratio (width / height) is log-uniform in [3/4, 4/3], and the sides are
  rounded to pixels, as torchvision's RandomResizedCrop; a box that does not fit is
  redrawn, up to 10 tries, then the largest central crop with an aspect in [3/4, 4/3]
  is taken (the whole image when its own aspect is in range). big_vision's op uses TF's
  sample_distorted_bounding_box, which samples a little differently (a uniform aspect,
  a uniform side rather than area, 100 tries, the whole image as fallback); the
  log-uniform aspect treats tall and wide crops alike.
  """
  if not 0 < area_min <= area_max <= 100:
    raise TypeError(f"need 0 < area_min <= area_max <= 100 (percent), got {area_min}, "
                    f"{area_max}")
  hw = None if size is None else _hw(size)
  _check_method(method)
  def crop(img, rng):
    top, left, h, w = inception_crop_box(img.shape[0], img.shape[1], area_min, area_max,
                                         rng)
    out = img[top:top + h, left:left + w]
    return out if hw is None else _resize_image(out, hw, method)
  def on_pil(pil, rng):
    top, left, h, w = inception_crop_box(pil.height, pil.width, area_min, area_max, rng)
    out = pil.crop((left, top, left + w, top + h))  # Not resize(box=): that reads
    # pixels around the box too.
    return out if hw is None else out.resize((hw[1], hw[0]), _RESAMPLE[method])
  return _on_key(key, crop, on_pil=on_pil)


@register("flip_lr")
def _flip_lr(key="image") -> Op:
  """Flips left-right with probability 1/2."""
  return _on_key(key, lambda img, rng: img[:, ::-1] if rng.random() < 0.5 else img,
                 on_pil=lambda pil, rng: (pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                                          if rng.random() < 0.5 else pil))


@register("to_rgb")
def _to_rgb(key="image") -> Op:
  """Repeats a single channel three times; leaves 3-channel images alone."""
  return _on_key(key, lambda img, rng: np.repeat(img, 3, axis=-1) if img.shape[-1] == 1
                 else img)


@register("value_range")
def _value_range(vmin=-1.0, vmax=1.0, in_min=0.0, in_max=255.0, key="image") -> Op:
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
  return _on_key(key, op)


def normalize_constants(mean, std) -> tuple[np.ndarray, np.ndarray]:
  """`normalize`'s mean and std in [0, 1] -> float32 (mean * 255, std * 255), checked."""
  mean255 = np.asarray(mean, np.float64) * 255
  std255 = np.asarray(std, np.float64) * 255
  if mean255.ndim > 1 or std255.ndim > 1:
    raise TypeError(f"mean and std must be numbers or lists of numbers, got {mean}, {std}")
  if not (std255 > 0).all():
    raise TypeError(f"std must be positive, got {std}")
  return mean255.astype(np.float32), std255.astype(np.float32)


@register("normalize")
def _normalize(mean, std, key="image") -> Op:
  """Per-channel standardisation of pixels in [0, 255]: float32 (x/255 - mean) / std.

  mean, std: numbers or one per channel, in the [0, 1] scale as published, e.g. ImageNet's
    normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) (timm's IMAGENET_DEFAULT_MEAN
    and _STD). The input is in [0, 255] (uint8), so the result equals timm's
    Normalize after ToTensor and big_vision's vgg_value_range (which takes the same
    constants times 255). Computed as (x - 255 mean) / (255 std) in float32, the
    arithmetic of the TF twin in vitcls.serving.
  """
  mean255, std255 = normalize_constants(mean, std)
  def norm(img, rng):
    for name, v in (("mean", mean255), ("std", std255)):
      if v.size not in (1, img.shape[-1]):
        raise PreprocessError(f"normalize got {v.size} {name} values for "
                              f"{img.shape[-1]}-channel images")
    return (img.astype(np.float32) - mean255) / std255
  return _on_key(key, norm)


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


@register("random_erasing")
def _random_erasing(p=0.25, area_min=0.02, area_max=1 / 3, aspect_min=0.3, key="image",
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
  return _on_key(key, erase)


@register("onehot")
def _onehot(depth, key="label", key_result="labels", on=1.0, off=0.0) -> Op:
  """Writes `key_result`: a float32 one-hot of the integer `key` (`on`/`off` values)."""
  def op(example, rng):
    label = int(example[key])
    if not 0 <= label < depth:
      raise ValueError(f"label {label} is outside onehot({depth})")
    vec = np.full((depth,), off, np.float32)
    vec[label] = on
    example[key_result] = vec
    return example
  return op


@register("multihot")
def _multihot(num_classes, key="labels", key_result="labels", on=1.0, off=0.0) -> Op:
  """Writes `key_result`: a float32 multi-hot of the integer labels in `key`.

  For multi-label data, where `key` holds the set of classes an example shows (a TFDS
  Sequence(ClassLabel) decodes to a 1-D int array, maybe empty; a scalar counts as one
  label). Duplicates count once. A label outside [0, num_classes) is an error.
  """
  num_classes = int(num_classes)
  def op(example, rng):
    labels = np.atleast_1d(np.asarray(example[key]))
    if labels.ndim != 1 or not (labels.size == 0 or np.issubdtype(labels.dtype, np.integer)):
      raise PreprocessError(f"multihot({shown(key)}) takes a 1-D array of integer labels, got "
                            f"{labels.dtype} of shape {labels.shape}")
    outside = labels[(labels < 0) | (labels >= num_classes)]
    if outside.size:
      raise PreprocessError(f"label {int(outside[0])} is outside multihot({num_classes}): "
                            f"give num_classes covering every label")
    vec = np.full((num_classes,), off, np.float32)
    vec[labels.astype(np.int64)] = on
    example[key_result] = vec
    return example
  return op


@register("keep")
def _keep(*keys) -> Op:
  """Drops every key but `keys`."""
  return lambda example, rng: {k: example[k] for k in keys}


@register("drop")
def _drop(*keys) -> Op:
  """Removes `keys` (absent ones are ignored, as big_vision's drop); see `keep`."""
  return lambda example, rng: {k: v for k, v in example.items() if k not in keys}


# Decoding.

DECODE_MODES = {1: "L", 3: "RGB"}  # Channels -> the PIL mode decoded into.


def _encoded(value) -> Optional[bytes]:
  """The bytes of an encoded image, or None when `value` is already pixels."""
  if isinstance(value, (bytes, bytearray, memoryview)):
    return bytes(value)
  if isinstance(value, np.ndarray):
    if value.ndim == 0 and value.dtype.kind == "O":
      return _encoded(value.item())
    if value.dtype.kind == "S":  # tobytes, not item(): item() strips trailing NULs.
      return value.tobytes()
    if value.ndim == 1 and value.dtype == np.uint8:
      return value.tobytes()
  return None


def _pil_image(value, key: str) -> Image.Image:
  """A PIL image of encoded bytes (fully decoded) or of a uint8 HW/HWC array."""
  data = _encoded(value)
  if data is None:
    arr = np.asarray(value)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (
        arr.ndim == 3 and arr.shape[-1] not in (1, 2, 3, 4)):
      raise DecodeError(f"decode({shown(key)}) takes encoded image bytes or uint8 pixels "
                        f"(HW or HWC, 1 to 4 channels), got {arr.dtype} of shape "
                        f"{arr.shape}")
    return Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr)
  img = None
  try:
    img = Image.open(io.BytesIO(data))
    img.load()
  except Image.UnidentifiedImageError as e:
    raise DecodeError(f"cannot decode {shown(key)}: its {len(data)} bytes are not an image "
                      f"format PIL reads (e.g. PNG, JPEG)") from e
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    what = f"{len(data)} bytes"
    if img is not None:
      what = f"{img.format} image of {what}"
    reason = " ".join(str(e).split()) or type(e).__name__  # One line, whatever PIL says.
    raise DecodeError(f"cannot decode {shown(key)} ({what}): {reason}") from e
  return img


def _in_mode(img: Image.Image, mode: str) -> Image.Image:
  """`img` in PIL `mode` (L or RGB), uint8; alpha is dropped, as TF's decode."""
  if img.mode.startswith("I"):  # 16-bit grey PNGs: keep the high byte, as libpng's strip.
    img = Image.fromarray((np.asarray(img).astype(np.int64) >> 8).clip(0, 255)
                          .astype(np.uint8))
  elif img.mode == "P":  # A palette, maybe with a transparent entry: resolve it first.
    img = img.convert("RGBA")
  elif img.mode not in ("1", "L", "LA", "RGB", "RGBA"):  # CMYK, YCbCr, F, ...
    img = img.convert("RGB")
  return img if img.mode == mode else img.convert(mode)  # convert() would only copy.


@dataclasses.dataclass(frozen=True)
class _Decode:
  """The `decode` op (see `_decode`)."""
  key: str
  channels: int

  def decoded(self, value) -> bool:
    """Whether `value` is already uint8 pixels with the right channels (left as is)."""
    return (isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 3
            and value.shape[-1] == self.channels)

  def pil(self, value) -> Image.Image:
    return _in_mode(_pil_image(value, self.key), DECODE_MODES[self.channels])

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    value = example[self.key]
    if not self.decoded(value):
      example[self.key] = from_pil(self.pil(value))
    return example


@dataclasses.dataclass(frozen=True)
class _DecodeThenPil:
  """`decode` and the ops after it that have a PIL twin, run on the decoded PIL image.

  Crops and resizes straight after decoding (`decode|inception_crop(224)`,
  `decode|resize_small(256)`) then skip copying the whole decoded image into NumPy and
  the crop back into PIL: the same pixels and the same rng draws as the ops one by one,
  which still run for examples that hold pixels already.
  """
  decode: _Decode
  then: tuple[ImageOp, ...]

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    value = example[self.decode.key]
    if self.decode.decoded(value):
      for op in self.then:
        example = op(example, rng)
      return example
    img = self.decode.pil(value)
    for op in self.then:
      img = op.on_pil(img, rng)
    example[self.decode.key] = from_pil(img)
    return example


def _fuse_decode(ops: list[Op]) -> list[Op]:
  """Each `decode` merged with the following ops on its key that have a PIL twin."""
  fused: list[Op] = []
  i = 0
  while i < len(ops):
    op, i = ops[i], i + 1
    if isinstance(op, _Decode):
      then = []
      while (i < len(ops) and isinstance(ops[i], ImageOp) and ops[i].key == op.key
             and ops[i].on_pil is not None):
        then.append(ops[i])
        i += 1
      if then:
        op = _DecodeThenPil(op, tuple(then))
    fused.append(op)
  return fused


@register("decode")
def _decode(key="image", channels=3) -> Op:
  """Decodes an encoded image (PNG, JPEG, ... as PIL reads) to uint8 HWC pixels.

  For TFDS images read with decoding skipped (`tfds.decode.SkipDecoding()`), so that
  decoding happens here, in grain's workers, alongside the other ops.
  channels: 3 for RGB (grey repeated, alpha dropped, palettes resolved) or 1 for grey
    (PIL's ITU-R 601 luma). 16-bit grey keeps its high byte.
  A uint8 array (HW or HWC) is taken as already decoded and only converted to
  `channels`; corrupt bytes raise DecodeError, a UserError, in one line.
  """
  if channels not in DECODE_MODES:
    raise TypeError(f"channels must be 1 or 3, got {channels!r}")
  return _Decode(key, channels)


# Registers `randaug`; imported last since it uses `register` from this module.
# pylint: disable-next=g-import-not-at-top,wrong-import-position,unused-import
from vitcls.data import randaug as _randaug  # noqa: E402,F401
