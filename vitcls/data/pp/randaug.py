"""RandAugment (Cubuk et al. 2020) on uint8 images, with PIL and NumPy: the pp op `randaug`.

Each of `num_layers` layers applies one operation drawn uniformly from a list, with a
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
  Solarize          invert pixels >= int(256 m/10): at m=10 the threshold is 256 and
                    nothing changes (stronger at lower m) -- big_vision's mapping, kept
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

from typing import Callable, Sequence, Union

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
  """Stretches each channel linearly so its min is 0 and its max 255 (flat ones kept)."""
  out = np.empty_like(img)
  x = np.arange(256)
  for c in range(img.shape[-1]):
    ch = img[..., c]
    lo, hi = int(ch.min()), int(ch.max())
    out[..., c] = _lut(ch, (x - lo) * 255 // (hi - lo)) if hi > lo else ch
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
  """Blends with a smoothed copy: 3x3 kernel [1 1 1; 1 5 1; 1 1 1] / 13, borders kept."""
  smooth = img.copy()
  h, w = img.shape[:2]
  if h >= 3 and w >= 3:
    x = img.astype(np.float32)
    window = sum(x[i:h - 2 + i, j:w - 2 + j] for i in range(3) for j in range(3))
    inner = (window + 4 * x[1:-1, 1:-1]) / 13
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
    "Solarize": lambda img, m, rng: solarize(img, int(m / MAX_LEVEL * 256)),
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
