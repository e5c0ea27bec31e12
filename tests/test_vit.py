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
from vitcls.models import loading, vit

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
TIMM_COUNTS = [
    # (timm name, vitcls config, image size, folded entries, timm param_count in M)
    ("vit_base_patch16_224", dict(num_classes=1000, variant="B/16", pool_type="tok"),
     224, 1, 86.57),
    ("deit_small_patch16_224", dict(num_classes=1000, variant="S/16", pool_type="tok"),
     224, 1, 22.05),
    ("deit3_small_patch16_224", dict(num_classes=1000, variant="S/16", pool_type="tok",
                                     layer_scale_init=1e-6), 224, 0, 22.06),
    ("vit_small_patch14_dinov2", dict(num_classes=0, variant="S/14", pool_type="tok",
                                      layer_scale_init=1e-5), 518, 1, 22.06),
    ("vit_base_patch14_reg4_dinov2", dict(num_classes=0, variant="B/14", pool_type="tok",
                                          layer_scale_init=1e-5, num_registers=4),
     518, 0, 86.58),
    ("vit_giant_patch14_dinov2", dict(num_classes=0, width=1536, depth=40, mlp_dim=4096,
                                      num_heads=24, patch_size=14, pool_type="tok",
                                      layer_scale_init=1e-5, mlp_type="swiglu"),
     518, 1, 1136.48),
    ("vit_base_patch16_siglip_224", dict(num_classes=0, variant="B/16", pool_type="map"),
     224, 0, 92.88),
    # Distilled DeiT: pos_embed has entries for cls and dist, both folded.
    ("deit_small_distilled_patch16_224", dict(num_classes=1000, variant="S/16",
                                              pool_type="tok", distill_token=True),
     224, 2, 22.44),
    ("deit_base_distilled_patch16_224", dict(num_classes=1000, variant="B/16",
                                             pool_type="tok", distill_token=True),
     224, 2, 87.34),
]


@pytest.mark.parametrize("name, cfg, size, folded, millions", TIMM_COUNTS,
                         ids=[c[0] for c in TIMM_COUNTS])
def test_param_count_matches_timm(name, cfg, size, folded, millions):
  del name
  model = vit.Model(**cfg, scan=True)  # Same count as unrolled; traces 1 block, not 40.
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  count = _count(shapes) + folded * model.sizes()["width"]
  assert round(count / 1e6, 2) == millions


def test_registers_follow_cls_without_posemb_and_pooling_skips_them():
  # depth=0: encoded = encoder_norm(tokens entering the encoder), a plain LN at init.
  model = vit.Model(num_classes=0, variant="mu/4", depth=0, pool_type="tok", num_registers=3)
  images = _images()
  params = _init(model, images)
  assert params["reg"].shape == (1, 3, 32)
  assert 0 < np.abs(params["reg"]).max() < 1e-5  # N(0, 1e-6^2), as timm and DINOv2.
  cls = np.linspace(-1, 1, 32).reshape(1, 1, 32)
  reg = np.random.default_rng(0).normal(size=(1, 3, 32))
  params = dict(params, cls=cls, reg=reg)
  _, aux = model.apply({"params": params}, images)
  patches = np.asarray(aux["stem"]).reshape(2, 16, 32) + np.asarray(params["pos_embedding"])
  tokens = np.concatenate([np.broadcast_to(cls, (2, 1, 32)), np.broadcast_to(reg, (2, 3, 32)),
                           patches], axis=1)
  np.testing.assert_allclose(aux["encoded"], _layernorm(tokens), atol=2e-4)
  np.testing.assert_array_equal(aux["pre_logits"], aux["encoded"][:, 0])

  for pool_type in ("gap", "map"):
    pooled = vit.Model(num_classes=0, variant="mu/4", pool_type=pool_type, class_token=True,
                       num_registers=3)
    p = _init(pooled, images)
    _, aux = pooled.apply({"params": p}, images)
    assert aux["encoded"].shape == (2, 20, 32)
    patches = aux["encoded"][:, 4:]  # timm: x[:, num_prefix_tokens:] before pooling.
    if pool_type == "gap":
      expected = np.mean(patches, axis=1)
    else:
      expected = vit.MAPHead(mlp_dim=128, num_heads=2).apply({"params": p["MAPHead_0"]},
                                                             patches)
    np.testing.assert_allclose(aux["pre_logits"], expected, rtol=1e-5, atol=1e-6)


FULL_OPTIONS = dict(SMALL, depth=2, class_token=True, num_registers=2, layer_scale_init=0.3,
                    mlp_type="swiglu", qkv_bias=False, gelu_approximate=False)


@pytest.mark.parametrize("pool_type", ["tok", "gap", "map"])
def test_new_options_work_with_scan_remat_and_every_pool(pool_type):
  cfg = dict(FULL_OPTIONS, pool_type=pool_type)
  images = _images()
  loop = vit.Model(**cfg)
  params = _init(loop, images)
  block = params["Transformer"]["encoderblock_0"]
  assert set(block) == {"LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerScale_0",
                        "LayerNorm_1", "MlpBlock_0", "LayerScale_1"}
  ref = loop.apply({"params": params}, images)[0]
  stacked = _stack_blocks(params, 2)
  for extra in (dict(scan=True), dict(scan=True, remat=True), dict(remat=True)):
    p = stacked if extra.get("scan") else params
    np.testing.assert_allclose(vit.Model(**cfg, **extra).apply({"params": p}, images)[0],
                               ref, rtol=1e-5, atol=1e-5)
  if pool_type != "tok":  # Gradients once: the pooling is not what remat changes.
    return
  loss = lambda m: lambda p: jnp.sum(m.apply({"params": p}, images)[0] ** 2)  # noqa: E731
  g1 = jax.grad(loss(loop))(params)
  g2 = jax.grad(loss(vit.Model(**cfg, remat=True)))(params)
  assert np.abs(g1["reg"]).max() > 0 and np.abs(g1["cls"]).max() > 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g2)


def test_layer_scale_scales_both_branches():
  cfg = dict(SMALL, depth=1, pool_type="tok", layer_scale_init=1e-5)
  images = _images()
  model = vit.Model(**cfg)
  params = _init(model, images)
  block = params["Transformer"]["encoderblock_0"]
  for name in ("LayerScale_0", "LayerScale_1"):
    np.testing.assert_array_equal(block[name]["scale"], np.full(32, 1e-5, np.float32))
  # Zero scales make the block the identity: the output is the depth-0 model's.
  zero = jax.tree.map(np.zeros_like, {k: block[k] for k in ("LayerScale_0", "LayerScale_1")})
  params = dict(params, Transformer=dict(params["Transformer"],
                                         encoderblock_0=dict(block, **zero)))
  _, aux = model.apply({"params": params}, images)
  shallow = dict(params, Transformer={"encoder_norm": params["Transformer"]["encoder_norm"]})
  _, ref = vit.Model(**dict(cfg, depth=0)).apply({"params": shallow}, images)
  np.testing.assert_allclose(aux["encoded"], ref["encoded"], atol=1e-6)
  # Each scale multiplies its branch: block(x) - x is linear in the attention scale when
  # the MLP branch is off.
  blk = vit.Encoder1DBlock(mlp_dim=128, num_heads=2, layer_scale_init=1e-5)
  x = np.random.default_rng(2).normal(size=(2, 5, 32)).astype(np.float32)
  branch = lambda s: np.asarray(blk.apply({"params": dict(  # noqa: E731
      block, LayerScale_0={"scale": np.full(32, s, np.float32)},
      LayerScale_1=zero["LayerScale_1"])}, x, 0.0)[0]) - x
  assert np.abs(branch(1.0)).max() > 0.1
  np.testing.assert_allclose(branch(2.0), 2 * branch(1.0), rtol=1e-4, atol=1e-5)


def test_swiglu_and_exact_gelu_mlp_match_numpy():
  x = np.random.default_rng(1).normal(size=(2, 5, 8)).astype(np.float32)
  for mlp_type, approximate in (("swiglu", True), ("gelu", False), ("gelu", True)):
    block = vit.MlpBlock(mlp_dim=6, mlp_type=mlp_type, gelu_approximate=approximate)
    p = block.init(jax.random.key(0), x)["params"]
    p = jax.tree.map(lambda a: a + 0.1, p)  # Non-zero biases.
    w0, b0 = (np.asarray(p["Dense_0"][k], np.float64) for k in ("kernel", "bias"))
    w1, b1 = (np.asarray(p["Dense_1"][k], np.float64) for k in ("kernel", "bias"))
    h = x @ w0 + b0
    if mlp_type == "swiglu":
      assert w0.shape == (8, 12)  # Packed: gate (first 6) and value (last 6).
      gate, value = h[..., :6], h[..., 6:]
      h = gate / (1 + np.exp(-gate)) * value
    elif approximate:
      h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
    else:
      import math
      h = h * 0.5 * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
    np.testing.assert_allclose(block.apply({"params": p}, x), h @ w1 + b1, rtol=1e-5,
                               atol=1e-5)


def test_no_qkv_bias_keeps_the_output_bias_and_flax_numerics():
  images = _images()
  biased = vit.Model(**SMALL, pool_type="tok")
  plain = vit.Model(**SMALL, pool_type="tok", qkv_bias=False)
  params = _init(plain, images)
  attention = params["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_0"]
  assert {k: set(v) for k, v in attention.items()} == {
      "query": {"kernel"}, "key": {"kernel"}, "value": {"kernel"}, "out": {"kernel", "bias"}}
  assert attention["query"]["kernel"].shape == (32, 2, 16)
  attention = dict(attention, out=dict(attention["out"], bias=attention["out"]["bias"] + 0.3))
  full = {k: dict(v, bias=np.zeros(v["kernel"].shape[1:], np.float32)) if k != "out" else v
          for k, v in attention.items()}
  block = params["Transformer"]["encoderblock_0"]
  with_bias = dict(params, Transformer=dict(params["Transformer"], encoderblock_0=dict(
      block, MultiHeadDotProductAttention_0=full)))
  without = dict(params, Transformer=dict(params["Transformer"], encoderblock_0=dict(
      block, MultiHeadDotProductAttention_0=attention)))
  np.testing.assert_allclose(plain.apply({"params": without}, images)[0],
                             biased.apply({"params": with_bias}, images)[0], atol=1e-6)


def test_map_head_takes_its_own_heads_and_mlp_dim():
  model = vit.Model(**SMALL, pool_type="map", map_num_heads=4, map_mlp_dim=48)
  params = _init(model, _images())["MAPHead_0"]
  assert params["MultiHeadDotProductAttention_0"]["query"]["kernel"].shape == (32, 4, 8)
  assert params["MlpBlock_0"]["Dense_0"]["kernel"].shape == (32, 48)
  assert set(params) == {"probe", "MultiHeadDotProductAttention_0", "LayerNorm_0",
                         "MlpBlock_0"}


@pytest.mark.parametrize("field, value, message", [
    ("mlp_type", "relu", "unknown mlp_type 'relu': expected one of gelu, swiglu"),
    ("class_token", False, "pool_type='tok' reads the class token: set class_token=True"),
    ("num_registers", -1, "num_registers must be an integer >= 0, got -1"),
    ("layer_scale_init", 0.0, "layer_scale_init must be a positive number or None, got 0.0"),
    ("layer_norm_eps", 0, "layer_norm_eps must be a positive number, got 0"),
    ("map_num_heads", 3, "ViT width 32 is not divisible by map_num_heads 3")])
def test_new_options_raise_clear_errors(field, value, message):
  model = vit.Model(**SMALL, pool_type="tok", **{field: value})
  with pytest.raises(ValueError) as info:
    model.validate()
  assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_field_rules_cover_the_new_options():
  rules = models.field_rules("vit")
  assert rules["mlp_type"] == ("gelu", "swiglu")
  assert rules["qkv_bias"] == (True, False) and rules["class_token"] == (True, False)
  assert rules["map_num_heads"] == "positive" and rules["map_mlp_dim"] == "positive"
  assert rules["distill_token"] == (True, False)
  assert {"num_registers", "layer_scale_init", "layer_norm_eps"} <= models.fields("vit")


# --------------------------------------------------------------- DeiT distillation token


def _dense(x, p):
  return np.asarray(x, np.float64) @ np.asarray(p["kernel"], np.float64) + np.asarray(
      p["bias"], np.float64)


def test_distill_token_follows_cls_without_posemb_and_has_its_own_head():
  """[cls, dist, registers, patches + posemb]; `head` reads token 0, `head_dist` token 1;
  train=True gives the cls head's logits, train=False the mean of the two heads."""
  images = _images()
  for rep_size in (False, True):
    # depth=0: encoded = encoder_norm(tokens entering the encoder), a plain LN at init.
    model = vit.Model(**SMALL, depth=0, pool_type="tok", distill_token=True,
                      num_registers=2, rep_size=rep_size)
    params = _init(model, images)
    assert params["dist"].shape == (1, 1, 32) and params["head_dist"]["kernel"].shape == (
        32, 5)
    assert 0.01 < np.std(params["dist"]) < 0.04  # trunc_normal(.02), unlike the zero cls.
    rng = np.random.default_rng(1)
    cls, dist, reg = rng.normal(size=(1, 1, 32)), rng.normal(size=(1, 1, 32)), rng.normal(
        size=(1, 2, 32))
    head_dist = {"kernel": rng.normal(size=(32, 5)), "bias": rng.normal(size=5)}
    params = dict(params, cls=cls, dist=dist, reg=reg, head_dist=head_dist)
    logits, aux = model.apply({"params": params}, images, train=False)
    patches = np.asarray(aux["stem"]).reshape(2, 16, 32) + np.asarray(params["pos_embedding"])
    tokens = np.concatenate([np.broadcast_to(t, (2,) + t.shape[1:])
                             for t in (cls, dist, reg)] + [patches], axis=1)
    np.testing.assert_allclose(aux["encoded"], _layernorm(tokens), atol=2e-4)
    features = np.asarray(aux["encoded"])[:, :2]
    if rep_size:
      features = np.tanh(_dense(features, params["pre_logits"]))
    np.testing.assert_allclose(aux["pre_logits"], features.mean(1), atol=1e-5)
    expected_cls = _dense(features[:, 0], params["head"])
    expected_dist = _dense(features[:, 1], head_dist)
    np.testing.assert_allclose(aux["logits_cls"], expected_cls, atol=1e-4)
    np.testing.assert_allclose(aux["logits_dist"], expected_dist, atol=1e-4)
    np.testing.assert_allclose(logits, (expected_cls + expected_dist) / 2, atol=1e-4)
    assert aux["logits"] is logits and logits.dtype == jnp.float32
    logits, aux = model.apply({"params": params}, images, train=True)
    np.testing.assert_allclose(logits, expected_cls, atol=1e-4)
    np.testing.assert_allclose(aux["logits_dist"], expected_dist, atol=1e-4)


def test_distill_token_defaults_and_errors():
  images = _images()
  plain = _init(vit.Model(**SMALL, pool_type="tok"), images)
  assert "dist" not in plain and "head_dist" not in plain
  zero = _init(vit.Model(num_classes=5, variant="mu/4", pool_type="tok", distill_token=True),
               images)
  assert np.all(zero["head_dist"]["kernel"] == 0) and np.all(zero["head"]["kernel"] == 0)
  # No head: the features are the mean of the two tokens', as timm's pre_logits.
  model = vit.Model(num_classes=0, variant="mu/4", pool_type="tok", distill_token=True)
  logits, aux = model.apply({"params": _init(model, images)}, images)
  assert "head_dist" not in _init(model, images) and "logits_dist" not in aux
  np.testing.assert_allclose(logits, np.mean(aux["encoded"][:, :2], axis=1), atol=1e-6)
  for pool_type in ("gap", "map"):
    with pytest.raises(ValueError) as info:
      vit.Model(**SMALL, pool_type=pool_type, distill_token=True).validate()
    assert str(info.value).startswith("distill_token=True needs pool_type='tok'")
    assert "\n" not in str(info.value)


def test_distill_token_layer_ids_and_load_round_trip(tmp_path):
  """layer_ids: `dist` with the embeddings (0), `head_dist` with the head (L). A vitcls
  export (npz) loads back unchanged, also into a scanned model; another class count gets
  fresh heads; an N+2 position embedding (cls, dist, patches) is folded into the tokens."""
  images = _images()
  cfg = dict(SMALL, depth=2, pool_type="tok", distill_token=True)
  model = vit.Model(**cfg)
  params = jax.device_get(_init(model, images, seed=1))
  ids, top = vit.layer_ids(params)
  assert top == 3 and ids["dist"] == 0 and ids["cls"] == 0
  assert ids["head_dist"] == {"kernel": 3, "bias": 3}
  path = str(tmp_path / "export.npz")
  loading.write_npz(path, params)
  init = jax.device_get(_init(model, images, seed=2))
  loaded = models.load("vit", init, path, cfg)
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  scan = vit.Model(**cfg, scan=True)
  scanned = models.load("vit", jax.device_get(_init(scan, images)), path, dict(cfg, scan=True))
  for train in (False, True):
    np.testing.assert_allclose(scan.apply({"params": scanned}, images, train=train)[0],
                               model.apply({"params": params}, images, train=train)[0],
                               rtol=1e-5, atol=1e-5)
  other = vit.Model(**dict(cfg, num_classes=7))
  other_init = jax.device_get(_init(other, images))
  fresh = models.load("vit", other_init, path, cfg)
  for head in ("head", "head_dist"):
    np.testing.assert_array_equal(fresh[head]["kernel"], other_init[head]["kernel"])
  np.testing.assert_array_equal(fresh["dist"], params["dist"])
  pos = np.random.default_rng(3).normal(size=(1, 18, 32)).astype(np.float32)
  folded = models.load("vit", init, dict(params, pos_embedding=pos), cfg)
  np.testing.assert_allclose(folded["cls"], params["cls"] + pos[:, :1])
  np.testing.assert_allclose(folded["dist"], params["dist"] + pos[:, 1:2])
  np.testing.assert_array_equal(folded["pos_embedding"], pos[:, 2:])
  # A model without the token refuses the export in one line, and the other way round.
  plain = vit.Model(**dict(cfg, distill_token=False))
  with pytest.raises(loading.CheckpointError, match="set config.model.distill_token=True"):
    models.load("vit", jax.device_get(_init(plain, images)), path, {})
  plain_path = str(tmp_path / "plain.npz")
  loading.write_npz(plain_path, jax.device_get(_init(plain, images)))
  with pytest.raises(loading.CheckpointError, match="has no distillation token"):
    models.load("vit", init, plain_path, cfg)
