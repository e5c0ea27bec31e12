"""ConvNeXt (Liu et al. 2022) and ConvNeXt V2 (Woo et al. 2023) as a Flax linen module.

The convolutional baselines the ViT papers are compared with today, with the numerics of
the official code (facebookresearch/ConvNeXt models/convnext.py at 048efce,
facebookresearch/ConvNeXt-V2 models/convnextv2.py at 2553895) and timm
(timm/models/convnext.py at aa4b585), whose checkpoints `load` reads.
`Model(num_classes=1000, variant="T")` is ConvNeXt-T; `variant="V2-T"` is ConvNeXt V2-T.
V1 blocks end in LayerScale; V2 blocks have Global Response Normalization (GRN) in the MLP
and no LayerScale. big_vision has no ConvNeXt, so the parameter names follow timm's module
tree, one flax module per timm module (timm name in brackets):
  stem/conv, stem/norm            4x4 stride-4 conv, LayerNorm [stem.0, stem.1]
  stages_{i}/downsample/norm, /conv   for i > 0: LayerNorm, 2x2 stride-2 conv
                                  [stages.i.downsample.0, .1]
  stages_{i}/blocks_{j}/conv_dw   7x7 depthwise conv, padding 3 [...blocks.j.conv_dw]
  stages_{i}/blocks_{j}/norm      LayerNorm over channels [...norm]
  stages_{i}/blocks_{j}/mlp/fc1, /fc2   Dense(4C), exact GELU, (V2: GRN), Dense(C)
                                  [...mlp.fc1, mlp.fc2]
  stages_{i}/blocks_{j}/mlp/grn   V2 only: `scale` and `bias`, (4C,) [...mlp.grn.weight/bias]
  stages_{i}/blocks_{j}/layer_scale   V1 only: (C,) LayerScale [...gamma]
  norm                            LayerNorm after global average pooling [head.norm]
  head                            the classifier [head.fc]
Convs and Dense layers hold `kernel`/`bias` (timm `weight`/`bias`), LayerNorms and GRN
`scale`/`bias`. The final norm is outside `head` on purpose: `dont_load=["head/.*"]`
(a fine-tuning's fresh classifier) keeps the pretrained norm, as timm's reset_classifier.

Numerics, as the references: LayerNorm eps 1e-6 everywhere (two-pass variance, like
PyTorch's), GELU the exact erf form (PyTorch nn.GELU), GRN (grn.py:45-47 in timm,
utils.py:114-116 in ConvNeXt-V2) x + bias + scale * x * N(x), N(x) = ||x||_spatial /
(mean over channels of ||x||_spatial + 1e-6); the classifier sees LayerNorm(mean over
the grid) (convnext.py:112 upstream; timm's NormMlpClassifierHead pools, then norms).
Fresh parameters as the papers' `_init_weights`: conv and Dense kernels trunc-normal
std .02, zero biases, LayerNorm 1/0, GRN 0/0, LayerScale `layer_scale_init`, and the head
kernel times `head_init_scale`. Stochastic depth is linear over all blocks, 0 to
`stoch_depth` (torch.linspace(0, rate, sum(depths))).

`apply({'params': p}, images, train=...)` takes NHWC images and returns `(logits, aux)`;
aux holds "stem" (the stem's output grid), "encoded" (the last stage's grid), "pre_logits"
(the normed pooled features) and "logits", all float32. Published weights were trained
on ImageNet-normalised pixels: use `normalize((0.485, 0.456, 0.406), (0.229, 0.224,
0.225))` in the pp, not value_range(-1, 1), when loading them.
"""

import math
import re
from typing import Any, Optional, Sequence

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitcls.models import common, loading
from vitcls.models.vit import trunc_normal

# name: (version, depths, dims). V1: the ConvNeXt paper's T/S/B/L/XL (its section 2.6);
# V2: the ConvNeXt V2 paper's Atto..Huge (its Table 1, timm's convnextv2_* defs).
VARIANTS = {
    "T": (1, (3, 3, 9, 3), (96, 192, 384, 768)),
    "S": (1, (3, 3, 27, 3), (96, 192, 384, 768)),
    "B": (1, (3, 3, 27, 3), (128, 256, 512, 1024)),
    "L": (1, (3, 3, 27, 3), (192, 384, 768, 1536)),
    "XL": (1, (3, 3, 27, 3), (256, 512, 1024, 2048)),
    "V2-A": (2, (2, 2, 6, 2), (40, 80, 160, 320)),
    "V2-F": (2, (2, 2, 6, 2), (48, 96, 192, 384)),
    "V2-P": (2, (2, 2, 6, 2), (64, 128, 256, 512)),
    "V2-N": (2, (2, 2, 8, 2), (80, 160, 320, 640)),
    "V2-T": (2, (3, 3, 9, 3), (96, 192, 384, 768)),
    "V2-B": (2, (3, 3, 27, 3), (128, 256, 512, 1024)),
    "V2-L": (2, (3, 3, 27, 3), (192, 384, 768, 1536)),
    "V2-H": (2, (3, 3, 27, 3), (352, 704, 1408, 2816)),
}
# The keys of VARIANTS as a literal, which `vitcls.validate` reads from this source before
# flax loads (a dict rule would mean 'NAME/PATCH'); tests check the two agree.
VARIANT_NAMES = ("T", "S", "B", "L", "XL", "V2-A", "V2-F", "V2-P", "V2-N", "V2-T", "V2-B",
                 "V2-L", "V2-H")
VERSIONS = (1, 2)
NUM_STAGES = 4
# What `vitcls.validate` checks of the fields' values (see `vitcls.models.field_rules`).
FIELD_RULES = {
    "variant": VARIANT_NAMES, "depths": "positive", "dims": "positive", "version": VERSIONS,
    "stoch_depth": "rate",
}
LN_EPS = 1e-6
GRN_EPS = 1e-6
LAYER_SCALE_V1 = 1e-6


def decode_variant(variant: Optional[str]) -> dict:
  """"T" -> dict(version=1, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)); None gives {};
  an unknown name raises ValueError in one line."""
  if variant is None:
    return {}
  if not isinstance(variant, str) or variant not in VARIANTS:
    raise ValueError(f"unknown ConvNeXt variant {variant!r}: expected one of "
                     f"{', '.join(VARIANTS)} ('T' is ConvNeXt-T, 'V2-T' ConvNeXt V2-T)")
  version, depths, dims = VARIANTS[variant]
  return dict(version=version, depths=depths, dims=dims)


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return (isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
          and math.isfinite(v))


class GRN(nn.Module):
  """Global Response Normalization on (N, H, W, C): x + bias + scale * x * N(x), where
  N(x) = G(x) / (mean over channels of G(x) + 1e-6) and G(x) is each channel's L2 norm
  over the grid. Statistics in float32 whatever the compute dtype."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.zeros, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    x32 = x.astype(jnp.float32)
    g = jnp.sqrt(jnp.sum(jnp.square(x32), axis=(1, 2), keepdims=True))
    n = g / (jnp.mean(g, axis=-1, keepdims=True) + GRN_EPS)
    return (x32 + bias + scale * (x32 * n)).astype(self.dtype)


def _layer_norm(dtype, name=None):
  return nn.LayerNorm(epsilon=LN_EPS, use_fast_variance=False, dtype=dtype,
                      param_dtype=jnp.float32, name=name)


def _conv(features, kernel, stride, dtype, name, padding="VALID", groups=1):
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                 feature_group_count=groups, dtype=dtype, param_dtype=jnp.float32,
                 kernel_init=trunc_normal(0.02), bias_init=nn.initializers.zeros, name=name)


class Mlp(nn.Module):
  """Dense(4C) -> exact GELU -> (GRN) -> Dense(C), on the channels of (N, H, W, C)."""
  hidden: int
  grn: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = lambda n, name: nn.Dense(  # noqa: E731
        n, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=trunc_normal(0.02),
        bias_init=nn.initializers.zeros, name=name)
    y = nn.gelu(dense(self.hidden, "fc1")(x), approximate=False)
    if self.grn:
      y = GRN(dtype=self.dtype, name="grn")(y)
    return dense(x.shape[-1], "fc2")(y)


class Block(nn.Module):
  """x + drop_path(LayerScale(MLP(LN(depthwise 7x7 conv(x))))), LayerScale when
  `layer_scale_init` is set; `drop_rate` is this block's stochastic-depth rate."""
  grn: bool = False
  layer_scale_init: Optional[float] = None
  drop_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    c = x.shape[-1]
    y = _conv(c, 7, 1, self.dtype, "conv_dw", padding=((3, 3), (3, 3)), groups=c)(x)
    y = _layer_norm(self.dtype, "norm")(y)
    y = Mlp(4 * c, grn=self.grn, dtype=self.dtype, name="mlp")(y)
    if self.layer_scale_init:
      gamma = self.param("layer_scale", nn.initializers.constant(self.layer_scale_init),
                         (c,), jnp.float32)
      y = y * gamma.astype(self.dtype)
    if self.drop_rate > 0 and not deterministic:
      y = common.drop_path(y, self.drop_rate, self.make_rng("dropout"))
    return x + y


class Downsample(nn.Module):
  """LayerNorm, then a 2x2 stride-2 conv to `features` channels (between stages)."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = _layer_norm(self.dtype, "norm")(x)
    return _conv(self.features, 2, 2, self.dtype, "conv")(x)


class Stem(nn.Module):
  """A 4x4 stride-4 conv to `features` channels (the patchify stem), then LayerNorm."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = _conv(self.features, 4, 4, self.dtype, "conv")(x)
    return _layer_norm(self.dtype, "norm")(x)


class Stage(nn.Module):
  """`downsample` (unless first), then `blocks_{j}`, with their drop-path rates."""
  features: int
  rates: Sequence[float]
  downsample: bool
  grn: bool = False
  layer_scale_init: Optional[float] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    if self.downsample:
      x = Downsample(self.features, dtype=self.dtype, name="downsample")(x)
    for j, rate in enumerate(self.rates):
      x = Block(grn=self.grn, layer_scale_init=self.layer_scale_init, drop_rate=rate,
                dtype=self.dtype, name=f"blocks_{j}")(x, deterministic)
    return x


class Model(nn.Module):
  """ConvNeXt classifier. Size and version come from `variant`; fields set override it.

  variant: "T", "S", "B", "L", "XL" (ConvNeXt V1) or "V2-A", "V2-F", "V2-P", "V2-N",
    "V2-T", "V2-B", "V2-L", "V2-H" (ConvNeXt V2).
  depths / dims: blocks and channels of the four stages.
  version: 1 (LayerScale) or 2 (GRN, no LayerScale); None: the variant's, 1 without one.
  layer_scale_init: LayerScale's initial value; None: the version's default (1e-6 in V1,
    none in V2); 0 removes LayerScale (no parameter).
  stoch_depth: drop-path rate of the last block; block k of all n drops with rate
    stoch_depth * k / (n - 1); active only with train=True.
  head_init_scale: fresh head kernel and bias times this (the papers' fine-tuning uses
    e.g. 0.001).
  head_zeroinit: zero head kernel (big_vision's fine-tuning); False: trunc-normal .02.
  dtype: compute dtype ("bfloat16" for mixed precision); params stay float32.
  num_classes: 0/None means no head; logits are then the pre_logits.
  """
  num_classes: Optional[int] = None
  variant: Optional[str] = None
  depths: Optional[Sequence[int]] = None
  dims: Optional[Sequence[int]] = None
  version: Optional[int] = None
  layer_scale_init: Optional[float] = None
  stoch_depth: float = 0.0
  head_init_scale: float = 1.0
  head_zeroinit: bool = False
  dtype: Optional[str] = None

  def sizes(self) -> dict:
    """version, depths, dims (tuples of 4) and the resolved layer_scale_init (None when
    off); ValueError in one line naming a bad field."""
    sizes = {"version": 1}
    sizes.update(decode_variant(self.variant))
    for key in ("version", "depths", "dims"):
      if getattr(self, key) is not None:
        sizes[key] = getattr(self, key)
    missing = [k for k in ("depths", "dims") if k not in sizes]
    if missing:
      raise ValueError(f"ConvNeXt size not given: set variant (e.g. 'T') or "
                       f"{' and '.join(missing)}")
    if not (_is_int(sizes["version"]) and sizes["version"] in VERSIONS):
      raise ValueError(f"ConvNeXt version must be 1 or 2, got {sizes['version']!r}")
    for key in ("depths", "dims"):
      value = sizes[key]
      if (not isinstance(value, (list, tuple)) or len(value) != NUM_STAGES
          or not all(_is_int(v) and v >= 1 for v in value)):
        raise ValueError(f"ConvNeXt {key} must be {NUM_STAGES} positive integers, one per "
                         f"stage, got {value!r}")
      sizes[key] = tuple(int(v) for v in value)
    scale = self.layer_scale_init
    if scale is None:
      scale = LAYER_SCALE_V1 if sizes["version"] == 1 else None
    elif not (_is_number(scale) and scale >= 0):
      raise ValueError(f"layer_scale_init must be a number >= 0 (0 disables LayerScale) or "
                       f"None, got {scale!r}")
    sizes["layer_scale_init"] = float(scale) if scale else None
    return sizes

  def validate(self) -> None:
    """Checks every field before anything is traced; ValueError names the bad one."""
    self.sizes()
    common.as_dtype(self.dtype)
    if not (_is_number(self.stoch_depth) and 0 <= self.stoch_depth <= 1):
      raise ValueError(f"stoch_depth must be in [0, 1], got {self.stoch_depth!r}")
    if not _is_number(self.head_init_scale):
      raise ValueError(f"head_init_scale must be a number, got {self.head_init_scale!r}")

  @nn.compact
  def __call__(self, images, train: bool = False):
    self.validate()
    sizes, dtype = self.sizes(), common.as_dtype(self.dtype)
    depths, dims = sizes["depths"], sizes["dims"]
    rates = np.linspace(0.0, self.stoch_depth, sum(depths)).tolist()
    out = {}
    x = Stem(dims[0], dtype=dtype, name="stem")(jnp.asarray(images, dtype))
    out["stem"] = x.astype(jnp.float32)
    for i, depth in enumerate(depths):
      first = sum(depths[:i])
      x = Stage(dims[i], rates[first:first + depth], downsample=i > 0,
                grn=sizes["version"] == 2, layer_scale_init=sizes["layer_scale_init"],
                dtype=dtype, name=f"stages_{i}")(x, deterministic=not train)
    out["encoded"] = x.astype(jnp.float32)
    x = _layer_norm(dtype, "norm")(jnp.mean(x.astype(jnp.float32), axis=(1, 2)))
    out["pre_logits"] = x.astype(jnp.float32)
    if self.num_classes:
      if self.head_zeroinit:
        kernel_init = nn.initializers.zeros
      else:
        def kernel_init(key, shape, dtype=jnp.float32):
          return trunc_normal(0.02)(key, shape, dtype) * self.head_init_scale
      x = nn.Dense(self.num_classes, dtype=dtype, param_dtype=jnp.float32,
                   kernel_init=kernel_init, bias_init=nn.initializers.zeros, name="head")(x)
    logits = x.astype(jnp.float32)
    out["logits"] = logits
    return logits, out


# PyTorch state dicts. Each layout is renamed to timm's names by regex substitutions, then
# timm's names to this file's by one table. The layouts, each told by one of its names:
#   timm         stem.0.weight, stages.1.blocks.0.mlp.fc1.weight, head.fc.weight
#                (Linear MLPs, or 1x1-conv MLPs in atto..nano, conv_mlp=True);
#   official     downsample_layers.0.0.weight, stages.1.0.pwconv1.weight, norm, head;
#                GRN gamma/beta of shape (1, 1, 1, 4C) (timm's checkpoint_filter_fn,
#                convnext.py:652, maps them the same way);
#   transformers convnext[v2].embeddings.patch_embeddings.weight,
#                convnext.encoder.stages.1.layers.0.pwconv1.weight, layernorm, classifier
#                (transformers' convert_convnext_to_pytorch.py renames from the official).
_LAYOUTS = {
    "timm": (r"stem\.0\.weight", ()),
    "official ConvNeXt": (r"downsample_layers\.0\.0\.weight", (
        (r"^downsample_layers\.0\.", "stem."),
        (r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample."),
        (r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2."),
        (r"\.dwconv\.", ".conv_dw."),
        (r"\.pwconv([12])\.", r".mlp.fc\1."),
        (r"\.grn\.gamma$", ".mlp.grn.weight"),
        (r"\.grn\.beta$", ".mlp.grn.bias"),
        (r"^norm\.", "head.norm."),
        (r"^head\.(weight|bias)$", r"head.fc.\1"),
    )),
    "transformers": (r"convnext(v2)?\.embeddings\.patch_embeddings\.weight", (
        (r"^convnext(v2)?\.", ""),
        (r"^embeddings\.patch_embeddings\.", "stem.0."),
        (r"^embeddings\.layernorm\.", "stem.1."),
        (r"^encoder\.stages\.(\d+)\.downsampling_layer\.", r"stages.\1.downsample."),
        (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.", r"stages.\1.blocks.\2."),
        (r"\.dwconv\.", ".conv_dw."),
        (r"\.layernorm\.", ".norm."),
        (r"\.pwconv([12])\.", r".mlp.fc\1."),
        (r"\.grn\.", ".mlp.grn."),
        (r"\.layer_scale_parameter$", ".gamma"),
        (r"^layernorm\.", "head.norm."),
        (r"^classifier\.", "head.fc."),
    )),
}
_BLOCK = r"stages\.(\d+)\.blocks\.(\d+)\."
# timm name (full match) -> this file's name and the tensor's kind (`_from_torch`).
_TIMM_NAMES = (
    (r"stem\.0\.(weight|bias)", r"stem/conv/\1", "conv"),
    (r"stem\.1\.(weight|bias)", r"stem/norm/\1", "norm"),
    (r"stages\.(\d+)\.downsample\.0\.(weight|bias)", r"stages_\1/downsample/norm/\2", "norm"),
    (r"stages\.(\d+)\.downsample\.1\.(weight|bias)", r"stages_\1/downsample/conv/\2", "conv"),
    (_BLOCK + r"conv_dw\.(weight|bias)", r"stages_\1/blocks_\2/conv_dw/\3", "conv"),
    (_BLOCK + r"norm\.(weight|bias)", r"stages_\1/blocks_\2/norm/\3", "norm"),
    (_BLOCK + r"mlp\.(fc[12])\.(weight|bias)", r"stages_\1/blocks_\2/mlp/\3/\4", "dense"),
    (_BLOCK + r"mlp\.grn\.(weight|bias)", r"stages_\1/blocks_\2/mlp/grn/\3", "norm"),
    (_BLOCK + r"gamma", r"stages_\1/blocks_\2/layer_scale", "norm"),
    (r"head\.norm\.(weight|bias)", r"norm/\1", "norm"),
    (r"head\.fc\.(weight|bias)", r"head/\1", "dense"),
)
# PyTorch's `weight` by kind: conv (O, I/groups, kh, kw) -> flax (kh, kw, I/groups, O);
# Linear (out, in), or a 1x1 conv (out, in, 1, 1), -> (in, out); norms, GRN and
# LayerScale are vectors (the official GRN's (1, 1, 1, C) flattened).
_WEIGHT = {"conv": "kernel", "dense": "kernel", "norm": "scale"}


def _convert(name: str, kind: str, value: np.ndarray, what: str) -> tuple[str, np.ndarray]:
  value = np.asarray(value)
  if name.endswith("/bias") or kind == "norm":
    if name.endswith("/weight"):
      name = name[:-len("weight")] + _WEIGHT[kind]
    return name, value.reshape(-1)
  name = name[:-len("weight")] + _WEIGHT[kind]
  if kind == "conv" and value.ndim == 4:
    return name, value.transpose(2, 3, 1, 0)
  if kind == "dense" and (value.ndim == 2 or value.shape[2:] == (1, 1)):
    return name, value.reshape(value.shape[:2]).T
  raise loading.CheckpointError(f"'{what}' has a {value.ndim}-D tensor of shape "
                                f"{value.shape} for '{name}': not a ConvNeXt weight")


def _from_torch(flat: dict, what: str) -> dict:
  """A timm / official / transformers ConvNeXt state dict -> this file's params tree."""
  layout = next((name for name, (probe, _) in _LAYOUTS.items()
                 if any(re.fullmatch(probe, k) for k in flat)), None)
  if layout is None:
    example = sorted(flat)[0]
    raise loading.CheckpointError(
        f"'{what}' is not a ConvNeXt state dict (it has e.g. '{example}' but no "
        f"'stem.0.weight' (timm), 'downsample_layers.0.0.weight' (official) or "
        f"'convnext.embeddings.patch_embeddings.weight' (transformers)): pass a "
        f"ConvNeXt checkpoint, or set config.model_name to the checkpoint's model")
  out, unknown = {}, []
  for key, value in flat.items():
    name = key
    for pattern, replacement in _LAYOUTS[layout][1]:
      name = re.sub(pattern, replacement, name)
    for pattern, target, kind in _TIMM_NAMES:
      match = re.fullmatch(pattern, name)
      if match:
        new, array = _convert(match.expand(target), kind, value, what)
        out[new] = array
        break
    else:
      unknown.append(key)
  if unknown:
    raise loading.CheckpointError(
        f"'{what}' is a {layout} ConvNeXt state dict with parameters vitcls's ConvNeXt "
        f"does not have: {', '.join(unknown[:3])}{' and more' if len(unknown) > 3 else ''} "
        f"(a timm variant with another stem or head, e.g. *_ols or head_hidden_size): "
        f"only the papers' ConvNeXt and ConvNeXt V2 load")
  logging.info("Converted a %s ConvNeXt state dict (%d tensors).", layout, len(out))
  return loading.unflatten(out)


def _architecture(params: dict) -> dict:
  """depths, dims, GRN and LayerScale of a params tree in this file's names."""
  stages = sorted((int(k[len("stages_"):]), v) for k, v in params.items()
                  if k.startswith("stages_") and k[len("stages_"):].isdigit())
  blocks = [sorted(int(b[len("blocks_"):]) for b in s if b.startswith("blocks_"))
            for _, s in stages]
  flat = loading.flatten(params)

  def width(stage: dict, block: int) -> int:  # The depthwise kernel's (7, 7, 1, C).
    kernel = stage[f"blocks_{block}"].get("conv_dw", {}).get("kernel")
    return int(np.shape(kernel)[-1]) if hasattr(kernel, "shape") else 0

  return dict(
      depths=tuple(len(b) for b in blocks),
      dims=tuple(width(s, b[0]) if b else 0 for (_, s), b in zip(stages, blocks)),
      grn=any(n.endswith("/mlp/grn/scale") for n in flat),
      layer_scale=any(n.endswith("/layer_scale") for n in flat))


def _check_architecture(restored: dict, init_params: dict, what: str) -> None:
  """One line when the checkpoint is another ConvNeXt than the model (sizes, version)."""
  have, want = _architecture(restored), _architecture(init_params)
  if (have["depths"], have["dims"]) != (want["depths"], want["dims"]):
    raise loading.CheckpointError(
        f"'{what}' is a ConvNeXt with depths {list(have['depths'])} and dims "
        f"{list(have['dims'])} but the model has depths {list(want['depths'])} and dims "
        f"{list(want['dims'])}: set config.model.variant (or depths and dims) to the "
        f"checkpoint's")
  if have["grn"] != want["grn"]:
    have_v, want_v = (2, 1) if have["grn"] else (1, 2)
    raise loading.CheckpointError(
        f"'{what}' is a ConvNeXt V{have_v} checkpoint ({'with' if have['grn'] else 'no'} "
        f"GRN) but the model is V{want_v}: set config.model.version={have_v}")
  if have["layer_scale"] != want["layer_scale"]:
    fix = ("layer_scale_init=1e-6" if have["layer_scale"] else "layer_scale_init=0")
    raise loading.CheckpointError(
        f"'{what}' {'has' if have['layer_scale'] else 'has no'} LayerScale but the model "
        f"{'has none' if have['layer_scale'] else 'has'}: set config.model.{fix}")


def load(init_params, checkpoint, model_cfg, dont_load: Sequence[str] = (),
         origin: str = "") -> dict:
  """Parameters for a model of `model_cfg` from a ConvNeXt checkpoint.

  `checkpoint`: a params tree in this file's names (a vitcls workdir's, read by the
  caller), a vitcls `.npz` export, or a `.safetensors` PyTorch state dict in timm's,
  the official repositories' or transformers' names (see `_LAYOUTS`), converted here;
  `origin` names it in messages. The head is kept from `init_params` when its shape
  differs (another class count), the checkpoint has none, or `dont_load` names it. Another
  architecture, another ConvNeXt size or version, or any other mismatch is one
  CheckpointError saying what to change.
  """
  del model_cfg  # The init params say everything about the model's shapes.
  restored, what = loading.read_model_params(
      checkpoint, origin, family="ConvNeXt", top_level=("stem", "stages_0"),
      from_torch=_from_torch)
  _check_architecture(restored, init_params, what)
  logging.info("Loading ConvNeXt parameters from %s.", what)
  return loading.merge(restored, init_params, dont_load, fresh=[r"head/.*"],
                       source=f"'{what}'")


def layer_ids(params) -> tuple[dict, int]:
  """Each parameter's layer for layer-wise lr decay (`config.layer_decay`), and the top L.

  The official fine-tuning's 12 groups (`get_num_layer_for_convnext` in
  facebookresearch/ConvNeXt optim_factory.py, also ConvNeXt-V2's "group" decay for B/L/H):
  the stem is 0, stage 0 is 1, stage 1 is 2, stage 2's block j is 3 + j // 3, stage 3 is
  12, each downsample layer joins the first block of its stage, and the final norm and
  head are L = 13, so the optimiser's factor `layer_decay ** (L - id)` is 1 there. As
  upstream, stage 3 is 12 whatever the depth (ConvNeXt-T's stage 2 ends at 5); a stage 2
  deeper than 27 blocks moves stage 3 to 3 + ceil(depth / 3) and L one above it.
  """
  depths = _architecture(params)["depths"]
  last = max(12, 3 + -(-(depths[2] if len(depths) > 2 else 0) // 3))
  top = last + 1

  def layer(stage: int, part: str) -> int:
    """`part` of stages_{stage}: "downsample" (as block 0) or "blocks_{j}"."""
    block = 0 if part == "downsample" else int(part[len("blocks_"):])
    if stage < 2:
      return stage + 1
    return 3 + block // 3 if stage == 2 else last

  def constant(tree, i):
    return jax.tree_util.tree_map(lambda _: i, tree)

  ids = {}
  for name, sub in params.items():
    if name.startswith("stages_"):
      stage = int(name[len("stages_"):])
      ids[name] = {part: constant(v, layer(stage, part)) for part, v in sub.items()}
    else:
      ids[name] = constant(sub, 0 if name == "stem" else top)
  return ids, top
