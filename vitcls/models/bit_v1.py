"""big_vision's `bit` network: a ResNet-v1 with GroupNorm and weight standardisation.

big_vision's `configs/bit_i1k.py` trains this network (`model_name='bit'`,
big_vision `models/bit.py`), not the BiT paper's pre-activation ResNet-v2 (big_vision's
`bit_paper`, vitcls's `bit`), so an experiment that follows that config needs it.
Differences from `vitcls.models.bit` (big_vision `models/bit.py` at commit 0127fb6b):
  post-activation units: conv-GN-ReLU, conv-GN-ReLU, conv-GN, add, ReLU (:59-68), with a
    GN after the projection shortcut (`gn_proj`, :55-57);
  a GN and ReLU after the root conv (`gn_root`, :101-103), no GN before the head (:117);
  the last GN of each unit starts at scale 0 (:67), so every unit starts as its shortcut;
  convolutions and the max-pool use "SAME" padding (flax's nn.Conv default, :104);
  kernel standardisation (w - mean) / (std + 1e-5) (:28-31), not / sqrt(var + 1e-10);
  flax's nn.GroupNorm: 32 groups, eps 1e-6, scale/bias of shape (C,);
  units are named `unit1`, `unit2`, ... (:80-82), not `unit01`.
The head is zero-initialised (:120-121). Same `apply` contract and aux keys as `bit`.
"""

from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitcls.models import bit, common, loading

GROUPS = 32
FIELD_RULES = {"depth": "positive", "width": "positive"}


class StdConv(nn.Module):
  """Bias-free "SAME" convolution of the kernel standardised as (w - mean) / (std + 1e-5).

  big_vision `models/bit.py:28-40`; standardised in float32, then cast to `dtype`.
  """
  features: int
  kernel_size: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (k, k, x.shape[-1], self.features), jnp.float32)
    kernel = kernel - jnp.mean(kernel, axis=(0, 1, 2))
    kernel = kernel / (jnp.std(kernel, axis=(0, 1, 2)) + 1e-5)
    return jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype), (self.strides, self.strides),
        "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _norm(name, dtype, zero_scale=False):
  """flax's GroupNorm (32 groups, eps 1e-6) with float32 statistics and params."""
  scale_init = nn.initializers.zeros if zero_scale else nn.initializers.ones
  return nn.GroupNorm(num_groups=GROUPS, epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32,
                      scale_init=scale_init, name=name)


class ResidualUnit(nn.Module):
  """Bottleneck: conv1x1-GN-ReLU, conv3x3/stride-GN-ReLU, conv1x1-GN(scale 0), add, ReLU.

  The shortcut is a strided 1x1 projection and GN when the width or resolution changes.
  """
  nmid: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    nout = 4 * self.nmid
    conv = lambda *a, **kw: StdConv(*a, dtype=self.dtype, **kw)  # noqa: E731
    shortcut = x
    if x.shape[-1] != nout or self.strides != 1:
      shortcut = conv(nout, 1, strides=self.strides, name="conv_proj")(x)
      shortcut = _norm("gn_proj", self.dtype)(shortcut)
    y = nn.relu(_norm("gn1", self.dtype)(conv(self.nmid, 1, name="conv1")(x)))
    y = conv(self.nmid, 3, strides=self.strides, name="conv2")(y)
    y = nn.relu(_norm("gn2", self.dtype)(y))
    y = _norm("gn3", self.dtype, zero_scale=True)(conv(nout, 1, name="conv3")(y))
    return nn.relu(shortcut.astype(y.dtype) + y)


class ResNetStage(nn.Module):
  """`units` residual units `unit1`, `unit2`, ...; only the first one strides."""
  units: int
  nmid: int
  first_stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for u in range(self.units):
      x = ResidualUnit(self.nmid, strides=self.first_stride if u == 0 else 1,
                       dtype=self.dtype, name=f"unit{u + 1}")(x)
    return x


class Model(nn.Module):
  """big_vision's ResNet-v1 + GN/WS classifier, e.g. `Model(num_classes, depth=50)`.

  depth: 26, 50, 101, 152, or a list of 4 units per stage (as `bit`).
  width: integer multiplier of the 64 root channels.
  dtype: compute dtype ("bfloat16" for mixed precision); params stay float32.
  num_classes: 0/None means no head; logits are then the pre_logits.
  """
  num_classes: Optional[int] = None
  depth: Union[int, Sequence[int]] = 50
  width: int = 1
  dtype: Optional[str] = None

  def validate(self) -> None:
    """Checks every field before anything is traced; ValueError names the bad one."""
    bit.Model(depth=self.depth, width=self.width, dtype=self.dtype, parent=None).validate()

  @nn.compact
  def __call__(self, images, train: bool = False):
    del train  # No dropout and no BatchNorm: training and inference compute the same.
    self.validate()
    dtype, width = common.as_dtype(self.dtype), 64 * int(self.width)
    out = {}
    x = StdConv(width, 7, strides=2, dtype=dtype, name="conv_root")(
        jnp.asarray(images, dtype))
    x = nn.relu(_norm("gn_root", dtype)(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    out["stem"] = x.astype(jnp.float32)
    for s, units in enumerate(bit.stage_depths(self.depth)):
      x = ResNetStage(units, width * 2 ** s, first_stride=1 if s == 0 else 2, dtype=dtype,
                      name=f"block{s + 1}")(x)
      out[f"stage{s + 1}"] = x.astype(jnp.float32)
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    out["pre_logits"] = x
    if self.num_classes:
      x = nn.Dense(self.num_classes, dtype=dtype, param_dtype=jnp.float32,
                   kernel_init=nn.initializers.zeros, name="head")(x.astype(dtype))
    logits = x.astype(jnp.float32)
    out["logits"] = logits
    return logits, out


def load(init_params, checkpoint, model_cfg, dont_load: Sequence[str] = (),
         origin: str = "") -> dict:
  """Parameters from a big_vision `bit` / vitcls `bit_v1` checkpoint onto `init_params`.

  The head is kept from `init_params` when its shape differs or `dont_load` names it.
  """
  del model_cfg  # Nothing to adapt: convolutions do not depend on the image size.
  source = f"'{loading.describe(checkpoint, origin)}'"
  return loading.merge(loading.read_params(checkpoint), init_params, dont_load,
                       fresh=[r"head/.*"], source=source)
