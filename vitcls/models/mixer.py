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
needs no translation layer. timm's `MlpMixer` (timm/models/mlp_mixer.py), whose
`mixer_*` weights are these checkpoints ported to PyTorch, computes the same network with
exact (erf) GELU; `load` also reads its state dict (`.safetensors`), and
`gelu_approximate=False` computes as timm does.

`apply({'params': p}, images, train=...)` takes NHWC images in [-1, 1] and returns
`(logits, aux)`; aux holds "stem" (patch grid), "encoded" (tokens after the final
LayerNorm), "pre_logits" (their mean) and "logits". The token-mixing MLP's shapes fix the
number of patches, so a model is tied to one image size; `load` refuses another in one line.
"""

import re
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
  """Dense(mlp_dim) -> GELU (tanh-approximate or exact) -> Dense(back to the input's
  last dimension)."""
  mlp_dim: int
  dtype: Any = jnp.float32
  gelu_approximate: bool = True

  @nn.compact
  def __call__(self, x):
    y = nn.Dense(self.mlp_dim, dtype=self.dtype, param_dtype=jnp.float32)(x)
    y = nn.gelu(y, approximate=self.gelu_approximate)
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
  gelu_approximate: bool = True

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    def branch(y):
      if self.drop_rate > 0 and not deterministic:
        y = common.drop_path(y, self.drop_rate, self.make_rng("dropout"))
      return y

    mlp = lambda dim, name: MlpBlock(  # noqa: E731
        dim, dtype=self.dtype, gelu_approximate=self.gelu_approximate, name=name)
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=jnp.float32)(x)
    y = jnp.swapaxes(y, 1, 2)
    y = mlp(self.tokens_mlp_dim, "token_mixing")(y)
    x = x + branch(jnp.swapaxes(y, 1, 2))
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=jnp.float32)(x)
    y = mlp(self.channels_mlp_dim, "channel_mixing")(y)
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
  gelu_approximate: True: tanh-approximate GELU, as vision_transformer and big_vision
    trained their checkpoints; False: exact (erf) GELU, as timm's MlpMixer computes
    (torch's nn.GELU), for its weights to give timm's logits.
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
  gelu_approximate: bool = True

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
    if not isinstance(self.gelu_approximate, bool):
      raise ValueError(f"gelu_approximate must be true or false, got "
                       f"{self.gelu_approximate!r}")

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
                     dtype=dtype, gelu_approximate=self.gelu_approximate,
                     name=f"MixerBlock_{i}")(x, deterministic=not train)
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


# timm's MlpMixer state dict (timm/models/mlp_mixer.py: `stem` a PatchEmbed, `blocks.i`
# MixerBlocks of norm1, mlp_tokens, norm2, mlp_channels (timm Mlps: fc1, fc2), `norm`,
# `head`): a regex on the name without its last part -> the module here.
_TIMM_MODULES = (
    (r"stem\.proj", lambda m: "stem"),
    (r"blocks\.(\d+)\.norm([12])", lambda m: f"MixerBlock_{m[1]}/LayerNorm_{int(m[2]) - 1}"),
    (r"blocks\.(\d+)\.mlp_(token|channel)s\.fc([12])",
     lambda m: f"MixerBlock_{m[1]}/{m[2]}_mixing/Dense_{int(m[3]) - 1}"),
    (r"norm", lambda m: "pre_head_layer_norm"),
    (r"head", lambda m: "head"),
)


def _from_timm(state_dict: dict, what: str) -> dict:
  """timm's `mixer_*` state dict (dotted PyTorch names) -> the tree above.

  Conv weights (out, in, kh, kw) become HWIO kernels, Linear weights (out, in) become
  (in, out) kernels, LayerNorm weights scales; biases stay. A name timm's MlpMixer does
  not have (a ResMLP or gMLP's, a stem norm) is refused in one line.
  """
  flat = {}
  for name, value in state_dict.items():
    module, _, kind = name.rpartition(".")
    path = None
    for pattern, to_path in _TIMM_MODULES:
      match = re.fullmatch(pattern, module)
      if match:
        path = to_path(match)
        break
    if path is None or kind not in ("weight", "bias"):
      raise loading.CheckpointError(
          f"'{what}' has parameter '{name}', which timm's MlpMixer (mixer_*) does not: "
          f"it is not a timm Mixer state dict (ResMLP and gMLP are other networks)")
    value = np.asarray(value)
    if kind == "bias":
      flat[f"{path}/bias"] = value
    elif value.ndim == 4:
      flat[f"{path}/kernel"] = value.transpose(2, 3, 1, 0)
    elif value.ndim == 2:
      flat[f"{path}/kernel"] = value.T
    else:
      flat[f"{path}/scale"] = value
  return loading.unflatten(flat)


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
  `.npz`, a timm `mixer_*` `.safetensors` state dict (or a params tree of either;
  `origin` names it in messages), loaded by name.

  Nothing is resampled: the token-mixing MLP is as wide as the patch grid, so a checkpoint
  of another patch or image size is refused in one line. The head is kept from
  `init_params` when its shape differs (another class count) or `dont_load` names it; any
  other mismatch is one CheckpointError naming the parameter and both shapes. timm
  weights load into a model of tanh-approximate GELU (the default) with a warning, as its
  logits then differ slightly from timm's: `gelu_approximate=False` gives timm's. Which
  GELU a JAX checkpoint was trained with, its file does not say (upstream's: tanh).
  """
  what = loading.describe(checkpoint, origin)
  params = loading.read_params(checkpoint)
  timm = loading.is_torch_layout(params)
  restored = _from_timm(params, what) if timm else _to_current_layout(params)
  if timm and model_cfg.get("gelu_approximate", True):
    logging.warning("%s is a timm Mixer, trained with exact GELU, but the model computes "
                    "tanh-approximate GELU: set config.model.gelu_approximate=False to "
                    "give timm's logits.", what)
  have, want = _grid(restored), _grid(init_params)
  if have and want and have != want:
    raise loading.CheckpointError(
        f"'{what}' is a Mixer for {have[0]}x{have[1]} patches and {have[2]} tokens but the "
        f"model has {want[0]}x{want[1]} patches and {want[2]} tokens: Mixer cannot be "
        f"resampled, use its patch size and image size")
  logging.info("Loading Mixer parameters from %s.", what)
  return loading.merge(restored, init_params, dont_load, fresh=[r"head/.*"],
                       source=f"'{what}'")


def layer_ids(params) -> tuple[dict, int]:
  """Each parameter's layer for layer-wise lr decay (`config.layer_decay`), and the top L.

  As `vitcls.models.vit.layer_ids` numbers a ViT: the patch embedding (`stem`) is layer
  0, `MixerBlock_i` is layer i+1, and what follows the blocks (`pre_head_layer_norm`,
  `head`) is layer L = num_blocks + 1, where the optimiser's factor
  `layer_decay ** (L - id)` is 1.
  """
  top = sum(1 for name in params if name.startswith("MixerBlock_")) + 1

  def layer(name):
    if name == "stem":
      return 0
    if name.startswith("MixerBlock_"):
      return int(name[len("MixerBlock_"):]) + 1
    return top

  def constant(tree, value):
    return jax.tree_util.tree_map(lambda _: value, tree)

  return {name: constant(sub, layer(name)) for name, sub in params.items()}, top
