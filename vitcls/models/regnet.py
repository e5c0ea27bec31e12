"""RegNetY (Radosavovic et al. 2020, "Designing Network Design Spaces") as a Flax linen module.

DeiT's distillation teacher (RegNetY-16GF, timm's `regnety_160.deit_in1k`) and the other
RegNetY of pycls and timm, with the numerics of timm (timm/models/regnet.py at aa4b585,
itself a port of facebookresearch/pycls pycls/models/regnet.py), whose checkpoints `load`
reads. `Model(num_classes=1000, variant="Y-16GF")` is RegNetY-16GF. Variants are named as
the paper and pycls's model zoo name them, after their FLOPs: timm's `regnety_NNN` is
"Y-" + NNN x 10^8 FLOPs (`timm_names.regnet_variant`): 002 -> "Y-200MF", 016 -> "Y-1.6GF",
160 -> "Y-16GF", 320 -> "Y-32GF"; "Y-64GF", "Y-128GF" and "Y-256GF" are SEER's (timm's
regnety_640/1280/2560). A variant is five numbers of timm's `model_cfgs` (w0, wa, wm,
group_size, depth), which `generate` turns into the four stages' widths, depths and group
widths by the paper's quantised linear rule (timm's `generate_regnet` and
`adjust_widths_groups_comp`); setting any of the five fields overrides the variant's.

The network (timm's `RegNet` with `Bottleneck` blocks, bottle_ratio 1, se_ratio 0.25):
  stem/conv, stem/bn             3x3 stride-2 conv (padding 1) to 32 channels, BN, ReLU
                                 [stem.conv, stem.bn]
  s{i}/b{j}/conv1/conv, /bn      for stage i = 1..4, block j = 1..depth (1-based, as
                                 timm): 1x1 conv to the stage width w, BN, ReLU
                                 [s{i}.b{j}.conv1.conv, .conv1.bn]
  s{i}/b{j}/conv2/conv, /bn      3x3 group conv (w / group width groups, stride 2 in b1,
                                 padding 1), BN, ReLU [.conv2]
  s{i}/b{j}/se/fc1, /fc2         Squeeze-Excitation: global mean, Dense to
                                 round(0.25 * the block's *input* width) (timm's
                                 `se_channels = int(round(in_chs * se_ratio))`, not the
                                 bottleneck width), ReLU, Dense(w), sigmoid gate [.se.fc1/2]
  s{i}/b{j}/conv3/conv, /bn      1x1 conv, BN, no activation [.conv3]
  s{i}/b1/downsample/conv, /bn   the shortcut of each stage's first block (stride 2, a new
                                 width): 1x1 stride-2 conv, BN [.downsample.conv/bn];
                                 other blocks add their input; ReLU after the sum
  head                           the classifier on the global average pool [head.fc]
Convs hold a bias-free `kernel` (timm `weight`), SE and head Dense layers `kernel`/`bias`.

BatchNorm is frozen: each `bn` holds `scale`, `bias` and the running statistics `mean` and
`var` as four parameters ([bn.weight, bn.bias, bn.running_mean, bn.running_var]; timm's
num_batches_tracked is dropped), and computes (x - mean) / sqrt(var + 1e-5) * scale + bias
(PyTorch's eval-mode BN, eps 1e-5 as timm) in training too: vitcls's train state holds
params only, so no batch statistics are ever computed or updated ("frozen BatchNorm", as
detection backbones use it). The statistics pass through `stop_gradient`, so they never
change by training; scale and bias train. The model is meant as a frozen teacher
(`config.distill`) or as a backbone fine-tuned with its pretrained statistics; when
training it, `config.frozen=[".*/mean", ".*/var"]` also spares the statistics their
optimiser state. The default `wd_mask` (".*/kernel$") decays conv and Dense kernels only.
So the parameter trees hold 2 x (BN channels) statistics that timm counts as buffers;
without the `mean`/`var` leaves, their sizes are timm's (RegNetY-16GF: 83,590,140).

Fresh parameters as timm's `_init_weights`: conv kernels N(0, 2 / fan_out) with fan_out =
k * k * out / groups (the SE 1x1 convs too), zero biases, BN 1/0 with statistics 0/1 and
the last BN of each block (conv3/bn) at scale 0 (zero_init_last), the head N(0, 0.01^2)
(or zeros with `head_zeroinit`). Stochastic depth is linear over all blocks, 0 to
`stoch_depth` (timm's calculate_drop_path_rates), on the residual branch before the sum.

`apply({'params': p}, images, train=...)` takes NHWC images and returns `(logits, aux)`;
aux holds "stem" (the stem's output grid), "encoded" (the last stage's grid), "pre_logits"
(the pooled features) and "logits", all float32. Published weights were trained on
ImageNet-normalised pixels: use `normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))`
in the pp, not value_range(-1, 1), when loading them.
"""

import math
import re
from typing import Any, Mapping, Optional, Sequence

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitcls.models import common, loading

# name: (w0, wa, wm, group_size, depth), timm's model_cfgs regnety_NNN (timm's names in
# the comments): pycls's model zoo RegNetY (the paper's) and SEER's three larger ones.
VARIANTS = {
    "Y-200MF": (24, 36.44, 2.49, 8, 13),      # regnety_002
    "Y-400MF": (48, 27.89, 2.09, 8, 16),      # regnety_004
    "Y-600MF": (48, 32.54, 2.32, 16, 15),     # regnety_006
    "Y-800MF": (56, 38.84, 2.4, 16, 14),      # regnety_008
    "Y-1.6GF": (48, 20.71, 2.65, 24, 27),     # regnety_016
    "Y-3.2GF": (80, 42.63, 2.66, 24, 21),     # regnety_032
    "Y-4.0GF": (96, 31.41, 2.24, 64, 22),     # regnety_040
    "Y-6.4GF": (112, 33.22, 2.27, 72, 25),    # regnety_064
    "Y-8.0GF": (192, 76.82, 2.19, 56, 17),    # regnety_080
    "Y-12GF": (168, 73.36, 2.37, 112, 19),    # regnety_120
    "Y-16GF": (200, 106.23, 2.48, 112, 18),   # regnety_160 (DeiT's teacher)
    "Y-32GF": (232, 115.89, 2.53, 232, 20),   # regnety_320
    "Y-64GF": (352, 147.48, 2.4, 328, 20),    # regnety_640 (SEER)
    "Y-128GF": (456, 160.83, 2.52, 264, 27),  # regnety_1280 (SEER)
    "Y-256GF": (640, 230.83, 2.53, 373, 27),  # regnety_2560 (SEER)
}
# The keys of VARIANTS as a literal, which `vitcls.validate` (and `timm_names`) read from
# this source before flax loads; tests check the two agree.
VARIANT_NAMES = ("Y-200MF", "Y-400MF", "Y-600MF", "Y-800MF", "Y-1.6GF", "Y-3.2GF",
                 "Y-4.0GF", "Y-6.4GF", "Y-8.0GF", "Y-12GF", "Y-16GF", "Y-32GF", "Y-64GF",
                 "Y-128GF", "Y-256GF")
SIZE_FIELDS = ("w0", "wa", "wm", "group_size", "depth")
# What `vitcls.validate` checks of the fields' values (see `vitcls.models.field_rules`).
FIELD_RULES = {
    "variant": VARIANT_NAMES, "w0": "positive", "group_size": "positive", "depth": "positive",
    "stoch_depth": "rate",
}
NUM_STAGES = 4
STEM_WIDTH = 32
SE_RATIO = 0.25
QUANT = 8
BN_EPS = 1e-5


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return (isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
          and math.isfinite(v))


def generate(w0: int, wa: float, wm: float, group_size: int, depth: int
             ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
  """(widths, depths, group widths) of the stages of a RegNet of these parameters.

  The paper's quantised linear rule as timm computes it, in float32 like its torch code:
  block j's continuous width u_j = w0 + wa * j is quantised to w0 * wm^round(log_wm(u_j /
  w0)), rounded to a multiple of 8; blocks of one width form a stage; a stage's group
  width is min(group_size, its width), and its width is rounded to a multiple of that
  (`adjust_widths_groups_comp` with bottle_ratio 1). ValueError in one line for
  parameters outside the rule's domain (timm's asserts).
  """
  if not (_is_int(w0) and w0 > 0 and w0 % QUANT == 0):
    raise ValueError(f"RegNet w0 must be a positive multiple of {QUANT}, got {w0!r}")
  if not (_is_number(wa) and wa >= 0):
    raise ValueError(f"RegNet wa (the width slope) must be a number >= 0, got {wa!r}")
  if not (_is_number(wm) and wm > 1):
    raise ValueError(f"RegNet wm (the width multiplier) must be a number > 1, got {wm!r}")
  for key, value in (("group_size", group_size), ("depth", depth)):
    if not (_is_int(value) and value >= 1):
      raise ValueError(f"RegNet {key} must be a positive integer, got {value!r}")
  f32 = np.float32
  continuous = np.arange(depth, dtype=f32) * f32(wa) + f32(w0)
  exponents = np.round(np.log(continuous / f32(w0)) / f32(math.log(wm)))
  blocks = np.round(f32(w0) * np.power(f32(wm), exponents) / f32(QUANT)) * f32(QUANT)
  widths, depths = np.unique(blocks.astype(np.int64), return_counts=True)
  groups = [min(group_size, int(w)) for w in widths]
  widths = [int(round(int(w) / g) * g) for w, g in zip(widths, groups)]
  return tuple(widths), tuple(int(d) for d in depths), tuple(groups)


def _conv_init(groups: int = 1):
  """timm's conv init: N(0, 2 / fan_out), fan_out = kh * kw * out / groups."""
  def init(key, shape, dtype=jnp.float32):
    fan_out = math.prod(shape[:2]) * shape[-1] // groups
    return jax.random.normal(key, shape, dtype) * math.sqrt(2.0 / fan_out)
  return init


class FrozenBatchNorm(nn.Module):
  """Inference-mode BatchNorm with its statistics as parameters (see the module docstring):
  (x - mean) / sqrt(var + 1e-5) * scale + bias, in float32, whatever `train` is."""
  zero_scale: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.zeros if self.zero_scale
                       else nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    mean = jax.lax.stop_gradient(self.param("mean", nn.initializers.zeros, (c,), jnp.float32))
    var = jax.lax.stop_gradient(self.param("var", nn.initializers.ones, (c,), jnp.float32))
    multiplier = scale * jax.lax.rsqrt(var + BN_EPS)
    return (x.astype(jnp.float32) * multiplier + (bias - mean * multiplier)).astype(self.dtype)


class ConvBN(nn.Module):
  """A bias-free conv, frozen BN and optionally ReLU (timm's ConvNormAct: `conv`, `bn`)."""
  features: int
  kernel: int = 1
  stride: int = 1
  groups: int = 1
  relu: bool = True
  zero_scale: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    pad = (self.kernel - 1) // 2  # timm's symmetric padding for stride <= 2, dilation 1.
    x = nn.Conv(self.features, (self.kernel, self.kernel), strides=(self.stride, self.stride),
                padding=((pad, pad), (pad, pad)), feature_group_count=self.groups,
                use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                kernel_init=_conv_init(self.groups), name="conv")(x)
    x = FrozenBatchNorm(zero_scale=self.zero_scale, dtype=self.dtype, name="bn")(x)
    return nn.relu(x) if self.relu else x


class SqueezeExcite(nn.Module):
  """x * sigmoid(fc2(relu(fc1(mean of x over the grid)))), fc1 to `reduced` channels."""
  reduced: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = lambda n, name: nn.Dense(  # noqa: E731  # timm's 1x1 convs on the pooled grid.
        n, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=_conv_init(),
        bias_init=nn.initializers.zeros, name=name)
    s = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
    s = dense(x.shape[-1], "fc2")(nn.relu(dense(self.reduced, "fc1")(s)))
    return x * nn.sigmoid(s)[:, None, None, :].astype(self.dtype)


class Block(nn.Module):
  """timm's RegNet Bottleneck (bottle_ratio 1): relu(drop_path(conv3(se(conv2(conv1(x)))))
  + shortcut(x)), the shortcut a 1x1 conv + BN when the stride or width changes."""
  features: int
  stride: int
  group_size: int
  drop_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    c_in, w = x.shape[-1], self.features
    y = ConvBN(w, 1, dtype=self.dtype, name="conv1")(x)
    y = ConvBN(w, 3, self.stride, groups=w // self.group_size, dtype=self.dtype,
               name="conv2")(y)
    y = SqueezeExcite(int(round(c_in * SE_RATIO)), dtype=self.dtype, name="se")(y)
    y = ConvBN(w, 1, relu=False, zero_scale=True, dtype=self.dtype, name="conv3")(y)
    if self.drop_rate > 0 and not deterministic:
      y = common.drop_path(y, self.drop_rate, self.make_rng("dropout"))
    if c_in != w or self.stride != 1:
      x = ConvBN(w, 1, self.stride, relu=False, dtype=self.dtype, name="downsample")(x)
    return nn.relu(y + x)


class Stage(nn.Module):
  """Blocks `b1`.. of one width, the first with stride 2, at their drop-path rates."""
  features: int
  group_size: int
  rates: Sequence[float]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    for j, rate in enumerate(self.rates):
      x = Block(self.features, 2 if j == 0 else 1, self.group_size, drop_rate=rate,
                dtype=self.dtype, name=f"b{j + 1}")(x, deterministic=deterministic)
    return x


class Model(nn.Module):
  """RegNetY classifier (see the module docstring for names and numerics).

  variant: "Y-200MF" .. "Y-256GF" (`VARIANTS`); w0, wa, wm, group_size, depth: the
    RegNet parameters (timm's RegNetCfg), each overriding the variant's; all five
    without a variant.
  stoch_depth: drop-path rate of the last block, linear from 0 over all blocks; train only.
  head_zeroinit: zero head kernel; False: N(0, 0.01^2) as timm.
  dtype: compute dtype ("bfloat16" ...); parameters, BN and the outputs stay float32.
  num_classes: 0/None means no head; logits are then the pre_logits.
  """
  num_classes: Optional[int] = None
  variant: Optional[str] = None
  w0: Optional[int] = None
  wa: Optional[float] = None
  wm: Optional[float] = None
  group_size: Optional[int] = None
  depth: Optional[int] = None
  stoch_depth: float = 0.0
  head_zeroinit: bool = False
  dtype: Optional[str] = None

  def sizes(self) -> dict:
    """widths, depths and group_sizes of the 4 stages (tuples); ValueError in one line
    naming a bad field."""
    if self.variant is not None and self.variant not in VARIANTS:
      raise ValueError(f"unknown RegNet variant {self.variant!r}: expected one of "
                       f"{', '.join(VARIANTS)} ('Y-16GF' is RegNetY-16GF, timm's "
                       f"regnety_160)")
    given = dict(zip(SIZE_FIELDS, VARIANTS[self.variant])) if self.variant else {}
    given.update({k: getattr(self, k) for k in SIZE_FIELDS if getattr(self, k) is not None})
    missing = [k for k in SIZE_FIELDS if k not in given]
    if missing:
      raise ValueError(f"RegNet size not given: set variant (e.g. 'Y-16GF') or "
                       f"{', '.join(missing)}")
    widths, depths, groups = generate(**given)
    if len(widths) != NUM_STAGES:
      raise ValueError(
          f"RegNet w0={given['w0']}, wa={given['wa']}, wm={given['wm']}, "
          f"depth={given['depth']} gives {len(widths)} stages of widths {list(widths)}, "
          f"not {NUM_STAGES}: change wa, wm or depth, or use a variant")
    return dict(widths=widths, depths=depths, group_sizes=groups)

  def validate(self) -> None:
    """Checks every field before anything is traced; ValueError names the bad one."""
    self.sizes()
    common.as_dtype(self.dtype)
    if not (_is_number(self.stoch_depth) and 0 <= self.stoch_depth <= 1):
      raise ValueError(f"stoch_depth must be in [0, 1], got {self.stoch_depth!r}")

  @nn.compact
  def __call__(self, images, train: bool = False):
    self.validate()
    sizes, dtype = self.sizes(), common.as_dtype(self.dtype)
    depths = sizes["depths"]
    rates = np.linspace(0.0, self.stoch_depth, sum(depths)).tolist()
    out = {}
    x = ConvBN(STEM_WIDTH, 3, 2, dtype=dtype, name="stem")(jnp.asarray(images, dtype))
    out["stem"] = x.astype(jnp.float32)
    for i, (width, group) in enumerate(zip(sizes["widths"], sizes["group_sizes"])):
      first = sum(depths[:i])
      x = Stage(width, group, rates[first:first + depths[i]], dtype=dtype,
                name=f"s{i + 1}")(x, deterministic=not train)
    out["encoded"] = x.astype(jnp.float32)
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    out["pre_logits"] = x
    if self.num_classes:
      init = (nn.initializers.zeros if self.head_zeroinit
              else nn.initializers.normal(0.01))
      x = nn.Dense(self.num_classes, dtype=dtype, param_dtype=jnp.float32, kernel_init=init,
                   bias_init=nn.initializers.zeros, name="head")(x)
    logits = x.astype(jnp.float32)
    out["logits"] = logits
    return logits, out


# timm's state dict names (full match) -> this file's names and the tensor's kind
# (`_convert`); timm's RegNet, verified against timm/models/regnet.py (`ConvNormAct` holds
# `conv` and `bn`, `SEModule` `fc1` and `fc2`, `ClassifierHead` `fc`).
_BLOCK = r"s(\d+)\.b(\d+)\."
_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_TIMM_NAMES = (
    (r"stem\.conv\.weight", r"stem/conv/weight", "conv"),
    (r"stem\.bn\." + _BN, r"stem/bn/\1", "bn"),
    (_BLOCK + r"(conv[123]|downsample)\.conv\.weight", r"s\1/b\2/\3/conv/weight", "conv"),
    (_BLOCK + r"(conv[123]|downsample)\.bn\." + _BN, r"s\1/b\2/\3/bn/\4", "bn"),
    (_BLOCK + r"se\.(fc[12])\.(weight|bias)", r"s\1/b\2/se/\3/\4", "dense"),
    (r"head\.fc\.(weight|bias)", r"head/\1", "dense"),
)
_BN_NAMES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def _convert(name: str, kind: str, value: np.ndarray, what: str) -> tuple[str, np.ndarray]:
  """One timm tensor in this file's name and layout: conv (O, I/groups, kh, kw) -> flax
  (kh, kw, I/groups, O); a Linear (out, in) or the SE's 1x1 convs (out, in, 1, 1) ->
  (in, out); BN vectors as they are."""
  value = np.asarray(value)
  parent, leaf = name.rsplit("/", 1)
  if kind == "bn":
    return f"{parent}/{_BN_NAMES[leaf]}", value.reshape(-1)
  if leaf == "bias":
    return name, value.reshape(-1)
  if kind == "conv" and value.ndim == 4:
    return f"{parent}/kernel", value.transpose(2, 3, 1, 0)
  if kind == "dense" and (value.ndim == 2 or value.shape[2:] == (1, 1)):
    return f"{parent}/kernel", value.reshape(value.shape[:2]).T
  raise loading.CheckpointError(f"'{what}' has a {value.ndim}-D tensor of shape "
                                f"{value.shape} for '{name}': not a RegNet weight")


def _from_torch(flat: dict, what: str) -> dict:
  """A timm RegNet state dict -> this file's params tree (num_batches_tracked dropped)."""
  if "stem.conv.weight" not in flat:
    example = sorted(flat)[0]
    raise loading.CheckpointError(
        f"'{what}' is not a timm RegNet state dict (it has e.g. '{example}' but no "
        f"'stem.conv.weight'): pass a timm regnety_* checkpoint, or set "
        f"config.model_name to the checkpoint's model")
  out, unknown = {}, []
  for key, value in flat.items():
    for pattern, target, kind in _TIMM_NAMES:
      match = re.fullmatch(pattern, key)
      if match:
        if not key.endswith("num_batches_tracked"):
          new, array = _convert(match.expand(target), kind, value, what)
          out[new] = array
        break
    else:
      unknown.append(key)
  if unknown:
    raise loading.CheckpointError(
        f"'{what}' is a timm RegNet state dict with parameters vitcls's RegNetY does not "
        f"have: {', '.join(unknown[:3])}{' and more' if len(unknown) > 3 else ''} (a "
        f"RegNetV/Z or another timm variant): only RegNetY loads")
  logging.info("Converted a timm RegNet state dict (%d tensors).", len(out))
  return loading.unflatten(out)


def _architecture(params: dict) -> dict:
  """depths, widths and group widths of the stages of a params tree in this file's
  names, and whether its blocks have SE (RegNetY) or not (RegNetX)."""
  stages = sorted((int(k[1:]), v) for k, v in params.items()
                  if re.fullmatch(r"s\d+", k) and isinstance(v, Mapping))
  blocks = [sorted(int(b[1:]) for b in s if re.fullmatch(r"b\d+", b)) for _, s in stages]

  def kernel(stage: dict, block: int, conv: str) -> tuple:
    value = stage[f"b{block}"].get(conv, {}).get("conv", {}).get("kernel")
    return tuple(np.shape(value)) if hasattr(value, "shape") else (0, 0, 0, 0)

  return dict(
      depths=tuple(len(b) for b in blocks),
      widths=tuple(kernel(s, b[0], "conv3")[-1] if b else 0
                   for (_, s), b in zip(stages, blocks)),
      group_sizes=tuple(kernel(s, b[0], "conv2")[2] if b else 0
                        for (_, s), b in zip(stages, blocks)),
      se=any("/se/" in n for n in loading.flatten(params)))


def _check_architecture(restored: dict, init_params: dict, what: str) -> None:
  """One line when the checkpoint is another RegNet than the model."""
  have, want = _architecture(restored), _architecture(init_params)
  if have["se"] != want["se"]:
    raise loading.CheckpointError(
        f"'{what}' is a RegNet without Squeeze-Excitation (a RegNetX) but vitcls's RegNet "
        f"is RegNetY: pass a RegNetY (timm regnety_*) checkpoint")
  keys = ("depths", "widths", "group_sizes")
  if tuple(have[k] for k in keys) != tuple(want[k] for k in keys):
    def text(a):
      return ", ".join(f"{k} {list(a[k])}" for k in keys)
    raise loading.CheckpointError(
        f"'{what}' is a RegNet with {text(have)} but the model has {text(want)}: set "
        f"config.model.variant (or w0, wa, wm, group_size, depth) to the checkpoint's "
        f"(e.g. 'Y-16GF' for timm's regnety_160)")


def load(init_params, checkpoint, model_cfg, dont_load: Sequence[str] = (),
         origin: str = "") -> dict:
  """Parameters for a model of `model_cfg` from a RegNetY checkpoint.

  `checkpoint`: a params tree in this file's names (a vitcls workdir's, read by the
  caller), a vitcls `.npz` export, or a timm `.safetensors` state dict (`_TIMM_NAMES`),
  converted here, BN running statistics included; `origin` names it in messages. The
  head is kept from `init_params` when its shape differs (another class count), the
  checkpoint has none, or `dont_load` names it. Another architecture, another RegNet
  size, or any other mismatch is one CheckpointError saying what to change.
  """
  del model_cfg  # The init params say everything about the model's shapes.
  restored, what = loading.read_model_params(
      checkpoint, origin, family="RegNet", top_level=("stem", "s1"),
      from_torch=_from_torch)
  _check_architecture(restored, init_params, what)
  logging.info("Loading RegNet parameters from %s.", what)
  return loading.merge(restored, init_params, dont_load, fresh=[r"head/.*"],
                       source=f"'{what}'")


def layer_ids(params) -> tuple[dict, int]:
  """Each parameter's layer for layer-wise lr decay (`config.layer_decay`), and the top L.

  timm's `group_matcher` (stem, then one group per block `^s(\\d+)\\.b(\\d+)`): the stem
  is 0, the blocks are 1, 2, ... in forward order across the stages, and the head (with
  anything else outside the stages) is L = 1 + the number of blocks, so the optimiser's
  factor `layer_decay ** (L - id)` is 1 there.
  """
  depths = _architecture(params)["depths"]
  top = sum(depths) + 1

  def constant(tree, i):
    return jax.tree_util.tree_map(lambda _: i, tree)

  ids = {}
  for name, sub in params.items():
    if re.fullmatch(r"s\d+", name):
      first = sum(depths[:int(name[1:]) - 1])
      ids[name] = {b: constant(v, first + int(b[1:])) for b, v in sub.items()}
    else:
      ids[name] = constant(sub, 0 if name == "stem" else top)
  return ids, top
