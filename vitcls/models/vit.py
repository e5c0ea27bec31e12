"""Vision Transformer (Dosovitskiy et al. 2021) as a Flax linen module.

`Model(num_classes=1000, variant="B/16", pool_type="tok")` is the original ViT-B/16: same
numerics (pre-norm blocks, LayerNorm eps 1e-6, tanh-approximate GELU, xavier-uniform
attention/MLP kernels) and the same parameter names as google-research/vision_transformer
and big_vision, so their `.npz` checkpoints map onto it. Every config key is a dataclass
field, so `Model(num_classes, **config.model)` needs no translation layer. Options for
the towers published elsewhere (each off by default, so the default tree and numerics are
the original's): register tokens (`num_registers`, DINOv2-reg), LayerScale
(`layer_scale_init`, DeiT-III, DINOv2), a SwiGLU MLP (`mlp_type`, DINOv2-g), exact GELU
(`gelu_approximate=False`, timm and Hugging Face), no q/k/v bias (`qkv_bias`), a class
token with any pooling (`class_token`), the MAP head's own size (`map_num_heads`,
`map_mlp_dim`), the LayerNorm epsilon (`layer_norm_eps`) and DeiT's distillation token and
head (`distill_token`). `load` reads their checkpoints: `.npz` (big_vision, incl. the
`img/` tower of a SigLIP two-tower file) here, timm / Hugging Face `.safetensors` through
`vitcls.models.vit_torch`.

`apply({'params': p}, images, train=...)` takes NHWC images in [-1, 1] and returns
`(logits, aux)`; aux holds "stem" (patch grid), "encoded" (all tokens after the final
LayerNorm: the cls token first when there is one, then the distillation token, then the
registers, then the patches) and "pre_logits" (what the head sees); with a distillation
token also "logits_cls" and "logits_dist" (see `Model`). Logits and aux features are
float32 whatever `dtype` computes in.
"""

import math
import re
from typing import Any, Optional, Sequence, Union

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitcls.models import common, loading

# name: (width, depth, mlp_dim, num_heads)
VARIANTS = {
    "mu": (32, 1, 128, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
}
POOL_TYPES = ("gap", "tok", "map")
POSEMBS = ("learn", "sincos2d")
WEIGHT_INITS = ("big_vision", "timm")
MLP_TYPES = ("gelu", "swiglu")
# What `vitcls.validate` checks of the fields' values before flax loads (read from this
# source: see `vitcls.models.field_rules`). The patch convolution drops pixels past the
# last whole patch, so a patch need not divide the image, only fit in it.
FIELD_RULES = {
    "variant": VARIANTS, "width": "positive", "depth": "positive", "mlp_dim": "positive",
    "num_heads": "positive", "patch_size": "patch", "posemb": POSEMBS,
    "pool_type": POOL_TYPES, "dropout": "rate", "stoch_depth": "rate",
    "weight_init": WEIGHT_INITS, "mlp_type": MLP_TYPES, "gelu_approximate": (True, False),
    "qkv_bias": (True, False), "class_token": (True, False), "map_num_heads": "positive",
    "map_mlp_dim": "positive", "distill_token": (True, False),
}


def decode_variant(variant: Optional[str]) -> dict:
  """"S/16" -> dict(width=384, depth=12, mlp_dim=1536, num_heads=6, patch_size=(16, 16)).

  None gives {} (every size field must then be set explicitly). Anything else that is not
  NAME/PATCH with a known NAME and a positive integer PATCH raises ValueError in one line.
  Cheap and pure: the trainer calls it to validate a config before building anything.
  """
  if variant is None:
    return {}
  error = ValueError(
      f"unknown ViT variant {variant!r}: expected NAME/PATCH with NAME in "
      f"{', '.join(VARIANTS)} (e.g. 'S/16')")
  if not isinstance(variant, str) or variant.count("/") != 1:
    raise error
  name, patch = variant.split("/")
  if name not in VARIANTS or not patch.isdigit() or int(patch) <= 0:
    raise error
  width, depth, mlp_dim, num_heads = VARIANTS[name]
  return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads,
              patch_size=(int(patch), int(patch)))


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0):
  """Fixed 2D sin-cos position embedding, shape (1, h*w, width), row-major over the grid.

  Channels are [sin(x*omega), cos(x*omega), sin(y*omega), cos(y*omega)], each width/4 wide,
  with omega_k = temperature**(-k / (width/4 - 1)) (as in big_vision / MoCo v3).
  """
  if width % 4:
    raise ValueError(f"posemb='sincos2d' needs width divisible by 4, got width={width}")
  quarter = width // 4
  y, x = jnp.mgrid[:h, :w]
  omega = jnp.arange(quarter) / max(quarter - 1, 1)
  omega = 1.0 / (temperature ** omega)
  y = y.reshape(-1)[:, None] * omega[None, :]
  x = x.reshape(-1)[:, None] * omega[None, :]
  pe = jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)
  return pe[None].astype(jnp.float32)


def trunc_normal(std: float = 0.02, a: float = -2.0, b: float = 2.0):
  """timm's `trunc_normal_(std=std)`: N(0, std^2) truncated to [a, b], in absolute units.

  timm's bounds are values, not multiples of std (timm 0.3.2
  timm/models/layers/weight_init.py:42, a=-2., b=2.), so at std .02 they sit 100 std out
  and never bite: the draws are plain N(0, .02^2), std .02 (not the 0.88 x .02 of a cut
  at 2 std). Bounds that far out are drawn as a normal clipped to them (the same
  distribution); timm's inverse-CDF draw (weight_init.py:27-38) instead maps a uniform's
  rare exact -1 to the bound itself (-2, 100 std), an outlier this does not reproduce.
  """
  def init(key, shape, dtype=jnp.float32):
    lo, hi = a / std, b / std
    if lo <= -8 and hi >= 8:  # Mass outside below 1e-15: truncation changes nothing.
      return jnp.clip(std * jax.random.normal(key, shape, dtype), a, b)
    return std * jax.random.truncated_normal(key, lo, hi, shape, dtype)
  return init


def torch_default_uniform(fan_in: int):
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default Conv2d weight and bias init.

  timm 0.3.2's ViT re-initialises only Linear and LayerNorm modules
  (timm/models/vision_transformer.py:243-252), so its patch embedding (an nn.Conv2d,
  vision_transformer.py:158) keeps torch's reset_parameters: kaiming_uniform_(a=sqrt(5))
  for the weight, bound sqrt(6 / ((1 + 5) fan_in)) = 1/sqrt(fan_in), and the same
  bound for the bias.
  """
  bound = 1.0 / math.sqrt(fan_in)
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def dense_inits(weight_init: str) -> tuple[Any, Any]:
  """(kernel_init, bias_init) of the Dense layers in the blocks (MLP; attention kernels).

  big_vision: xavier-uniform kernels, MLP biases N(0, 1e-6^2) (attention biases zero);
  timm: every nn.Linear trunc_normal_(std=.02) with zero bias
  (timm 0.3.2 vision_transformer.py:246-249).
  """
  if weight_init == "timm":
    return trunc_normal(0.02), nn.initializers.zeros
  return nn.initializers.xavier_uniform(), nn.initializers.normal(stddev=1e-6)


class MlpBlock(nn.Module):
  """Dense(mlp_dim) -> GELU -> dropout -> Dense(width) -> dropout.

  mlp_type="swiglu" (DINOv2-g; timm's `SwiGLUPacked`, DINOv2's `SwiGLUFFNFused`): `Dense_0`
  is packed, 2 * mlp_dim wide; its first half is the gate, through SiLU, times its second
  half, the value: silu(x W[:, :h]) * (x W[:, h:]) with h = mlp_dim, then `Dense_1` (h ->
  width). mlp_dim is that h (4096 for DINOv2-g: (int(4 * 1536 * 2 / 3) + 7) // 8 * 8).
  gelu_approximate: tanh approximation (big_vision, flax's default) or exact erf (PyTorch
  `nn.GELU`, as timm and Hugging Face ViT/DINOv2 compute).
  """
  mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  weight_init: str = "big_vision"
  mlp_type: str = "gelu"
  gelu_approximate: bool = True

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    kernel_init, bias_init = dense_inits(self.weight_init)
    dense = lambda n: nn.Dense(  # noqa: E731
        n, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=kernel_init,
        bias_init=bias_init)
    width = x.shape[-1]
    if self.mlp_type == "swiglu":
      gate, value = jnp.split(dense(2 * self.mlp_dim)(x), 2, axis=-1)
      x = nn.silu(gate) * value
    else:
      x = dense(self.mlp_dim)(x)
      x = nn.gelu(x, approximate=self.gelu_approximate)
    x = nn.Dropout(rate=self.dropout)(x, deterministic)
    x = dense(width)(x)
    return nn.Dropout(rate=self.dropout)(x, deterministic)


class LayerScale(nn.Module):
  """x * scale, one learned factor per channel (Touvron et al. 2021, CaiT / DeiT-III).

  Its parameter is `scale`, shape (width,), starting at `init_value` (1e-5 in DINOv2, 1e-6
  in DeiT-III); a block's attention branch has `LayerScale_0`, its MLP branch
  `LayerScale_1` (timm's `ls1.gamma` / `ls2.gamma`, Hugging Face's `layer_scale1.lambda1`).
  """
  init_value: float

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.constant(self.init_value), (x.shape[-1],),
                       jnp.float32)
    return x * scale.astype(x.dtype)


class QKVNoBiasAttention(nn.Module):
  """Self-attention whose query/key/value projections have no bias (the output keeps it).

  The layout of `nn.MultiHeadDotProductAttention` (kernels `query`/`key`/`value` (width,
  heads, width/heads), `out` (heads, width/heads, width)) and the same numerics, less the
  three biases; a block names it `MultiHeadDotProductAttention_0`, as that module.
  timm's `qkv_bias=False` towers (`vit_base_patch16_224_miil`, `vit_medium_patch16_gap_*`)
  use it.
  """
  num_heads: int
  dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.xavier_uniform()

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    heads = (self.num_heads, width // self.num_heads)
    project = lambda name: nn.DenseGeneral(  # noqa: E731
        heads, axis=-1, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=self.kernel_init, name=name)(x)
    y = nn.dot_product_attention(project("query"), project("key"), project("value"),
                                 dtype=self.dtype)
    return nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, param_dtype=jnp.float32,
                           kernel_init=self.kernel_init, bias_init=nn.initializers.zeros,
                           name="out")(y)


class Encoder1DBlock(nn.Module):
  """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x)).

  Returns (x, None) so the same module serves as a body of `nn.scan`. `drop_rate` is this
  block's stochastic-depth rate (a float, or a traced scalar under scan); it is applied
  to both residual branches only when `use_drop_path` and not `deterministic`.
  layer_scale_init: a `LayerScale` on each branch before the residual sum (None: none).
  """
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  use_drop_path: bool = False
  dtype: Any = jnp.float32
  weight_init: str = "big_vision"
  layer_scale_init: Optional[float] = None
  mlp_type: str = "gelu"
  gelu_approximate: bool = True
  qkv_bias: bool = True
  layer_norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x, drop_rate, deterministic: bool = True):
    def branch(y):
      if self.layer_scale_init is not None:
        y = LayerScale(self.layer_scale_init)(y)
      if self.use_drop_path and not deterministic:
        y = common.drop_path(y, drop_rate, self.make_rng("dropout"))
      return y

    kernel_init = dense_inits(self.weight_init)[0]
    y = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=jnp.float32)(x)
    if self.qkv_bias:
      y = nn.MultiHeadDotProductAttention(
          num_heads=self.num_heads, dtype=self.dtype, param_dtype=jnp.float32,
          kernel_init=kernel_init, deterministic=True)(y, y)
    else:
      y = QKVNoBiasAttention(num_heads=self.num_heads, dtype=self.dtype,
                             kernel_init=kernel_init,
                             name="MultiHeadDotProductAttention_0")(y)
    y = nn.Dropout(rate=self.dropout)(y, deterministic)
    x = x + branch(y)

    y = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=jnp.float32)(x)
    y = MlpBlock(mlp_dim=self.mlp_dim, dropout=self.dropout, dtype=self.dtype,
                 weight_init=self.weight_init, mlp_type=self.mlp_type,
                 gelu_approximate=self.gelu_approximate)(y, deterministic)
    return x + branch(y), None


class Encoder(nn.Module):
  """`depth` blocks (`encoderblock_{i}`, or one stacked `encoderblock` when scanned) and
  the final LayerNorm `encoder_norm`.

  Stochastic depth grows linearly with depth, as in DeiT/timm: block i drops with rate
  stoch_depth * i / (depth - 1), so the first block never drops and the last uses the full
  rate (a depth-1 encoder therefore never drops).
  """
  depth: int
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  stoch_depth: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False
  remat_policy: Optional[str] = None
  scan: bool = False
  weight_init: str = "big_vision"
  layer_scale_init: Optional[float] = None
  mlp_type: str = "gelu"
  gelu_approximate: bool = True
  qkv_bias: bool = True
  layer_norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    rates = np.linspace(0.0, self.stoch_depth, self.depth)
    block = Encoder1DBlock
    if self.remat:
      # Arguments count from self=0: x=1, drop_rate=2, deterministic=3 (a Python bool).
      block = nn.remat(block, prevent_cse=not self.scan, static_argnums=(3,),
                       policy=_remat_policy(self.remat_policy))
    kw = dict(mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout=self.dropout,
              use_drop_path=self.stoch_depth > 0, dtype=self.dtype,
              weight_init=self.weight_init, layer_scale_init=self.layer_scale_init,
              mlp_type=self.mlp_type, gelu_approximate=self.gelu_approximate,
              qkv_bias=self.qkv_bias, layer_norm_eps=self.layer_norm_eps)
    if self.scan:
      scanned = nn.scan(
          block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
          in_axes=(0, nn.broadcast), length=self.depth)
      x, _ = scanned(name="encoderblock", **kw)(
          x, jnp.asarray(rates, jnp.float32), deterministic)
    else:
      for i in range(self.depth):
        x, _ = block(name=f"encoderblock_{i}", **kw)(x, float(rates[i]), deterministic)
    return nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=jnp.float32,
                        name="encoder_norm")(x)


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned probe attends over the tokens, then an MLP.

  big_vision's names: `probe` (1, 1, width), `MultiHeadDotProductAttention_0` (with
  biases), `LayerNorm_0`, `MlpBlock_0/Dense_{0,1}`; the pooled token is
  attn + MLP(LN(attn)). SigLIP's towers give it the encoder's heads and mlp_dim.
  """
  mlp_dim: int
  num_heads: int
  dtype: Any = jnp.float32
  weight_init: str = "big_vision"
  gelu_approximate: bool = True
  layer_norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x):
    n, _, d = x.shape
    timm = self.weight_init == "timm"  # The probe is a learned token, as timm's cls.
    probe_init = trunc_normal(0.02) if timm else nn.initializers.xavier_uniform()
    probe = self.param("probe", probe_init, (1, 1, d), jnp.float32)
    probe = jnp.tile(probe, [n, 1, 1]).astype(self.dtype)
    x = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=dense_inits(self.weight_init)[0], deterministic=True)(probe, x)
    y = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=jnp.float32)(x)
    x = x + MlpBlock(mlp_dim=self.mlp_dim, dtype=self.dtype, weight_init=self.weight_init,
                     gelu_approximate=self.gelu_approximate)(y)
    return x[:, 0]


def _remat_policy(name: Optional[str]):
  """None -> save nothing; else a name from `jax.checkpoint_policies`, e.g. "dots_saveable"."""
  if name is None:
    return None
  policy = getattr(jax.checkpoint_policies, name, None)
  if policy is None or name.startswith("_") or name.startswith("save_"):
    options = [p for p in dir(jax.checkpoint_policies)
               if not p.startswith(("_", "save_")) and p != "offload_dot_with_no_batch_dims"]
    raise ValueError(f"unknown remat_policy {name!r}: expected one of {', '.join(options)}")
  return policy


class Model(nn.Module):
  """ViT classifier. Size comes from `variant` ("S/16"); explicit size fields override it.

  pool_type: "gap" (mean of the patch tokens), "tok" (learned cls token at position 0,
    head reads token 0) or "map" (attention pooling with a learned probe over the patch
    tokens). As timm pools, the cls and register tokens never enter "gap" or "map".
  class_token: a learned `cls` token before the patches; None (default): only with
    pool_type="tok". True with "gap"/"map" keeps it in the encoder (timm's
    `vit_medium_patch16_gap_*`, a DINOv2 tower pooled another way).
  num_registers: learned register tokens (Darcet et al. 2024), param `reg` (1, R, width),
    placed after the cls token and before the patches ([cls, reg..., patches], as timm and
    DINOv2 order them), with no position embedding, dropped before pooling.
  posemb: "learn" (param `pos_embedding` of the h*w patches) or "sincos2d" (fixed, no
    param). Either is added before the cls token is prepended, as in big_vision: the
    original N+1 layout of vision_transformer, timm and Hugging Face checkpoints is folded
    into `cls` on load (a constant added to a constant token: logits are unchanged).
  layer_scale_init: LayerScale on both residual branches of every block, starting at this
    value (DeiT-III 1e-6 for S/B, 1e-5 for L/H; DINOv2 1e-5); None: no LayerScale.
  mlp_type: "gelu" (Dense, GELU, Dense) or "swiglu" (packed gate/value, SiLU; DINOv2-g
    with mlp_dim=4096); see `MlpBlock`.
  gelu_approximate: tanh-approximate GELU (big_vision, SigLIP, the default) or exact erf
    GELU (False: timm and Hugging Face ViT / DINOv2, whose logits it then reproduces).
  qkv_bias: biases on the query/key/value projections (the output projection keeps its).
  layer_norm_eps: every LayerNorm's epsilon: 1e-6 (big_vision, timm, DINOv2, SigLIP);
    Hugging Face's ViTConfig says 1e-12 for the same Google weights (set it to reproduce
    transformers' ViT outputs to 1e-5).
  map_num_heads / map_mlp_dim: the MAP head's heads and MLP width (default: the encoder's,
    as big_vision, timm and Hugging Face SigLIP towers have them).
  distill_token: DeiT's distillation token (Touvron et al. 2021), param `dist` (1, 1, width),
    right after the cls token ([cls, dist, reg..., patches]) and, like it, with no position
    embedding (a file's entry for it is folded into it on load); its output feeds a second
    head `head_dist` (initialised as `head`). Needs pool_type="tok". train=True returns the
    cls head's logits (what the label loss trains) with aux "logits_dist" for the
    distillation loss (`vitcls.losses`, "deit_*"); train=False returns their mean (DeiT's
    and timm's evaluation). aux has "logits_cls" and "logits_dist" either way, and
    "pre_logits" is the mean of the two tokens' features (timm's
    `forward_head(pre_logits=True)`). `dist` starts trunc_normal(.02) under either
    weight_init (DeiT's; a zero token would start equal to big_vision's zero cls).
  rep_size: int adds Dense(rep_size)+tanh ("pre_logits") before the head; True = width.
  dropout: after the position embedding and in every block (attention output, MLP).
  stoch_depth: drop-path on each residual branch, per example, rate linear in depth from 0
    (first block) to stoch_depth (last block); active only with train=True.
  dtype: compute dtype ("bfloat16" for mixed precision); params stay float32.
  remat / remat_policy: rematerialise each block in the backward pass.
  scan: one `nn.scan` over blocks, params stacked on a leading depth axis.
  head_zeroinit: zero head kernel (big_vision's); False: lecun-normal, or timm's
    trunc-normal with weight_init="timm".
  weight_init: how fresh parameters are drawn; shapes and names are the same either way.
    "big_vision": xavier-uniform block kernels, MLP biases N(0, 1e-6^2), position
      embedding N(0, 1/width), zero cls, lecun-normal patch embedding, zero biases.
    "timm": timm 0.3.2's VisionTransformer, which DeiT trains
      (timm/models/vision_transformer.py:222-252): every Dense kernel (attention,
      MLP, pre_logits, head) `trunc_normal(.02)` with zero bias, position embedding and
      cls `trunc_normal(.02)`, the patch embedding PyTorch's Conv2d default
      (`torch_default_uniform`), LayerNorms one and zero (both schemes).
    Either way registers start N(0, 1e-6^2) (timm, DINOv2) and LayerScales at
    layer_scale_init.
  """
  num_classes: Optional[int] = None
  variant: Optional[str] = None
  width: Optional[int] = None
  depth: Optional[int] = None
  mlp_dim: Optional[int] = None
  num_heads: Optional[int] = None
  patch_size: Optional[Union[int, Sequence[int]]] = None
  posemb: str = "learn"
  pool_type: str = "gap"
  rep_size: Union[int, bool] = False
  dropout: float = 0.0
  stoch_depth: float = 0.0
  dtype: Optional[str] = None
  remat: bool = False
  remat_policy: Optional[str] = None
  scan: bool = False
  head_zeroinit: bool = True
  weight_init: str = "big_vision"
  class_token: Optional[bool] = None
  num_registers: int = 0
  layer_scale_init: Optional[float] = None
  mlp_type: str = "gelu"
  gelu_approximate: bool = True
  qkv_bias: bool = True
  map_num_heads: Optional[int] = None
  map_mlp_dim: Optional[int] = None
  layer_norm_eps: float = 1e-6
  distill_token: bool = False

  def has_class_token(self) -> bool:
    """Whether the model has a `cls` token: `class_token`, else pool_type == "tok"."""
    return self.pool_type == "tok" if self.class_token is None else bool(self.class_token)

  def sizes(self) -> dict:
    """The resolved width/depth/mlp_dim/num_heads/patch_size; ValueError on bad config."""
    sizes = decode_variant(self.variant)
    for key in ("width", "depth", "mlp_dim", "num_heads", "patch_size"):
      if getattr(self, key) is not None:
        sizes[key] = getattr(self, key)
    missing = [k for k in ("width", "depth", "mlp_dim", "num_heads", "patch_size")
               if k not in sizes]
    if missing:
      raise ValueError(
          f"ViT size not given: set variant (e.g. 'S/16') or all of {', '.join(missing)}")
    patch = sizes["patch_size"]
    sizes["patch_size"] = (patch, patch) if isinstance(patch, int) else tuple(patch)
    if sizes["width"] % sizes["num_heads"]:
      raise ValueError(f"ViT width {sizes['width']} is not divisible by num_heads "
                       f"{sizes['num_heads']}")
    if self.pool_type not in POOL_TYPES:
      raise ValueError(f"unknown pool_type {self.pool_type!r}: expected one of "
                       f"{', '.join(POOL_TYPES)}")
    if self.posemb not in POSEMBS:
      raise ValueError(f"unknown posemb {self.posemb!r}: expected one of {', '.join(POSEMBS)}")
    if self.weight_init not in WEIGHT_INITS:
      raise ValueError(f"unknown weight_init {self.weight_init!r}: expected one of "
                       f"{', '.join(WEIGHT_INITS)}")
    if self.mlp_type not in MLP_TYPES:
      raise ValueError(f"unknown mlp_type {self.mlp_type!r}: expected one of "
                       f"{', '.join(MLP_TYPES)}")
    if self.pool_type == "tok" and not self.has_class_token():
      raise ValueError("pool_type='tok' reads the class token: set class_token=True (or "
                       "None), or pool_type 'gap' or 'map'")
    if self.distill_token and self.pool_type != "tok":
      raise ValueError(f"distill_token=True needs pool_type='tok' (DeiT's heads read the cls "
                       f"and distillation tokens), got pool_type={self.pool_type!r}")
    if (isinstance(self.num_registers, bool) or not isinstance(self.num_registers, int)
        or self.num_registers < 0):
      raise ValueError(f"num_registers must be an integer >= 0, got {self.num_registers!r}")
    eps = self.layer_norm_eps
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
      raise ValueError(f"layer_norm_eps must be a positive number, got {eps!r}")
    ls = self.layer_scale_init
    if ls is not None and (isinstance(ls, bool) or not isinstance(ls, (int, float))
                           or not math.isfinite(ls) or ls <= 0):
      raise ValueError(f"layer_scale_init must be a positive number or None, got {ls!r}")
    sizes["map_num_heads"] = self.map_num_heads or sizes["num_heads"]
    sizes["map_mlp_dim"] = self.map_mlp_dim or sizes["mlp_dim"]
    if sizes["width"] % sizes["map_num_heads"]:
      raise ValueError(f"ViT width {sizes['width']} is not divisible by map_num_heads "
                       f"{sizes['map_num_heads']}")
    return sizes

  def validate(self) -> None:
    """Checks every field before anything is traced; ValueError names the bad one."""
    self.sizes()
    common.as_dtype(self.dtype)
    _remat_policy(self.remat_policy)

  @nn.compact
  def __call__(self, images, train: bool = False):
    sizes = self.sizes()
    width, dtype = sizes["width"], common.as_dtype(self.dtype)
    _remat_policy(self.remat_policy)  # Validate even when remat is off.
    out = {}

    timm = self.weight_init == "timm"
    embed_init = {}
    if timm:  # fan_in of the patch convolution: patch height x width x input channels.
      uniform = torch_default_uniform(math.prod(sizes["patch_size"]) * images.shape[-1])
      embed_init = dict(kernel_init=uniform, bias_init=uniform)
    x = nn.Conv(width, sizes["patch_size"], strides=sizes["patch_size"], padding="VALID",
                dtype=dtype, param_dtype=jnp.float32, name="embedding", **embed_init)(
                    jnp.asarray(images, dtype))
    n, h, w, _ = x.shape
    out["stem"] = x.astype(jnp.float32)
    x = x.reshape(n, h * w, width)

    if self.posemb == "sincos2d":
      x = x + posemb_sincos_2d(h, w, width).astype(dtype)
    else:
      pos_init = trunc_normal(0.02) if timm else nn.initializers.normal(stddev=width ** -0.5)
      pos = self.param("pos_embedding", pos_init, (1, h * w, width), jnp.float32)
      x = x + pos.astype(dtype)
    prefix = []  # After the posemb, as big_vision: cls and registers have none.
    if self.has_class_token():
      cls = self.param("cls", trunc_normal(0.02) if timm else nn.initializers.zeros,
                       (1, 1, width), jnp.float32)
      prefix.append(cls)
    if self.distill_token:
      prefix.append(self.param("dist", trunc_normal(0.02), (1, 1, width), jnp.float32))
    if self.num_registers:
      prefix.append(self.param("reg", nn.initializers.normal(stddev=1e-6),
                               (1, self.num_registers, width), jnp.float32))
    if prefix:
      x = jnp.concatenate([jnp.tile(t.astype(dtype), [n, 1, 1]) for t in prefix] + [x],
                          axis=1)
    x = nn.Dropout(rate=self.dropout)(x, not train)

    x = Encoder(
        depth=sizes["depth"], mlp_dim=sizes["mlp_dim"], num_heads=sizes["num_heads"],
        dropout=self.dropout, stoch_depth=self.stoch_depth, dtype=dtype, remat=self.remat,
        remat_policy=self.remat_policy, scan=self.scan, weight_init=self.weight_init,
        layer_scale_init=self.layer_scale_init, mlp_type=self.mlp_type,
        gelu_approximate=self.gelu_approximate, qkv_bias=self.qkv_bias,
        layer_norm_eps=self.layer_norm_eps, name="Transformer")(
            x, deterministic=not train)
    out["encoded"] = x.astype(jnp.float32)

    num_prefix = int(self.has_class_token()) + int(self.distill_token) + self.num_registers
    if self.pool_type == "tok":
      x = x[:, :2] if self.distill_token else x[:, 0]  # [cls, dist] share pre_logits.
    elif self.pool_type == "gap":
      x = jnp.mean(x[:, num_prefix:] if num_prefix else x, axis=1)
    else:
      x = MAPHead(mlp_dim=sizes["map_mlp_dim"], num_heads=sizes["map_num_heads"],
                  dtype=dtype, weight_init=self.weight_init,
                  gelu_approximate=self.gelu_approximate,
                  layer_norm_eps=self.layer_norm_eps)(
                      x[:, num_prefix:] if num_prefix else x)

    rep_size = width if self.rep_size is True else self.rep_size
    dense_init = dict(kernel_init=trunc_normal(0.02)) if timm else {}
    if rep_size:
      x = nn.tanh(nn.Dense(rep_size, dtype=dtype, param_dtype=jnp.float32,
                           name="pre_logits", **dense_init)(x))
    features = x.astype(jnp.float32)
    out["pre_logits"] = jnp.mean(features, axis=1) if self.distill_token else features

    if not self.num_classes:
      out["logits"] = out["pre_logits"]
      return out["pre_logits"], out
    init = dense_init.get("kernel_init", nn.initializers.lecun_normal())
    init = nn.initializers.zeros if self.head_zeroinit else init
    head = lambda name, y: nn.Dense(  # noqa: E731
        self.num_classes, dtype=dtype, param_dtype=jnp.float32, kernel_init=init,
        bias_init=nn.initializers.zeros, name=name)(y).astype(jnp.float32)
    if not self.distill_token:
      out["logits"] = head("head", x)
      return out["logits"], out
    out["logits_cls"], out["logits_dist"] = head("head", x[:, 0]), head("head_dist", x[:, 1])
    logits = out["logits_cls"] if train else (out["logits_cls"] + out["logits_dist"]) / 2
    out["logits"] = logits
    return logits, out


def _to_current_layout(params: dict) -> dict:
  """Any ViT checkpoint's tree -> the current big_vision / vitcls names.

  vision_transformer's pre-linen names (`MultiHeadDotProductAttention_1`, `MlpBlock_3`,
  `LayerNorm_2`) are renumbered per module type by flax's own converter; its position
  embedding moves from `Transformer/posembed_input` (or `Transformer/`) to the top level;
  and an N+1 embedding whose first entry belongs to the cls token (N+2: cls, then a
  distillation token `dist`) is folded into those tokens (the model adds them after the
  position embedding, so logits are unchanged).
  """
  from flax.training import checkpoints  # pylint: disable=g-import-not-at-top
  params = checkpoints.convert_pre_linen(params)
  params = jax.tree_util.tree_map(np.asarray, dict(params))
  encoder = dict(params.get("Transformer", {}))
  inside = encoder.pop("posembed_input", {}).get("pos_embedding")
  if inside is None:
    inside = encoder.pop("pos_embedding", None)
  if encoder:
    params["Transformer"] = encoder
  if inside is not None:
    params["pos_embedding"] = inside
  pos = params.get("pos_embedding")
  if pos is not None and "cls" in params:
    n, tokens = pos.shape[1], ["cls"] + (["dist"] if "dist" in params else [])
    k = len(tokens)
    with_tokens = n > k and math.isqrt(n - k) ** 2 == n - k and math.isqrt(n) ** 2 != n
    if inside is not None or with_tokens:
      for i, name in enumerate(tokens):
        params[name] = params[name] + pos[:, i:i + 1]
      params["pos_embedding"] = pos[:, k:]
  return params


def _match_scan(params: dict, scan: bool) -> dict:
  """Stacks `encoderblock_i` into one `encoderblock` (scan) or splits it, as the model needs."""
  encoder = dict(params.get("Transformer", {}))
  if scan and "encoderblock" not in encoder and "encoderblock_0" in encoder:
    depth = sum(1 for k in encoder if k.startswith("encoderblock_"))
    blocks = [encoder.pop(f"encoderblock_{i}") for i in range(depth)]
    encoder["encoderblock"] = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *blocks)
  elif not scan and "encoderblock" in encoder:
    stacked = encoder.pop("encoderblock")
    depth = len(jax.tree_util.tree_leaves(stacked)[0])
    for i in range(depth):
      encoder[f"encoderblock_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], stacked)
  return dict(params, Transformer=encoder)


def _square_grid(n: int, what: str) -> tuple[int, int]:
  side = math.isqrt(n)
  if side * side != n:
    raise loading.CheckpointError(
        f"cannot resample the position embedding: the {what} has {n} patch entries, which "
        f"is not a square grid; use images that give a square patch grid")
  return side, side


def resample_posemb(old, new_length: int):
  """(1, N, D) embeddings of a square grid -> (1, new_length, D), bilinear (scipy zoom 1)."""
  old = np.asarray(old)
  if old.shape[1] == new_length:
    return old
  h, w = _square_grid(old.shape[1], "checkpoint")
  grid = loading.resample_grid(old.reshape(h, w, -1),
                               _square_grid(new_length, "model"))
  logging.info("Position embedding resampled from a %dx%d grid to %s.", h, w,
               "x".join(map(str, grid.shape[:2])))
  return np.asarray(grid).reshape(1, new_length, -1)


def _image_tower(tree: dict) -> dict:
  """The image tower of a big_vision two-tower (SigLIP, LiT) tree: its `img/` subtree."""
  if isinstance(tree.get("img"), dict) and ("txt" in tree or "t" in tree):
    logging.info("Loading the image tower (img/) of a two-tower checkpoint.")
    return tree["img"]
  return tree


def _heads(tree) -> int:
  """The attention heads of a ViT tree's first block (or of a MAPHead_0 subtree)."""
  if not isinstance(tree, dict):
    return 1
  attention = tree.get("MultiHeadDotProductAttention_0")
  if attention is None:
    encoder = tree.get("Transformer", {})
    block = encoder.get("encoderblock", encoder.get("encoderblock_0", {}))
    attention = block.get("MultiHeadDotProductAttention_0", {})
  kernel = attention.get("query", {}).get("kernel")
  return int(np.shape(kernel)[-2]) if kernel is not None else 1


def _first_block(tree: dict) -> dict:
  encoder = tree.get("Transformer", {})
  return encoder.get("encoderblock", encoder.get("encoderblock_0", {}))


def _check_options(restored: dict, init: dict, what: str, dont_load: Sequence[str]) -> None:
  """One line naming the config field to set when the file has a part the model lacks (or
  the other way round): registers, LayerScale, SwiGLU, q/k/v biases, distillation token,
  cls token, MAP head."""
  skip = [re.compile(p) for p in dont_load]
  skipped = lambda path: any(p.fullmatch(path) for p in skip)  # noqa: E731
  fix = "set config.model.{} to load it".format
  file_reg = np.shape(restored["reg"])[1] if "reg" in restored else 0
  model_reg = np.shape(init["reg"])[1] if "reg" in init else 0
  if file_reg != model_reg and not skipped("reg"):
    raise loading.CheckpointError(
        f"the '{what}' has {file_reg} register tokens but the model {model_reg}: "
        f"{fix(f'num_registers={file_reg}')}")
  fb, mb = _first_block(restored), _first_block(init)
  if fb and mb:
    if ("LayerScale_0" in fb) != ("LayerScale_0" in mb) and not skipped(
        ".*/LayerScale_0/scale"):
      raise loading.CheckpointError(
          f"the '{what}' has LayerScale (per-channel scales on the residual branches): "
          f"{fix('layer_scale_init (e.g. 1e-5; the file gives the values)')}"
          if "LayerScale_0" in fb else
          f"the '{what}' has no LayerScale but the model has: {fix('layer_scale_init=None')}")

    def glu(block):
      dense = block.get("MlpBlock_0", {})
      d0, d1 = dense.get("Dense_0", {}).get("kernel"), dense.get("Dense_1", {}).get("kernel")
      return None if d0 is None or d1 is None else np.shape(d0)[-1] == 2 * np.shape(d1)[-2]
    if None not in (glu(fb), glu(mb)) and glu(fb) != glu(mb):
      kind = "swiglu" if glu(fb) else "gelu"
      raise loading.CheckpointError(
          f"the '{what}' has a {'SwiGLU (packed gate and value)' if glu(fb) else 'GELU'} "
          f"MLP: {fix(f'mlp_type={kind!r}')}")
    has_bias = lambda b: "bias" in b.get("MultiHeadDotProductAttention_0", {}).get(  # noqa: E731
        "query", {})
    if has_bias(fb) != has_bias(mb) and not skipped(".*/query/bias"):
      raise loading.CheckpointError(
          f"the '{what}' has {'' if has_bias(fb) else 'no '}query/key/value biases: "
          f"{fix(f'qkv_bias={has_bias(fb)}')}")
  if ("dist" in restored) != ("dist" in init) and not skipped("dist"):
    raise loading.CheckpointError(
        f"the '{what}' has a distillation token and head (DeiT distilled): set "
        f"config.model.distill_token=True to load it" if "dist" in restored else
        f"the '{what}' has no distillation token: set config.model.distill_token=False, or "
        f"add 'dist' and 'head_dist/.*' to config.model_load.dont_load to train fresh ones")
  if "cls" in init and "cls" not in restored and not skipped("cls"):
    raise loading.CheckpointError(
        f"the '{what}' has no class token: set config.model.class_token=False and "
        f"pool_type 'map' or 'gap'")
  if "MAPHead_0" in init and "MAPHead_0" not in restored and not skipped("MAPHead_0/probe"):
    raise loading.CheckpointError(
        f"the '{what}' has no MAP head: set config.model.pool_type to 'tok' or 'gap', or add "
        f"'MAPHead_0/.*' to config.model_load.dont_load to train a fresh one")


def load(init_params, checkpoint, model_cfg, dont_load: Sequence[str] = (),
         origin: str = "") -> dict:
  """Parameters for a model of `model_cfg` from a checkpoint, adapted to it.

  `checkpoint`: a params tree (e.g. a vitcls workdir's, read by the caller), or the path
  of a vision_transformer / AugReg or big_vision `.npz` (bare, or under `params/`;
  per-block or stacked blocks; of a two-tower SigLIP / LiT file, its `img/` tower), or of
  a timm / Hugging Face `.safetensors` ViT state dict (converted by
  `vitcls.models.vit_torch`); `origin` names it in messages (default: the path).
  Adapting: blocks stacked or split to match `model_cfg.scan`; the position embedding
  resampled to the model's patch grid (bilinear, `resample_posemb`); `pre_logits` dropped
  when the model has no `rep_size` (the head, trained on its output, is then fresh too);
  the head (and `head_dist`) kept from `init_params` when its shape differs (another class
  count) or `dont_load` names it. A file with registers, LayerScale, a SwiGLU MLP, q/k/v
  biases, a cls token, a distillation token or a MAP head the model's config does not
  match is one CheckpointError naming the config field to set; any other mismatch one
  naming the parameter and both shapes.
  """
  what = loading.describe(checkpoint, origin)
  restored = loading.read_params(checkpoint)
  if loading.is_torch_layout(restored):
    from vitcls.models import vit_torch  # pylint: disable=g-import-not-at-top
    grid = np.shape(init_params["pos_embedding"])[1] if "pos_embedding" in init_params else None
    restored, layout = vit_torch.convert(
        restored, _heads(init_params), _heads(init_params.get("MAPHead_0")), grid, what)
    if layout.exact_gelu == bool(model_cfg.get("gelu_approximate", True)):
      logging.info("%s computes GELU %s: set config.model.gelu_approximate=%s to reproduce "
                   "its outputs exactly.", layout.name,
                   "exactly (erf)" if layout.exact_gelu else "with the tanh approximation",
                   not layout.exact_gelu)
    if layout.layer_norm_eps != model_cfg.get("layer_norm_eps", 1e-6):
      logging.info("%s's LayerNorms use eps %g: set config.model.layer_norm_eps=%g to "
                   "reproduce its outputs exactly.", layout.name, layout.layer_norm_eps,
                   layout.layer_norm_eps)
  else:
    restored = _to_current_layout(_image_tower(restored))
  restored = _match_scan(restored, bool(model_cfg.get("scan", False)))
  _check_options(restored, init_params, what, dont_load)
  fresh = [r"head/.*", r"head_dist/.*"]
  if "pre_logits" in restored and "pre_logits" not in init_params:
    logging.info("Dropping pre_logits of %s: the model has no rep_size.", what)
    del restored["pre_logits"]
    restored.pop("head", None)
    restored.pop("head_dist", None)
  if "pos_embedding" in restored and "pos_embedding" in init_params:
    restored["pos_embedding"] = resample_posemb(restored["pos_embedding"],
                                                np.shape(init_params["pos_embedding"])[1])
  return loading.merge(restored, init_params, dont_load, fresh=fresh, source=f"'{what}'")


def layer_ids(params) -> tuple[dict, int]:
  """Each parameter's layer for layer-wise lr decay (`config.layer_decay`), and the top L.

  BEiT's numbering (`get_num_layer_for_vit` in its fine-tuning code), which DeiT-III and
  DINOv2 fine-tuning reuse: the patch embedding, position embedding, cls, distillation and
  register tokens are layer 0, block i is layer i+1, everything after the blocks (final
  norm, MAP head, pre_logits, head, head_dist) is layer L = depth+1, so the optimiser's factor
  `layer_decay ** (L - id)` is 1 at the head. Stacked (`scan`) blocks get an int array of
  shape (depth,): one layer per slice along their leading axis.
  """
  encoder = params.get("Transformer", {})
  if "encoderblock" in encoder:
    depth = len(jax.tree_util.tree_leaves(encoder["encoderblock"])[0])
  else:
    depth = sum(1 for k in encoder if k.startswith("encoderblock_"))
  top = depth + 1

  def block_id(name):
    if name == "encoderblock":
      return np.arange(1, depth + 1)
    if name.startswith("encoderblock_"):
      return int(name[len("encoderblock_"):]) + 1
    return top  # encoder_norm.

  ids = {}
  for name, sub in params.items():
    if name == "Transformer":
      ids[name] = {k: _constant_tree(v, block_id(k)) for k, v in sub.items()}
    else:
      ids[name] = _constant_tree(
          sub, 0 if name in ("embedding", "pos_embedding", "cls", "dist", "reg") else top)
  return ids, top


def _constant_tree(tree, value):
  """`tree` with every leaf replaced by `value`."""
  return jax.tree_util.tree_map(lambda _: value, tree)
