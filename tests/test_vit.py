"""Tests for vitcls/models/vit.py: sizes, FLOPs and semantics against independent numbers.

Parameter counts are the published ones (google-research/vision_transformer models_test.py);
FLOPs are XLA's count against twice the published multiply-accumulates; the rest checks each
option against a computation written here without the model's code.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitcls import models
from vitcls.models import vit

# Small model for semantic tests: width 32, depth 1, 2 heads; patch 4 on 16x16 -> 16 tokens.
SMALL = dict(num_classes=5, variant="mu/4", head_zeroinit=False)


def _images(n=2, size=16, seed=0):
  return jax.random.uniform(jax.random.key(seed), (n, size, size, 3), minval=-1, maxval=1)


def _init(model, images, seed=0):
  return model.init(jax.random.key(seed), images)["params"]


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _layernorm(x, eps=1e-6):  # Independent LayerNorm with unit scale and zero bias.
  x = np.asarray(x, np.float64)
  mean = x.mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(x.var(-1, keepdims=True) + eps)


@pytest.mark.parametrize("variant, expected", [
    ("Ti/16", 5_717_416), ("S/16", 22_050_664), ("B/16", 86_567_656),
    ("L/16", 304_326_632)])
def test_param_count_matches_official(variant, expected):
  """The published counts hold an N+1 position embedding (the cls token's entry first);
  vitcls follows big_vision's current layout, which folds that entry into `cls`, so it
  has exactly one width fewer."""
  model = vit.Model(num_classes=1000, variant=variant, pool_type="tok", posemb="learn")
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  assert _count(shapes) == expected - vit.decode_variant(variant)["width"]


@pytest.mark.parametrize("variant, gmacs", [("Ti/16", 1.26), ("S/16", 4.61), ("B/16", 17.58)])
def test_forward_flops_match_published_macs(variant, gmacs):
  model = vit.Model(num_classes=1000, variant=variant, pool_type="tok")
  images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), images)
  forward = lambda p, x: model.apply(p, x)[0]  # noqa: E731
  cost = jax.jit(forward).lower(params, images).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older jax returned one dict per device.
    cost = cost[0]
  assert cost["flops"] / (2 * gmacs * 1e9) == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("pool_type, tokens", [("gap", 16), ("tok", 17), ("map", 16)])
def test_output_shapes(pool_type, tokens):
  model = vit.Model(**SMALL, pool_type=pool_type)
  images = _images()
  logits, aux = model.apply({"params": _init(model, images)}, images)
  assert logits.shape == (2, 5) and logits.dtype == jnp.float32
  assert aux["pre_logits"].shape == (2, 32)
  assert aux["encoded"].shape == (2, tokens, 32)


def test_no_head_returns_pre_logits_and_rep_size_adds_tanh_layer():
  images = _images()
  for num_classes in (0, None):
    model = vit.Model(num_classes=num_classes, variant="mu/4")
    params = _init(model, images)
    logits, aux = model.apply({"params": params}, images)
    assert "head" not in params
    np.testing.assert_array_equal(logits, aux["pre_logits"])
  for rep_size, width in ((True, 32), (24, 24)):
    model = vit.Model(**SMALL, rep_size=rep_size)
    params = _init(model, images)
    _, aux = model.apply({"params": params}, images)
    assert params["pre_logits"]["kernel"].shape == (32, width)
    assert aux["pre_logits"].shape == (2, width)
    assert np.all(np.abs(aux["pre_logits"]) <= 1.0)  # tanh range


def test_gap_is_mean_of_encoded_tokens():
  model = vit.Model(**SMALL, pool_type="gap")
  images = _images()
  _, aux = model.apply({"params": _init(model, images)}, images)
  np.testing.assert_allclose(aux["pre_logits"], np.mean(aux["encoded"], axis=1),
                             rtol=1e-5, atol=1e-6)


def test_tok_reads_cls_token_at_position_zero():
  model = vit.Model(**SMALL, pool_type="tok")
  images = _images()
  params = _init(model, images)
  logits, aux = model.apply({"params": params}, images)
  np.testing.assert_array_equal(aux["pre_logits"], aux["encoded"][:, 0])
  # Not a constant shift: LayerNorm would remove that.
  moved = dict(params, cls=params["cls"] + jax.random.normal(jax.random.key(1), (1, 1, 32)))
  logits2, _ = model.apply({"params": moved}, images)
  assert np.max(np.abs(logits2 - logits)) > 1e-3


def test_map_pools_with_learned_probe_and_ignores_token_order():
  model = vit.Model(**SMALL, pool_type="map")
  images = _images()
  params = _init(model, images)
  assert params["MAPHead_0"]["probe"].shape == (1, 1, 32)
  _, aux = model.apply({"params": params}, images)
  head = vit.MAPHead(mlp_dim=128, num_heads=2)
  pooled = head.apply({"params": params["MAPHead_0"]}, aux["encoded"])
  np.testing.assert_allclose(pooled, aux["pre_logits"], rtol=1e-5, atol=1e-6)
  shuffled = aux["encoded"][:, np.random.default_rng(0).permutation(16)]
  np.testing.assert_allclose(head.apply({"params": params["MAPHead_0"]}, shuffled), pooled,
                             rtol=1e-4, atol=1e-5)


def _numpy_sincos(h, w, width, temperature=10_000.0):
  quarter = width // 4
  pe = np.zeros((h * w, width))
  for row in range(h):
    for col in range(w):
      for k in range(quarter):
        freq = temperature ** (-k / (quarter - 1))
        pe[row * w + col, [k, quarter + k, 2 * quarter + k, 3 * quarter + k]] = [
            np.sin(col * freq), np.cos(col * freq), np.sin(row * freq), np.cos(row * freq)]
  return pe


def test_sincos2d_posemb_matches_numpy_and_skips_cls():
  # depth=0: encoded = encoder_norm(tokens entering the encoder), LN at init is plain.
  model = vit.Model(num_classes=0, variant="mu/4", depth=0, posemb="sincos2d",
                    pool_type="tok")
  images = _images(size=12)  # 3x3 grid: rows and columns differ.
  params = _init(model, images)
  assert "pos_embedding" not in params
  np.testing.assert_allclose(vit.posemb_sincos_2d(3, 3, 32)[0], _numpy_sincos(3, 3, 32),
                             atol=1e-6)
  _, aux = model.apply({"params": params}, images)
  stem = np.asarray(aux["stem"]).reshape(2, 9, 32)
  np.testing.assert_allclose(aux["encoded"][:, 1:], _layernorm(stem + _numpy_sincos(3, 3, 32)),
                             atol=2e-4)
  cls = np.broadcast_to(np.asarray(params["cls"]) + 0.5, (2, 1, 32))
  cls = cls + np.linspace(-1, 1, 32)  # non-constant cls token so LN(cls) is non-trivial
  _, aux = model.apply({"params": dict(params, cls=cls[:1])}, images)
  np.testing.assert_allclose(aux["encoded"][:, :1], _layernorm(cls), atol=2e-4)


def test_learned_posemb_covers_patches_only_and_cls_comes_after():
  model = vit.Model(num_classes=0, variant="mu/4", depth=0, posemb="learn", pool_type="tok")
  images = _images()
  params = _init(model, images)
  pos = np.asarray(params["pos_embedding"])
  assert pos.shape == (1, 16, 32)  # big_vision's layout: no entry for the cls token.
  assert np.std(pos) == pytest.approx(32 ** -0.5, rel=0.15)
  cls = np.linspace(-1, 1, 32).reshape(1, 1, 32)
  _, aux = model.apply({"params": dict(params, cls=cls)}, images)
  tokens = np.asarray(aux["stem"]).reshape(2, 16, 32) + pos
  tokens = np.concatenate([np.broadcast_to(cls, (2, 1, 32)), tokens], axis=1)
  np.testing.assert_allclose(aux["encoded"], _layernorm(tokens), atol=2e-4)


def _stack_blocks(params, depth):
  """Unscanned params -> scanned params (blocks stacked on a leading axis)."""
  enc = dict(params["Transformer"])
  blocks = [enc.pop(f"encoderblock_{i}") for i in range(depth)]
  enc["encoderblock"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
  return dict(params, Transformer=enc)


def test_scan_matches_unrolled_blocks():
  cfg = dict(SMALL, depth=3, pool_type="tok")
  images = _images()
  loop, scan = vit.Model(**cfg), vit.Model(**cfg, scan=True)
  params = _init(loop, images)
  scan_params = _init(scan, images)
  stacked = _stack_blocks(params, 3)
  assert jax.tree.map(jnp.shape, scan_params) == jax.tree.map(jnp.shape, stacked)
  assert scan_params["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"].shape \
      == (3, 32, 128)
  np.testing.assert_allclose(scan.apply({"params": stacked}, images)[0],
                             loop.apply({"params": params}, images)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scan", [False, True])
def test_remat_gives_identical_outputs_and_gradients(scan):
  cfg = dict(SMALL, depth=2, scan=scan)
  images = _images()
  plain, remat = vit.Model(**cfg), vit.Model(**cfg, remat=True, remat_policy="dots_saveable")
  params = _init(plain, images)

  def loss(model):
    return lambda p: jnp.sum(model.apply({"params": p}, images)[0] ** 2)

  l1, g1 = jax.value_and_grad(loss(plain))(params)
  l2, g2 = jax.value_and_grad(loss(remat))(params)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  assert l1 > 0
  # Same maths; XLA may fuse the recomputation differently, so allow float32 rounding
  # (relative to the largest gradient: e.g. attention key biases have zero gradient).
  scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(g1))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale),
               g1, g2)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  images = _images()
  fp32 = vit.Model(**SMALL)
  bf16 = vit.Model(**SMALL, dtype="bfloat16")
  params = _init(bf16, images)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  ref, _ = fp32.apply({"params": params}, images)
  logits, aux = bf16.apply({"params": params}, images)
  assert logits.dtype == jnp.float32 and aux["pre_logits"].dtype == jnp.float32
  assert not np.array_equal(logits, ref)  # bf16 really computed in lower precision
  np.testing.assert_allclose(logits, ref, atol=0.05 * np.max(np.abs(ref)))


def test_dropout_and_stoch_depth_only_act_in_training():
  cfg = dict(SMALL, depth=2)
  images = _images(n=4)
  clean = vit.Model(**cfg)
  noisy = vit.Model(**cfg, dropout=0.3, stoch_depth=0.5)
  params = _init(clean, images)
  ref, _ = clean.apply({"params": params}, images)
  for _ in range(2):
    out, _ = noisy.apply({"params": params}, images, train=False)
    np.testing.assert_array_equal(out, ref)
  train = lambda seed: noisy.apply({"params": params}, images, train=True,  # noqa: E731
                                   rngs={"dropout": jax.random.key(seed)})[0]
  assert np.max(np.abs(train(1) - ref)) > 1e-3
  np.testing.assert_array_equal(train(1), train(1))
  assert np.max(np.abs(train(1) - train(2))) > 1e-3


@pytest.mark.parametrize("scan", [False, True])
def test_stoch_depth_drops_whole_examples_linearly_in_depth(scan):
  # depth 2: rates are [0, stoch_depth]. An example whose block-1 branches are dropped
  # gives exactly what a depth-1 model (block 0 only) gives.
  images = _images(n=64)
  cfg = dict(SMALL, depth=2, scan=scan)
  params = _init(vit.Model(**cfg), images)
  blocks = (jax.tree.map(lambda x: x[:1], params["Transformer"]["encoderblock"]) if scan
            else {"encoderblock_0": params["Transformer"]["encoderblock_0"]})
  short_params = dict(params, Transformer=dict(params["Transformer"], **(
      {"encoderblock": blocks} if scan else blocks)))
  if not scan:
    del short_params["Transformer"]["encoderblock_1"]
  short, _ = vit.Model(**dict(cfg, depth=1)).apply({"params": short_params}, images)

  def train(rate):
    return vit.Model(**cfg, stoch_depth=rate).apply(
        {"params": params}, images, train=True, rngs={"dropout": jax.random.key(3)})[0]

  np.testing.assert_allclose(train(1.0), short, rtol=1e-5, atol=1e-5)
  dropped = np.all(np.isclose(train(0.5), short, rtol=1e-5, atol=1e-5), axis=1)
  assert 16 <= dropped.sum() <= 48  # Binomial(64, 0.5): per-example, not all or none.


def test_decode_variant_and_overrides():
  assert vit.decode_variant("S/16") == dict(width=384, depth=12, mlp_dim=1536, num_heads=6,
                                            patch_size=(16, 16))
  assert vit.decode_variant("g/14")["width"] == 1408
  assert vit.decode_variant("B/7")["patch_size"] == (7, 7)
  assert vit.decode_variant(None) == {}
  model = vit.Model(num_classes=3, variant="S/16", depth=2, width=64, mlp_dim=96,
                    num_heads=4, patch_size=8)
  params = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))["params"]
  assert set(params["Transformer"]) == {"encoderblock_0", "encoderblock_1", "encoder_norm"}
  assert params["embedding"]["kernel"].shape == (8, 8, 3, 64)
  assert params["pos_embedding"].shape == (1, 16, 64)


@pytest.mark.parametrize("variant", ["X/16", "S16", "S/0", "S/-4", "S/16/2", "S/abc", "s/16", 16])
def test_unknown_variant_raises_clear_error(variant):
  expected = (f"unknown ViT variant {variant!r}: expected NAME/PATCH with NAME in "
              "mu, Ti, S, M, B, L, H, g (e.g. 'S/16')")
  with pytest.raises(ValueError) as info:
    vit.decode_variant(variant)
  assert str(info.value) == expected
  with pytest.raises(ValueError, match="unknown ViT variant"):
    vit.Model(num_classes=3, variant=variant).init(jax.random.key(0), _images())


@pytest.mark.parametrize("field, value, message", [
    ("pool_type", "cls", "unknown pool_type 'cls': expected one of gap, tok, map"),
    ("posemb", "sincos", "unknown posemb 'sincos': expected one of learn, sincos2d"),
    ("remat_policy", "fast", "unknown remat_policy 'fast'"),
    ("dtype", "bfloat17", "unknown dtype 'bfloat17'"),
    ("weight_init", "torch", "unknown weight_init 'torch': expected one of big_vision, timm")])
def test_unknown_options_raise_clear_error(field, value, message):
  model = vit.Model(**SMALL, **{field: value})
  with pytest.raises(ValueError) as info:
    model.init(jax.random.key(0), _images())
  assert str(info.value).startswith(message)
  assert "\n" not in str(info.value)


def test_missing_size_raises_clear_error():
  with pytest.raises(ValueError, match="ViT size not given: set variant .* or all of"):
    vit.Model(num_classes=3, width=32).init(jax.random.key(0), _images())


def test_registry_finds_vit_by_name_and_lists_models_on_typo():
  assert models.get("vit") is vit.Model
  assert "vit" in models.available() and "common" not in models.available()
  with pytest.raises(ValueError) as info:
    models.get("vitt")
  assert str(info.value) == (
      f"unknown model 'vitt': available models: {', '.join(models.available())}")
  for name in ("common", "__init__", "vit.Model", ""):
    with pytest.raises(ValueError, match="unknown model"):
      models.get(name)


# timm 0.3.2 / DeiT initialisation (weight_init="timm"), checked by the statistics of the
# drawn values, not by calling the initialisers: a width-192 model, patch 16 on 64x64.
TIMM_MODEL = dict(num_classes=1000, width=192, depth=2, mlp_dim=768, num_heads=3,
                  patch_size=16, pool_type="tok", posemb="learn", head_zeroinit=False,
                  weight_init="timm")


def _by_path(params):
  return {jax.tree_util.keystr(k): np.asarray(v, np.float64)
          for k, v in jax.tree_util.tree_leaves_with_path(params)}


def _normal_tail(k):  # P(|z| > k) for a standard normal, from math.erfc.
  import math
  return math.erfc(k / math.sqrt(2))


@pytest.fixture(scope="module")
def timm_params():
  return _by_path(_init(vit.Model(**TIMM_MODEL), _images(1, 64)))


def test_timm_init_keeps_shapes_and_names():
  images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  for extra in (dict(), dict(pool_type="map", rep_size=True), dict(scan=True)):
    shapes = [jax.eval_shape(vit.Model(**dict(TIMM_MODEL, **extra, weight_init=w)).init,
                             jax.random.key(0), images) for w in ("big_vision", "timm")]
    assert jax.tree.map(lambda x: x.shape, shapes[0]) == jax.tree.map(
        lambda x: x.shape, shapes[1])


def test_timm_init_linear_kernels_are_normal_std_002_not_cut_at_2_std(timm_params):
  """timm's trunc_normal_(std=.02) cuts at +-2 in value (100 std): the draws are N(0, .02^2).

  A cut at 2 std would give std 0.88 x .02 and nothing past .04; here 4.55% lie past it.
  """
  kernels = [v for k, v in timm_params.items()
             if k.endswith("['kernel']") and "embedding" not in k]
  assert len(kernels) == 2 * 6 + 1  # Per block q, k, v, out, fc1, fc2; and the head.
  for k in kernels:
    assert k.std() == pytest.approx(0.02, rel=0.03)
  w = np.concatenate([k.ravel() for k in kernels])
  assert w.size > 1_000_000
  assert abs(w.mean()) < 1e-4
  assert w.std() == pytest.approx(0.02, rel=0.005)
  assert np.mean(np.abs(w) > 0.04) == pytest.approx(_normal_tail(2.0), abs=0.001)
  assert np.mean(np.abs(w) > 0.06) == pytest.approx(_normal_tail(3.0), abs=3e-4)
  assert np.abs(w).max() < 2.0


def test_timm_init_tokens_biases_norms_and_patch_embedding(timm_params):
  p = timm_params
  pos, cls = p["['pos_embedding']"], p["['cls']"]
  assert pos.shape == (1, 16, 192) and pos.std() == pytest.approx(0.02, rel=0.05)
  assert cls.std() == pytest.approx(0.02, rel=0.2) and np.all(cls != 0)
  for k, v in p.items():
    if k.endswith("['bias']") and "embedding" not in k:
      assert np.all(v == 0), k  # Linear biases zero; LayerNorm biases zero.
    if k.endswith("['scale']"):
      assert np.all(v == 1), k
  bound = 1 / np.sqrt(16 * 16 * 3)  # torch Conv2d default: U(+-1/sqrt(fan_in)).
  for name in ("kernel", "bias"):
    v = p[f"['embedding']['{name}']"]
    assert v.min() >= -bound and v.max() <= bound
    assert v.max() > 0.9 * bound and v.min() < -0.9 * bound
  kernel = p["['embedding']['kernel']"]
  assert kernel.std() == pytest.approx(bound / np.sqrt(3), rel=0.01)


def test_trunc_normal_bounds_are_absolute_values():
  """With bounds inside the distribution it is a true truncated normal (not a clip)."""
  import math
  z = np.asarray(vit.trunc_normal(std=1.0)(jax.random.key(1), (400_000,)), np.float64)
  assert z.min() >= -2 and z.max() <= 2
  pdf2 = math.exp(-2.0) / math.sqrt(2 * math.pi)  # Standard normal density at 2.
  var = 1 - 2 * 2 * pdf2 / (1 - _normal_tail(2.0))  # Of N(0, 1) truncated to [-2, 2].
  assert z.std() == pytest.approx(math.sqrt(var), rel=0.005)
  assert np.mean(np.abs(z) > 1.9) > 0.005  # Mass near the bounds: not a clip at 2.
  assert np.mean(z == 2) == 0 and np.mean(z == -2) == 0
  w = np.asarray(vit.trunc_normal(std=0.5, a=-0.25, b=1.0)(jax.random.key(2), (100_000,)))
  assert w.min() >= -0.25 and w.max() <= 1.0 and w.max() > 0.95


def test_big_vision_init_is_the_default_and_unchanged():
  images = _images(1, 64)
  default = _by_path(_init(vit.Model(**dict(TIMM_MODEL, weight_init="big_vision")), images))
  assert np.all(default["['cls']"] == 0)
  assert default["['pos_embedding']"].std() == pytest.approx(192 ** -0.5, rel=0.05)
  mlp_bias = default["['Transformer']['encoderblock_0']['MlpBlock_0']['Dense_0']['bias']"]
  assert 0 < np.abs(mlp_bias).max() < 1e-5
  plain = dict(TIMM_MODEL)
  del plain["weight_init"]
  same = _by_path(_init(vit.Model(**plain), images))
  assert all(np.array_equal(same[k], default[k]) for k in default)


# Published towers: parameter counts from jax.eval_shape against timm's published
# param_count (millions, 2 decimals; results/benchmark-infer-amp-nchw-pt240-cu124-rtx3090.csv
# in huggingface/pytorch-image-models, the same column as results/results-imagenet.csv),
# compared at that precision. timm's pos_embed keeps an entry for the cls token unless the
# model has no_embed_class (DeiT-III, DINOv2-reg) or no cls token (SigLIP); vitcls folds
# that entry into `cls` on load, so it is added back (`folded`) before comparing.
