"""RegNetY: the width generator, parameter counts, timm state dicts through a NumPy forward
pass, frozen BatchNorm, checkpoint loading, layer ids, config checks.

Each test compares the model with something computed independently here: timm's stage
widths and published parameter counts, timm's forward pass (regnet.py Bottleneck,
SEModule, eval-mode BatchNorm2d) in NumPy on NCHW tensors under timm's names, timm's
`group_matcher` numbering, or the logits of the same parameters before they went
through a file.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from vitcls import configs, models, validate
from vitcls.models import loading, regnet, timm_names

# w0=8, wa=12, wm=2, depth=5: u_j = 8, 20, 32, 44, 56 -> log2(u_j / 8) rounds to
# 0, 1, 2, 2, 3 -> widths 8, 16, 32, 32, 64: four stages of depths 1, 1, 2, 1, group
# width min(8, w): 1, 2, 4 and 8 groups (the first stage a plain conv).
TINY = dict(w0=8, wa=12.0, wm=2.0, group_size=8, depth=5)
TINY_STAGES = ((8, 16, 32, 64), (1, 1, 2, 1), (8, 8, 8, 8))
CLASSES = 5


def _images(size=40, n=2, seed=7):
  return jax.random.uniform(jax.random.key(seed), (n, size, size, 3), minval=-1, maxval=1)


# ---------------------------------------------------------------------------------------
# The generator and parameter counts.

# Stage (widths, depths, group widths) of timm's RegNet._get_stage_args for its
# model_cfgs regnety_002, regnety_040 (w0=96 quantised up to 128), regnety_160 and
# regnety_2560 (group width 373: widths rounded to its multiples).
TIMM_STAGES = {
    "Y-200MF": ((24, 56, 152, 368), (1, 1, 4, 7), (8, 8, 8, 8)),
    "Y-4.0GF": ((128, 192, 512, 1088), (2, 6, 12, 2), (64, 64, 64, 64)),
    "Y-16GF": ((224, 448, 1232, 3024), (2, 4, 11, 1), (112, 112, 112, 112)),
    "Y-256GF": ((746, 1492, 4103, 10444), (2, 7, 17, 1), (373, 373, 373, 373)),
}


def test_generator_gives_timms_stages():
  for variant, stages in TIMM_STAGES.items():
    w0, wa, wm, group_size, depth = regnet.VARIANTS[variant]
    assert regnet.generate(w0, wa, wm, group_size, depth) == stages, variant
  assert regnet.generate(**TINY) == TINY_STAGES
  assert regnet.Model(**TINY).sizes() == dict(zip(("widths", "depths", "group_sizes"),
                                                  TINY_STAGES))


# timm's results/results-imagenet.csv (timm at aa4b585) `param_count` in millions, two
# decimals, of regnety_NNN with 1000 classes (timm's parameters: BN statistics are buffers).
TIMM_MILLIONS = {
    "Y-200MF": ("002", 3.16), "Y-400MF": ("004", 4.34), "Y-600MF": ("006", 6.06),
    "Y-800MF": ("008", 6.26), "Y-1.6GF": ("016", 11.20), "Y-3.2GF": ("032", 19.44),
    "Y-4.0GF": ("040", 20.65), "Y-6.4GF": ("064", 30.58), "Y-8.0GF": ("080", 39.18),
    "Y-12GF": ("120", 51.82), "Y-16GF": ("160", 83.59), "Y-32GF": ("320", 145.05),
    "Y-64GF": ("640", 281.38), "Y-128GF": ("1280", 644.81), "Y-256GF": ("2560", 1282.60),
}


def _counts(variant, num_classes=1000):
  """(parameters without the BN statistics, the statistics) of eval_shape's tree."""
  model = regnet.Model(num_classes=num_classes, variant=variant)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 224, 224, 3), np.float32))
  flat = loading.flatten(shapes["params"])
  stats = sum(math.prod(x.shape) for n, x in flat.items() if n.endswith(("/mean", "/var")))
  return sum(math.prod(x.shape) for x in flat.values()) - stats, stats


def _closed_form(widths, depths, group_sizes, classes=1000):
  """(weights, BN channels) from the layer shapes: stem 3x3 conv + BN; per block 1x1 conv,
  3x3 group conv, SE (round(in / 4) channels, with biases), 1x1 conv, each conv + BN
  (scale, bias), the first block's 1x1 shortcut conv + BN; the head."""
  weights, bn = 27 * 32, 32
  c_in = 32
  for w, d, g in zip(widths, depths, group_sizes):
    for j in range(d):
      se = round(c_in * 0.25)
      weights += c_in * w + 9 * g * w + (w * se + se) + (se * w + w) + w * w
      bn += 3 * w
      if j == 0:
        weights, bn = weights + c_in * w, bn + w
      c_in = w
  return weights + 2 * bn + c_in * classes + classes, bn


def test_parameter_counts_are_timms_published_ones():
  assert tuple(regnet.VARIANTS) == regnet.VARIANT_NAMES == tuple(TIMM_MILLIONS)
  for variant, (digits, millions) in TIMM_MILLIONS.items():
    weights, bn = _closed_form(*regnet.Model(variant=variant).sizes().values())
    assert _counts(variant) == (weights, 2 * bn), variant
    assert round(weights / 1e6, 2) == millions, (variant, weights)
    assert timm_names.model_config(f"hf-hub:timm/regnety_{digits}.tag") == (
        "regnet", {"variant": variant}, timm_names.IMAGENET)
  assert _counts("Y-16GF")[0] == 83_590_140


# ---------------------------------------------------------------------------------------
# timm state dicts and a NumPy forward pass on them.

def _timm_state_dict(widths, depths, group_sizes, classes=CLASSES, se=True, seed=0):
  """Known random tensors under timm's names and shapes (regnet.py: stem.conv/bn,
  s{i}.b{j}.conv{1,2,3}.conv/bn, .se.fc1/fc2 (1x1 convs), .downsample.conv/bn in b1,
  head.fc), BN with nonzero running statistics and num_batches_tracked."""
  rng = np.random.default_rng(seed)
  sd = {}

  def weight(name, *shape):
    fan_in = math.prod(shape[1:])
    sd[name] = (rng.standard_normal(shape) / math.sqrt(fan_in)).astype(np.float32)

  def vector(name, n, center=0.0, spread=0.1):
    sd[name] = (center + spread * rng.standard_normal(n)).astype(np.float32)

  def conv_bn(prefix, out, c_in, k=1):
    weight(prefix + ".conv.weight", out, c_in, k, k)
    vector(prefix + ".bn.weight", out, 1.0)
    vector(prefix + ".bn.bias", out)
    vector(prefix + ".bn.running_mean", out, 0.0, 0.3)
    sd[prefix + ".bn.running_var"] = rng.uniform(0.5, 2.0, out).astype(np.float32)
    sd[prefix + ".bn.num_batches_tracked"] = np.array(1000, np.int64)

  conv_bn("stem", 32, 3, 3)
  c_in = 32
  for i, (w, d, g) in enumerate(zip(widths, depths, group_sizes)):
    for j in range(d):
      p = f"s{i + 1}.b{j + 1}."
      conv_bn(p + "conv1", w, c_in)
      conv_bn(p + "conv2", w, g, 3)
      if se:
        rd = round(c_in * 0.25)
        weight(p + "se.fc1.weight", rd, w, 1, 1)
        vector(p + "se.fc1.bias", rd)
        weight(p + "se.fc2.weight", w, rd, 1, 1)
        vector(p + "se.fc2.bias", w)
      conv_bn(p + "conv3", w, w)
      if j == 0:
        conv_bn(p + "downsample", w, c_in)
      c_in = w
  weight("head.fc.weight", classes, c_in)
  vector("head.fc.bias", classes)
  return sd


def _conv2d(x, w, stride=1, pad=0, groups=1):
  """PyTorch's bias-free Conv2d on NCHW: weight (O, I/groups, kh, kw), zero padding."""
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  n, c, h, wd = x.shape
  o, c_g, kh, kw = w.shape
  ho, wo = (h - kh) // stride + 1, (wd - kw) // stride + 1
  o_g = o // groups
  out = np.zeros((n, o, ho, wo))
  for g in range(groups):
    xg, wg = x[:, g * c_g:(g + 1) * c_g], w[g * o_g:(g + 1) * o_g]
    for i in range(kh):
      for j in range(kw):
        patch = xg[:, :, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
        out[:, g * o_g:(g + 1) * o_g] += np.einsum("nchw,oc->nohw", patch, wg[:, :, i, j])
  return out


def _bn(x, p, prefix):
  """Eval-mode BatchNorm2d: running statistics, eps 1e-5."""
  def v(name):
    return p[f"{prefix}.bn.{name}"][None, :, None, None]
  return (x - v("running_mean")) / np.sqrt(v("running_var") + 1e-5) * v("weight") + v("bias")


def _relu(x):
  return np.maximum(x, 0)


def _numpy_regnet(sd, images, depths, group_sizes):
  """timm's RegNet forward (Bottleneck, SEModule, ClassifierHead) in float64 on NCHW."""
  p = {k: v.astype(np.float64) for k, v in sd.items() if v.dtype == np.float32}
  x = np.asarray(images, np.float64).transpose(0, 3, 1, 2)
  x = _relu(_bn(_conv2d(x, p["stem.conv.weight"], stride=2, pad=1), p, "stem"))
  for i, (d, g) in enumerate(zip(depths, group_sizes)):
    for j in range(d):
      b, stride = f"s{i + 1}.b{j + 1}.", 2 if j == 0 else 1
      y = _relu(_bn(_conv2d(x, p[b + "conv1.conv.weight"]), p, b + "conv1"))
      w2 = p[b + "conv2.conv.weight"]
      y = _conv2d(y, w2, stride=stride, pad=1, groups=w2.shape[0] // g)
      y = _relu(_bn(y, p, b + "conv2"))
      s = y.mean(axis=(2, 3))
      s = _relu(s @ p[b + "se.fc1.weight"][:, :, 0, 0].T + p[b + "se.fc1.bias"])
      s = s @ p[b + "se.fc2.weight"][:, :, 0, 0].T + p[b + "se.fc2.bias"]
      y = y * (1 / (1 + np.exp(-s)))[:, :, None, None]
      y = _bn(_conv2d(y, p[b + "conv3.conv.weight"]), p, b + "conv3")
      if j == 0:
        x = _bn(_conv2d(x, p[b + "downsample.conv.weight"], stride=stride), p,
                b + "downsample")
      x = _relu(y + x)
  return x.mean(axis=(2, 3)) @ p["head.fc.weight"].T + p["head.fc.bias"]


def _template(model, size=40):
  """Zeros of the model's parameter shapes: what `load` lays a checkpoint onto (cheaper
  than compiling `init`)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, size, size, 3), np.float32))["params"]
  return jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes)


_COMPILED = {}


def _apply(model, params, images, train=False, rng=None):
  """`model.apply` compiled as one program, once per model and `train`."""
  key = (repr(model), train)
  if key not in _COMPILED:
    _COMPILED[key] = jax.jit(functools.partial(model.apply, train=train))
  rngs = {} if rng is None else {"dropout": jax.random.key(rng)}
  return _COMPILED[key]({"params": params}, images, rngs=rngs)


def test_timm_state_dict_gives_the_references_logits(tmp_path):
  model = regnet.Model(num_classes=CLASSES, **TINY)
  sd = _timm_state_dict(*TINY_STAGES)
  path = str(tmp_path / "timm.safetensors")
  save_file(sd, path)
  params = models.load("regnet", _template(model), path, TINY)
  logits, aux = _apply(model, params, _images())
  expected = _numpy_regnet(sd, _images(), TINY_STAGES[1], TINY_STAGES[2])
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5, atol=1e-5)
  # 40 -> stem 20 -> stages 10, 5, 3, 2 (padding 1 on odd grids, as PyTorch).
  assert aux["stem"].shape == (2, 20, 20, 32) and aux["encoded"].shape == (2, 2, 2, 64)
  assert aux["pre_logits"].shape == (2, 64) and aux["logits"].dtype == jnp.float32
  block = params["s3"]["b2"]
  assert block["conv2"]["conv"]["kernel"].shape == (3, 3, 8, 32)
  assert block["se"]["fc1"]["kernel"].shape == (32, 8) and "downsample" not in block
  np.testing.assert_array_equal(block["conv2"]["bn"]["var"], sd["s3.b2.conv2.bn.running_var"])
  # Frozen BN: train=True computes the same function, and no gradient reaches the stats.
  def loss(p):
    y = model.apply({"params": p}, _images(), train=True)[0]
    return y.sum(), y

  grads, train_logits = jax.jit(jax.grad(loss, has_aux=True))(params)
  np.testing.assert_allclose(train_logits, logits, rtol=1e-6, atol=1e-6)
  flat = loading.flatten(grads)
  assert not any(np.any(v) for n, v in flat.items() if n.endswith(("/mean", "/var")))
  assert np.any(flat["s3/b2/conv2/bn/scale"]) and np.any(flat["stem/conv/kernel"])


# ---------------------------------------------------------------------------------------
# vitcls trees, other class counts, wrong files.

def _known_params(model, seed=1):
  """Random parameters of the model's shapes: N(0, 0.1^2) leaves, around 1 for BN scales
  and variances in [0.5, 2]."""
  rng = np.random.default_rng(seed)

  def leaf(name, x):
    if name.endswith("/var"):
      return rng.uniform(0.5, 2.0, x.shape).astype(x.dtype)
    center = 1.0 if name.endswith("/scale") else 0.0
    return (center + 0.1 * rng.standard_normal(x.shape)).astype(x.dtype)

  return loading.unflatten({n: leaf(n, x) for n, x in loading.flatten(_template(model)).items()})


def test_fresh_init_npz_round_trip_and_another_class_count(tmp_path):
  model = regnet.Model(num_classes=CLASSES, **TINY)
  fresh = jax.device_get(jax.jit(model.init)(jax.random.key(99), _images())["params"])
  # timm's _init_weights: N(0, 2 / fan_out), fan_out / groups; conv3/bn at scale 0;
  # statistics 0 / 1; the head N(0, 0.01^2).
  kernel = fresh["s4"]["b1"]["conv2"]["conv"]["kernel"]  # (3, 3, 8, 64), 8 groups.
  assert abs(np.std(kernel) - math.sqrt(2 / (9 * 64 / 8))) < 0.1 * math.sqrt(2 / 72)
  assert not np.any(fresh["s2"]["b1"]["conv3"]["bn"]["scale"])
  np.testing.assert_array_equal(fresh["s2"]["b1"]["conv1"]["bn"]["var"], 1.0)
  assert not np.any(fresh["stem"]["bn"]["mean"]) and np.std(fresh["head"]["kernel"]) < 0.02
  params = _known_params(model)
  expected = np.asarray(_apply(model, params, _images())[0])
  path = str(tmp_path / "regnet.npz")
  loading.write_npz(path, params)
  loaded = models.load("regnet", _template(model), path, TINY)
  np.testing.assert_array_equal(_apply(model, loaded, _images())[0], expected)
  # 3 classes: the head keeps its fresh init; the rest is loaded, from a tree or a file.
  init3 = _known_params(regnet.Model(num_classes=3, **TINY), seed=5)
  for source in (path, params):
    loaded = regnet.load(init3, source, {})
    np.testing.assert_array_equal(loaded["head"]["kernel"], init3["head"]["kernel"])
    np.testing.assert_array_equal(loaded["s4"]["b1"]["se"]["fc2"]["bias"],
                                  params["s4"]["b1"]["se"]["fc2"]["bias"])
  sd = _timm_state_dict(*TINY_STAGES, classes=1000)
  save_file(sd, str(tmp_path / "in1k.safetensors"))
  loaded = regnet.load(init3, str(tmp_path / "in1k.safetensors"), {})
  np.testing.assert_array_equal(loaded["head"]["bias"], init3["head"]["bias"])
  np.testing.assert_array_equal(loaded["stem"]["bn"]["mean"], sd["stem.bn.running_mean"])


def _one_line_error(init, checkpoint, fragment):
  with pytest.raises(loading.CheckpointError, match=fragment) as e:
    regnet.load(init, checkpoint, {})
  assert "\n" not in str(e.value)


def test_wrong_checkpoints_are_refused_in_one_line(tmp_path):
  init = _template(regnet.Model(num_classes=CLASSES, **TINY))
  vit = {"cls_token": np.zeros((1, 1, 8), np.float32),
         "patch_embed.proj.weight": np.zeros((8, 3, 4, 4), np.float32),
         "head.weight": np.zeros((CLASSES, 8), np.float32)}
  save_file(vit, str(tmp_path / "vit.safetensors"))
  _one_line_error(init, str(tmp_path / "vit.safetensors"),
                  r"is not a timm RegNet state dict \(it has e.g. 'cls_token' but no "
                  r"'stem.conv.weight'\)")
  _one_line_error(init, {"stem": {"conv": {"kernel": np.zeros((4, 4, 3, 8))}},
                         "stages_0": {}}, "is not a vitcls RegNet checkpoint")
  regnetx = {k: v for k, v in _timm_state_dict(*TINY_STAGES).items() if ".se." not in k}
  save_file(regnetx, str(tmp_path / "x.safetensors"))
  _one_line_error(init, str(tmp_path / "x.safetensors"), "without Squeeze-Excitation")
  deeper = regnet._from_torch(  # pylint: disable=protected-access
      _timm_state_dict((8, 16, 32, 64), (1, 1, 3, 1), (8, 8, 8, 8)), "sd")
  _one_line_error(init, deeper, r"depths \[1, 1, 3, 1\], widths \[8, 16, 32, 64\], "
                                r"group_sizes \[8, 8, 8, 8\] but the model has depths "
                                r"\[1, 1, 2, 1\].*set config.model.variant")
  z = dict(_timm_state_dict(*TINY_STAGES), **{
      "final_conv.conv.weight": np.zeros((16, 64, 1, 1), np.float32)})
  save_file(z, str(tmp_path / "z.safetensors"))
  _one_line_error(init, str(tmp_path / "z.safetensors"),
                  "parameters vitcls's RegNetY does not have: final_conv.conv.weight")


# ---------------------------------------------------------------------------------------
# Layer ids, stochastic depth, dtype.

def test_layer_ids_are_timms_block_groups():
  shapes = jax.eval_shape(regnet.Model(num_classes=1000, variant="Y-16GF").init,
                          jax.random.key(0), jax.ShapeDtypeStruct((1, 64, 64, 3), np.float32))
  ids, top = regnet.layer_ids(shapes["params"])
  flat = loading.flatten(ids)
  # timm's group_matcher: stem, then ^s(\d+)\.b(\d+) in order; the head last.
  order = [f"s{i + 1}/b{j + 1}" for i, d in enumerate((2, 4, 11, 1)) for j in range(d)]
  expected = {}
  for name in loading.flatten(shapes["params"]):
    block = "/".join(name.split("/")[:2])
    expected[name] = (0 if name.startswith("stem/") else
                      order.index(block) + 1 if block in order else 19)
  assert top == 19 and flat == expected
  assert flat["s1/b1/downsample/bn/mean"] == 1 and flat["s4/b1/se/fc1/bias"] == 18
  assert flat["head/kernel"] == 19 and flat["stem/bn/scale"] == 0


def test_stochastic_depth_and_dtype():
  images = _images()  # The shapes of the other tests: their compiled apply is reused.
  params = _known_params(regnet.Model(num_classes=CLASSES, **TINY))
  plain = regnet.Model(num_classes=CLASSES, **TINY)
  deep = regnet.Model(num_classes=CLASSES, stoch_depth=0.5, **TINY)
  reference = np.asarray(_apply(plain, params, images)[0])
  train = [np.asarray(_apply(deep, params, images, train=True, rng=k)[0]) for k in (1, 2)]
  assert not np.allclose(train[0], train[1]) and not np.allclose(train[0], reference)
  half = regnet.Model(num_classes=CLASSES, dtype="bfloat16", **TINY)
  logits, aux = _apply(half, params, images)
  assert logits.dtype == aux["encoded"].dtype == jnp.float32
  np.testing.assert_allclose(logits, reference, atol=0.1 * np.abs(reference).max())
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(_template(half)))


# ---------------------------------------------------------------------------------------
# Config checks.

def _problems(**model):
  c = configs.defaults()
  c.model_name = "regnet"
  c.model = model
  found = []
  validate._model(c, found)  # pylint: disable=protected-access
  return found


def test_config_fields_are_checked_by_their_rules():
  assert "regnet" in models.available()
  assert models.field_rules("regnet") == regnet.FIELD_RULES
  assert models.fields("regnet") == {"variant", "w0", "wa", "wm", "group_size", "depth",
                                     "stoch_depth", "head_zeroinit", "dtype"}
  assert _problems(variant="Y-16GF", stoch_depth=0.1) == []
  assert _problems(**TINY) == []
  for bad, fragment in [
      (dict(variant="160"), "config.model.variant must be one of 'Y-200MF', 'Y-400MF'"),
      (dict(depth=0), "config.model.depth must be a positive integer"),
      (dict(stoch_depth=1.5), "config.model.stoch_depth must be a number in [0, 1]"),
      (dict(width=[8]), "unknown config key 'model.width' for model 'regnet'"),
  ]:
    found = _problems(**bad)
    assert len(found) == 1 and fragment in found[0], (bad, found)
  # What only the model knows, build reports in one line.
  for cfg, fragment in [
      (dict(w0=8, wa=12.0), r"RegNet size not given: set variant \(e.g. 'Y-16GF'\) or wm, "
                            r"group_size, depth"),
      (dict(TINY, w0=12), "w0 must be a positive multiple of 8, got 12"),
      (dict(TINY, wm=1.0), r"wm \(the width multiplier\) must be a number > 1"),
      (dict(TINY, depth=3), r"gives 3 stages of widths \[8, 16, 32\], not 4"),
      (dict(variant="Y-16GF", dtype="float13"), "unknown dtype"),
  ]:
    with pytest.raises(configs.ConfigError, match=fragment) as e:
      models.build("regnet", 10, cfg)
    assert "\n" not in str(e.value)
  # A variant's numbers are overridden field by field.
  assert regnet.Model(variant="Y-16GF", depth=20).sizes()["depths"] != (2, 4, 11, 1)
