"""RandAugment (Cubuk et al. 2020) on uint8 images, with PIL and NumPy: the pp ops `randaug`
(big_vision's) and `randaug_timm` (timm 0.3.2's, as DeiT trains; see its section below).

`randaug`: each of `num_layers` layers applies one operation drawn uniformly from a list, with a
fixed `magnitude` on the paper's 0..10 scale (larger values extrapolate, as big_vision's
randaug(2, 15) and randaug(2, 20) configs use). The operations, the list and how
magnitude m maps to each operation's argument are big_vision's (its pp/autoaugment.py,
from TF's EfficientNet RandAugment), so a big_vision recipe's randaug means the same here:

  Rotate            +-30 m/10 degrees (random sign), about the centre
  ShearX, ShearY    +-0.3 m/10 (random sign), about the top-left pixel
  TranslateX/Y      +-100 m/10 pixels (random sign): absolute, as big_vision's
                    translate_const=100 (timm's is relative, 0.45 of the size)
  Color, Contrast,  factor 0.1 + 1.8 m/10, no sign: 1.9 at m=10; m=5 gives 1.0, the
  Brightness,       identity (timm's "increasing" variants draw 1 +- 0.9 m/10 instead)
  Sharpness
  Posterize         keep int(4 m/10) bits: 4 at m=10, fewer (stronger) below; 0 bits
                    (m < 2.5) is taken as 1, as TF's clamped shifts do in big_vision
  Solarize          invert pixels >= int(256 m/10) % 256: big_vision compares the uint8
                    image with the Python int, which TF casts to uint8 modulo 256, so at
                    m=10 the threshold is 0 and every pixel is inverted (m=15: 128)
  SolarizeAdd       add int(110 m/10) to pixels < 128, clipped at 255
  Cutout            a square of side 2 int(40 m/10) centred at a uniform pixel, clipped
  AutoContrast, Equalize, Invert, Identity: no argument

Rotate, Shear*, Translate* and Cutout fill with grey 128 per channel, as big_vision's
`replace` (timm fills with 128 too); geometric ops sample the nearest pixel, as TF's
image transforms. Point and enhance ops round as PIL and TF do (truncation after
clipping). One deliberate difference: Contrast blends towards the mean grey level, as
PIL (and so timm) does; big_vision's copy divides the histogram's *count* by 256 instead
of its mean (a known bug in TF's autoaugment.py), so its "mean" is pixels/256.

Channels: RGB, or one channel (each operation acts on it; Color is then the identity,
the image being its own grey). Pixels stay uint8 throughout.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Optional, Sequence, Union

import numpy as np
from PIL import Image

from vitcls.data.pp.image import from_pil, on_key, to_pil
from vitcls.data.pp.registry import Op, PreprocessError, register

MAX_LEVEL = 10.0  # The paper's magnitude scale.
FILL = 128  # Grey fill of geometric ops and Cutout, per channel.

# big_vision's list, in its order: 16 operations. The default, for parity with big_vision.
BIG_VISION_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "Color",
    "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX",
    "TranslateY", "Cutout", "SolarizeAdd")
# The paper's 14 (its list of transformations): Identity instead of Invert, Cutout and
# SolarizeAdd. timm's 15 are big_vision's without Cutout (left to random erasing).
PAPER_OPS = (
    "Identity", "AutoContrast", "Equalize", "Rotate", "Solarize", "Color", "Posterize",
    "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX",
    "TranslateY")
PRESETS = {"big_vision": BIG_VISION_OPS, "paper": PAPER_OPS}


# Operations: uint8 HWC (1 or 3 channels) -> uint8 HWC of the same shape.

def _lut(img: np.ndarray, table: np.ndarray) -> np.ndarray:
  return np.take(np.clip(table, 0, 255).astype(np.uint8), img)  # 1.7x indexing's speed.


def invert(img: np.ndarray) -> np.ndarray:
  """255 - x."""
  return 255 - img


def solarize(img: np.ndarray, threshold: int) -> np.ndarray:
  """Inverts the pixels >= threshold."""
  x = np.arange(256)
  return _lut(img, np.where(x < threshold, x, 255 - x))


def solarize_add(img: np.ndarray, addition: int, threshold: int = 128) -> np.ndarray:
  """Adds `addition` to the pixels < threshold, clipping to [0, 255]."""
  x = np.arange(256)
  return _lut(img, np.where(x < threshold, x + addition, x))


def posterize(img: np.ndarray, bits: int) -> np.ndarray:
  """Keeps the top `bits` bits (clamped to 1..8) of each pixel."""
  drop = 8 - min(max(int(bits), 1), 8)
  return (img >> drop) << drop


def auto_contrast(img: np.ndarray) -> np.ndarray:
  """Stretches each channel linearly so its min is 0 and its max 255 (flat ones kept).

  In float64 as PIL's ImageOps.autocontrast: int(x * scale - lo * scale), which is one
  level below the exact (x - lo) 255 // (hi - lo) where rounding lands under an integer.
  """
  out = np.empty_like(img)
  x = np.arange(256)
  for c in range(img.shape[-1]):
    ch = img[..., c]
    lo, hi = int(ch.min()), int(ch.max())
    if hi > lo:
      scale = 255.0 / (hi - lo)
      out[..., c] = _lut(ch, (x * scale - lo * scale).astype(int))
    else:
      out[..., c] = ch
  return out


def equalize(img: np.ndarray) -> np.ndarray:
  """Histogram equalisation per channel, with PIL's ImageOps.equalize lookup table.

  The table spreads the cumulative count over 0..255 in steps of
  (pixels - pixels of the top value) // 255; a channel with one value (step 0) is kept.
  """
  out = np.empty_like(img)
  for c in range(img.shape[-1]):
    ch = img[..., c]
    hist = np.bincount(ch.ravel(), minlength=256)
    top = hist[np.flatnonzero(hist)[-1]]
    step = (ch.size - top) // 255
    if step == 0:
      out[..., c] = ch
    else:
      below = np.cumsum(hist) - hist  # Pixels strictly darker than each value.
      out[..., c] = _lut(ch, (below + step // 2) // step)
  return out


def grey(img: np.ndarray) -> np.ndarray:
  """The HW1 grey level: PIL's convert("L") (ITU-R 601 luma) of RGB; one channel as is."""
  if img.shape[-1] == 1:
    return img
  return np.asarray(Image.fromarray(img).convert("L"))[..., None]


def blend(degenerate: np.ndarray, img: np.ndarray, factor: float) -> np.ndarray:
  """degenerate + factor (img - degenerate) in float32, clipped, truncated to uint8.

  factor 0 gives `degenerate`, 1 the image, above 1 extrapolates away from degenerate:
  PIL's ImageEnhance and big_vision's blend.
  """
  d = degenerate.astype(np.float32)
  out = img.astype(np.float32)  # In place from here: d + factor (x - d), no temporaries.
  out -= d  # Degenerate may be HW1.
  out *= np.float32(factor)
  out += d
  return np.clip(out, 0, 255, out=out).astype(np.uint8)


def color(img: np.ndarray, factor: float) -> np.ndarray:
  """Saturation: blends with the image's grey (0 grey, 1 unchanged)."""
  return blend(grey(img), img, factor)


def contrast(img: np.ndarray, factor: float) -> np.ndarray:
  """Blends with a flat image at the mean grey level, rounded (PIL's ImageEnhance)."""
  mean = int(grey(img).mean() + 0.5)
  return blend(np.full(img.shape[:2] + (1,), mean, np.uint8), img, factor)


def brightness(img: np.ndarray, factor: float) -> np.ndarray:
  """Blends with black."""
  return blend(np.zeros_like(img), img, factor)


def sharpness(img: np.ndarray, factor: float) -> np.ndarray:
  """Blends with a smoothed copy: 3x3 kernel [1 1 1; 1 5 1; 1 1 1] / 13, rounded to
  nearest as PIL's ImageFilter.SMOOTH, borders kept."""
  smooth = img.copy()
  h, w = img.shape[:2]
  if h >= 3 and w >= 3:
    x = img.astype(np.float32)
    window = sum(x[i:h - 2 + i, j:w - 2 + j] for i in range(3) for j in range(3))
    inner = (window + 4 * x[1:-1, 1:-1]) / 13 + 0.5
    smooth[1:-1, 1:-1] = np.clip(inner, 0, 255).astype(np.uint8)
  return blend(smooth, img, factor)


def _fill(img: np.ndarray):
  return FILL if img.shape[-1] == 1 else (FILL,) * img.shape[-1]


def rotate(img: np.ndarray, degrees: float) -> np.ndarray:
  """Rotates counter-clockwise by `degrees` about the centre, same size, grey fill."""
  rotated = to_pil(img).rotate(degrees, resample=Image.NEAREST, fillcolor=_fill(img))
  return from_pil(rotated)


def _affine(img: np.ndarray, coeffs) -> np.ndarray:
  """Output pixel (x, y) takes input pixel round(A (x, y)) for PIL's affine `coeffs`."""
  moved = to_pil(img).transform((img.shape[1], img.shape[0]), Image.AFFINE, coeffs,
                                resample=Image.NEAREST, fillcolor=_fill(img))
  return from_pil(moved)


def shear_x(img: np.ndarray, level: float) -> np.ndarray:
  """Output pixel (row y, column x) is input (y, x + level y), grey outside.

  PIL's affine maps pixel *corners*; the -level/2 offset makes it map pixel indices,
  as TF's transform (big_vision) does, so the top row stays in place.
  """
  return _affine(img, (1, level, -0.5 * level, 0, 1, 0))


def shear_y(img: np.ndarray, level: float) -> np.ndarray:
  """Output pixel (row y, column x) is input (y + level x, x), grey outside."""
  return _affine(img, (1, 0, 0, level, 1, -0.5 * level))


def _shift(img: np.ndarray, pixels: float, axis: int) -> np.ndarray:
  k, n = int(round(pixels)), img.shape[axis]
  out = np.full_like(img, FILL)
  if abs(k) < n:
    src, dst = [slice(None)] * img.ndim, [slice(None)] * img.ndim
    src[axis] = slice(max(0, -k), n - max(0, k))
    dst[axis] = slice(max(0, k), n - max(0, -k))
    out[tuple(dst)] = img[tuple(src)]
  return out


def translate_x(img: np.ndarray, pixels: float) -> np.ndarray:
  """Moves the content right by round(pixels) (left when negative), grey fill."""
  return _shift(img, pixels, axis=1)


def translate_y(img: np.ndarray, pixels: float) -> np.ndarray:
  """Moves the content down by round(pixels) (up when negative), grey fill."""
  return _shift(img, pixels, axis=0)


def cutout(img: np.ndarray, pad: int, rng: np.random.Generator) -> np.ndarray:
  """Greys the square [cy - pad, cy + pad) x [cx - pad, cx + pad), clipped to the image,
  around a uniformly drawn pixel (cy, cx)."""
  h, w = img.shape[:2]
  cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
  out = img.copy()
  out[max(0, cy - pad):min(h, cy + pad), max(0, cx - pad):min(w, cx + pad)] = FILL
  return out


# Layers: (img, magnitude, rng) -> img, with big_vision's magnitude -> argument mapping.

def _signed(value: float, rng: np.random.Generator) -> float:
  """`value` or `-value`, each with probability 1/2 (big_vision's random negation)."""
  return value if rng.random() < 0.5 else -value


def _enhance(m: float) -> float:
  return m / MAX_LEVEL * 1.8 + 0.1


Layer = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]

LAYERS: dict[str, Layer] = {
    "Identity": lambda img, m, rng: img,
    "AutoContrast": lambda img, m, rng: auto_contrast(img),
    "Equalize": lambda img, m, rng: equalize(img),
    "Invert": lambda img, m, rng: invert(img),
    "Rotate": lambda img, m, rng: rotate(img, _signed(m / MAX_LEVEL * 30, rng)),
    "Posterize": lambda img, m, rng: posterize(img, int(m / MAX_LEVEL * 4)),
    "Solarize": lambda img, m, rng: solarize(img, int(m / MAX_LEVEL * 256) % 256),
    "SolarizeAdd": lambda img, m, rng: solarize_add(img, int(m / MAX_LEVEL * 110)),
    "Color": lambda img, m, rng: color(img, _enhance(m)),
    "Contrast": lambda img, m, rng: contrast(img, _enhance(m)),
    "Brightness": lambda img, m, rng: brightness(img, _enhance(m)),
    "Sharpness": lambda img, m, rng: sharpness(img, _enhance(m)),
    "ShearX": lambda img, m, rng: shear_x(img, _signed(m / MAX_LEVEL * 0.3, rng)),
    "ShearY": lambda img, m, rng: shear_y(img, _signed(m / MAX_LEVEL * 0.3, rng)),
    "TranslateX": lambda img, m, rng: translate_x(img, _signed(m / MAX_LEVEL * 100, rng)),
    "TranslateY": lambda img, m, rng: translate_y(img, _signed(m / MAX_LEVEL * 100, rng)),
    "Cutout": lambda img, m, rng: cutout(img, int(m / MAX_LEVEL * 40), rng),
}


def randaugment(img: np.ndarray, num_layers: int, magnitude: float, ops: Sequence[str],
                rng: np.random.Generator) -> np.ndarray:
  """`num_layers` operations drawn uniformly (with replacement) from `ops`, in turn."""
  if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] not in (1, 3):
    raise PreprocessError(
        f"randaug works on uint8 images with 1 or 3 channels, got {img.dtype} of shape "
        f"{img.shape}: put it before value_range / normalize")
  for _ in range(num_layers):
    img = LAYERS[ops[int(rng.integers(len(ops)))]](img, magnitude, rng)
  return img


def _op_names(ops: Union[str, Sequence[str]]) -> tuple[str, ...]:
  names = PRESETS.get(ops) if isinstance(ops, str) else tuple(ops)
  if names is None:
    raise TypeError(f"ops must be {' or '.join(map(repr, PRESETS))} or a list of "
                    f"operation names, not {ops!r}")
  unknown = [n for n in names if n not in LAYERS]
  if unknown or not names:
    raise TypeError(f"unknown RandAugment operations {unknown}: choose from "
                    f"{', '.join(LAYERS)}")
  return names


@register("randaug", random=True)
def randaug(num_layers=2, magnitude=10, key="image", ops="big_vision") -> Op:
  """RandAugment: `num_layers` random operations at `magnitude` (0..10 scale, or above).

  ops: "big_vision" (default) for big_vision's 16 operations: AutoContrast, Equalize,
    Invert, Rotate, Posterize, Solarize, Color, Contrast, Brightness, Sharpness, ShearX,
    ShearY, TranslateX, TranslateY, Cutout, SolarizeAdd; "paper" for the paper's 14:
    Identity, AutoContrast, Equalize, Rotate, Solarize, Color, Posterize, Contrast,
    Brightness, Sharpness, ShearX, ShearY, TranslateX, TranslateY; or a list of names
    (timm's 15 are big_vision's without Cutout). The default is big_vision's because
    the magnitude mapping is big_vision's too (see the module docstring), so its
    ImageNet recipes carry over unchanged.
  Works on uint8 RGB or one-channel images, before value_range / normalize.
  """
  num_layers, magnitude = int(num_layers), float(magnitude)
  if num_layers < 0 or magnitude < 0:
    raise TypeError(f"num_layers and magnitude must be >= 0, got {num_layers}, {magnitude}")
  names = _op_names(ops)
  return on_key(key, lambda img, rng: randaugment(img, num_layers, magnitude, names, rng))


# timm 0.3.2's RandAugment, as DeiT trains with it (`--aa rand-m9-mstd0.5-inc1`, DeiT's
# main.py:98, requirements.txt `timm==0.3.2`): the pp op `randaug_timm`. Facts below cite
# pytorch-image-models at 6504a42832cb "Version 0.3.2" (no v0.3.2 tag; timm/data is the
# same through v0.3.3), files timm/data/auto_augment.py (aa:LINE) and
# transforms_factory.py (tf:LINE).

TIMM_FILL = (124, 116, 104)  # round(255 * ImageNet mean), tf:87 with constants.py's mean.
TIMM_TRANSLATE_PCT = 0.45  # aa:216, hparams['translate_pct'] default; DeiT sets none.
TIMM_INTERPOLATIONS = {"bilinear": (Image.BILINEAR,), "bicubic": (Image.BICUBIC,),
                       "random": (Image.BILINEAR, Image.BICUBIC)}  # aa:41, tf:89-90.
# aa:538-555 and aa:558-575, in timm's order (the `w` weights apply by position).
TIMM_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
    "TranslateYRel")
TIMM_INCREASING_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
    "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
    "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
    "TranslateYRel")
# aa:581-597, `w0`: timm's only op-choice weights, named by TIMM_OPS and applied by
# position to the increasing list too (aa:604 picks them for _RAND_TRANSFORMS).
TIMM_WEIGHTS_0 = {
    "Rotate": 0.3, "ShearX": 0.2, "ShearY": 0.2, "TranslateXRel": 0.1, "TranslateYRel": 0.1,
    "Color": .025, "Sharpness": 0.025, "AutoContrast": 0.025, "Solarize": .005,
    "SolarizeAdd": .005, "Contrast": .005, "Brightness": .005, "Equalize": .005,
    "Posterize": 0, "Invert": 0}


@dataclasses.dataclass(frozen=True)
class TimmConfig:
  """A parsed timm RandAugment string such as `rand-m9-mstd0.5-inc1` (aa:631-678)."""
  magnitude: int = 10  # aa:650
  num_layers: int = 2  # aa:651
  magnitude_std: float = 0.0  # aa:335, no noise unless `mstd`
  increasing: bool = False  # aa:653
  weights: Optional[tuple[float, ...]] = None  # aa:652, uniform unless `w0`

  @property
  def ops(self) -> tuple[str, ...]:
    """The 15 op names chosen among: timm's increasing list or its plain one."""
    return TIMM_INCREASING_OPS if self.increasing else TIMM_OPS


def _timm_mstd(val: str) -> float:
  std = float(val)
  if not math.isfinite(std):
    raise ValueError("not a finite number")
  return std


def _timm_weights(val: str) -> tuple[float, ...]:
  if int(val) != 0:  # aa:602 asserts weight_idx == 0.
    raise ValueError("timm 0.3.2 has weights 0 only")
  weights = [TIMM_WEIGHTS_0[name] for name in TIMM_OPS]
  return tuple(w / sum(weights) for w in weights)  # aa:604-605


# Section key -> (TimmConfig field, parser of the digits that follow it): aa:662-675.
# `inc` with any digits means increasing, `inc0` too: timm tests bool(val) on the text.
_TIMM_SECTIONS = {"m": ("magnitude", int), "n": ("num_layers", int),
                  "mstd": ("magnitude_std", _timm_mstd),
                  "inc": ("increasing", lambda val: True),
                  "w": ("weights", _timm_weights)}


def parse_timm_config(text: str) -> TimmConfig:
  """timm 0.3.2's reading of `rand-<key><value>-...` (aa:654-675), stricter in one way.

  Each dash-separated section after `rand` is a key and the digits-led value after it
  (timm's re.split(r'(\\d.*)')). timm skips sections without digits, so a typo like
  `rand-m9-mstd` silently means no noise there; here every section must parse.
  """
  if not isinstance(text, str):
    raise TypeError(f"the timm RandAugment config must be a string like "
                    f"'rand-m9-mstd0.5-inc1', not {text!r}")
  head, *sections = text.split("-")
  if head != "rand":  # aa:655
    raise ValueError(f"timm RandAugment config {text!r} must start with 'rand-'")
  fields = {}
  for section in sections:
    key, val = (re.split(r"(\d.*)", section) + [""])[:2]
    if key not in _TIMM_SECTIONS or not val:
      raise ValueError(f"bad section {section!r} in timm RandAugment config {text!r}: "
                       "sections are m<int>, n<int>, mstd<float>, inc<int>, w0")
    name, parse_value = _TIMM_SECTIONS[key]
    try:
      fields[name] = parse_value(val)
    except ValueError as e:
      raise ValueError(f"bad value in section {section!r} of timm RandAugment config "
                       f"{text!r}: {e}") from None
  config = TimmConfig(**fields)
  if config.weights is not None and config.num_layers > sum(w > 0 for w in config.weights):
    raise ValueError(f"timm RandAugment config {text!r} draws {config.num_layers} ops "
                     "without replacement (w0) from 13 with non-zero weight")
  return config


@dataclasses.dataclass(frozen=True)
class Geometry:
  """What timm's geometric ops take from hparams: fill colour and resampling filters."""
  fill: tuple[int, ...]  # One value per channel.
  resamples: tuple[int, ...]  # PIL filters; one drawn per op when several (aa:44-49).

  def resample(self, rng: np.random.Generator) -> int:
    """The PIL filter of one op: drawn from rng only when there is a choice, as timm."""
    if len(self.resamples) == 1:
      return self.resamples[0]
    return self.resamples[int(rng.integers(len(self.resamples)))]

  def pil_fill(self):
    """The fill as PIL's fillcolor takes it for this many channels."""
    return self.fill[0] if len(self.fill) == 1 else self.fill


def timm_posterize(img: np.ndarray, bits: int) -> np.ndarray:
  """Keeps the top `bits` bits: 8 or more is the identity (aa:153-156), 0 black, as
  Pillow's posterize lookup i & ~(2 ** (8 - bits) - 1) gave before Pillow refused 0
  bits; big_vision's `posterize` raises 0 to 1 instead. Posterize at m < 2.5 and
  PosterizeIncreasing at m = 10 reach 0 bits."""
  if bits >= 8:
    return img
  return img & np.uint8((0xFF << (8 - max(int(bits), 0))) & 0xFF)


def timm_affine(img: np.ndarray, coeffs, geometry: Geometry,
                rng: np.random.Generator) -> np.ndarray:
  """PIL's affine transform with timm's coefficients: output (x, y) samples the input at
  (a x + b y + c, d x + e y + f), pixel corners at integers (aa:58-87)."""
  moved = to_pil(img).transform((img.shape[1], img.shape[0]), Image.AFFINE, coeffs,
                                resample=geometry.resample(rng),
                                fillcolor=geometry.pil_fill())
  return from_pil(moved)


def timm_rotate(img: np.ndarray, degrees: float, geometry: Geometry,
                rng: np.random.Generator) -> np.ndarray:
  """PIL's rotate about the centre, counter-clockwise (aa:90-93, PIL >= 5.2)."""
  rotated = to_pil(img).rotate(degrees, resample=geometry.resample(rng),
                               fillcolor=geometry.pil_fill())
  return from_pil(rotated)


def _timm_enhance_increasing(m: float, rng: np.random.Generator) -> float:
  return 1.0 + _signed(m / MAX_LEVEL * 0.9, rng)  # aa:192-197


def _timm_translate(img, m, rng, geometry, horizontal):
  pct = _signed(m / MAX_LEVEL * TIMM_TRANSLATE_PCT, rng)  # aa:214-219
  pixels = pct * img.shape[1 if horizontal else 0]  # Width for x, height for y: aa:68-77.
  coeffs = (1, 0, pixels, 0, 1, 0) if horizontal else (1, 0, 0, 0, 1, pixels)
  return timm_affine(img, coeffs, geometry, rng)


def _timm_shear(img, m, rng, geometry, horizontal):
  factor = _signed(m / MAX_LEVEL * 0.3, rng)  # aa:200-204
  coeffs = (1, factor, 0, 0, 1, 0) if horizontal else (1, 0, 0, factor, 1, 0)
  return timm_affine(img, coeffs, geometry, rng)


TimmLayer = Callable[[np.ndarray, float, np.random.Generator, Geometry], np.ndarray]

# Name -> op at a magnitude already noised and clipped: aa:260-314's pairs of level
# function and PIL op. The NumPy point and enhance ops above equal PIL's ImageOps and
# ImageEnhance pixel for pixel (tests/test_pp_ops.py checks).
TIMM_LAYERS: dict[str, TimmLayer] = {
    "AutoContrast": lambda img, m, rng, g: auto_contrast(img),
    "Equalize": lambda img, m, rng, g: equalize(img),
    "Invert": lambda img, m, rng, g: invert(img),
    "Rotate": lambda img, m, rng, g: timm_rotate(img, _signed(m / MAX_LEVEL * 30, rng),
                                                 g, rng),
    "Posterize": lambda img, m, rng, g: timm_posterize(img, int(m / MAX_LEVEL * 4)),
    "PosterizeIncreasing": lambda img, m, rng, g: timm_posterize(
        img, 4 - int(m / MAX_LEVEL * 4)),
    "Solarize": lambda img, m, rng, g: solarize(img, int(m / MAX_LEVEL * 256)),
    "SolarizeIncreasing": lambda img, m, rng, g: solarize(
        img, 256 - int(m / MAX_LEVEL * 256)),
    "SolarizeAdd": lambda img, m, rng, g: solarize_add(img, int(m / MAX_LEVEL * 110)),
    "Color": lambda img, m, rng, g: color(img, _enhance(m)),
    "ColorIncreasing": lambda img, m, rng, g: color(img, _timm_enhance_increasing(m, rng)),
    "Contrast": lambda img, m, rng, g: contrast(img, _enhance(m)),
    "ContrastIncreasing": lambda img, m, rng, g: contrast(
        img, _timm_enhance_increasing(m, rng)),
    "Brightness": lambda img, m, rng, g: brightness(img, _enhance(m)),
    "BrightnessIncreasing": lambda img, m, rng, g: brightness(
        img, _timm_enhance_increasing(m, rng)),
    "Sharpness": lambda img, m, rng, g: sharpness(img, _enhance(m)),
    "SharpnessIncreasing": lambda img, m, rng, g: sharpness(
        img, _timm_enhance_increasing(m, rng)),
    "ShearX": lambda img, m, rng, g: _timm_shear(img, m, rng, g, horizontal=True),
    "ShearY": lambda img, m, rng, g: _timm_shear(img, m, rng, g, horizontal=False),
    "TranslateXRel": lambda img, m, rng, g: _timm_translate(img, m, rng, g, horizontal=True),
    "TranslateYRel": lambda img, m, rng, g: _timm_translate(img, m, rng, g, horizontal=False),
}

TIMM_APPLY_PROB = 0.5  # aa:613, every RandAugment op.


def timm_magnitude(config: TimmConfig, rng: np.random.Generator) -> float:
  """m, or a normal draw around it when mstd > 0, clipped to [0, 10] always (aa:340-343)."""
  m = float(config.magnitude)
  if config.magnitude_std > 0:
    m = float(rng.normal(m, config.magnitude_std))
  return min(MAX_LEVEL, max(0.0, m))


def timm_layer(img: np.ndarray, name: str, config: TimmConfig, geometry: Geometry,
               rng: np.random.Generator) -> np.ndarray:
  """One AugmentOp call (aa:337-345): skipped with probability 1/2, else the op at a
  fresh magnitude. Draws in timm's order: apply, magnitude, sign, filter."""
  if rng.random() > TIMM_APPLY_PROB:
    return img
  return TIMM_LAYERS[name](img, timm_magnitude(config, rng), rng, geometry)


def timm_randaugment(img: np.ndarray, config: TimmConfig, geometry: Geometry,
                     rng: np.random.Generator) -> np.ndarray:
  """num_layers ops drawn up front, uniformly with replacement, or by the w0 weights
  without replacement (aa:622-628), each applied in turn with `timm_layer`."""
  if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] not in (1, 3):
    raise PreprocessError(
        f"randaug_timm works on uint8 images with 1 or 3 channels, got {img.dtype} of "
        f"shape {img.shape}: put it before value_range / normalize")
  ops = config.ops
  if config.weights is None:
    chosen = rng.integers(len(ops), size=config.num_layers)
  else:
    chosen = rng.choice(len(ops), config.num_layers, replace=False, p=config.weights)
  if img.shape[-1] != len(geometry.fill):
    geometry = dataclasses.replace(geometry, fill=_grey_fill(geometry.fill))
  for i in chosen:
    img = timm_layer(img, ops[int(i)], config, geometry, rng)
  return img


def _grey_fill(fill: tuple[int, ...]) -> tuple[int]:
  """The RGB fill's grey level (PIL's convert("L")), for one-channel images."""
  return (Image.new("RGB", (1, 1), tuple(fill)).convert("L").getpixel((0, 0)),)


def _check_fill(fill) -> tuple[int, ...]:
  values = (fill,) if isinstance(fill, int) else fill
  if (not isinstance(values, (tuple, list)) or len(values) not in (1, 3)
      or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255
                 for v in values)):
    raise TypeError(f"fill must be one or three integers in 0..255, not {fill!r}")
  return tuple(values) * (3 if len(values) == 1 else 1)


@register("randaug_timm", random=True)
def randaug_timm(config="rand-m9-mstd0.5-inc1", key="image", fill=TIMM_FILL,
                 interpolation="random") -> Op:
  """timm 0.3.2's RandAugment from its config string, e.g. 'rand-m9-mstd0.5-inc1'
  (DeiT's): reproduces a timm recipe's augmentation, which `randaug` does not.

  Sections: m<int> magnitude (default 10), n<int> ops per image (2), mstd<float> std of
    the normal noise on the magnitude (0), inc<int> the "increasing" op list, w0 timm's
    op-choice weights. Each chosen op runs with probability 1/2 at a magnitude drawn
    afresh and clipped to [0, 10]; signed ops flip sign with probability 1/2.
  fill: colour of pixels geometric ops bring in; default timm's create_transform's
    img_mean for the ImageNet mean, what DeiT and timm's train.py pass.
  interpolation: 'bilinear', 'bicubic' (DeiT's --train-interpolation) or 'random'
    (one of the two per geometric op: timm's when its train.py's default is kept).
  """
  parsed = parse_timm_config(config)
  if interpolation not in TIMM_INTERPOLATIONS:
    raise TypeError(f"interpolation must be bilinear, bicubic or random, not "
                    f"{interpolation!r}")
  geometry = Geometry(_check_fill(fill), TIMM_INTERPOLATIONS[interpolation])
  return on_key(key, lambda img, rng: timm_randaugment(img, parsed, geometry, rng))
