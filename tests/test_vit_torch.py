"""Published ViT towers in their own layouts give their own logits through `vit.load`.

Each test writes a state dict with the exact names and shapes of a reference format (timm
`VisionTransformer` and its AugReg / DeiT / DeiT-III / DINOv2 / SigLIP configurations,
timm's `VisionTransformerDistilled` (distilled DeiT), the original DINOv2 release, Hugging
Face `ViTModel` / `ViTForImageClassification` / `DeiTForImageClassificationWithTeacher` /
`Dinov2Model` / `Dinov2WithRegistersModel` / `SiglipVisionModel` / `SiglipModel` /
`SiglipForImageClassification`, big_vision's SigLIP two-tower `.npz`) from random
parameters, loads it with `vitcls.models.load("vit", ...)` and compares the logits with a
NumPy forward pass written here from the reference's own code, in its own (PyTorch)
layout: timm's fused qkv reshaped (B, N, 3, heads, head_dim), position embeddings added
before or after the cls / register tokens as each does, `nn.MultiheadAttention`'s packed
in_proj, and so on. None of vitcls's code computes the expected numbers.
"""

import re

import jax
import numpy as np
import pytest
import scipy.ndimage
import scipy.special
from safetensors.numpy import save_file

from vitcls import models
from vitcls.models import loading, vit, vit_torch

D, HEADS, MLP, DEPTH, PATCH, SIZE, CLASSES = 32, 2, 64, 2, 4, 16, 5
GRID = SIZE // PATCH
N = GRID * GRID
CFG = dict(width=D, depth=DEPTH, mlp_dim=MLP, num_heads=HEADS, patch_size=PATCH,
           head_zeroinit=False)


# ---------------------------------------------------------------- NumPy reference pieces


class _Random:
  """Random float32 tensors of a given shape; `scale` keeps activations near unit size."""

  def __init__(self, seed):
    self.rng = np.random.default_rng(seed)

  def __call__(self, *shape, scale=0.2, mean=0.0):
    return (mean + scale * self.rng.standard_normal(shape)).astype(np.float32)


def _images(n=2):
  """NHWC images in [-1, 1] for vitcls, and the same pixels NCHW for the references."""
  x = np.random.default_rng(5).uniform(-1, 1, (n, SIZE, SIZE, 3)).astype(np.float32)
  return x, x.transpose(0, 3, 1, 2).astype(np.float64)


def _linear(x, sd, name):  # torch.nn.Linear: x @ W.T + b, W of shape (out, in).
  y = x @ sd[name + ".weight"].astype(np.float64).T
  return y + sd[name + ".bias"] if name + ".bias" in sd else y


def _layernorm(x, sd, name, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * sd[name + ".weight"] + sd[name + ".bias"]


def _gelu(x, exact):
  if exact:  # torch.nn.GELU(): x * Phi(x).
    return 0.5 * x * (1 + scipy.special.erf(x / np.sqrt(2)))
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _silu(x):
  return x / (1 + np.exp(-x))


def _softmax(x):
  x = x - x.max(-1, keepdims=True)
  return np.exp(x) / np.exp(x).sum(-1, keepdims=True)


def _split_heads(x):  # (B, N, D) -> (B, heads, N, head_dim), as .view(B, N, H, hd).transpose(1, 2)
  b, n, _ = x.shape
  return x.reshape(b, n, HEADS, D // HEADS).transpose(0, 2, 1, 3)


def _sdpa(q, k, v):  # (B, H, N, hd) each: softmax(q k^T / sqrt(hd)) v, heads merged back.
  weights = _softmax(q @ k.transpose(0, 1, 3, 2) * (q.shape[-1] ** -0.5))
  out = weights @ v
  b, h, n, hd = out.shape
  return out.transpose(0, 2, 1, 3).reshape(b, n, h * hd)


def _patches(images, sd, name):
  """Conv2d(kernel=stride=patch) then .flatten(2).transpose(1, 2): (B, N, D), row-major."""
  b, c, _, _ = images.shape
  x = images.reshape(b, c, GRID, PATCH, GRID, PATCH).transpose(0, 2, 4, 1, 3, 5)
  w = sd[name + ".weight"].astype(np.float64).reshape(D, -1)
  return x.reshape(b, N, -1) @ w.T + sd[name + ".bias"]


def _tile(token, b):
  return np.broadcast_to(token, (b,) + token.shape[1:]).astype(np.float64)


# ---------------------------------------------------------------------------- timm


def _timm_state(r, *, cls=True, dist=False, reg=0, embed_prefix=True, ls=False,
                swiglu=False, qkv_bias=True, pool="token", classes=CLASSES, grid=GRID):
  """timm VisionTransformer's state dict (timm/models/vision_transformer.py): names and
  shapes of PatchEmbed, cls_token, reg_token, pos_embed (prefix entries unless
  no_embed_class), Block (norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1/fc2,
  ls2.gamma), norm, AttentionPoolLatent (attn_pool.*) and head; `dist`: deit.py's
  VisionTransformerDistilled adds dist_token, head_dist and a pos_embed entry for it."""
  sd = {"patch_embed.proj.weight": r(D, 3, PATCH, PATCH), "patch_embed.proj.bias": r(D)}
  if cls:
    sd["cls_token"] = r(1, 1, D)
  if dist:
    sd["dist_token"] = r(1, 1, D)
  if reg:
    sd["reg_token"] = r(1, reg, D)
  prefix = int(cls) + int(dist) + reg
  sd["pos_embed"] = r(1, grid * grid + (prefix if embed_prefix else 0), D)
  for i in range(DEPTH):
    b = f"blocks.{i}."
    sd.update({b + "norm1.weight": r(D, scale=0.1, mean=1), b + "norm1.bias": r(D, scale=0.1),
               b + "attn.qkv.weight": r(3 * D, D), b + "attn.proj.weight": r(D, D),
               b + "attn.proj.bias": r(D), b + "norm2.weight": r(D, scale=0.1, mean=1),
               b + "norm2.bias": r(D, scale=0.1),
               b + "mlp.fc1.weight": r(2 * MLP if swiglu else MLP, D),
               b + "mlp.fc1.bias": r(2 * MLP if swiglu else MLP),
               b + "mlp.fc2.weight": r(D, MLP, scale=0.1), b + "mlp.fc2.bias": r(D)})
    if qkv_bias:
      sd[b + "attn.qkv.bias"] = r(3 * D)
    if ls:
      sd[b + "ls1.gamma"] = r(D, mean=0.5)
      sd[b + "ls2.gamma"] = r(D, mean=0.5)
  sd.update({"norm.weight": r(D, scale=0.1, mean=1), "norm.bias": r(D, scale=0.1)})
  if pool == "map":
    sd.update({"attn_pool.latent": r(1, 1, D), "attn_pool.q.weight": r(D, D),
               "attn_pool.q.bias": r(D), "attn_pool.kv.weight": r(2 * D, D),
               "attn_pool.kv.bias": r(2 * D), "attn_pool.proj.weight": r(D, D),
               "attn_pool.proj.bias": r(D), "attn_pool.norm.weight": r(D, scale=0.1, mean=1),
               "attn_pool.norm.bias": r(D, scale=0.1), "attn_pool.mlp.fc1.weight": r(MLP, D),
               "attn_pool.mlp.fc1.bias": r(MLP), "attn_pool.mlp.fc2.weight": r(D, MLP),
               "attn_pool.mlp.fc2.bias": r(D)})
  if classes:
    sd.update({"head.weight": r(classes, D), "head.bias": r(classes)})
    if dist:
      sd.update({"head_dist.weight": r(classes, D), "head_dist.bias": r(classes)})
  return sd


def _timm_forward(sd, images, *, embed_prefix=True, pool="token", distilled_training=False):
  """timm's VisionTransformer.forward (eval), LayerNorm eps 1e-6, nn.GELU (exact). With a
  dist_token, VisionTransformerDistilled's: [cls, dist, patches], and forward_head's
  (head(x[:, 0]) + head_dist(x[:, 1])) / 2, or the pair with `distilled_training`."""
  eps = 1e-6
  x = _patches(images, sd, "patch_embed.proj")
  b = x.shape[0]
  prefix = [_tile(sd[k], b) for k in ("cls_token", "dist_token", "reg_token") if k in sd]
  num_prefix = sum(t.shape[1] for t in prefix)
  if embed_prefix:  # _pos_embed: original timm / DeiT: concat, then add.
    x = np.concatenate(prefix + [x], axis=1) + sd["pos_embed"]
  else:  # no_embed_class (DeiT-III, DINOv2-reg, big_vision): add, then concat.
    x = np.concatenate(prefix + [x + sd["pos_embed"]], axis=1)
  for i in range(DEPTH):
    p = f"blocks.{i}."
    h = _layernorm(x, sd, p + "norm1", eps)
    qkv = _linear(h, sd, p + "attn.qkv").reshape(b, x.shape[1], 3, HEADS, D // HEADS)
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)
    h = _linear(_sdpa(q, k, v), sd, p + "attn.proj")
    x = x + h * sd.get(p + "ls1.gamma", 1.0)
    h = _linear(_layernorm(x, sd, p + "norm2", eps), sd, p + "mlp.fc1")
    if h.shape[-1] == 2 * MLP:  # SwiGLUPacked: GluMlp(act=SiLU, gate_last=False).
      x1, x2 = np.split(h, 2, axis=-1)
      h = _silu(x1) * x2
    else:
      h = _gelu(h, exact=True)
    x = x + _linear(h, sd, p + "mlp.fc2") * sd.get(p + "ls2.gamma", 1.0)
  x = _layernorm(x, sd, "norm", eps)
  if "dist_token" in sd:
    heads = _linear(x[:, 0], sd, "head"), _linear(x[:, 1], sd, "head_dist")
    return heads if distilled_training else (heads[0] + heads[1]) / 2
  if pool == "token":
    x = x[:, 0]
  elif pool == "avg":  # fc_norm=False: the final norm, then the mean of the patch tokens.
    x = x[:, num_prefix:].mean(1)
  else:  # AttentionPoolLatent on the patch tokens (pool_include_prefix=False).
    x = x[:, num_prefix:]
    q = _linear(_tile(sd["attn_pool.latent"], b), sd, "attn_pool.q")
    kv = _linear(x, sd, "attn_pool.kv").reshape(b, x.shape[1], 2, HEADS, D // HEADS)
    k, v = kv.transpose(2, 0, 3, 1, 4)
    x = _linear(_sdpa(_split_heads(q), k, v), sd, "attn_pool.proj")
    h = _layernorm(x, sd, "attn_pool.norm", eps)
    h = _linear(_gelu(_linear(h, sd, "attn_pool.mlp.fc1"), exact=True), sd,
                "attn_pool.mlp.fc2")
    x = (x + h)[:, 0]
  return _linear(x, sd, "head") if "head.weight" in sd else x


def _save(tmp_path, sd, name="model.safetensors"):
  path = str(tmp_path / name)
  save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, path)
  return path


def _load_and_run(path, classes=CLASSES, **cfg):
  cfg = dict(CFG, **cfg)
  model = vit.Model(num_classes=classes, **cfg)
  images, _ = _images()
  init = jax.device_get(model.init(jax.random.key(0), images)["params"])
  loaded = models.load("vit", init, path, cfg)
  return np.asarray(model.apply({"params": loaded}, images)[0]), loaded


# name: (state-dict options, forward options, vitcls config). Exact GELU throughout:
# timm's blocks and attention pool use nn.GELU.
TIMM_CASES = {
    # vit_*_augreg* and deit_*: cls token, N+1 position embedding, token pooling.
    "augreg_deit": (dict(), dict(), dict(pool_type="tok")),
    "deit_scanned_model": (dict(), dict(), dict(pool_type="tok", scan=True)),
    # deit_*_distilled_*: dist_token after cls, N+2 position embedding, head_dist; eval
    # logits are the mean of the two heads.
    "deit_distilled": (dict(dist=True), dict(), dict(pool_type="tok", distill_token=True)),
    "deit_distilled_scanned_model": (dict(dist=True), dict(),
                                     dict(pool_type="tok", distill_token=True, scan=True)),
    # deit3_*: no_embed_class=True, LayerScale (init_values=1e-6).
    "deit3": (dict(embed_prefix=False, ls=True), dict(embed_prefix=False),
              dict(pool_type="tok", layer_scale_init=1e-6)),
    # vit_*_patch14_dinov2: LayerScale, cls entry in pos_embed, num_classes=0.
    "dinov2": (dict(ls=True, classes=0), dict(),
               dict(pool_type="tok", layer_scale_init=1e-5, classes=0)),
    # vit_*_patch14_reg4_dinov2: four registers, no_embed_class=True.
    "dinov2_reg4": (dict(reg=4, embed_prefix=False, ls=True, classes=0),
                    dict(embed_prefix=False),
                    dict(pool_type="tok", num_registers=4, layer_scale_init=1e-5,
                         classes=0)),
    # vit_giant_patch14_dinov2: SwiGLUPacked MLP (fc1 of 2 x hidden).
    "dinov2_g_swiglu": (dict(ls=True, swiglu=True, classes=0), dict(),
                        dict(pool_type="tok", layer_scale_init=1e-5, mlp_type="swiglu",
                             classes=0)),
    # vit_*_siglip_*: class_token=False, global_pool='map', num_classes=0.
    "siglip": (dict(cls=False, pool="map", classes=0), dict(pool="map"),
               dict(pool_type="map", classes=0)),
    # vit_medium_patch16_gap_*: cls kept, avg pool (fc_norm=False), qkv_bias=False, LS.
    "medium_gap_no_qkv_bias": (dict(ls=True, qkv_bias=False), dict(pool="avg"),
                               dict(pool_type="gap", class_token=True, qkv_bias=False,
                                    layer_scale_init=1e-6)),
    # A register model pooled with MAP over the patch tokens only.
    "registers_map": (dict(reg=2, embed_prefix=False, pool="map"),
                      dict(embed_prefix=False, pool="map"),
                      dict(pool_type="map", class_token=True, num_registers=2)),
}


@pytest.mark.parametrize("case", TIMM_CASES)
def test_timm_layouts_give_the_reference_logits(tmp_path, case):
  state_kw, forward_kw, cfg = TIMM_CASES[case]
  sd = _timm_state(_Random(1), **state_kw)
  classes = cfg.pop("classes", CLASSES)
  logits, _ = _load_and_run(_save(tmp_path, sd), classes=classes, gelu_approximate=False,
                            **cfg)
  expected = _timm_forward(sd, _images()[1], **forward_kw)
  assert logits.shape == expected.shape
  np.testing.assert_allclose(logits, expected, atol=1e-5)


def test_original_dinov2_release_layout(tmp_path):
  """facebookresearch/dinov2's own names (which timm's _convert_dinov2 renames):
  `register_tokens`, `mask_token`, SwiGLUFFNFused's `mlp.w12` / `mlp.w3`, and a pos_embed
  with the cls entry but none for the registers (inserted after the embedding)."""
  sd = _timm_state(_Random(2), reg=4, embed_prefix=False, ls=True, swiglu=True, classes=0)
  cls_pos = _Random(3)(1, 1, D)
  original = {}
  for key, value in sd.items():
    key = key.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3")
    original[key.replace("reg_token", "register_tokens")] = value
  original["pos_embed"] = np.concatenate([cls_pos, sd["pos_embed"]], axis=1)
  original["cls_token"] = sd["cls_token"] - cls_pos  # Same network as `sd` describes.
  original["mask_token"] = _Random(4)(1, D)
  logits, _ = _load_and_run(_save(tmp_path, original), classes=0, pool_type="tok",
                            num_registers=4, layer_scale_init=1e-5, mlp_type="swiglu",
                            gelu_approximate=False)
  np.testing.assert_allclose(logits, _timm_forward(sd, _images()[1], embed_prefix=False),
                             atol=1e-5)


def test_original_deit3_release_layout(tmp_path):
  """facebookresearch/deit's DeiT-III files name LayerScale `blocks.I.gamma_1` / `gamma_2`
  (timm's checkpoint_filter_fn renames them to ls1.gamma / ls2.gamma)."""
  sd = _timm_state(_Random(30), embed_prefix=False, ls=True)
  original = {re.sub(r"ls([12])\.gamma", r"gamma_\1", k): v for k, v in sd.items()}
  assert "blocks.1.gamma_2" in original
  logits, _ = _load_and_run(_save(tmp_path, original), pool_type="tok", layer_scale_init=1e-6,
                            gelu_approximate=False)
  np.testing.assert_allclose(logits, _timm_forward(sd, _images()[1], embed_prefix=False),
                             atol=1e-5)


# ------------------------------------------------------------------- Hugging Face


def _hf_vit_state(r, *, dinov2=False, reg=0, swiglu=False, pooler=False, classes=0,
                  prefix="", distilled=False):
  """transformers' ViTModel / Dinov2Model / Dinov2WithRegistersModel names and shapes
  (modeling_vit.py, modeling_dinov2(_with_registers).py): embeddings.{cls_token,
  mask_token, register_tokens, position_embeddings (1, N+1, D),
  patch_embeddings.projection}, encoder.layer.I.{layernorm_before|norm1,
  attention.attention.{query,key,value}, attention.output.dense, layer_scale1.lambda1,
  layernorm_after|norm2, intermediate.dense + output.dense | mlp.fc1/fc2 |
  mlp.weights_in/weights_out, layer_scale2.lambda1}, layernorm, pooler.dense; the
  classifier sits outside the `vit.` / `dinov2.` prefix. `distilled`: modeling_deit.py's
  DeiTForImageClassificationWithTeacher: embeddings.distillation_token, position
  embeddings (1, N+2, D), cls_classifier and distillation_classifier (outside `deit.`)."""
  e = prefix + "embeddings."
  sd = {e + "cls_token": r(1, 1, D), e + "position_embeddings": r(1, N + 1 + distilled, D),
        e + "patch_embeddings.projection.weight": r(D, 3, PATCH, PATCH),
        e + "patch_embeddings.projection.bias": r(D)}
  if dinov2:
    sd[e + "mask_token"] = r(1, D)
  if reg:
    sd[e + "register_tokens"] = r(1, reg, D)
  if distilled:
    sd[e + "distillation_token"] = r(1, 1, D)
  for i in range(DEPTH):
    p = f"{prefix}encoder.layer.{i}."
    norms = ("norm1", "norm2") if dinov2 else ("layernorm_before", "layernorm_after")
    for name in norms:
      sd[p + name + ".weight"], sd[p + name + ".bias"] = r(D, scale=0.1, mean=1), r(D, scale=.1)
    for name in ("query", "key", "value"):
      sd[p + f"attention.attention.{name}.weight"] = r(D, D)
      sd[p + f"attention.attention.{name}.bias"] = r(D)
    sd[p + "attention.output.dense.weight"], sd[p + "attention.output.dense.bias"] = (
        r(D, D), r(D))
    if dinov2:
      fc1, fc2 = ("mlp.weights_in", "mlp.weights_out") if swiglu else ("mlp.fc1", "mlp.fc2")
      sd[p + "layer_scale1.lambda1"] = r(D, mean=0.5)
      sd[p + "layer_scale2.lambda1"] = r(D, mean=0.5)
    else:
      fc1, fc2 = "intermediate.dense", "output.dense"
    sd[p + fc1 + ".weight"] = r(2 * MLP if swiglu else MLP, D)
    sd[p + fc1 + ".bias"] = r(2 * MLP if swiglu else MLP)
    sd[p + fc2 + ".weight"], sd[p + fc2 + ".bias"] = r(D, MLP, scale=0.1), r(D)
  sd[prefix + "layernorm.weight"] = r(D, scale=0.1, mean=1)
  sd[prefix + "layernorm.bias"] = r(D, scale=0.1)
  if pooler:
    sd[prefix + "pooler.dense.weight"], sd[prefix + "pooler.dense.bias"] = r(D, D), r(D)
  if classes and distilled:
    for name in ("cls_classifier", "distillation_classifier"):
      sd[name + ".weight"], sd[name + ".bias"] = r(classes, D), r(classes)
  elif classes:
    sd["classifier.weight"], sd["classifier.bias"] = r(classes, D), r(classes)
  return sd


def _hf_vit_forward(sd, images, *, dinov2=False, prefix=""):
  """ViTModel / Dinov2(WithRegisters)Model forward (eval); returns
  (pooler_output, classifier logits or None). LayerNorm eps: ViTConfig 1e-12,
  Dinov2Config 1e-6; hidden_act "gelu" (exact)."""
  eps = 1e-6 if dinov2 else 1e-12
  e = prefix + "embeddings."
  x = _patches(images, sd, e + "patch_embeddings.projection")
  b = x.shape[0]
  tokens = [_tile(sd[e + k], b) for k in ("cls_token", "distillation_token") if e + k in sd]
  x = np.concatenate(tokens + [x], axis=1) + sd[e + "position_embeddings"]
  if e + "register_tokens" in sd:  # Inserted after the position embedding, after cls.
    x = np.concatenate([x[:, :1], _tile(sd[e + "register_tokens"], b), x[:, 1:]], axis=1)
  for i in range(DEPTH):
    p = f"{prefix}encoder.layer.{i}."
    h = _layernorm(x, sd, p + ("norm1" if dinov2 else "layernorm_before"), eps)
    q, k, v = (_split_heads(_linear(h, sd, p + f"attention.attention.{n}"))
               for n in ("query", "key", "value"))
    h = _linear(_sdpa(q, k, v), sd, p + "attention.output.dense")
    x = h * sd.get(p + "layer_scale1.lambda1", 1.0) + x
    h = _layernorm(x, sd, p + ("norm2" if dinov2 else "layernorm_after"), eps)
    if p + "mlp.weights_in.weight" in sd:  # Dinov2SwiGLUFFN.
      x1, x2 = np.split(_linear(h, sd, p + "mlp.weights_in"), 2, axis=-1)
      h = _linear(_silu(x1) * x2, sd, p + "mlp.weights_out")
    elif dinov2:
      h = _linear(_gelu(_linear(h, sd, p + "mlp.fc1"), True), sd, p + "mlp.fc2")
    else:
      h = _linear(_gelu(_linear(h, sd, p + "intermediate.dense"), True), sd, p + "output.dense")
    x = h * sd.get(p + "layer_scale2.lambda1", 1.0) + x
  x = _layernorm(x, sd, prefix + "layernorm", eps)
  if prefix + "pooler.dense.weight" in sd:  # ViTPooler: tanh(dense(first token)).
    pooled = np.tanh(_linear(x[:, 0], sd, prefix + "pooler.dense"))
  else:  # Dinov2Model's pooler_output.
    pooled = x[:, 0]
  logits = _linear(x[:, 0], sd, "classifier") if "classifier.weight" in sd else None
  if "cls_classifier.weight" in sd:  # DeiTForImageClassificationWithTeacher.
    logits = (_linear(x[:, 0], sd, "cls_classifier")
              + _linear(x[:, 1], sd, "distillation_classifier")) / 2
  return pooled, logits


def test_hf_vit_for_image_classification(tmp_path):
  sd = _hf_vit_state(_Random(6), classes=CLASSES, prefix="vit.")
  logits, _ = _load_and_run(_save(tmp_path, sd), pool_type="tok", gelu_approximate=False,
                            layer_norm_eps=1e-12)
  np.testing.assert_allclose(logits, _hf_vit_forward(sd, _images()[1], prefix="vit.")[1],
                             atol=1e-5)


def test_hf_deit_for_image_classification_with_teacher(tmp_path):
  """transformers' distilled DeiT (facebook/deit-*-distilled-*): `deit.` prefix, ViT's layer
  names, a distillation token and two classifiers whose mean is the logits."""
  sd = _hf_vit_state(_Random(31), classes=CLASSES, prefix="deit.", distilled=True)
  logits, loaded = _load_and_run(_save(tmp_path, sd), pool_type="tok", distill_token=True,
                                 gelu_approximate=False, layer_norm_eps=1e-12)
  assert set(loaded["head_dist"]) == {"kernel", "bias"}
  np.testing.assert_allclose(logits, _hf_vit_forward(sd, _images()[1], prefix="deit.")[1],
                             atol=1e-5)


def test_hf_vit_model_pooler_is_pre_logits(tmp_path):
  """ViTModel's tanh pooler (google/vit-*-in21k) is vitcls's pre_logits (rep_size=True)."""
  sd = _hf_vit_state(_Random(7), pooler=True)
  pre_logits, _ = _load_and_run(_save(tmp_path, sd), classes=0, pool_type="tok",
                                rep_size=True, gelu_approximate=False,
                                layer_norm_eps=1e-12)
  np.testing.assert_allclose(pre_logits, _hf_vit_forward(sd, _images()[1])[0], atol=1e-5)


@pytest.mark.parametrize("prefix, reg, swiglu", [("", 0, False), ("dinov2_with_registers.", 4, True)])
def test_hf_dinov2_models(tmp_path, prefix, reg, swiglu):
  sd = _hf_vit_state(_Random(8), dinov2=True, reg=reg, swiglu=swiglu, prefix=prefix)
  pooled, _ = _load_and_run(
      _save(tmp_path, sd), classes=0, pool_type="tok", num_registers=reg,
      layer_scale_init=1e-5, mlp_type="swiglu" if swiglu else "gelu", gelu_approximate=False,
      scan=bool(reg))
  expected = _hf_vit_forward(sd, _images()[1], dinov2=True, prefix=prefix)[0]
  np.testing.assert_allclose(pooled, expected, atol=1e-5)


def test_hf_dinov2_classifier_on_cls_and_mean_stays_fresh(tmp_path):
  """Dinov2ForImageClassification's head reads [cls, mean of patches] (2 x width): vitcls's
  head cannot, so the backbone loads and the head keeps its init."""
  sd = _hf_vit_state(_Random(9), dinov2=True, prefix="dinov2.")
  sd["classifier.weight"], sd["classifier.bias"] = _Random(10)(CLASSES, 2 * D), np.zeros(
      CLASSES, np.float32)
  model = vit.Model(num_classes=CLASSES, **CFG, pool_type="tok", layer_scale_init=1e-5)
  init = jax.device_get(model.init(jax.random.key(0), _images()[0])["params"])
  loaded = models.load("vit", init, _save(tmp_path, sd), {})
  np.testing.assert_array_equal(loaded["head"]["kernel"], init["head"]["kernel"])
  np.testing.assert_array_equal(loaded["embedding"]["bias"],
                                sd["dinov2.embeddings.patch_embeddings.projection.bias"])


def _hf_siglip_state(r, *, head=True, text=False, classes=0):
  """transformers' SiglipVisionModel names and shapes (modeling_siglip.py):
  vision_model.embeddings.{patch_embedding, position_embedding (nn.Embedding (N, D))},
  encoder.layers.I.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1/fc2},
  post_layernorm, head.{probe, attention (nn.MultiheadAttention: in_proj_weight (3D, D),
  in_proj_bias, out_proj), layernorm, mlp}; SiglipModel adds text_model.*, logit_scale,
  logit_bias; SiglipForImageClassification a classifier and no head."""
  v = "vision_model."
  sd = {v + "embeddings.patch_embedding.weight": r(D, 3, PATCH, PATCH),
        v + "embeddings.patch_embedding.bias": r(D),
        v + "embeddings.position_embedding.weight": r(N, D)}
  for i in range(DEPTH):
    p = f"{v}encoder.layers.{i}."
    for name in ("layer_norm1", "layer_norm2"):
      sd[p + name + ".weight"], sd[p + name + ".bias"] = r(D, scale=0.1, mean=1), r(D, scale=.1)
    for name in ("k_proj", "v_proj", "q_proj", "out_proj"):
      sd[p + f"self_attn.{name}.weight"], sd[p + f"self_attn.{name}.bias"] = r(D, D), r(D)
    sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = r(MLP, D), r(MLP)
    sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = r(D, MLP, scale=0.1), r(D)
  sd[v + "post_layernorm.weight"] = r(D, scale=0.1, mean=1)
  sd[v + "post_layernorm.bias"] = r(D, scale=0.1)
  if head:
    h = v + "head."
    sd.update({h + "probe": r(1, 1, D), h + "attention.in_proj_weight": r(3 * D, D),
               h + "attention.in_proj_bias": r(3 * D), h + "attention.out_proj.weight": r(D, D),
               h + "attention.out_proj.bias": r(D), h + "layernorm.weight": r(D, mean=1),
               h + "layernorm.bias": r(D), h + "mlp.fc1.weight": r(MLP, D),
               h + "mlp.fc1.bias": r(MLP), h + "mlp.fc2.weight": r(D, MLP),
               h + "mlp.fc2.bias": r(D)})
  if text:
    sd.update({"text_model.embeddings.token_embedding.weight": r(100, D),
               "text_model.final_layer_norm.weight": r(D), "text_model.head.weight": r(D, D),
               "logit_scale": r(1), "logit_bias": r(1)})
  if classes:
    sd["classifier.weight"], sd["classifier.bias"] = r(classes, D), r(classes)
  return sd


def _hf_siglip_forward(sd, images):
  """SiglipVisionTransformer (+ SiglipForImageClassification's mean pooling): eps 1e-6,
  hidden_act "gelu_pytorch_tanh"."""
  eps, v = 1e-6, "vision_model."
  x = _patches(images, sd, v + "embeddings.patch_embedding")
  x = x + sd[v + "embeddings.position_embedding.weight"][None]
  for i in range(DEPTH):
    p = f"{v}encoder.layers.{i}."
    h = _layernorm(x, sd, p + "layer_norm1", eps)
    q, k, vv = (_split_heads(_linear(h, sd, p + f"self_attn.{n}_proj")) for n in "qkv")
    x = x + _linear(_sdpa(q, k, vv), sd, p + "self_attn.out_proj")
    h = _layernorm(x, sd, p + "layer_norm2", eps)
    x = x + _linear(_gelu(_linear(h, sd, p + "mlp.fc1"), False), sd, p + "mlp.fc2")
  x = _layernorm(x, sd, v + "post_layernorm", eps)
  if "classifier.weight" in sd:
    return _linear(x.mean(1), sd, "classifier")
  h, b = v + "head.", x.shape[0]
  w, bias = sd[h + "attention.in_proj_weight"], sd[h + "attention.in_proj_bias"]
  packed = {f"{n}.weight": w[j * D:(j + 1) * D] for j, n in enumerate("qkv")}
  packed.update({f"{n}.bias": bias[j * D:(j + 1) * D] for j, n in enumerate("qkv")})
  q = _split_heads(_linear(_tile(sd[h + "probe"], b), packed, "q"))
  k, vv = (_split_heads(_linear(x, packed, n)) for n in "kv")
  x = _linear(_sdpa(q, k, vv), sd, h + "attention.out_proj")
  m = _layernorm(x, sd, h + "layernorm", eps)
  return (x + _linear(_gelu(_linear(m, sd, h + "mlp.fc1"), False), sd, h + "mlp.fc2"))[:, 0]


@pytest.mark.parametrize("text", [False, True], ids=["SiglipVisionModel", "SiglipModel"])
def test_hf_siglip_vision_tower(tmp_path, text):
  sd = _hf_siglip_state(_Random(11), text=text)
  pooled, _ = _load_and_run(_save(tmp_path, sd), classes=0, pool_type="map")
  np.testing.assert_allclose(pooled, _hf_siglip_forward(sd, _images()[1]), atol=1e-5)


def test_hf_siglip_for_image_classification_is_gap(tmp_path):
  sd = _hf_siglip_state(_Random(12), head=False, classes=CLASSES)
  logits, _ = _load_and_run(_save(tmp_path, sd), pool_type="gap")
  np.testing.assert_allclose(logits, _hf_siglip_forward(sd, _images()[1]), atol=1e-5)


# ------------------------------------------------------------ big_vision two-tower npz


def _big_vision_siglip_tower(r):
  """big_vision's two_towers.Model params: `img/` is models/vit.py with pool_type='map'
  and scan=True (blocks stacked on a leading depth axis), `txt/` the text tower, `t` and
  `b` the temperature and bias. Flax layouts: Conv kernel (p, p, 3, D), DenseGeneral
  q/k/v kernels (D, heads, head_dim), out (heads, head_dim, D)."""
  hd = D // HEADS

  def attention(lead=()):
    tree = {n: {"kernel": r(*lead, D, HEADS, hd), "bias": r(*lead, HEADS, hd)}
            for n in ("query", "key", "value")}
    tree["out"] = {"kernel": r(*lead, HEADS, hd, D), "bias": r(*lead, D)}
    return tree

  def mlp(lead=()):
    return {"Dense_0": {"kernel": r(*lead, D, MLP), "bias": r(*lead, MLP)},
            "Dense_1": {"kernel": r(*lead, MLP, D, scale=0.1), "bias": r(*lead, D)}}

  def norm(lead=()):
    return {"scale": r(*lead, D, scale=0.1, mean=1), "bias": r(*lead, D, scale=0.1)}

  img = {"embedding": {"kernel": r(PATCH, PATCH, 3, D), "bias": r(D)},
         "pos_embedding": r(1, N, D),
         "Transformer": {"encoderblock": {
             "LayerNorm_0": norm((DEPTH,)), "MultiHeadDotProductAttention_0": attention((DEPTH,)),
             "LayerNorm_1": norm((DEPTH,)), "MlpBlock_0": mlp((DEPTH,))},
             "encoder_norm": norm()},
         "MAPHead_0": {"probe": r(1, 1, D), "MultiHeadDotProductAttention_0": attention(),
                       "LayerNorm_0": norm(), "MlpBlock_0": mlp()}}
  txt = {"Embed_0": {"embedding": r(100, D)}, "head": {"kernel": r(D, D), "bias": r(D)}}
  return {"img": img, "txt": txt, "t": r(1), "b": r(1)}


def _big_vision_forward(img, images_nhwc):
  """big_vision models/vit.py _Model with pool_type='map' (flax LayerNorm eps 1e-6,
  nn.gelu's tanh approximation), in its own flax layout."""
  def ln(x, p):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-6) * p[
        "scale"] + p["bias"]

  def mha(xq, xkv, p):
    q, k, v = (np.einsum("bnd,dhk->bhnk", x, p[n]["kernel"]) + p[n]["bias"][:, None]
               for x, n in ((xq, "query"), (xkv, "key"), (xkv, "value")))
    weights = _softmax(np.einsum("bhqk,bhnk->bhqn", q, k) / np.sqrt(q.shape[-1]))
    out = np.einsum("bhqn,bhnk->bqhk", weights, v)
    return np.einsum("bqhk,hkd->bqd", out, p["out"]["kernel"]) + p["out"]["bias"]

  def mlp(x, p):
    h = _gelu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"], exact=False)
    return h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]

  x = images_nhwc.astype(np.float64)
  b = x.shape[0]
  x = x.reshape(b, GRID, PATCH, GRID, PATCH, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, N, -1)
  x = x @ img["embedding"]["kernel"].reshape(-1, D) + img["embedding"]["bias"]
  x = x + img["pos_embedding"]
  blocks = img["Transformer"]["encoderblock"]
  for i in range(DEPTH):
    blk = jax.tree.map(lambda a, i=i: a[i], blocks)
    y = ln(x, blk["LayerNorm_0"])
    x = x + mha(y, y, blk["MultiHeadDotProductAttention_0"])
    x = x + mlp(ln(x, blk["LayerNorm_1"]), blk["MlpBlock_0"])
  x = ln(x, img["Transformer"]["encoder_norm"])
  head = img["MAPHead_0"]
  x = mha(_tile(head["probe"], b), x, head["MultiHeadDotProductAttention_0"])
  return (x + mlp(ln(x, head["LayerNorm_0"]), head["MlpBlock_0"]))[:, 0]


def test_big_vision_two_tower_npz_loads_its_image_tower(tmp_path):
  tree = _big_vision_siglip_tower(_Random(13))
  path = str(tmp_path / "siglip.npz")
  np.savez(path, **{"params/" + k: v for k, v in loading.flatten(tree).items()})
  pooled, loaded = _load_and_run(path, classes=0, pool_type="map")
  assert "txt" not in loaded and "MAPHead_0" in loaded
  np.testing.assert_allclose(pooled, _big_vision_forward(tree["img"], _images()[0]),
                             atol=1e-5)


# ------------------------------------------------- position embeddings, heads, the API


@pytest.mark.parametrize("reg, embed_prefix", [(0, True), (4, False)])
def test_dinov2_518px_posemb_resampled_to_the_model_grid(tmp_path, reg, embed_prefix):
  """A 37x37 grid (518 px / patch 14) -> the model's 4x4: the patch entries as
  scipy.ndimage.zoom(order=1) resamples them, the cls entry (when the file has one) added
  to the cls token, the registers untouched (they have none)."""
  sd = _timm_state(_Random(14), reg=reg, embed_prefix=embed_prefix, ls=True, classes=0,
                   grid=37)
  assert sd["pos_embed"].shape == (1, 37 * 37 + (1 if embed_prefix else 0), D)
  _, loaded = _load_and_run(_save(tmp_path, sd), classes=0, pool_type="tok",
                            num_registers=reg, layer_scale_init=1e-5)
  patches = sd["pos_embed"][0, 1:] if embed_prefix else sd["pos_embed"][0]
  expected = scipy.ndimage.zoom(patches.reshape(37, 37, D), (GRID / 37, GRID / 37, 1), order=1)
  np.testing.assert_allclose(loaded["pos_embedding"], expected.reshape(1, N, D), atol=1e-6)
  cls = sd["cls_token"] + (sd["pos_embed"][:, :1] if embed_prefix else 0)
  np.testing.assert_allclose(loaded["cls"], cls, atol=1e-7)
  if reg:
    np.testing.assert_array_equal(loaded["reg"], sd["reg_token"])


def test_other_class_count_gives_a_fresh_head(tmp_path):
  sd = _timm_state(_Random(15), classes=1000)
  model = vit.Model(num_classes=CLASSES, **CFG, pool_type="tok")
  init = jax.device_get(model.init(jax.random.key(0), _images()[0])["params"])
  loaded = models.load("vit", init, _save(tmp_path, sd), {})
  np.testing.assert_array_equal(loaded["head"]["kernel"], init["head"]["kernel"])
  np.testing.assert_array_equal(loaded["Transformer"]["encoderblock_1"]["LayerNorm_0"]["scale"],
                                sd["blocks.1.norm1.weight"])


def test_convert_is_a_pure_function_of_arrays():
  """The fused qkv (3D, D) splits in q, k, v order into (D, heads, head_dim) kernels;
  the projection (D, D) becomes (heads, head_dim, D); the conv (O, I, kh, kw) (kh, kw, I, O)."""
  sd = _timm_state(_Random(16))
  tree, layout = vit_torch.convert(sd, num_heads=HEADS)
  assert layout.name == "timm"
  attention = tree["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_0"]
  qkv = sd["blocks.0.attn.qkv.weight"]
  for j, name in enumerate(("query", "key", "value")):
    np.testing.assert_array_equal(attention[name]["kernel"],
                                  qkv[j * D:(j + 1) * D].T.reshape(D, HEADS, D // HEADS))
  np.testing.assert_array_equal(attention["out"]["kernel"],
                                sd["blocks.0.attn.proj.weight"].T.reshape(HEADS, D // HEADS, D))
  np.testing.assert_array_equal(tree["embedding"]["kernel"],
                                sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0))
  assert tree["pos_embedding"].shape == (1, N, D)


# ------------------------------------------------------------------- one-line errors


def _one_line_error(fn):
  with pytest.raises(loading.CheckpointError) as info:
    fn()
  message = str(info.value)
  assert "\n" not in message and info.value.__cause__ is None
  return message


def _load(tmp_path, sd, classes=CLASSES, **cfg):
  return lambda: _load_and_run(_save(tmp_path, sd), classes=classes, **cfg)


def test_another_architecture_is_named(tmp_path):
  r = _Random(17)
  convnext = {"stem.0.weight": r(8, 3, 4, 4), "stem.0.bias": r(8),
              "stages.0.blocks.0.conv_dw.weight": r(8, 1, 7, 7), "head.fc.weight": r(5, 8)}
  message = _one_line_error(_load(tmp_path, convnext, pool_type="tok"))
  assert "is a ConvNeXt state dict (timm convnext_*), not a ViT" in message
  assert "config.model_name" in message


def test_unknown_layout_names_its_keys(tmp_path):
  message = _one_line_error(_load(tmp_path, {"encoder.weight": _Random(18)(4, 4)},
                                  pool_type="tok"))
  assert "of no layout vit knows (names such as encoder.weight)" in message
  assert vit_torch.WHAT_LOADS in message


def test_timm_distilled_deit_heads_in_training_and_evaluation(tmp_path):
  """train=True: the cls head's logits, aux "logits_dist" the distillation head's (what
  DeiT's DistillationLoss takes); train=False: their mean (timm's forward_head in eval)."""
  sd = _timm_state(_Random(19), dist=True)
  cfg = dict(CFG, pool_type="tok", distill_token=True, gelu_approximate=False)
  model = vit.Model(num_classes=CLASSES, **cfg)
  images, nchw = _images()
  init = jax.device_get(model.init(jax.random.key(0), images)["params"])
  loaded = models.load("vit", init, _save(tmp_path, sd), cfg)
  cls_logits, dist_logits = _timm_forward(sd, nchw, distilled_training=True)
  logits, aux = model.apply({"params": loaded}, images, train=True)
  np.testing.assert_allclose(logits, cls_logits, atol=1e-5)
  np.testing.assert_allclose(aux["logits_dist"], dist_logits, atol=1e-5)
  logits, aux = model.apply({"params": loaded}, images, train=False)
  np.testing.assert_allclose(logits, (cls_logits + dist_logits) / 2, atol=1e-5)
  np.testing.assert_allclose(aux["logits_cls"], cls_logits, atol=1e-5)
  np.testing.assert_allclose(aux["logits_dist"], dist_logits, atol=1e-5)
  # The position entries of cls and dist (the first two of 18) are folded into the tokens.
  np.testing.assert_allclose(loaded["cls"], sd["cls_token"] + sd["pos_embed"][:, :1])
  np.testing.assert_allclose(loaded["dist"], sd["dist_token"] + sd["pos_embed"][:, 1:2])
  np.testing.assert_array_equal(loaded["pos_embedding"], sd["pos_embed"][:, 2:])


def test_distilled_deit_other_class_count_gives_fresh_heads(tmp_path):
  sd = _timm_state(_Random(32), dist=True, classes=1000)
  model = vit.Model(num_classes=CLASSES, **CFG, pool_type="tok", distill_token=True)
  init = jax.device_get(model.init(jax.random.key(0), _images()[0])["params"])
  loaded = models.load("vit", init, _save(tmp_path, sd), {})
  for head in ("head", "head_dist"):
    np.testing.assert_array_equal(loaded[head]["kernel"], init[head]["kernel"])
  np.testing.assert_allclose(loaded["dist"], sd["dist_token"] + sd["pos_embed"][:, 1:2])


@pytest.mark.parametrize("dist_in_file", [True, False])
def test_distill_token_mismatch_names_the_field(tmp_path, dist_in_file):
  """A distilled DeiT into a model without distill_token (dropping the token would change
  every feature), or the other way round: one line naming distill_token."""
  sd = _timm_state(_Random(33), dist=dist_in_file)
  message = _one_line_error(_load(tmp_path, sd, pool_type="tok",
                                  distill_token=not dist_in_file))
  if dist_in_file:
    assert message.startswith(f"the '{tmp_path}/model.safetensors' has a distillation token")
    assert "set config.model.distill_token=True to load it" in message
  else:
    assert "has no distillation token: set config.model.distill_token=False" in message


@pytest.mark.parametrize("state_kw, cfg, expected", [
    (dict(reg=4, embed_prefix=False), dict(), "has 4 register tokens but the model 0: set "
     "config.model.num_registers=4"),
    (dict(), dict(num_registers=2), "has 0 register tokens but the model 2: set "
     "config.model.num_registers=0"),
    (dict(ls=True), dict(), "has LayerScale (per-channel scales on the residual branches): "
     "set config.model.layer_scale_init"),
    (dict(), dict(layer_scale_init=1e-5), "has no LayerScale but the model has: set "
     "config.model.layer_scale_init=None"),
    (dict(swiglu=True), dict(), "has a SwiGLU (packed gate and value) MLP: set "
     "config.model.mlp_type='swiglu'"),
    (dict(qkv_bias=False), dict(), "has no query/key/value biases: set "
     "config.model.qkv_bias=False"),
    (dict(cls=False, pool="map"), dict(), "has no class token: set "
     "config.model.class_token=False"),
    (dict(), dict(pool_type="map", class_token=True), "has no MAP head: set "
     "config.model.pool_type to 'tok' or 'gap'"),
])
def test_config_that_does_not_match_the_file_names_the_field(tmp_path, state_kw, cfg,
                                                             expected):
  cfg = dict(dict(pool_type="tok"), **cfg)
  message = _one_line_error(_load(tmp_path, _timm_state(_Random(22), **state_kw), **cfg))
  assert expected in message


def test_tensors_with_no_place_are_named(tmp_path):
  sd = _timm_state(_Random(23))
  sd["fc_norm.weight"], sd["fc_norm.bias"] = _Random(24)(D), _Random(25)(D)
  message = _one_line_error(_load(tmp_path, sd, pool_type="tok"))
  assert ("the timm state dict '" in message and "has tensors vitcls's ViT has no place for: "
          "fc_norm.bias, fc_norm.weight (timm's fc_norm (a LayerNorm after average "
          "pooling))" in message)


def test_siglip2_naflex_patch_embedding_is_refused(tmp_path):
  sd = _hf_siglip_state(_Random(26))
  sd["vision_model.embeddings.patch_embedding.weight"] = _Random(27)(D, 3 * PATCH * PATCH)
  message = _one_line_error(_load(tmp_path, sd, classes=0, pool_type="map"))
  assert "SigLIP 2 NaFlex" in message and "fixed-resolution SigLIP 2 checkpoint" in message
