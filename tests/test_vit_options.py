"""Tests for the options today's ViT towers need (registers, LayerScale, SwiGLU, no-bias
attention, MAP head sizes, DeiT's distillation token) and timm's published counts of the
towers; split from tests/test_vit.py so the test workers share them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitcls import models
from vitcls.models import loading, vit
from test_vit import SMALL, _count, _images, _init, _layernorm, _stack_blocks

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
