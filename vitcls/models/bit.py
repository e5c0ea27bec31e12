"""BiT ResNet-v2 (Kolesnikov et al. 2020, "Big Transfer") as a Flax linen module.

BiT is the convolutional baseline of the transfer-learning literature, and its public
checkpoints are the ones papers compare against, so `Model(num_classes, depth=50, width=1)`
keeps BiT's numerics and big_vision's parameter names (`bit_paper.py`): pre-activation
bottleneck units, weight-standardised convolutions, GroupNorm with 32 groups, no
BatchNorm (so `train` changes nothing). vitcls's flat `.npz` export of these params is
big_vision's layout, and `load` also reads the public BiT files (`resnet/...` names).

`apply({'params': p}, images, train=...)` takes NHWC images in [-1, 1] and returns
`(logits, aux)`; aux holds "stem" (after the root max-pool), "stage1".."stage4",
"pre_logits" (the globally pooled features the head sees) and "logits", all float32
whatever `dtype` computes in.
"""

import re
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitcls.models import common, loading

# depth: units per stage, as in the paper (26 as in timm / big_vision).
DEPTHS = {
    26: (2, 2, 2, 2),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
GROUPS = 32
# What `vitcls.validate` checks of the fields' values before flax loads (read from this
# source: see `vitcls.models.field_rules`); `stage_depths` checks the depth's value.
FIELD_RULES = {"depth": "positive", "width": "positive"}


def stage_depths(depth) -> tuple[int, ...]:
  """50 -> (3, 4, 6, 3); a list/tuple of 4 positive ints is taken as it is.

  Anything else raises ValueError in one line; cheap, so `validate` can call it.
  """
  if isinstance(depth, (list, tuple)):
    if len(depth) == 4 and all(_is_positive_int(d) for d in depth):
      return tuple(int(d) for d in depth)
  elif _is_positive_int(depth) and int(depth) in DEPTHS:
    return DEPTHS[int(depth)]
  shown = list(depth) if isinstance(depth, tuple) else depth  # Flax turns lists to tuples.
  raise ValueError(
      f"unknown BiT depth {shown!r}: expected one of {', '.join(map(str, DEPTHS))} or a "
      f"list of 4 positive units per stage (e.g. [3, 4, 6, 3])")


def _is_positive_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x > 0


def standardize(x, axis, eps):
  """(x - mean) / sqrt(var + eps) over `axis`; var is the mean square after centring."""
  x = x - jnp.mean(x, axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=axis, keepdims=True) + eps)


class StdConv(nn.Module):
  """Bias-free convolution whose kernel is standardised per output channel (eps 1e-10).

  Standardising in float32 before the cast keeps bf16 training stable: the raw kernel's
  scale never reaches the activations.
  """
  features: int
  kernel_size: int
  strides: int = 1
  padding: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (k, k, x.shape[-1], self.features), jnp.float32)
    kernel = standardize(kernel, axis=(0, 1, 2), eps=1e-10).astype(self.dtype)
    pad = (self.padding, self.padding)
    return jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel, (self.strides, self.strides), (pad, pad),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


class GroupNorm(nn.Module):
  """GroupNorm over (H, W, channels of a group); statistics in float32, eps 1e-5.

  scale/bias have shape (1, 1, 1, C) as in big_vision, so its checkpoints load as they are.
  """
  groups: int = GROUPS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (1, 1, 1, c), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (1, 1, 1, c), jnp.float32)
    y = x.astype(jnp.float32).reshape(x.shape[:-1] + (self.groups, c // self.groups))
    y = standardize(y, axis=(1, 2, 4), eps=1e-5).reshape(x.shape)
    return (y * scale + bias).astype(self.dtype)


class RootBlock(nn.Module):
  """7x7/2 standardised conv (padding 3), then 3x3/2 max-pool (padding 1, never picked).

  As big_vision. The original BiT code (big_transfer) pads the pool's input with zeros,
  which differs where a border window of the (ReLU-free) root output is all negative.
  """
  width: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = StdConv(self.width, 7, strides=2, padding=3, dtype=self.dtype, name="conv_root")(x)
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class ResidualUnit(nn.Module):
  """Pre-activation bottleneck: GN-ReLU-conv1x1, GN-ReLU-conv3x3/stride, GN-ReLU-conv1x1.

  The shortcut is a strided 1x1 projection of the pre-activated input when the width or
  resolution changes (the first unit of every stage), the raw input otherwise.
  """
  nmid: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    nout = 4 * self.nmid
    conv = lambda *a, **kw: StdConv(*a, dtype=self.dtype, **kw)  # noqa: E731
    norm = lambda name: GroupNorm(dtype=self.dtype, name=name)  # noqa: E731

    shortcut = x
    x = nn.relu(norm("gn1")(x))
    if x.shape[-1] != nout or self.strides != 1:
      shortcut = conv(nout, 1, strides=self.strides, name="conv_proj")(x)
    x = conv(self.nmid, 1, name="conv1")(x)
    x = nn.relu(norm("gn2")(x))
    x = conv(self.nmid, 3, strides=self.strides, padding=1, name="conv2")(x)
    x = nn.relu(norm("gn3")(x))
    x = conv(nout, 1, name="conv3")(x)
    return x + shortcut.astype(x.dtype)


class ResNetStage(nn.Module):
  """`units` residual units `unit01`, `unit02`, ...; only the first one strides."""
  units: int
  nmid: int
  first_stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for u in range(self.units):
      x = ResidualUnit(self.nmid, strides=self.first_stride if u == 0 else 1,
                       dtype=self.dtype, name=f"unit{u + 1:02d}")(x)
    return x


class Model(nn.Module):
  """BiT ResNet-v2 classifier, e.g. R50x1 = `Model(num_classes, depth=50, width=1)`.

  depth: 26, 50, 101, 152, or a list of 4 units per stage.
  width: integer multiplier; the root conv has 64*width channels, stage s (0-based) units
    64*width*2**s bottleneck and 4x that output channels.
  dtype: compute dtype ("bfloat16" for mixed precision); params stay float32 and
    GroupNorm statistics are computed in float32.
  head_zeroinit: zero-initialised head (BiT's fine-tuning recipe), else lecun-normal.
  num_classes: 0/None means no head; logits are then the pre_logits.
  """
  num_classes: Optional[int] = None
  depth: Union[int, Sequence[int]] = 50
  width: int = 1
  dtype: Optional[str] = None
  head_zeroinit: bool = True

  def validate(self) -> None:
    """Checks every field before anything is traced; ValueError names the bad one."""
    stage_depths(self.depth)
    if not _is_positive_int(self.width):
      raise ValueError(f"BiT width must be a positive integer multiplier (64*width root "
                       f"channels), got {self.width!r}")
    common.as_dtype(self.dtype)

  @nn.compact
  def __call__(self, images, train: bool = False):
    del train  # No dropout and no BatchNorm: training and inference compute the same.
    self.validate()
    dtype, width = common.as_dtype(self.dtype), 64 * int(self.width)
    out = {}

    x = RootBlock(width, dtype=dtype, name="root_block")(jnp.asarray(images, dtype))
    out["stem"] = x.astype(jnp.float32)
    for s, units in enumerate(stage_depths(self.depth)):
      x = ResNetStage(units, width * 2 ** s, first_stride=1 if s == 0 else 2, dtype=dtype,
                      name=f"block{s + 1}")(x)
      out[f"stage{s + 1}"] = x.astype(jnp.float32)

    x = nn.relu(GroupNorm(dtype=dtype, name="norm-pre-head")(x))
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    out["pre_logits"] = x

    if self.num_classes:
      init = nn.initializers.zeros if self.head_zeroinit else nn.initializers.lecun_normal()
      x = nn.Dense(self.num_classes, dtype=dtype, param_dtype=jnp.float32,
                   kernel_init=init, bias_init=nn.initializers.zeros, name="head")(
                       x.astype(dtype))
    logits = x.astype(jnp.float32)
    out["logits"] = logits
    return logits, out


# Public BiT names (under `resnet/`) -> big_vision / vitcls names. In a public unit, group
# a holds the pre-activation norm before conv1 (and before the projection), b the norm
# before conv2, c the one before conv3: big_vision's gn1/conv1, gn2/conv2, gn3/conv3.
_PUBLIC_TOP = {
    "root_block/standardized_conv2d/kernel": "root_block/conv_root/kernel",
    "group_norm/gamma": "norm-pre-head/scale",
    "group_norm/beta": "norm-pre-head/bias",
    "head/conv2d/kernel": "head/kernel",
    "head/conv2d/bias": "head/bias",
}
_PUBLIC_UNIT = re.compile(r"(block\d+/unit\d+)/([abc])/"
                          r"(standardized_conv2d/kernel|group_norm/gamma|group_norm/beta)")
_PUBLIC_LEAF = {"standardized_conv2d/kernel": "conv{}/kernel",
                "group_norm/gamma": "gn{}/scale", "group_norm/beta": "gn{}/bias"}


def _public_name(name: str) -> str:
  """'block1/unit01/b/group_norm/gamma' -> 'block1/unit01/gn2/scale'; unknown kept as is.

  Some public files number their convs ('standardized_conv2d_3'); the number is dropped.
  """
  name = re.sub(r"(^|/)standardized_conv2d_\d+/", r"\1standardized_conv2d/", name)
  if name in _PUBLIC_TOP:
    return _PUBLIC_TOP[name]
  proj = re.fullmatch(r"(block\d+/unit\d+)/a/proj/standardized_conv2d/kernel", name)
  if proj:
    return f"{proj.group(1)}/conv_proj/kernel"
  unit = _PUBLIC_UNIT.fullmatch(name)
  if unit:
    index = "abc".index(unit.group(2)) + 1
    return f"{unit.group(1)}/{_PUBLIC_LEAF[unit.group(3)].format(index)}"
  return name


def _public_value(name: str, value, source: str):
  """Public gamma/beta are (C,), big_vision's (1, 1, 1, C); the head is a 1x1 conv."""
  value = np.asarray(value)
  if name.endswith(("/scale", "/bias")) and not name.startswith("head/"):
    return value.reshape(1, 1, 1, -1)
  if name == "head/kernel" and value.ndim == 4:
    if value.shape[:2] != (1, 1):
      raise loading.CheckpointError(
          f"parameter 'resnet/head/conv2d/kernel' of the {source} has shape "
          f"{value.shape}: expected a 1x1 convolution (1, 1, C, classes)")
    return value[0, 0]
  return value


def from_public_layout(tree: dict, source: str = "checkpoint") -> dict:
  """A public BiT tree ({'resnet': {...}}) -> big_vision / vitcls's nested params."""
  flat = loading.flatten(tree["resnet"])
  renamed = {}
  for public, value in flat.items():
    name = _public_name(public)
    renamed[name] = _public_value(name, value, source)
  return loading.unflatten(renamed)


def load(init_params, checkpoint, model_cfg, dont_load: Sequence[str] = (),
         origin: str = "") -> dict:
  """Parameters for a BiT model from a checkpoint, laid onto `init_params`.

  `checkpoint`: a params tree (e.g. a vitcls workdir's, read by the caller), or the path
  of a public BiT `.npz` (`resnet/...`, e.g. BiT-M-R50x1.npz) or a big_vision / vitcls
  `.npz` (bare or under `params/`); `origin` names it in messages (default: the path). The
  head is kept from `init_params` when its shape differs (another class count) or
  `dont_load` names it; any other mismatch is one CheckpointError naming the parameter and
  both shapes.
  """
  del model_cfg  # Nothing to adapt: convolutions do not depend on the image size.
  source = f"'{loading.describe(checkpoint, origin)}'"
  restored = loading.read_params(checkpoint)
  if isinstance(restored.get("resnet"), dict):
    restored = from_public_layout(restored, source)
  return loading.merge(restored, init_params, dont_load, fresh=[r"head/.*"], source=source)
