"""Preprocessing ops on the host, chosen by a string spec.

A spec is ops joined by `|`, each a call with literal arguments, e.g.
`random_shift(2)|resize(32)|value_range(-1,1)|onehot(10)`. Ops come from a registry
(`@register`), so adding one is adding a function; an unknown op or bad arguments is a
`PreprocessError` that names the op and lists the known ones.

Every op maps `(example: dict, rng: np.random.Generator) -> dict` on one NumPy example.
Random ops draw only from `rng`, which the pipeline derives from (seed, position in the
stream), so preprocessing is reproducible per example.
"""

from __future__ import annotations

import ast
import dataclasses
from typing import Any, Callable

import numpy as np
from PIL import Image

from vitcls.errors import UserError

Example = dict[str, Any]
Op = Callable[[Example, np.random.Generator], Example]

_REGISTRY: dict[str, Callable[..., Op]] = {}


class PreprocessError(UserError):
  """A preprocessing spec names an unknown op or gives it bad arguments."""


def register(name: str):
  """Registers `factory(*args, **kw) -> op` under `name` for use in specs."""
  def wrap(factory):
    _REGISTRY[name] = factory
    return factory
  return wrap


def available_ops() -> list[str]:
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
    raise PreprocessError(f"cannot parse pp op '{text}': write ops like 'resize(32)'") from e
  if isinstance(node, ast.Name):
    return node.id, (), {}
  if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
    raise PreprocessError(f"cannot parse pp op '{text}': write ops like 'resize(32)'")
  try:
    args = tuple(ast.literal_eval(a) for a in node.args)
    kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
  except ValueError as e:
    raise PreprocessError(f"pp op '{text}' takes literal arguments only") from e
  return node.func.id, args, kwargs


def parse(spec: str) -> Preprocess:
  """Parses `op1(...)|op2(...)` into a `Preprocess`; errors name the bad op."""
  ops = []
  for text in (t.strip() for t in spec.split("|")):
    if not text:
      continue
    name, args, kwargs = _parse_call(text)
    if name not in _REGISTRY:
      raise PreprocessError(f"unknown pp op '{name}' in '{spec}': known ops are "
                            f"{', '.join(available_ops())}")
    try:
      ops.append(_REGISTRY[name](*args, **kwargs))
    except TypeError as e:
      raise PreprocessError(f"bad arguments for pp op '{text}': {e}") from e
  return Preprocess(spec, tuple(ops))


def _hw(size, width=None) -> tuple[int, int]:
  return (int(size), int(size if width is None else width))


def _on_key(key: str, fn: Callable[[np.ndarray, np.random.Generator], np.ndarray]) -> Op:
  def op(example, rng):
    example[key] = fn(np.asarray(example[key]), rng)
    return example
  return op


def _resize_image(img: np.ndarray, hw: tuple[int, int], method: str) -> np.ndarray:
  """Resizes an HWC array with PIL, channel by channel, keeping its dtype."""
  resample = {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
              "bicubic": Image.BICUBIC, "area": Image.BOX}[method]
  channels = [
      np.asarray(Image.fromarray(img[..., c].astype(np.float32), mode="F").resize(
          (hw[1], hw[0]), resample=resample))
      for c in range(img.shape[-1])]
  out = np.stack(channels, axis=-1)
  if np.issubdtype(img.dtype, np.integer):
    info = np.iinfo(img.dtype)
    out = np.clip(np.round(out), info.min, info.max)
  return out.astype(img.dtype)


@register("resize")
def _resize(size, width=None, key="image", method="bilinear") -> Op:
  """Resizes to (size, width or size) with PIL (`method`: bilinear|nearest|bicubic|area)."""
  hw = _hw(size, width)
  if method not in ("bilinear", "nearest", "bicubic", "area"):
    raise TypeError(f"method must be bilinear, nearest, bicubic or area, not {method!r}")
  return _on_key(key, lambda img, rng: _resize_image(img, hw, method))


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


@register("flip_lr")
def _flip_lr(key="image") -> Op:
  """Flips left-right with probability 1/2."""
  return _on_key(key, lambda img, rng: img[:, ::-1] if rng.random() < 0.5 else img)


@register("to_rgb")
def _to_rgb(key="image") -> Op:
  """Repeats a single channel three times; leaves 3-channel images alone."""
  return _on_key(key, lambda img, rng: np.repeat(img, 3, axis=-1) if img.shape[-1] == 1
                 else img)


@register("value_range")
def _value_range(vmin=-1.0, vmax=1.0, in_min=0.0, in_max=255.0, key="image") -> Op:
  """Maps [in_min, in_max] linearly to [vmin, vmax] as float32."""
  scale = (vmax - vmin) / (in_max - in_min)
  return _on_key(key, lambda img, rng: ((img.astype(np.float32) - in_min) * scale
                                        + vmin).astype(np.float32))


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


@register("keep")
def _keep(*keys) -> Op:
  """Drops every key but `keys`."""
  return lambda example, rng: {k: example[k] for k in keys}
