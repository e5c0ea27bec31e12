"""ConvNeXt and ConvNeXt V2: parameter counts, PyTorch state dicts through a NumPy forward
pass, checkpoint loading, layer ids, stochastic depth, config checks.

Each test compares the model with something computed independently here: a closed form of
the layer shapes and timm's published counts, the references' maths in NumPy on NCHW
tensors under timm's names, the official fine-tuning's layer numbering, or the logits of
the same parameters before they went through a file.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file
from scipy.special import erf

from vitcls import configs, models, validate
from vitcls.models import convnext, loading

TINY = dict(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32))
CLASSES = 5


def _images(size=72, n=2, seed=7):
  return jax.random.uniform(jax.random.key(seed), (n, size, size, 3), minval=-1, maxval=1)


# ---------------------------------------------------------------------------------------
# Parameter counts.

def _count(variant, num_classes=1000):
  model = convnext.Model(num_classes=num_classes, variant=variant)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 224, 224, 3), np.float32))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["params"]))


def _closed_form(depths, dims, version, classes=1000):
  """From the layer shapes: stem conv + LN; per later stage LN + 2x2 conv; per block a
  7x7 depthwise conv, LN, two Linear layers (C -> 4C -> C), LayerScale (V1) or GRN's two
  4C vectors (V2); the final LN and the head."""
  total = 4 * 4 * 3 * dims[0] + dims[0] + 2 * dims[0]
  for i, (depth, c) in enumerate(zip(depths, dims)):
    if i:
      total += 2 * dims[i - 1] + 2 * 2 * dims[i - 1] * c + c
    block = 49 * c + c + 2 * c + (c * 4 * c + 4 * c) + (4 * c * c + c)
    block += c if version == 1 else 2 * 4 * c
    total += depth * block
  return total + 2 * dims[-1] + dims[-1] * classes + classes


# timm's results/results-imagenet.csv (timm at aa4b585) `param_count` in millions, two
# decimals, of convnext_{tiny,...,xlarge} and convnextv2_{atto,...,huge} with 1000 classes.
TIMM_MILLIONS = {
    "T": 28.59, "S": 50.22, "B": 88.59, "L": 197.77, "XL": 350.20,
    "V2-A": 3.71, "V2-F": 5.23, "V2-P": 9.07, "V2-N": 15.62, "V2-T": 28.64, "V2-B": 88.72,
    "V2-L": 197.96, "V2-H": 660.29,
}


def test_parameter_counts_are_timms_published_ones():
  assert tuple(convnext.VARIANTS) == convnext.VARIANT_NAMES == tuple(TIMM_MILLIONS)
  for variant, millions in TIMM_MILLIONS.items():
    version, depths, dims = convnext.VARIANTS[variant]
    exact = _closed_form(depths, dims, version)
    assert _count(variant) == exact, variant
    assert round(exact / 1e6, 2) == millions, (variant, exact)
  assert _count("T") == 28_589_128 and _count("V2-H") == 660_289_640


# ---------------------------------------------------------------------------------------
# timm / official / transformers state dicts and a NumPy forward pass on them.

def _timm_state_dict(depths, dims, version, classes=CLASSES, conv_mlp=False, seed=0):
  """Known random tensors under timm's names and shapes (convnext.py: stem.0/1,
  stages.i.downsample.0/1, stages.i.blocks.j.{conv_dw,norm,mlp.fc1,mlp.fc2,gamma,
  mlp.grn}, head.norm, head.fc); `conv_mlp` gives the 1x1-conv MLPs of timm's
  atto..nano (weights (out, in, 1, 1))."""
  rng = np.random.default_rng(seed)
  sd = {}

  def weight(name, *shape):
    fan_in = math.prod(shape[1:])
    sd[name] = (rng.standard_normal(shape) / math.sqrt(fan_in)).astype(np.float32)

  def vector(name, n, center=0.0, spread=0.1):
    sd[name] = (center + spread * rng.standard_normal(n)).astype(np.float32)

  def norm(prefix, n):
    vector(prefix + ".weight", n, 1.0)
    vector(prefix + ".bias", n)

  weight("stem.0.weight", dims[0], 3, 4, 4)
  vector("stem.0.bias", dims[0])
  norm("stem.1", dims[0])
  for i, (depth, c) in enumerate(zip(depths, dims)):
    if i:
      norm(f"stages.{i}.downsample.0", dims[i - 1])
      weight(f"stages.{i}.downsample.1.weight", c, dims[i - 1], 2, 2)
      vector(f"stages.{i}.downsample.1.bias", c)
    for j in range(depth):
      p = f"stages.{i}.blocks.{j}."
      weight(p + "conv_dw.weight", c, 1, 7, 7)
      vector(p + "conv_dw.bias", c)
      norm(p + "norm", c)
      pointwise = (1, 1) if conv_mlp else ()
      weight(p + "mlp.fc1.weight", 4 * c, c, *pointwise)
      vector(p + "mlp.fc1.bias", 4 * c)
      weight(p + "mlp.fc2.weight", c, 4 * c, *pointwise)
      vector(p + "mlp.fc2.bias", c)
      if version == 1:
        vector(p + "gamma", c, 0.5)
      else:
        vector(p + "mlp.grn.weight", 4 * c, 0.0, 0.5)
        vector(p + "mlp.grn.bias", 4 * c)
  norm("head.norm", dims[-1])
  weight("head.fc.weight", classes, dims[-1])
  vector("head.fc.bias", classes)
  return sd


def _conv2d(x, w, b, stride=1, pad=0, groups=1):
  """PyTorch's Conv2d on NCHW: weight (O, I/groups, kh, kw), zero padding `pad`."""
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  n, c, h, wd = x.shape
  o, _, kh, kw = w.shape
  ho, wo = (h - kh) // stride + 1, (wd - kw) // stride + 1
  out = np.zeros((n, o, ho, wo))
  for i in range(kh):
    for j in range(kw):
      patch = x[:, :, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
      if groups == 1:
        out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
      else:  # Depthwise: groups == channels, one input channel per output channel.
        out += patch * w[:, 0, i, j][None, :, None, None]
  return out + b[None, :, None, None]


def _layer_norm(x, weight, bias, axis):
  """LayerNorm over `axis` (channels), eps 1e-6, biased variance (PyTorch's)."""
  mean = x.mean(axis, keepdims=True)
  var = ((x - mean) ** 2).mean(axis, keepdims=True)
  shape = [1] * x.ndim
  shape[axis] = -1
  return ((x - mean) / np.sqrt(var + 1e-6) * weight.reshape(shape) + bias.reshape(shape))


def _pointwise(x, w, b):
  """A Linear (out, in) or 1x1 conv (out, in, 1, 1) on the channels of NCHW `x`."""
  return np.einsum("nchw,oc->nohw", x, w.reshape(w.shape[:2])) + b[None, :, None, None]


def _gelu(x):  # PyTorch nn.GELU(): the exact erf form.
  return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def _numpy_convnext(sd, images, depths):
  """The references' forward pass (official convnext.py / convnextv2.py, timm's
  ConvNeXtBlock, GlobalResponseNorm and NormMlpClassifierHead) in float64 on NCHW."""
  p = {k: v.astype(np.float64) for k, v in sd.items()}
  x = np.asarray(images, np.float64).transpose(0, 3, 1, 2)
  x = _conv2d(x, p["stem.0.weight"], p["stem.0.bias"], stride=4)
  x = _layer_norm(x, p["stem.1.weight"], p["stem.1.bias"], axis=1)
  for i, depth in enumerate(depths):
    if i:
      d = f"stages.{i}.downsample."
      x = _layer_norm(x, p[d + "0.weight"], p[d + "0.bias"], axis=1)
      x = _conv2d(x, p[d + "1.weight"], p[d + "1.bias"], stride=2)
    for j in range(depth):
      b = f"stages.{i}.blocks.{j}."
      y = _conv2d(x, p[b + "conv_dw.weight"], p[b + "conv_dw.bias"], pad=3, groups=x.shape[1])
      y = _layer_norm(y, p[b + "norm.weight"], p[b + "norm.bias"], axis=1)
      y = _gelu(_pointwise(y, p[b + "mlp.fc1.weight"], p[b + "mlp.fc1.bias"]))
      if b + "mlp.grn.weight" in p:  # GRN: L2 norm over the grid, divided by its channel mean.
        g = np.sqrt((y ** 2).sum(axis=(2, 3), keepdims=True))
        n = g / (g.mean(axis=1, keepdims=True) + 1e-6)
        y = (y + p[b + "mlp.grn.bias"][None, :, None, None]
             + p[b + "mlp.grn.weight"][None, :, None, None] * (y * n))
      y = _pointwise(y, p[b + "mlp.fc2.weight"], p[b + "mlp.fc2.bias"])
      if b + "gamma" in p:
        y = p[b + "gamma"][None, :, None, None] * y
      x = x + y
  x = _layer_norm(x.mean(axis=(2, 3)), p["head.norm.weight"], p["head.norm.bias"], axis=1)
  return x @ p["head.fc.weight"].T + p["head.fc.bias"]


def _official(sd):
  """timm's names -> the official repositories' (what timm's checkpoint_filter_fn maps
  from): downsample_layers.{0: the stem, i}, stages.i.j, dwconv, pwconv1/2 (Linear),
  GRN gamma/beta of shape (1, 1, 1, 4C), norm, head."""
  out = {}
  for k, v in sd.items():
    parts = k.split(".")
    if parts[0] == "stem":
      k = "downsample_layers.0." + ".".join(parts[1:])
    elif parts[0] == "stages" and parts[2] == "downsample":
      k = f"downsample_layers.{parts[1]}." + ".".join(parts[3:])
    elif parts[0] == "stages":
      rest = ".".join(parts[4:]).replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv")
      rest = rest.replace("mlp.grn.weight", "grn.gamma").replace("mlp.grn.bias", "grn.beta")
      k = f"stages.{parts[1]}.{parts[3]}.{rest}"
      if ".grn." in k:
        v = v.reshape(1, 1, 1, -1)
      if "pwconv" in k and v.ndim == 4:
        v = v.reshape(v.shape[:2])
    else:
      k = ("norm." if parts[1] == "norm" else "head.") + parts[2]
    out[k] = v
  return out


def _transformers(sd, version):
  """timm's names -> transformers' ConvNextForImageClassification (convnext. prefix;
  V2: convnextv2. and GRN weight/bias (1, 1, 1, 4C))."""
  prefix = "convnext." if version == 1 else "convnextv2."
  out = {}
  for k, v in sd.items():
    parts = k.split(".")
    if parts[0] == "stem":
      k = prefix + "embeddings." + ("patch_embeddings." if parts[1] == "0" else "layernorm.") \
          + parts[2]
    elif parts[0] == "stages" and parts[2] == "downsample":
      k = f"{prefix}encoder.stages.{parts[1]}.downsampling_layer.{'.'.join(parts[3:])}"
    elif parts[0] == "stages":
      rest = ".".join(parts[4:]).replace("conv_dw", "dwconv").replace("norm.", "layernorm.")
      rest = rest.replace("mlp.fc", "pwconv").replace("mlp.grn", "grn")
      rest = rest.replace("gamma", "layer_scale_parameter")
      k = f"{prefix}encoder.stages.{parts[1]}.layers.{parts[3]}.{rest}"
      if ".grn." in k:
        v = v.reshape(1, 1, 1, -1)
      if "pwconv" in k and v.ndim == 4:
        v = v.reshape(v.shape[:2])
    elif parts[0] == "head" and parts[1] == "norm":
      k = prefix + "layernorm." + parts[2]
    else:
      k = "classifier." + parts[2]
    out[k] = v
  return out


def _init(model, size=72, seed=99):
  return jax.device_get(jax.jit(model.init)(jax.random.key(seed), _images(size))["params"])


def _apply(model, params, images, train=False, rng=None):
  """`model.apply` compiled as one program (much faster on CPU than op by op)."""
  rngs = {} if rng is None else {"dropout": jax.random.key(rng)}
  return jax.jit(model.apply, static_argnames="train")(
      {"params": params}, images, train=train, rngs=rngs)


@pytest.mark.parametrize("version, conv_mlp", [(1, False), (2, True)])
def test_timm_state_dict_gives_the_references_logits(tmp_path, version, conv_mlp):
  cfg = dict(TINY, version=version)
  model = convnext.Model(num_classes=CLASSES, **cfg)
  sd = _timm_state_dict(TINY["depths"], TINY["dims"], version, conv_mlp=conv_mlp)
  path = str(tmp_path / "timm.safetensors")
  save_file(sd, path)
  params = models.load("convnext", _init(model), path, cfg)
  logits, aux = _apply(model, params, _images())
  expected = _numpy_convnext(sd, _images(), TINY["depths"])
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5, atol=1e-5)
  assert aux["stem"].shape == (2, 18, 18, 8) and aux["encoded"].shape == (2, 2, 2, 32)
  assert aux["pre_logits"].shape == (2, 32) and aux["logits"].dtype == jnp.float32
  # The official repositories' and transformers' names give the same parameters.
  for name, other in (("official", _official(sd)), ("hf", _transformers(sd, version))):
    other_path = str(tmp_path / f"{name}.safetensors")
    save_file(other, other_path)
    again = convnext.load(_init(model), other_path, cfg)
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, again, params))), name


# ---------------------------------------------------------------------------------------
# vitcls trees, other class counts, wrong files.

def _known_params(model, seed=1):
  """Init params with every leaf made non-trivial (biases, LN, GRN are 0/1 at init)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: (x + 0.1 * rng.standard_normal(x.shape)).astype(x.dtype),
                      _init(model, seed=seed))


def test_parameter_names_and_fresh_init():
  v1 = _init(convnext.Model(num_classes=CLASSES, **TINY))
  names = set(loading.flatten(v1))
  block = "stages_2/blocks_1/"
  assert {"stem/conv/kernel", "stem/norm/scale", "stages_1/downsample/norm/scale",
          "stages_1/downsample/conv/kernel", block + "conv_dw/kernel", block + "norm/bias",
          block + "mlp/fc1/kernel", block + "mlp/fc2/bias", block + "layer_scale",
          "norm/scale", "head/kernel", "head/bias"} <= names
  assert not any("downsample" in n for n in names if n.startswith("stages_0/"))
  assert v1["stages_2"]["blocks_1"]["conv_dw"]["kernel"].shape == (7, 7, 1, 24)
  np.testing.assert_array_equal(v1["stages_0"]["blocks_0"]["layer_scale"], np.float32(1e-6))
  assert abs(np.std(v1["stages_2"]["blocks_1"]["mlp"]["fc1"]["kernel"]) - 0.02) < 0.003
  v2 = _init(convnext.Model(num_classes=CLASSES, version=2, head_init_scale=1e-3, **TINY))
  flat2 = loading.flatten(v2)
  assert not any(n.endswith("layer_scale") for n in flat2)
  assert not np.any(flat2[block + "mlp/grn/scale"]) and flat2[block + "mlp/grn/bias"].shape == (96,)
  assert 0 < np.abs(v2["head"]["kernel"]).max() < 1e-4 and not np.any(v2["head"]["bias"])
  zero = _init(convnext.Model(num_classes=CLASSES, head_zeroinit=True, **TINY))
  assert not np.any(zero["head"]["kernel"])
  # layer_scale_init=0 removes LayerScale from V1; version/variant resolve as documented.
  none = _init(convnext.Model(num_classes=None, layer_scale_init=0, **TINY))
  assert "head" not in none and not any("layer_scale" in n for n in loading.flatten(none))
  assert convnext.Model(variant="V2-N").sizes()["version"] == 2
  assert convnext.Model(variant="T", version=2).sizes()["layer_scale_init"] is None


def test_vitcls_npz_round_trip_and_another_class_count(tmp_path):
  model = convnext.Model(num_classes=CLASSES, version=2, **TINY)
  params = _known_params(model)
  expected = np.asarray(_apply(model, params, _images())[0])
  path = str(tmp_path / "convnext.npz")
  loading.write_npz(path, params)
  loaded = models.load("convnext", _init(model), path, dict(TINY, version=2))
  np.testing.assert_array_equal(_apply(model, loaded, _images())[0], expected)
  # 3 classes: the head keeps its fresh init; the rest, the final norm too, is loaded.
  other = convnext.Model(num_classes=3, version=2, **TINY)
  init3 = _init(other, seed=5)
  for source in (path, params):
    loaded = convnext.load(init3, source, {})
    np.testing.assert_array_equal(loaded["head"]["kernel"], init3["head"]["kernel"])
    np.testing.assert_array_equal(loaded["norm"]["scale"], params["norm"]["scale"])
  # The same from a timm file with 1000 classes.
  sd = _timm_state_dict(TINY["depths"], TINY["dims"], 2, classes=1000)
  save_file(sd, str(tmp_path / "in1k.safetensors"))
  loaded = convnext.load(init3, str(tmp_path / "in1k.safetensors"), {})
  np.testing.assert_array_equal(loaded["head"]["bias"], init3["head"]["bias"])
  np.testing.assert_array_equal(loaded["norm"]["bias"], sd["head.norm.bias"])


def _one_line_error(init, checkpoint, fragment):
  with pytest.raises(loading.CheckpointError, match=fragment) as e:
    convnext.load(init, checkpoint, {})
  assert "\n" not in str(e.value)


def test_wrong_checkpoints_are_refused_in_one_line(tmp_path):
  init = _init(convnext.Model(num_classes=CLASSES, **TINY))
  vit = {"cls_token": np.zeros((1, 1, 8), np.float32),
         "patch_embed.proj.weight": np.zeros((8, 3, 4, 4), np.float32),
         "blocks.0.attn.qkv.weight": np.zeros((24, 8), np.float32),
         "head.weight": np.zeros((CLASSES, 8), np.float32)}
  save_file(vit, str(tmp_path / "vit.safetensors"))
  _one_line_error(init, str(tmp_path / "vit.safetensors"),
                  r"is not a ConvNeXt state dict \(it has e.g. 'blocks.0.attn.qkv.weight'")
  _one_line_error(init, {"embedding": {"kernel": np.zeros((4, 4, 3, 8))}},
                  "is not a vitcls ConvNeXt checkpoint")
  v2 = _timm_state_dict(TINY["depths"], TINY["dims"], 2)
  save_file(v2, str(tmp_path / "v2.safetensors"))
  _one_line_error(init, str(tmp_path / "v2.safetensors"),
                  "is a ConvNeXt V2 checkpoint .* the model is V1: set config.model.version=2")
  big = _timm_state_dict((1, 1, 3, 1), TINY["dims"], 1)
  _one_line_error(init, _from_sd(big), r"depths \[1, 1, 3, 1\] .* the model has depths "
                                       r"\[1, 1, 2, 1\]")
  v1 = _timm_state_dict(TINY["depths"], TINY["dims"], 1)
  no_ls = {k: v for k, v in v1.items() if not k.endswith("gamma")}
  save_file(no_ls, str(tmp_path / "no_ls.safetensors"))
  _one_line_error(init, str(tmp_path / "no_ls.safetensors"),
                  "has no LayerScale but the model has: set config.model.layer_scale_init=0")
  save_file(dict(v1, **{"head.pre_logits.fc.weight": np.zeros((4, 32), np.float32)}),
            str(tmp_path / "hidden.safetensors"))
  _one_line_error(init, str(tmp_path / "hidden.safetensors"),
                  "timm ConvNeXt state dict with parameters .* head.pre_logits.fc.weight")


def _from_sd(sd):
  """A timm state dict as vitcls names (through the loader's conversion)."""
  return convnext._from_torch(sd, "sd")  # pylint: disable=protected-access


# ---------------------------------------------------------------------------------------
# Layer ids, stochastic depth, dtype.

def _official_layer(name):
  """The official fine-tuning's group of a parameter in vitcls's names: the closed form
  of get_num_layer_for_convnext (facebookresearch/ConvNeXt optim_factory.py) on the
  official names downsample_layers.i (0: the stem) and stages.i.j."""
  parts = name.split("/")
  if parts[0] == "stem" or parts[1:2] == ["downsample"]:
    stage = 0 if parts[0] == "stem" else int(parts[0].split("_")[1])
    return (0, 2, 3, 12)[stage]
  if parts[0].startswith("stages_"):
    stage, block = int(parts[0].split("_")[1]), int(parts[1].split("_")[1])
    return 3 + block // 3 if stage == 2 else (1, 2, None, 12)[stage]
  return 13


@pytest.mark.parametrize("variant", ["T", "V2-B"])
def test_layer_ids_are_the_official_groups(variant):
  shapes = jax.eval_shape(convnext.Model(num_classes=1000, variant=variant).init,
                          jax.random.key(0), jax.ShapeDtypeStruct((1, 64, 64, 3), np.float32))
  ids, top = convnext.layer_ids(shapes["params"])
  assert top == 13
  flat = loading.flatten(ids)
  assert flat == {n: _official_layer(n) for n in loading.flatten(shapes["params"])}
  assert flat["stem/conv/kernel"] == 0 and flat["head/kernel"] == flat["norm/scale"] == 13
  assert flat["stages_1/downsample/conv/kernel"] == 2
  last = "stages_2/blocks_8" if variant == "T" else "stages_2/blocks_26"
  assert flat[last + "/mlp/fc1/kernel"] == (5 if variant == "T" else 11)
  assert flat["stages_3/downsample/norm/scale"] == flat["stages_3/blocks_0/conv_dw/bias"] == 12
  # A stage 2 deeper than the papers' 27 blocks moves stage 3 and the top up.
  deep = jax.eval_shape(convnext.Model(depths=(1, 1, 30, 1), dims=(8, 8, 8, 8)).init,
                        jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32))
  ids, top = convnext.layer_ids(deep["params"])
  assert top == 14 and ids["stages_2"]["blocks_29"]["norm"]["scale"] == 12
  assert ids["stages_3"]["blocks_0"]["norm"]["scale"] == 13


def test_stochastic_depth_and_dtype():
  images = _images(32, n=8)  # 8 examples x 4 blocks that may drop: masks differ by key.
  params = _known_params(convnext.Model(num_classes=CLASSES, **TINY))
  plain = convnext.Model(num_classes=CLASSES, **TINY)
  deep = convnext.Model(num_classes=CLASSES, stoch_depth=0.5, **TINY)
  reference = np.asarray(_apply(plain, params, images)[0])
  train = [np.asarray(_apply(deep, params, images, train=True, rng=k)[0]) for k in (1, 2)]
  assert not np.allclose(train[0], train[1])
  assert not np.allclose(train[0], reference)
  np.testing.assert_array_equal(_apply(deep, params, images)[0], reference)
  np.testing.assert_array_equal(_apply(plain, params, images, train=True, rng=1)[0],
                                reference)
  half = convnext.Model(num_classes=CLASSES, dtype="bfloat16", **TINY)
  logits, aux = _apply(half, params, images)
  assert logits.dtype == aux["encoded"].dtype == jnp.float32
  np.testing.assert_allclose(logits, reference, atol=0.15 * np.abs(reference).max())
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(_init(half, size=32)))


# ---------------------------------------------------------------------------------------
# Config checks.

def _problems(**model):
  c = configs.defaults()
  c.model_name = "convnext"
  c.model = model
  found = []
  validate._model(c, found)  # pylint: disable=protected-access
  return found


def test_config_fields_are_checked_by_their_rules():
  assert "convnext" in models.available()
  assert models.field_rules("convnext") == convnext.FIELD_RULES
  assert models.fields("convnext") == {
      "variant", "depths", "dims", "version", "layer_scale_init", "stoch_depth",
      "head_init_scale", "head_zeroinit", "dtype"}
  assert _problems(variant="V2-T", stoch_depth=0.1, head_init_scale=0.001) == []
  assert _problems(depths=[1, 1, 2, 1], dims=[8, 16, 24, 32], version=2) == []
  for bad, fragment in [
      (dict(variant="tiny"), "config.model.variant must be one of 'T', 'S', 'B', 'L', "
                             "'XL', 'V2-A'"),
      (dict(version=3), "config.model.version must be one of 1, 2, got 3"),
      (dict(depths=[3, 0, 9, 3]), "config.model.depths must be a positive integer"),
      (dict(stoch_depth=1.5), "config.model.stoch_depth must be a number in [0, 1]"),
      (dict(dim=[8]), "unknown config key 'model.dim' for model 'convnext'"),
  ]:
    found = _problems(**bad)
    assert len(found) == 1 and fragment in found[0], (bad, found)
  for ok in convnext.VARIANTS:
    assert validate._follows(ok, convnext.FIELD_RULES["variant"])  # pylint: disable=protected-access
  # What only the model knows, build reports in one line.
  for cfg, fragment in [
      (dict(depths=[1, 1, 1]), "ConvNeXt size not given: set variant"),
      (dict(variant="T", dims=[8, 16, 24]), "dims must be 4 positive integers"),
      (dict(variant="T", layer_scale_init=-1.0), "layer_scale_init must be a number >= 0"),
      (dict(variant="T", dtype="float13"), "unknown dtype"),
  ]:
    with pytest.raises(configs.ConfigError, match=fragment):
      models.build("convnext", 10, cfg)
