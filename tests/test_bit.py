"""Tests for vitcls/models/bit.py: sizes, numerics and checkpoint loading.

Parameter counts are the published BiT ones (R50x1, R101x1, R50x3 with a 1000-class head);
numerics are checked against a NumPy ResNet-v2 written here (explicit kernel
standardisation, a loop-over-taps convolution, GroupNorm by its formula) on random
parameters; loading writes the public BiT and the big_vision layouts from known params.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitcls import configs, models, validate
from vitcls.configs import ConfigError
from vitcls.models import bit, loading

# Smallest official-width net: 2 units in stage 1 (so an identity shortcut is covered),
# 1 elsewhere; 32x32 images give 16 -> 8 (stem) -> 8, 4, 2, 1 (stages).
TINY = dict(depth=(2, 1, 1, 1), width=1, head_zeroinit=False)
CLASSES = 5


def _images(n=2, size=32, seed=0):
  return jax.random.uniform(jax.random.key(seed), (n, size, size, 3), minval=-1, maxval=1)


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _shapes(model, size=224):
  return jax.eval_shape(model.init, jax.random.key(0),
                        jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))["params"]


def _randomize(tree, seed):
  """Every leaf random, with offsets and scales that standardisation must remove."""
  rng = np.random.default_rng(seed)
  flat = {}
  for name, x in loading.flatten(tree).items():
    shape = np.shape(x)
    if name.endswith("scale"):
      flat[name] = 1 + 0.3 * rng.standard_normal(shape)
    elif name.endswith("bias"):
      flat[name] = 0.3 * rng.standard_normal(shape)
    elif name.startswith("head/"):
      flat[name] = 0.05 * rng.standard_normal(shape)
    else:  # Conv kernels: a per-tensor offset and scale far from mean 0 / std 1.
      flat[name] = rng.uniform(-1, 1) + rng.uniform(0.1, 3) * rng.standard_normal(shape)
  return loading.unflatten({k: v.astype(np.float32) for k, v in flat.items()})


@pytest.fixture(scope="module")
def tiny():
  """(jitted apply, random params, images) of the tiny network with a 5-class head."""
  model = bit.Model(num_classes=CLASSES, **TINY)
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
  return apply, _randomize(_shapes(model, 32), seed=1), _images()


# ---------------------------------------------------------------- NumPy reference

def _np_standardize(w):
  w = np.asarray(w, np.float64)
  w = w - w.mean(axis=(0, 1, 2), keepdims=True)
  return w / np.sqrt(np.mean(w ** 2, axis=(0, 1, 2), keepdims=True) + 1e-10)


def _np_conv(x, w, stride=1, pad=0):
  """Cross-correlation, NHWC x HWIO, as a sum over kernel taps of strided slices."""
  x = np.pad(np.asarray(x, np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  kh, kw = w.shape[:2]
  oh, ow = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], oh, ow, w.shape[3]))
  for i in range(kh):
    for j in range(kw):
      patch = x[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]
      out += patch @ np.asarray(w[i, j], np.float64)
  return out


def _np_groupnorm(x, p, groups=32, eps=1e-5):
  n, h, w, c = x.shape
  g = np.asarray(x, np.float64).reshape(n, h * w, groups, c // groups)
  mean = g.mean(axis=(1, 3), keepdims=True)
  var = ((g - mean) ** 2).mean(axis=(1, 3), keepdims=True)
  y = ((g - mean) / np.sqrt(var + eps)).reshape(x.shape)
  return y * np.reshape(p["scale"], -1) + np.reshape(p["bias"], -1)


def _np_maxpool(x):
  """3x3 stride 2, padding 1 that never wins (-inf), as big_vision's flax max_pool."""
  x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  oh, ow = (x.shape[1] - 3) // 2 + 1, (x.shape[2] - 3) // 2 + 1
  taps = [x[:, i:i + 2 * (oh - 1) + 1:2, j:j + 2 * (ow - 1) + 1:2]
          for i in range(3) for j in range(3)]
  return np.max(taps, axis=0)


def _relu(x):
  return np.maximum(x, 0)


def _np_unit(x, p, stride):
  """Pre-activation bottleneck; projection shortcut from the pre-activated input."""
  conv = lambda y, name, **kw: _np_conv(y, _np_standardize(p[name]["kernel"]), **kw)  # noqa: E731
  pre = _relu(_np_groupnorm(x, p["gn1"]))
  shortcut = conv(pre, "conv_proj", stride=stride) if "conv_proj" in p else x
  y = conv(pre, "conv1")
  y = conv(_relu(_np_groupnorm(y, p["gn2"])), "conv2", stride=stride, pad=1)
  y = conv(_relu(_np_groupnorm(y, p["gn3"])), "conv3")
  return y + shortcut


def _np_forward(p, images):
  out = {}
  x = _np_conv(images, _np_standardize(p["root_block"]["conv_root"]["kernel"]), 2, 3)
  x = out["stem"] = _np_maxpool(x)
  for s in range(4):
    block = p[f"block{s + 1}"]
    for u in range(len(block)):
      x = _np_unit(x, block[f"unit{u + 1:02d}"], stride=2 if s > 0 and u == 0 else 1)
    out[f"stage{s + 1}"] = x
  x = out["pre_logits"] = _relu(_np_groupnorm(x, p["norm-pre-head"])).mean(axis=(1, 2))
  if "head" in p:
    x = x @ np.asarray(p["head"]["kernel"], np.float64) + p["head"]["bias"]
  out["logits"] = x
  return out


def _close(actual, expected, rel=1e-4):
  expected = np.asarray(expected)
  np.testing.assert_allclose(actual, expected, rtol=0, atol=rel * np.max(np.abs(expected)))


def _expected_count(units, width, classes):
  """Bottleneck pre-activation ResNet, counted by hand: convs, GN scale+bias, head."""
  w0 = 64 * width
  total, cin = 7 * 7 * 3 * w0, w0
  for s, n in enumerate(units):
    mid = w0 * 2 ** s
    for u in range(n):
      total += 2 * cin + cin * mid + 2 * mid + 9 * mid * mid + 2 * mid + mid * 4 * mid
      total += cin * 4 * mid if u == 0 else 0
      cin = 4 * mid
  return total + 2 * cin + (cin * classes + classes if classes else 0)


# ---------------------------------------------------------------- sizes

@pytest.mark.parametrize("depth, width, expected", [
    (50, 1, 25_549_352), (101, 1, 44_541_480), (50, 3, 217_319_080)])
def test_param_count_matches_published(depth, width, expected):
  params = _shapes(bit.Model(num_classes=1000, depth=depth, width=width))
  assert _count(params) == expected
  assert _expected_count(bit.DEPTHS[depth], width, 1000) == expected  # The formula's check.


@pytest.mark.parametrize("depth, units", [
    (26, (2, 2, 2, 2)), (152, (3, 8, 36, 3)), ([1, 2, 3, 1], (1, 2, 3, 1))])
def test_other_depths_build_with_expected_units(depth, units):
  params = _shapes(bit.Model(num_classes=10, depth=depth, width=2), size=32)
  assert [len(params[f"block{s + 1}"]) for s in range(4)] == list(units)
  assert _count(params) == _expected_count(units, 2, 10)
  assert params["root_block"]["conv_root"]["kernel"].shape == (7, 7, 3, 128)
  assert params["head"]["kernel"].shape == (4 * 128 * 8, 10)


def test_param_names_are_big_vision_layout():
  params = _shapes(bit.Model(num_classes=3, **TINY), size=32)
  assert set(params) == {"root_block", "block1", "block2", "block3", "block4",
                         "norm-pre-head", "head"}
  projected = {n.rsplit("/", 2)[0] for n in loading.flatten(params) if "/conv_proj/" in n}
  assert projected == {f"block{s}/unit01" for s in range(1, 5)}
  assert set(params["block1"]["unit02"]) == {"gn1", "conv1", "gn2", "conv2", "gn3", "conv3"}
  assert params["block1"]["unit01"]["gn1"]["scale"].shape == (1, 1, 1, 64)
  assert params["block2"]["unit01"]["conv2"]["kernel"].shape == (3, 3, 128, 128)
  assert params["norm-pre-head"]["bias"].shape == (1, 1, 1, 2048)


# ---------------------------------------------------------------- numerics

def test_group_norm_matches_formula():
  rng = np.random.default_rng(0)
  x = (3 + 2 * rng.standard_normal((2, 5, 4, 64))).astype(np.float32)
  p = {"scale": rng.standard_normal((1, 1, 1, 64)).astype(np.float32),
       "bias": rng.standard_normal((1, 1, 1, 64)).astype(np.float32)}
  y = bit.GroupNorm().apply({"params": p}, x)
  _close(y, _np_groupnorm(x, p), rel=1e-5)


@pytest.mark.parametrize("kernel_size, stride, pad", [(3, 2, 1), (1, 1, 0), (7, 2, 3)])
def test_std_conv_matches_standardised_convolution(kernel_size, stride, pad):
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 9, 8, 6)).astype(np.float32)
  w = (0.7 + 2.5 * rng.standard_normal((kernel_size, kernel_size, 6, 10))).astype(np.float32)
  conv = bit.StdConv(10, kernel_size, strides=stride, padding=pad)
  y = conv.apply({"params": {"kernel": w}}, x)
  _close(y, _np_conv(x, _np_standardize(w), stride, pad), rel=1e-5)
  # Standardisation makes each output channel blind to its kernel's offset and scale.
  a = rng.uniform(0.5, 4, (1, 1, 1, 10)).astype(np.float32)
  b = rng.standard_normal((1, 1, 1, 10)).astype(np.float32)
  _close(conv.apply({"params": {"kernel": a * w + b}}, x), y, rel=1e-4)


def test_tiny_forward_matches_numpy_reference(tiny):
  apply, params, images = tiny
  logits, aux = apply(params, images)
  ref = _np_forward(params, np.asarray(images))
  assert logits.dtype == jnp.float32 and logits.shape == (2, CLASSES)
  shapes = {"stem": (2, 8, 8, 64), "stage1": (2, 8, 8, 256), "stage2": (2, 4, 4, 512),
            "stage3": (2, 2, 2, 1024), "stage4": (2, 1, 1, 2048), "pre_logits": (2, 2048)}
  for key, shape in shapes.items():
    assert aux[key].shape == shape, key
    _close(aux[key], ref[key])  # The stem covers the max-pool's never-winning padding.
  _close(logits, ref["logits"])
  np.testing.assert_array_equal(aux["logits"], logits)
  # No dropout and no batch statistics: training traces to the very same computation.
  model = bit.Model(num_classes=CLASSES, **TINY)
  trace = lambda train: str(jax.make_jaxpr(  # noqa: E731
      lambda p, x: model.apply({"params": p}, x, train=train))(params, images))
  assert trace(True) == trace(False)


def test_no_head_returns_pre_logits(tiny):
  _, params, images = tiny
  headless = {k: v for k, v in params.items() if k != "head"}
  for num_classes in (0, None):
    model = bit.Model(num_classes=num_classes, **TINY)
    assert "head" not in _shapes(model, 32)
    logits, aux = jax.eval_shape(model.apply, {"params": headless}, images)
    assert logits.shape == aux["pre_logits"].shape == (2, 2048)
  logits, aux = jax.jit(model.apply)({"params": headless}, images)  # One compile is enough.
  np.testing.assert_array_equal(logits, aux["pre_logits"])


def test_bfloat16_compute_keeps_float32_params_and_outputs(tiny):
  apply, params, images = tiny
  bf16 = bit.Model(num_classes=CLASSES, dtype="bfloat16", **TINY)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(_shapes(bf16, 32)))
  ref, _ = apply(params, images)
  logits, aux = jax.jit(bf16.apply)({"params": params}, images)
  assert logits.dtype == jnp.float32 and aux["pre_logits"].dtype == jnp.float32
  assert aux["stage2"].dtype == jnp.float32
  assert not np.array_equal(logits, ref)  # Really computed in lower precision.
  np.testing.assert_allclose(logits, ref, atol=0.05 * np.max(np.abs(ref)))


# ---------------------------------------------------------------- validation, registry

@pytest.mark.parametrize("field, value, message", [
    ("depth", 34, "unknown BiT depth 34: expected one of 26, 50, 101, 152 or a list"),
    ("depth", [3, 4, 6], "unknown BiT depth [3, 4, 6]"),
    ("depth", (3, 0, 6, 3), "unknown BiT depth [3, 0, 6, 3]"),
    ("depth", "50", "unknown BiT depth '50'"),
    ("width", 0, "BiT width must be a positive integer multiplier"),
    ("width", 1.5, "BiT width must be a positive integer multiplier"),
    ("width", True, "BiT width must be a positive integer multiplier"),
    ("dtype", "bfloat17", "unknown dtype 'bfloat17'")])
def test_bad_fields_raise_one_clear_line(field, value, message):
  model = bit.Model(num_classes=3, **{field: value})
  for check in (model.validate, lambda: model.init(jax.random.key(0), _images(n=1))):
    with pytest.raises(ValueError) as info:
      check()
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_registry_finds_bit_and_build_checks_fields():
  assert models.get("bit") is bit.Model
  assert "bit" in models.available()
  model = models.build("bit", 10, {"depth": 50})
  assert isinstance(model, bit.Model) and model.num_classes == 10 and model.depth == 50
  config = configs.resolve(configs.ConfigDict(), ["total_steps=1", "model_name=bit",
                                                   "model.depht=50"])
  with pytest.raises(ConfigError) as info:
    validate.check(config)
  assert str(info.value).startswith(
      "unknown config key 'model.depht' for model 'bit': known fields are depth, dtype, "
      "head_zeroinit, width")
  with pytest.raises(ConfigError, match=r"^config.model: unknown BiT depth 34"):
    models.build("bit", 10, {"depth": 34})


# ---------------------------------------------------------------- loading

def _public_layout(params, numbered=False):
  """The flat public BiT npz of `params`: 'resnet/...' keys, (C,) gamma/beta, conv head.

  numbered: name convs 'standardized_conv2d_<k>', as some public files do.
  """
  counter = iter(range(1, 10_000))
  conv = lambda: (f"standardized_conv2d_{next(counter)}" if numbered  # noqa: E731
                  else "standardized_conv2d")
  vec = lambda x: np.asarray(x).reshape(-1)  # noqa: E731
  flat = {"resnet/root_block/standardized_conv2d/kernel":
          params["root_block"]["conv_root"]["kernel"],
          "resnet/group_norm/gamma": vec(params["norm-pre-head"]["scale"]),
          "resnet/group_norm/beta": vec(params["norm-pre-head"]["bias"]),
          "resnet/head/conv2d/kernel": np.asarray(params["head"]["kernel"])[None, None],
          "resnet/head/conv2d/bias": params["head"]["bias"]}
  for block in (f"block{s}" for s in range(1, 5)):
    for unit, p in params[block].items():
      prefix = f"resnet/{block}/{unit}"
      for i, group in enumerate("abc", 1):
        flat[f"{prefix}/{group}/{conv()}/kernel"] = p[f"conv{i}"]["kernel"]
        flat[f"{prefix}/{group}/group_norm/gamma"] = vec(p[f"gn{i}"]["scale"])
        flat[f"{prefix}/{group}/group_norm/beta"] = vec(p[f"gn{i}"]["bias"])
      if "conv_proj" in p:
        flat[f"{prefix}/a/proj/{conv()}/kernel"] = p["conv_proj"]["kernel"]
  return flat


def _assert_same_tree(actual, expected):
  actual, expected = loading.flatten(actual), loading.flatten(expected)
  assert set(actual) == set(expected)
  for name, value in expected.items():
    assert np.shape(actual[name]) == np.shape(value), name
    np.testing.assert_array_equal(actual[name], value, err_msg=name)


def _init_like(params, seed=7):
  """Stands in for the trainer's fresh init: same tree, other values."""
  return _randomize(params, seed)


@pytest.mark.parametrize("numbered", [False, True])
def test_load_public_bit_npz(tiny, tmp_path, numbered):
  apply, params, images = tiny
  flat = _public_layout(params, numbered)
  assert flat["resnet/block1/unit01/a/group_norm/gamma"].shape == (64,)
  assert flat["resnet/head/conv2d/kernel"].shape == (1, 1, 2048, CLASSES)
  path = str(tmp_path / "BiT-M-tiny.npz")
  np.savez(path, **flat)
  loaded = bit.load(_init_like(params), path, {})
  _assert_same_tree(loaded, params)
  got, _ = apply(loaded, images)
  want, _ = apply(params, images)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("prefix", [False, True])
def test_load_big_vision_flat_npz(tiny, tmp_path, prefix):
  apply, params, images = tiny
  path = str(tmp_path / "bv.npz")
  loading.write_npz(path, {"params": params} if prefix else params)
  with np.load(path) as npz:
    assert ("params/" if prefix else "") + "block1/unit01/gn1/scale" in npz.files
  loaded = bit.load(_init_like(params), path, {})
  _assert_same_tree(loaded, params)
  got, _ = apply(loaded, images)
  want, _ = apply(params, images)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_head_kept_fresh_for_other_class_count_or_dont_load(tiny, tmp_path):
  _, params, _ = tiny
  path = str(tmp_path / "public.npz")
  np.savez(path, **_public_layout(params))
  body = {k: v for k, v in params.items() if k != "head"}
  model = bit.Model(num_classes=7, **dict(TINY, head_zeroinit=True))
  init = jax.tree.map(np.asarray, jax.jit(model.init)(jax.random.key(0), _images(n=1)))
  init = init["params"]  # A real init, as the trainer makes it: the head starts at zero.
  assert not np.any(init["head"]["kernel"]) and not np.any(init["head"]["bias"])
  np.testing.assert_array_equal(init["block1"]["unit01"]["gn1"]["scale"], 1)
  loaded = bit.load(init, path, {})
  _assert_same_tree(loaded["head"], init["head"])
  _assert_same_tree({k: v for k, v in loaded.items() if k != "head"}, body)
  init = _init_like(params)  # Same class count, but the head asked to stay fresh.
  loaded = bit.load(init, path, {}, dont_load=[r"head/.*"])
  _assert_same_tree(loaded["head"], init["head"])
  _assert_same_tree({k: v for k, v in loaded.items() if k != "head"}, body)


def test_wrong_width_checkpoint_is_one_clear_error(tiny, tmp_path):
  _, params, _ = tiny  # A width-1 checkpoint, loaded into a width-2 model.
  path = str(tmp_path / "w1.npz")
  np.savez(path, **_public_layout(params))
  wide = _shapes(bit.Model(num_classes=CLASSES, **dict(TINY, width=2)), 32)
  init = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), wide)
  with pytest.raises(loading.CheckpointError) as info:
    bit.load(init, path, {})
  message = str(info.value)
  assert "\n" not in message
  match = re.match(r"parameter '([^']+)' has shape (\(.*?\)) in the '(.*?)' but (\(.*?\)) "
                   r"in the model", message)
  assert match, message
  name, theirs, source, ours = match.groups()
  assert source == path
  assert theirs == str(np.shape(loading.flatten(params)[name]))
  assert ours == str(np.shape(loading.flatten(wide)[name]))
  assert theirs != ours


# ---------------------------------------------------------------- bit_v1 (big_vision's `bit`)

def _expected_count_v1(units, width, classes):
  """ResNet-v1 + GN: convs, a GN after every conv (root, 3 per unit, projections), head."""
  w0 = 64 * width
  total, cin = 7 * 7 * 3 * w0 + 2 * w0, w0
  for s, n in enumerate(units):
    mid = w0 * 2 ** s
    for u in range(n):
      total += cin * mid + 2 * mid + 9 * mid * mid + 2 * mid + mid * 4 * mid + 8 * mid
      total += cin * 4 * mid + 8 * mid if u == 0 else 0
      cin = 4 * mid
  return total + (cin * classes + classes if classes else 0)


@pytest.mark.parametrize("depth, width, expected", [
    (50, 1, 25_557_032), (101, 1, 44_549_160)])
def test_bit_v1_param_count(depth, width, expected):
  """torchvision's published ResNet-50 / -101 counts: GN's scale+bias replace BN's."""
  from vitcls.models import bit_v1
  params = _shapes(bit_v1.Model(num_classes=1000, depth=depth, width=width))
  assert _count(params) == expected == _expected_count_v1(bit.DEPTHS[depth], width, 1000)
  units = (1, 2, 1, 1)
  small = _shapes(bit_v1.Model(num_classes=10, depth=list(units), width=2), size=32)
  assert _count(small) == _expected_count_v1(units, 2, 10)


def test_bit_v1_layout_and_units_start_as_shortcuts():
  """big_vision models/bit.py:67: gn3's scale starts at 0, so a unit starts as its shortcut."""
  from vitcls.models import bit_v1
  model = bit_v1.Model(num_classes=CLASSES, depth=(2, 1, 1, 1))
  params = jax.jit(model.init)(jax.random.key(0), _images(n=1))["params"]
  assert set(params["block1"]) == {"unit1", "unit2"}
  assert set(params["block1"]["unit1"]) == {"conv1", "gn1", "conv2", "gn2", "conv3", "gn3",
                                            "conv_proj", "gn_proj"}
  logits, aux = jax.jit(model.apply)({"params": params}, _images())
  assert not np.any(logits)  # Zero head.
  shapes = {"stem": (2, 8, 8, 64), "stage1": (2, 8, 8, 256), "stage2": (2, 4, 4, 512),
            "stage3": (2, 2, 2, 1024), "stage4": (2, 1, 1, 2048)}
  assert {k: aux[k].shape for k in shapes} == shapes  # SAME padding halves exactly.
  # unit2 of block1 has no projection: its output is relu(its input) = its input.
  x = bit_v1.ResidualUnit(64).apply({"params": params["block1"]["unit2"]}, aux["stage1"])
  np.testing.assert_allclose(x, aux["stage1"], rtol=0, atol=0)
  assert np.all(np.asarray(aux["stem"]) >= 0)  # gn_root and a ReLU before the max-pool.


def test_bit_v1_standardisation_is_big_vision_formula():
  from vitcls.models import bit_v1
  rng = np.random.default_rng(2)
  x = rng.standard_normal((1, 6, 6, 4)).astype(np.float32)
  w = (0.3 + 2 * rng.standard_normal((3, 3, 4, 5))).astype(np.float32)
  y = bit_v1.StdConv(5, 3).apply({"params": {"kernel": w}}, x)
  ws = w.astype(np.float64) - w.mean(axis=(0, 1, 2))
  ws = ws / (ws.std(axis=(0, 1, 2)) + 1e-5)
  _close(y, _np_conv(x, ws, 1, 1), rel=1e-5)  # Stride 1, 3x3: SAME is a padding of 1.


def test_registry_finds_bit_v1():
  from vitcls.models import bit_v1
  assert models.get("bit_v1") is bit_v1.Model and "bit_v1" in models.available()
  with pytest.raises(ConfigError, match=r"^config.model: unknown BiT depth 34"):
    models.build("bit_v1", 10, {"depth": 34})
