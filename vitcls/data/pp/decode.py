"""The `decode` op: encoded image bytes to uint8 pixels, fused with the PIL ops after it.

For TFDS images read with decoding skipped (`tfds.decode.SkipDecoding()`) and image
folders, so that decoding happens in the pp, in grain's workers, alongside the other ops.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Optional

import numpy as np
from PIL import Image

from vitcls.data.pp.image import ImageOp, from_pil
from vitcls.data.pp.registry import Example, Op, register
from vitcls.errors import UserError, shown

DECODE_MODES = {1: "L", 3: "RGB"}  # Channels -> the PIL mode decoded into.


class DecodeError(UserError):
  """An example's image is not a readable image (corrupt or truncated bytes)."""


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
  """The `decode` op (see `decode`)."""
  key: str
  channels: int

  def decoded(self, value) -> bool:
    """Whether `value` is already uint8 pixels with the right channels (left as is)."""
    return (isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 3
            and value.shape[-1] == self.channels)

  def pil(self, value) -> Image.Image:
    """`value` (bytes or pixels) as a PIL image in this op's mode."""
    return _in_mode(_pil_image(value, self.key), DECODE_MODES[self.channels])

  def fuse(self, ops: list[Op], i: int) -> tuple[Op, int]:
    """This op merged with `ops[i:]`'s leading ops on its key that have a PIL twin.

    The registry's parse calls it; returns (the op to run, the index after the merged).
    """
    then = []
    while (i < len(ops) and isinstance(ops[i], ImageOp) and ops[i].key == self.key
           and ops[i].on_pil is not None):
      then.append(ops[i])
      i += 1
    return (_DecodeThenPil(self, tuple(then)) if then else self), i

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


@register("decode", tf_twin="decode")
def decode(key="image", channels=3) -> Op:
  """Decodes an encoded image (PNG, JPEG, ... as PIL reads) to uint8 HWC pixels.

  channels: 3 for RGB (grey repeated, alpha dropped, palettes resolved) or 1 for grey
    (PIL's ITU-R 601 luma). 16-bit grey keeps its high byte.
  A uint8 array (HW or HWC) is taken as already decoded and only converted to
  `channels`; corrupt bytes raise DecodeError, a UserError, in one line.
  """
  if channels not in DECODE_MODES:
    raise TypeError(f"channels must be 1 or 3, got {channels!r}")
  return _Decode(key, channels)
