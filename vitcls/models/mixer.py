"""MLP-Mixer (Tolstikhin et al. 2021) as a Flax linen module.

`Model(num_classes=1000, variant="B/16")` is the paper's Mixer-B/16 with the parameter names
of google-research/vision_transformer (`vit_jax/models_mixer.py` at c6de1e5) and big_vision
(`big_vision/models/mlp_mixer.py` at 0127fb6), so their `.npz` checkpoints load by name:
  stem                               patch embedding, a Conv with stride = kernel = patch
                                     (models_mixer.py:61-62, mlp_mixer.py:72-73);
  MixerBlock_{i}/LayerNorm_0         before the token-mixing MLP (mlp_mixer.py:48);
  MixerBlock_{i}/token_mixing/Dense_{0,1}    MLP over the tokens: the normalised tokens
                                     transposed to (N, C, T), Dense(tokens_mlp_dim), GELU,
                                     Dense(T), transposed back (mlp_mixer.py:49-51, :30-37);
  MixerBlock_{i}/LayerNorm_1         before the channel-mixing MLP (mlp_mixer.py:53);
  MixerBlock_{i}/channel_mixing/Dense_{0,1}  Dense(channels_mlp_dim), GELU, Dense(C) (:54);
  pre_head_layer_norm                final LayerNorm (models_mixer.py:66), then the mean
                                     over tokens (:67);
  head                               zero-initialised kernel by default (:69-70).
Numerics are flax's defaults as upstream: LayerNorm eps 1e-6, tanh-approximate `nn.gelu`,
lecun-normal kernels and zero biases. Every config key is a dataclass field, named as
big_vision's (`hidden_dim`, `num_blocks`, ...), so `Model(num_classes, **config.model)`
needs no translation layer.

`apply({'params': p}, images, train=...)` takes NHWC images in [-1, 1] and returns
`(logits, aux)`; aux holds "stem" (patch grid), "encoded" (tokens after the final
LayerNorm), "pre_logits" (their mean) and "logits". The token-mixing MLP's shapes fix the
number of patches, so a model is tied to one image size; `load` refuses another in one line.
"""

from typing import Any, Optional, Sequence, Union

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitcls.models import common, loading

# name: (hidden_dim, num_blocks, tokens_mlp_dim, channels_mlp_dim): the paper's Table 1,
# as big_vision mlp_mixer.py:93-118 and vision_transformer configs/models.py:336-367.
VARIANTS = {
    "S": (512, 8, 256, 2048),
    "B": (768, 12, 384, 3072),
    "L": (1024, 24, 512, 4096),
    "H": (1280, 32, 640, 5120),
}
SIZE_FIELDS = ("hidden_dim", "num_blocks", "tokens_mlp_dim", "channels_mlp_dim", "patch_size")
# What `vitcls.validate` checks of the fields' values before flax loads (read from this
# source: see `vitcls.models.field_rules`).
FIELD_RULES = {
    "variant": VARIANTS, "hidden_dim": "positive", "num_blocks": "positive",
    "tokens_mlp_dim": "positive", "channels_mlp_dim": "positive", "patch_size": "patch",
    "stoch_depth": "rate",
}


def decode_variant(variant: Optional[str]) -> dict:
  """"B/16" -> dict(hidden_dim=768, num_blocks=12, tokens_mlp_dim=384,
  channels_mlp_dim=3072, patch_size=(16, 16)); None gives {}; anything else that is not
  NAME/PATCH with a known NAME and a positive integer PATCH raises ValueError in one line.
  """
  if variant is None:
    return {}
  name, _, patch = variant.partition("/") if isinstance(variant, str) else ("", "", "")
  if name not in VARIANTS or not patch.isdigit() or int(patch) <= 0:
    raise ValueError(f"unknown Mixer variant {variant!r}: expected NAME/PATCH with NAME in "
                     f"{', '.join(VARIANTS)} (e.g. 'B/16')")
  return dict(zip(SIZE_FIELDS, VARIANTS[name] + ((int(patch), int(patch)),)))


class MlpBlock(nn.Module):
  """Dense(mlp_dim) -> GELU -> Dense(back to the input's last dimension)."""
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = nn.Dense(self.mlp_dim, dtype=self.dtype, param_dtype=jnp.float32)(x)
    y = nn.gelu(y)
    return nn.Dense(x.shape[-1], dtype=self.dtype, param_dtype=jnp.float32)(y)


class MixerBlock(nn.Module):
  """x + TokenMLP(LN(x)^T)^T, then x + ChannelMLP(LN(x)), on (N, tokens, channels).

  `drop_rate` is this block's stochastic-depth rate, applied to both residual branches
  with `common.drop_path` when not `deterministic`. Unlike big_vision's mask
  (mlp_mixer.py:173-177, a bare 0/1 factor), kept examples are scaled by 1/(1-rate), as in
  vitcls's ViT, so training and inference agree in expectation.
  """
  tokens_mlp_dim: int
  channels_mlp_dim: int
  drop_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    def branch(y):
      if self.drop_rate > 0 and not deterministic:
        y = common.drop_path(y, self.drop_rate, self.make_rng("dropout"))
      return y

    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=jnp.float32)(x)
    y = jnp.swapaxes(y, 1, 2)
    y = MlpBlock(self.tokens_mlp_dim, dtype=self.dtype, name="token_mixing")(y)
    x = x + branch(jnp.swapaxes(y, 1, 2))
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=jnp.float32)(x)
    y = MlpBlock(self.channels_mlp_dim, dtype=self.dtype, name="channel_mixing")(y)
    return x + branch(y)


class Model(nn.Module):
  """MLP-Mixer classifier. Size comes from `variant` ("B/16"); size fields override it.

  hidden_dim / num_blocks / tokens_mlp_dim / channels_mlp_dim / patch_size: the sizes
    (big_vision's names); patch_size an int or (height, width).
  stoch_depth: drop-path on each residual branch, per example, rate linear in depth from 0
    (first block) to stoch_depth (last block), as big_vision mlp_mixer.py:76; active only
    with train=True.
  dtype: compute dtype ("bfloat16" for mixed precision); params stay float32.
  head_zeroinit: zero head kernel (both upstreams'); False: lecun-normal.
  num_classes: 0/None means no head; logits are then the pre_logits.
  """
  num_classes: Optional[int] = None
  variant: Optional[str] = None
  hidden_dim: Optional[int] = None
  num_blocks: Optional[int] = None
  tokens_mlp_dim: Optional[int] = None
  channels_mlp_dim: Optional[int] = None
  patch_size: Optional[Union[int, Sequence[int]]] = None
  stoch_depth: float = 0.0
  dtype: Optional[str] = None
  head_zeroinit: bool = True

  def sizes(self) -> dict:
    """The resolved size fields, patch_size as (height, width); ValueError on bad config."""
    sizes = decode_variant(self.variant)
    sizes.update({k: getattr(self, k) for k in SIZE_FIELDS if getattr(self, k) is not None})
    missing = [k for k in SIZE_FIELDS if k not in sizes]
    if missing:
      raise ValueError(f"Mixer size not given: set variant (e.g. 'B/16') or all of "
                       f"{', '.join(missing)}")
    patch = sizes["patch_size"]
    sizes["patch_size"] = (patch, patch) if isinstance(patch, int) else tuple(patch)
    return sizes

  def validate(self) -> None:
    """Checks every field before anything is traced; ValueError names the bad one."""
    self.sizes()
    common.as_dtype(self.dtype)
    if not 0 <= self.stoch_depth <= 1:
      raise ValueError(f"stoch_depth must be in [0, 1], got {self.stoch_depth!r}")

  @nn.compact
  def __call__(self, images, train: bool = False):
    self.validate()
    sizes, dtype = self.sizes(), common.as_dtype(self.dtype)
    out = {}
    x = nn.Conv(sizes["hidden_dim"], sizes["patch_size"], strides=sizes["patch_size"],
                padding="VALID", dtype=dtype, param_dtype=jnp.float32, name="stem")(
                    jnp.asarray(images, dtype))
    out["stem"] = x.astype(jnp.float32)
    n, h, w, c = x.shape
    x = x.reshape(n, h * w, c)
    depth = sizes["num_blocks"]
    for i in range(depth):
      rate = self.stoch_depth * i / max(depth - 1, 1)
      x = MixerBlock(sizes["tokens_mlp_dim"], sizes["channels_mlp_dim"], drop_rate=rate,
                     dtype=dtype, name=f"MixerBlock_{i}")(x, deterministic=not train)
    x = nn.LayerNorm(epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32,
                     name="pre_head_layer_norm")(x)
    out["encoded"] = x.astype(jnp.float32)
    x = jnp.mean(x, axis=1)
    out["pre_logits"] = x.astype(jnp.float32)
    if self.num_classes:
      init = nn.initializers.zeros if self.head_zeroinit else nn.initializers.lecun_normal()
      x = nn.Dense(self.num_classes, dtype=dtype, param_dtype=jnp.float32,
                   kernel_init=init, name="head")(x)
    logits = x.astype(jnp.float32)
    out["logits"] = logits
    return logits, out


def _to_current_layout(params: dict) -> dict:
  """Any Mixer checkpoint's tree -> the names above.

  flax's `convert_pre_linen` renumbers pre-linen names per module type, as
  vision_transformer's loader does (checkpoint.py:76). big_vision also reads an older
  layout (mlp_mixer.py:144-165): `embedding`, `Mixer/encoder_norm` and
  `Mixer/encoderblock_{i}/{token,channel}_mixing_phase_0/{kernel,bias}{1,2}`, the latter
  with size-1 axes that are squeezed; it is mapped the same way here.
  """
  from flax.training import checkpoints  # pylint: disable=g-import-not-at-top
  params = jax.tree_util.tree_map(np.asarray, dict(checkpoints.convert_pre_linen(params)))
  if "Mixer" not in params:
    return params
  old = dict(params.pop("Mixer"))
  params["pre_head_layer_norm"] = old.pop("encoder_norm")
  params["stem"] = params.pop("embedding")

  def dense(d):
    return {f"Dense_{j}": {"kernel": np.squeeze(d[f"kernel{j + 1}"]),
                           "bias": np.squeeze(d[f"bias{j + 1}"])} for j in range(2)}

  for name, block in old.items():
    if not name.startswith("encoderblock_"):
      raise loading.CheckpointError(f"unexpected parameter 'Mixer/{name}' in a Mixer "
                                    f"checkpoint: expected encoderblock_N")
    block = dict(block)
    block["token_mixing"] = dense(block.pop("token_mixing_phase_0"))
    block["channel_mixing"] = dense(block.pop("channel_mixing_phase_0"))
    params["MixerBlock_" + name[len("encoderblock_"):]] = block
  return params


def _grid(params: dict) -> Optional[tuple]:
  """(patch height, patch width, number of tokens) a params tree was made for."""
  try:
    stem = np.shape(params["stem"]["kernel"])
    tokens = np.shape(params["MixerBlock_0"]["token_mixing"]["Dense_0"]["kernel"])[0]
  except (KeyError, TypeError):
    return None
  return stem[0], stem[1], tokens


def load(init_params, checkpoint, model_cfg, dont_load: Sequence[str] = (),
         origin: str = "") -> dict:
  """Parameters for a model of `model_cfg` from a vision_transformer / big_vision Mixer
  `.npz` (or a params tree; `origin` names it in messages), loaded by name.

  Nothing is resampled: the token-mixing MLP is as wide as the patch grid, so a checkpoint
  of another patch or image size is refused in one line. The head is kept from
  `init_params` when its shape differs (another class count) or `dont_load` names it; any
  other mismatch is one CheckpointError naming the parameter and both shapes.
  """
  del model_cfg  # The init params say everything about the model's shapes.
  what = loading.describe(checkpoint, origin)
  restored = _to_current_layout(loading.read_params(checkpoint))
  have, want = _grid(restored), _grid(init_params)
  if have and want and have != want:
    raise loading.CheckpointError(
        f"'{what}' is a Mixer for {have[0]}x{have[1]} patches and {have[2]} tokens but the "
        f"model has {want[0]}x{want[1]} patches and {want[2]} tokens: Mixer cannot be "
        f"resampled, use its patch size and image size")
  logging.info("Loading Mixer parameters from %s.", what)
  return loading.merge(restored, init_params, dont_load, fresh=[r"head/.*"],
                       source=f"'{what}'")
