"""MLP-Mixer: parameter counts, a NumPy forward pass, checkpoint loading, config checks.

Each test compares the model with something computed independently here: a closed form of
the layer shapes, the paper's equations in NumPy, or the logits of the same parameters
before they went through a file.
"""

import math

from absl import logging as absl_logging
import jax
import numpy as np
import pytest
from safetensors.numpy import save_file
import scipy.special

from vitcls import configs, models, validate
from vitcls.models import loading, mixer

TINY = dict(hidden_dim=8, num_blocks=2, tokens_mlp_dim=6, channels_mlp_dim=12,
            patch_size=4, head_zeroinit=False)


def _images(size=16, n=2):
  return jax.random.uniform(jax.random.key(7), (n, size, size, 3), minval=-1, maxval=1)


def _known_params(model, size=16, seed=1):
  """Init params with every leaf made non-trivial (biases and LN are 0/1 at init)."""
  params = model.init(jax.random.key(seed), _images(size))["params"]
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [np.asarray(x + 0.1 * jax.random.normal(k, x.shape)) for x, k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, leaves)


def _count(variant, num_classes, size=224):
  model = mixer.Model(num_classes=num_classes, variant=variant)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, size, size, 3), np.float32))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["params"]))


def _closed_form(hidden, blocks, tokens_mlp, channels_mlp, patch, classes, size=224):
  """Parameters from the layer shapes: stem conv, per block 2 LN + 2 two-layer MLPs, LN, head."""
  tokens = (size // patch) ** 2
  stem = patch * patch * 3 * hidden + hidden
  token_mlp = tokens * tokens_mlp + tokens_mlp + tokens_mlp * tokens + tokens
  channel_mlp = hidden * channels_mlp + channels_mlp + channels_mlp * hidden + hidden
  block = 2 * (2 * hidden) + token_mlp + channel_mlp
  head = hidden * classes + classes if classes else 0
  return stem + blocks * block + 2 * hidden + head


# variant: (hidden, blocks, token MLP, channel MLP) of the paper's Table 1, its "#Params"
# in millions, and vision_transformer's models_test.py:31-33 count with 1000 classes.
PAPER = {
    "S/16": ((512, 8, 256, 2048), 18, None),
    "S/32": ((512, 8, 256, 2048), 19, None),
    "B/16": ((768, 12, 384, 3072), 59, 59_880_472),
    "B/32": ((768, 12, 384, 3072), 60, 60_293_428),
    "L/16": ((1024, 24, 512, 4096), 207, 208_196_168),
}


@pytest.mark.parametrize("variant", list(PAPER))
def test_parameter_counts_are_the_published_ones(variant):
  dims, millions, with_head = PAPER[variant]
  patch = int(variant.split("/")[1])
  exact = _closed_form(*dims, patch, 1000)
  assert _count(variant, 1000) == exact
  if with_head is not None:
    assert exact == with_head
  # The paper's figures count the network without the 1000-class head: with it, S/16 has
  # 18.53M (19M) and L/16 208.2M, against the table's 18M and 207M.
  body = _closed_form(*dims, patch, 0)
  assert _count(variant, None) == body
  assert round(body / 1e6) == millions


def _ln(x, p):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def _gelu(x):  # The tanh approximation (flax's nn.gelu default, as upstream).
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _mlp(x, p):
  h = _gelu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
  return h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]


def _numpy_mixer(params, images, patch, blocks):
  """The paper's equations (1): U = X + W2 gelu(W1 LN(X)^T), Y = U + W4 gelu(W3 LN(U))."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = np.asarray(images, np.float64)
  n, hh, ww, c = x.shape
  gh, gw = hh // patch, ww // patch
  # Non-overlapping patches flattened (row, column, channel) as the conv kernel's HWIO.
  patches = x[:, :gh * patch, :gw * patch].reshape(n, gh, patch, gw, patch, c)
  patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(n, gh * gw, patch * patch * c)
  kernel = p["stem"]["kernel"].reshape(patch * patch * c, -1)
  x = patches @ kernel + p["stem"]["bias"]
  for i in range(blocks):
    b = p[f"MixerBlock_{i}"]
    x = x + _mlp(_ln(x, b["LayerNorm_0"]).transpose(0, 2, 1),
                 b["token_mixing"]).transpose(0, 2, 1)
    x = x + _mlp(_ln(x, b["LayerNorm_1"]), b["channel_mixing"])
  x = _ln(x, p["pre_head_layer_norm"]).mean(1)
  return x @ p["head"]["kernel"] + p["head"]["bias"]


def test_forward_equals_numpy_from_the_equations():
  model = mixer.Model(num_classes=5, **TINY)
  params = _known_params(model, size=18)  # 18 px: the conv drops the last 2 rows/columns.
  logits, aux = model.apply({"params": params}, _images(18))
  assert aux["stem"].shape == (2, 4, 4, 8) and aux["encoded"].shape == (2, 16, 8)
  np.testing.assert_allclose(np.asarray(logits), _numpy_mixer(params, _images(18), 4, 2),
                             rtol=1e-4, atol=1e-5)


def test_parameter_names_are_the_upstream_ones():
  model = mixer.Model(num_classes=5, **TINY)
  names = set(loading.flatten(_known_params(model)))
  block = {f"MixerBlock_0/{m}/Dense_{j}/{w}" for m in ("token_mixing", "channel_mixing")
           for j in (0, 1) for w in ("kernel", "bias")}
  block |= {f"MixerBlock_0/LayerNorm_{j}/{w}" for j in (0, 1) for w in ("scale", "bias")}
  assert block <= names
  assert {"stem/kernel", "stem/bias", "pre_head_layer_norm/scale", "head/kernel"} <= names
  assert len(names) == 2 + 2 * len(block) + 2 + 2  # stem, 2 blocks, final LN, head.


def test_head_zeroinit_and_stochastic_depth():
  images = _images()
  zero = mixer.Model(num_classes=5, **dict(TINY, head_zeroinit=True))
  params = zero.init(jax.random.key(0), images)["params"]
  assert not np.any(params["head"]["kernel"])
  deep = mixer.Model(num_classes=5, **dict(TINY, stoch_depth=1.0))
  params = _known_params(deep)
  # Rate 1 on the last block drops both its branches in training; the first never drops.
  train = deep.apply({"params": params}, images, train=True,
                     rngs={"dropout": jax.random.key(3)})[1]["encoded"]
  two = mixer.Model(num_classes=5, **dict(TINY, num_blocks=1))
  one_block = {k: v for k, v in params.items() if k != "MixerBlock_1"}
  np.testing.assert_allclose(train, two.apply({"params": one_block}, images)[1]["encoded"],
                             rtol=1e-5, atol=1e-5)
  # Inference is deterministic and uses every block.
  a = deep.apply({"params": params}, images)[0]
  b = mixer.Model(num_classes=5, **TINY).apply({"params": params}, images)[0]
  np.testing.assert_array_equal(a, b)


def _vision_transformer_npz(params, path):
  """Flat `/`-joined keys, as vision_transformer's checkpoint.load reads them."""
  np.savez(path, **{k: np.asarray(v) for k, v in loading.flatten(params).items()})


def _big_vision_legacy(params):
  """The older layout big_vision's mlp_mixer.py:144-165 converts (size-1 axes added)."""
  flat = {}
  for name, value in loading.flatten(params).items():
    parts = name.split("/")
    if parts[0] == "stem":
      name = "/".join(["embedding"] + parts[1:])
    elif parts[0] == "pre_head_layer_norm":
      name = "/".join(["Mixer/encoder_norm"] + parts[1:])
    elif parts[0].startswith("MixerBlock_"):
      block = "Mixer/encoderblock_" + parts[0].split("_")[1]
      if parts[1] in ("token_mixing", "channel_mixing"):
        j = int(parts[2].split("_")[1]) + 1
        name = f"{block}/{parts[1]}_phase_0/{parts[3]}{j}"
        value = np.asarray(value)[None]
      else:
        name = "/".join([block] + parts[1:])
    flat[name] = np.asarray(value)
  return flat


def test_npz_round_trip_gives_identical_logits(tmp_path):
  model = mixer.Model(num_classes=5, **TINY)
  params = _known_params(model)
  init = jax.device_get(model.init(jax.random.key(99), _images())["params"])
  expected = np.asarray(model.apply({"params": params}, _images())[0])
  path = str(tmp_path / "Mixer-tiny.npz")
  _vision_transformer_npz(params, path)
  loaded = models.load("mixer", init, path, dict(TINY))
  np.testing.assert_array_equal(model.apply({"params": loaded}, _images())[0], expected)
  legacy = str(tmp_path / "legacy.npz")
  np.savez(legacy, **_big_vision_legacy(params))
  loaded = mixer.load(init, legacy, dict(TINY))
  np.testing.assert_array_equal(model.apply({"params": loaded}, _images())[0], expected)
  # Another class count: the head keeps its fresh init, the rest is loaded.
  other = mixer.Model(num_classes=3, **TINY)
  init3 = jax.device_get(other.init(jax.random.key(9), _images())["params"])
  loaded = mixer.load(init3, path, dict(TINY))
  np.testing.assert_array_equal(loaded["head"]["kernel"], init3["head"]["kernel"])
  np.testing.assert_array_equal(loaded["stem"]["kernel"], params["stem"]["kernel"])


@pytest.mark.parametrize("change, size, fragment", [
    (dict(patch_size=2), 16, "4x4 patches and 16 tokens but the model has 2x2 patches and "
                             "64 tokens"),
    ({}, 32, "16 tokens but the model has 4x4 patches and 64 tokens"),
])
def test_another_patch_or_size_is_refused_in_one_line(tmp_path, change, size, fragment):
  params = _known_params(mixer.Model(num_classes=5, **TINY))
  path = str(tmp_path / "m.npz")
  _vision_transformer_npz(params, path)
  model = mixer.Model(num_classes=5, **dict(TINY, **change))
  init = jax.device_get(model.init(jax.random.key(0), _images(size))["params"])
  with pytest.raises(loading.CheckpointError, match=fragment) as e:
    mixer.load(init, path, {})
  assert "\n" not in str(e.value)


def _problems(**model):
  c = configs.defaults()
  c.model_name = "mixer"
  c.model = model
  found = []
  validate._model(c, found)  # pylint: disable=protected-access
  return found


def test_config_fields_are_checked_by_their_rules():
  assert "mixer" in models.available()
  assert models.field_rules("mixer") == mixer.FIELD_RULES
  assert models.fields("mixer") == {
      "variant", "hidden_dim", "num_blocks", "tokens_mlp_dim", "channels_mlp_dim",
      "patch_size", "stoch_depth", "dtype", "head_zeroinit", "gelu_approximate"}
  assert _problems(variant="B/16", stoch_depth=0.1) == []
  for bad, fragment in [
      (dict(variant="X/16"), "config.model.variant must be 'NAME/PATCH' with NAME one of "
                             "S, B, L, H"),
      (dict(variant="B/0"), "config.model.variant must be"),
      (dict(num_blocks=0), "config.model.num_blocks must be a positive integer"),
      (dict(tokens_mlp_dim=-3), "config.model.tokens_mlp_dim must be a positive integer"),
      (dict(patch_size=[4, 0]), "config.model.patch_size must be a positive integer or a"),
      (dict(stoch_depth=1.5), "config.model.stoch_depth must be a number in [0, 1]"),
      (dict(hiden_dim=8), "unknown config key 'model.hiden_dim' for model 'mixer'"),
  ]:
    found = _problems(**bad)
    assert len(found) == 1 and fragment in found[0], (bad, found)
  # What the check accepts the model builds; what only the model knows, build reports.
  for ok in ("S/16", "H/14"):
    assert validate._follows(ok, mixer.FIELD_RULES["variant"])  # pylint: disable=protected-access
    mixer.decode_variant(ok)
  with pytest.raises(configs.ConfigError, match="Mixer size not given"):
    models.build("mixer", 10, dict(hidden_dim=8))
  with pytest.raises(configs.ConfigError, match="unknown dtype"):
    models.build("mixer", 10, dict(variant="S/16", dtype="float13"))
  with pytest.raises(configs.ConfigError, match="gelu_approximate must be true or false"):
    models.build("mixer", 10, dict(variant="S/16", gelu_approximate="no"))


# timm's results CSVs (results/benchmark-infer-amp-nchw-pt240-cu124-rtx3090.csv at
# pytorch-image-models main): param_count in millions, 2 decimals, 1000 classes, 224 px.
TIMM_PARAM_COUNTS = {"S/32": 19.10, "S/16": 18.53, "B/32": 60.29, "B/16": 59.88,
                     "L/32": 206.94, "L/16": 208.20}


@pytest.mark.parametrize("variant", list(TIMM_PARAM_COUNTS))
def test_parameter_counts_are_timms(variant):
  """timm's mixer_{s,b,l}{16,32}_224 are these networks: the same parameter counts."""
  assert round(_count(variant, 1000) / 1e6, 2) == TIMM_PARAM_COUNTS[variant]


def _timm_state_dict(hidden=8, blocks=2, tokens=16, tokens_mlp=6, channels_mlp=12, patch=4,
                     classes=5, seed=0):
  """A timm `MlpMixer` state dict of known random values: names and PyTorch shapes as
  timm's mlp_mixer.py makes them (PatchEmbed `stem.proj` conv (out, in, kh, kw), Linear
  weights (out, in), LayerNorm `weight`/`bias`)."""
  shapes = {"stem.proj.weight": (hidden, 3, patch, patch), "stem.proj.bias": (hidden,)}
  for i in range(blocks):
    for norm in ("norm1", "norm2"):
      shapes[f"blocks.{i}.{norm}.weight"] = shapes[f"blocks.{i}.{norm}.bias"] = (hidden,)
    for mlp, dim, inner in (("mlp_tokens", tokens, tokens_mlp),
                            ("mlp_channels", hidden, channels_mlp)):
      shapes[f"blocks.{i}.{mlp}.fc1.weight"] = (inner, dim)
      shapes[f"blocks.{i}.{mlp}.fc1.bias"] = (inner,)
      shapes[f"blocks.{i}.{mlp}.fc2.weight"] = (dim, inner)
      shapes[f"blocks.{i}.{mlp}.fc2.bias"] = (dim,)
  shapes.update({"norm.weight": (hidden,), "norm.bias": (hidden,),
                 "head.weight": (classes, hidden), "head.bias": (classes,)})
  rng = np.random.default_rng(seed)
  return {name: (rng.normal(size=shape) * 0.3
                 + (1.0 if "norm" in name and name.endswith("weight") else 0.0)
                 ).astype(np.float32) for name, shape in shapes.items()}


def _torch_mixer(sd, images, patch, blocks):
  """timm's MlpMixer.forward in NumPy (float64), on PyTorch's layouts: NCHW images, a
  stride-`patch` conv, Linear x @ W.T + b, LayerNorm eps 1e-6, exact (erf) GELU."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  x = np.asarray(images, np.float64).transpose(0, 3, 1, 2)
  n, c, h, w = x.shape
  gh, gw = h // patch, w // patch
  patches = x[:, :, :gh * patch, :gw * patch].reshape(n, c, gh, patch, gw, patch)
  patches = patches.transpose(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, c * patch * patch)
  weight = sd["stem.proj.weight"]
  x = patches @ weight.reshape(weight.shape[0], -1).T + sd["stem.proj.bias"]

  def linear(y, name):
    return y @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

  def norm(y, name):
    mean = y.mean(-1, keepdims=True)
    var = ((y - mean) ** 2).mean(-1, keepdims=True)
    return (y - mean) / np.sqrt(var + 1e-6) * sd[f"{name}.weight"] + sd[f"{name}.bias"]

  def mlp(y, name):
    hidden = linear(y, f"{name}.fc1")
    return linear(0.5 * hidden * (1 + scipy.special.erf(hidden / np.sqrt(2))), f"{name}.fc2")

  for i in range(blocks):
    b = f"blocks.{i}"
    x = x + mlp(norm(x, f"{b}.norm1").transpose(0, 2, 1), f"{b}.mlp_tokens").transpose(0, 2, 1)
    x = x + mlp(norm(x, f"{b}.norm2"), f"{b}.mlp_channels")
  return linear(norm(x, "norm").mean(1), "head")


def test_timm_safetensors_give_timms_logits(tmp_path, monkeypatch):
  sd = _timm_state_dict()
  path = str(tmp_path / "mixer_tiny.safetensors")
  save_file(sd, path)
  exact = dict(TINY, gelu_approximate=False)
  model = mixer.Model(num_classes=5, **exact)
  init = jax.device_get(model.init(jax.random.key(0), _images())["params"])
  loaded = models.load("mixer", init, path, exact)
  logits = model.apply({"params": loaded}, _images())[0]
  np.testing.assert_allclose(np.asarray(logits), _torch_mixer(sd, _images(), 4, 2),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(loaded["stem"]["kernel"],
                                sd["stem.proj.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
      loaded["MixerBlock_1"]["token_mixing"]["Dense_0"]["kernel"],
      sd["blocks.1.mlp_tokens.fc1.weight"].T)
  # The default tanh GELU differs (the timm file says nothing of it): a warning, not an error.
  warnings = []
  monkeypatch.setattr(absl_logging, "warning", lambda msg, *a: warnings.append(msg % a))
  approx = mixer.Model(num_classes=5, **TINY)
  loaded_approx = mixer.load(init, path, dict(TINY))
  assert any("gelu_approximate=False" in w for w in warnings), warnings
  diff = np.abs(approx.apply({"params": loaded_approx}, _images())[0] - logits).max()
  assert 0 < diff < 0.05
  # Another class count: the head keeps its fresh init, the rest is loaded.
  other = mixer.Model(num_classes=3, **exact)
  init3 = jax.device_get(other.init(jax.random.key(9), _images())["params"])
  loaded = mixer.load(init3, path, exact)
  np.testing.assert_array_equal(loaded["head"]["kernel"], init3["head"]["kernel"])
  np.testing.assert_array_equal(loaded["pre_head_layer_norm"]["scale"], sd["norm.weight"])


def test_other_timm_networks_and_sizes_are_refused_in_one_line(tmp_path):
  init = jax.device_get(mixer.Model(num_classes=5, **TINY).init(
      jax.random.key(0), _images())["params"])
  resmlp = dict(_timm_state_dict(), **{"blocks.0.linear_tokens.weight": np.ones((16, 16),
                                                                               np.float32)})
  save_file(resmlp, str(tmp_path / "resmlp.safetensors"))
  with pytest.raises(loading.CheckpointError, match="'blocks.0.linear_tokens.weight', which "
                     "timm's MlpMixer") as e:
    mixer.load(init, str(tmp_path / "resmlp.safetensors"), {})
  assert "\n" not in str(e.value)
  save_file(_timm_state_dict(patch=2, tokens=64), str(tmp_path / "p2.safetensors"))
  with pytest.raises(loading.CheckpointError, match="2x2 patches and 64 tokens but the "
                     "model has 4x4 patches and 16 tokens") as e:
    mixer.load(init, str(tmp_path / "p2.safetensors"), {})
  assert "\n" not in str(e.value)


def test_layer_ids_number_the_blocks_from_the_stem():
  params = _known_params(mixer.Model(num_classes=5, **dict(TINY, num_blocks=3)))
  ids, top = mixer.layer_ids(params)
  assert top == 4
  assert jax.tree.structure(ids) == jax.tree.structure(params)
  flat = loading.flatten(ids)
  assert {flat["stem/kernel"], flat["stem/bias"]} == {0}
  for i in range(3):
    assert {v for k, v in flat.items() if k.startswith(f"MixerBlock_{i}/")} == {i + 1}
  assert {flat["pre_head_layer_norm/scale"], flat["head/kernel"], flat["head/bias"]} == {4}
