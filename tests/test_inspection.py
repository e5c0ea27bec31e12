"""Tests for vitcls/inspection.py against computations written here without its code.

Tiny models, no training: attention weights against a NumPy softmax of the queries and
keys flax computed, rollout against hand-worked matrices, the relevance map's layout
against a model built by hand to look at one patch.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vitcls import configs, inspection, models
from vitcls.run import checkpoint
from vitcls.models import vit

TINY = dict(num_classes=3, width=16, depth=2, mlp_dim=32, num_heads=2, patch_size=7,
            head_zeroinit=False)


def _images(n=3, h=14, w=21, seed=0):
  return np.asarray(jax.random.uniform(jax.random.key(seed), (n, h, w, 1), minval=-1,
                                       maxval=1))


def _init(model, images, seed=1):
  return model.init(jax.random.key(seed), jnp.asarray(images))["params"]


def _softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("pool_type, tokens", [("tok", 7), ("gap", 6)])
def test_weights_are_the_softmax_of_the_captured_queries_and_keys(pool_type, tokens):
  model = vit.Model(pool_type=pool_type, **TINY)
  images = _images()
  params = _init(model, images)
  weights = inspection.attention_weights(model, params, images)
  assert weights.shape == (2, 3, 2, tokens, tokens) and weights.dtype == np.float32
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)

  # The query / key projections' outputs, [N, tokens, heads, head_dim], taken by flax.
  _, state = model.apply({"params": params}, images,
                         capture_intermediates=lambda m, _: m.name in ("query", "key"),
                         mutable=["intermediates"])
  for block in range(2):
    attention = state["intermediates"]["Transformer"][f"encoderblock_{block}"][
        "MultiHeadDotProductAttention_0"]
    q = np.asarray(attention["query"]["__call__"][0], np.float64)
    k = np.asarray(attention["key"]["__call__"][0], np.float64)
    expected = _softmax(np.einsum("nqhd,nkhd->nhqk", q, k) / np.sqrt(q.shape[-1]))
    np.testing.assert_allclose(weights[block], expected, atol=2e-6)


def test_scanned_and_rematerialised_models_give_the_same_weights():
  model = vit.Model(pool_type="tok", **TINY)
  images = _images()
  params = _init(model, images)
  expected = inspection.attention_weights(model, params, images)
  blocks = [params["Transformer"].pop(f"encoderblock_{i}") for i in range(2)]
  stacked = dict(params, Transformer=dict(
      params["Transformer"],
      encoderblock=jax.tree_util.tree_map(lambda *x: np.stack(x), *blocks)))
  scanned = model.clone(scan=True)
  assert jax.tree_util.tree_structure(stacked) == jax.tree_util.tree_structure(
      _init(scanned, images))
  np.testing.assert_allclose(inspection.attention_weights(scanned, stacked, images),
                             expected, atol=1e-6)
  params["Transformer"].update({f"encoderblock_{i}": b for i, b in enumerate(blocks)})
  np.testing.assert_allclose(
      inspection.attention_weights(model.clone(remat=True), params, images), expected,
      atol=1e-6)


def test_only_vits_have_attention():
  bit = models.get("bit")(num_classes=3, depth=[1, 1, 1, 1], width=1)
  with pytest.raises(ValueError, match="need a ViT"):
    inspection.attention_weights(bit, {}, _images())


def test_rollout_of_identity_attention_is_the_identity():
  weights = np.broadcast_to(np.eye(5), (3, 2, 4, 5, 5))
  np.testing.assert_array_equal(inspection.attention_rollout(weights),
                                np.broadcast_to(np.eye(5), (2, 5, 5)))


def test_two_block_rollout_worked_by_hand():
  # Block 1, two heads averaging to [[0.2, 0.8], [0.6, 0.4]]: with the residual and
  # renormalised, [[0.6, 0.4], [0.3, 0.7]]. Block 2, one matrix [[1, 0], [0.5, 0.5]] ->
  # [[1, 0], [0.25, 0.75]]. Rollout = block 2 @ block 1.
  block1 = np.array([[[0.4, 0.6], [0.6, 0.4]], [[0.0, 1.0], [0.6, 0.4]]])
  block2 = np.array([[[1.0, 0.0], [0.5, 0.5]]] * 2)
  weights = np.stack([block1, block2])[:, None]  # [depth 2, N 1, heads 2, 2, 2]
  np.testing.assert_allclose(inspection.attention_rollout(weights)[0],
                             [[0.6, 0.4], [0.375, 0.625]], atol=1e-12)
  with pytest.raises(ValueError, match="depth, N, heads, tokens, tokens"):
    inspection.attention_rollout(weights[0])


def test_rollout_rows_sum_to_one():
  rng = np.random.default_rng(0)
  weights = _softmax(rng.normal(size=(4, 2, 3, 6, 6)) * 3)
  rollout = inspection.attention_rollout(weights)
  np.testing.assert_allclose(rollout.sum(-1), 1.0, atol=1e-12)
  assert (rollout >= 0).all()


def test_token_relevance_reads_what_the_head_reads():
  rng = np.random.default_rng(1)
  rollout = inspection.attention_rollout(_softmax(rng.normal(size=(2, 2, 1, 5, 5))))
  np.testing.assert_array_equal(inspection.token_relevance(rollout, "tok"),
                                rollout[:, 0, 1:])
  gap = inspection.token_relevance(rollout, "gap")
  np.testing.assert_allclose(gap, rollout.mean(axis=1))
  np.testing.assert_allclose(gap.sum(-1), 1.0)
  probe = _softmax(rng.normal(size=(2, 3, 1, 5)))  # [N, heads, 1 query, tokens]
  expected = np.stack([probe[n].mean(0)[0] @ rollout[n] for n in range(2)])
  np.testing.assert_allclose(inspection.token_relevance(rollout, "map", probe), expected)
  with pytest.raises(ValueError, match="unknown pool_type"):
    inspection.token_relevance(rollout, "max")


def _one_patch_model():
  """A depth-1 gap ViT, 1 head, width 8, whose every query looks at the brightest patch.

  The embedding writes a patch's mean into channel 0 only, so after the LayerNorm a
  bright patch is a fixed pattern and a black one is 0; the queries are a constant
  (bias only) aligned with that pattern through the key kernel.
  """
  model = vit.Model(num_classes=2, width=8, depth=1, mlp_dim=8, num_heads=1,
                    patch_size=7, pool_type="gap")
  images = np.zeros((1, 14, 21, 1), np.float32)
  params = jax.tree_util.tree_map(np.array, _init(model, images))
  params["embedding"]["kernel"][:] = 0
  params["embedding"]["kernel"][..., 0, 0] = 1 / 49
  params["embedding"]["bias"][:] = 0
  params["pos_embedding"][:] = 0
  attention = params["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_0"]
  for name in ("query", "key"):
    attention[name]["kernel"][:] = 0
    attention[name]["bias"][:] = 0
  attention["query"]["bias"][0, 0] = 10.0
  attention["key"]["kernel"][0, 0, 0] = 10.0
  return model, params


def test_relevance_map_is_laid_out_like_the_image():
  model, params = _one_patch_model()
  images = np.full((2, 14, 21, 1), 0.0, np.float32)  # A 2x3 patch grid.
  images[0, 0:7, 14:21] = 1.0  # Top right patch.
  images[1, 7:14, 0:7] = 1.0  # Bottom left patch.
  maps = inspection.relevance_maps(model, params, images)
  assert maps.shape == (2, 2, 3)
  # Every query puts all its weight on the bright patch: with the residual, each row
  # is 0.5 there and 0.5 on itself, so the mean of the rows is 0.5 + 0.5/6 there.
  expected = np.full((2, 2, 3), 0.5 / 6)
  expected[0, 0, 2] += 0.5
  expected[1, 1, 0] += 0.5
  np.testing.assert_allclose(maps, expected, atol=1e-6)


def test_relevance_maps_compose_the_parts():
  model = vit.Model(pool_type="map", **TINY)
  images = _images(n=2)
  params = _init(model, images)
  maps = inspection.relevance_maps(model, params, images)
  assert maps.shape == (2, 2, 3)
  np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1.0, atol=1e-6)
  tok = vit.Model(pool_type="tok", **TINY)
  tok_params = _init(tok, images)
  rollout = inspection.attention_rollout(
      inspection.attention_weights(tok, tok_params, images))
  np.testing.assert_allclose(inspection.relevance_maps(tok, tok_params, images),
                             rollout[:, 0, 1:].reshape(2, 2, 3))


def test_probabilities_are_the_softmax_of_the_logits_in_any_batch():
  model = vit.Model(pool_type="gap", **TINY)
  images = _images(n=7)
  params = _init(model, images)
  logits = np.asarray(model.apply({"params": params}, images)[0], np.float64)
  probs = inspection.probabilities(model, params, images, batch_size=3)
  assert probs.shape == (7, 3)
  np.testing.assert_allclose(probs, _softmax(logits), atol=1e-6)


def _folder_config(root):
  c = configs.defaults()
  c.input.data.name = f"folder:{root}"
  c.num_classes = 2
  c.model_name = "vit"
  c.model = configs.ConfigDict(dict(width=16, depth=1, mlp_dim=32, num_heads=2,
                                    patch_size=7, pool_type="gap"))
  c.evals.test = configs.ConfigDict(dict(
      type="classification", split="test",
      pp="decode(channels=1)|resize(14)|value_range(-1,1)|onehot(2)"))
  return configs.resolve(c)


def _write_folder(root):
  """Two classes of 5 flat grey PNGs each, 28x28, grey level 10 * (5 * label + i)."""
  for label, name in enumerate(["dark", "light"]):
    os.makedirs(root / name)
    for i in range(5):
      Image.fromarray(np.full((28, 28), 10 * (5 * label + i), np.uint8)).save(
          root / name / f"{i}.png")


def test_eval_examples_are_the_evaluators_split_preprocessed(tmp_path):
  _write_folder(tmp_path / "images")
  config = _folder_config(tmp_path / "images")
  examples = inspection.eval_examples(config)
  assert examples.label_names == ["dark", "light"]
  # The flat layout's test part is one image of each class (20% of 5).
  assert examples.images.shape == (2, 14, 14, 1) and list(examples.labels) == [0, 1]
  for image, label in zip(examples.images, examples.labels):
    level = image[0, 0, 0]
    assert np.all(image == level)  # Flat images stay flat.
    grey = (level + 1) * 127.5
    assert 50 * label <= grey <= 50 * label + 40
  assert len(inspection.eval_examples(config, count=1).images) == 1
  with pytest.raises(configs.ConfigError, match="no evaluator 'val'"):
    inspection.eval_examples(config, eval_name="val")


def test_load_run_gives_back_the_saved_config_and_params(tmp_path):
  _write_folder(tmp_path / "images")
  config = _folder_config(tmp_path / "images")
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(configs.to_json(config))
  model = models.build(config.model_name, config.num_classes, config.model)
  params = _init(model, np.zeros((1, 14, 14, 1), np.float32))
  ckpt = checkpoint.Checkpointer(workdir, asynchronous=False)
  try:
    ckpt.save(4, {"params": params})
  finally:
    ckpt.close()
  run = inspection.load_run(workdir)
  config_, model_, params_ = run
  assert configs.to_json(config_) == configs.to_json(config)
  assert model_ == model
  jax.tree_util.tree_map(np.testing.assert_array_equal, params_, params)
  with pytest.raises(configs.ConfigError, match="no EMA"):
    inspection.load_run(workdir, ema=True)
