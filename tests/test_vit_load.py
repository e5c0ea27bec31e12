"""Importing ViT checkpoints: every published layout gives the same logits; adapting on load.

Each test writes a checkpoint file in one layout (key names and shapes as the public files
have them) from parameters known here, loads it with `vit.load`, and compares the logits
with the model run directly on those parameters.
"""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from vitcls.models import loading, vit

CFG = dict(variant="mu/4", depth=2, pool_type="tok", head_zeroinit=False)


def _images(size=16, n=3):
  return jax.random.uniform(jax.random.key(7), (n, size, size, 3), minval=-1, maxval=1)


def _model(**kw):
  return vit.Model(**dict(dict(CFG, num_classes=5), **kw))


def _known_params(model, size=16, seed=1):
  """Init params with every leaf made non-trivial (cls and biases are zero at init)."""
  params = model.init(jax.random.key(seed), _images(size))["params"]
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [np.asarray(x + 0.02 * jax.random.normal(k, x.shape)) for x, k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, leaves)


def _logits(model, params, size=16):
  return np.asarray(model.apply({"params": params}, _images(size))[0])


def _init(model, size=16):
  return jax.device_get(model.init(jax.random.key(99), _images(size))["params"])


def _vision_transformer_layout(params):
  """vitcls params -> google-research/vision_transformer's flat keys (pre-linen names).

  The cls token's position entry comes first in its (1, N+1, D) embedding; here it gets a
  random value and `cls` is stored minus that value, so the model the file describes
  computes what `params` computes.
  """
  flat = {}
  names = {"LayerNorm_0": "LayerNorm_0", "MultiHeadDotProductAttention_0":
           "MultiHeadDotProductAttention_1", "LayerNorm_1": "LayerNorm_2",
           "MlpBlock_0": "MlpBlock_3"}
  for name, value in loading.flatten(params).items():
    parts = name.split("/")
    if parts[0] == "Transformer" and parts[1].startswith("encoderblock_"):
      parts[2] = names[parts[2]]
    flat["/".join(parts)] = value
  cls_pos = np.random.default_rng(0).normal(size=(1, 1, params["cls"].shape[-1]))
  cls_pos = cls_pos.astype(np.float32)
  flat["Transformer/posembed_input/pos_embedding"] = np.concatenate(
      [cls_pos, flat.pop("pos_embedding")], axis=1)
  flat["cls"] = flat["cls"] - cls_pos
  return flat


def _stacked(flat_params):
  """Per-block flat keys -> one `encoderblock` with a leading depth axis (scan=True)."""
  tree = loading.unflatten(flat_params)
  encoder = tree["Transformer"]
  blocks = [encoder.pop(f"encoderblock_{i}") for i in range(2)]
  encoder["encoderblock"] = jax.tree.map(lambda *xs: np.stack(xs), *blocks)
  return loading.flatten(tree)


def _save(tmp_path, flat, name="ckpt.npz"):
  path = str(tmp_path / name)
  np.savez(path, **flat)
  return path


def test_vision_transformer_layout_gives_the_same_logits(tmp_path):
  model = _model(rep_size=True)
  params = _known_params(model)
  flat = _vision_transformer_layout(params)
  assert flat["Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel"].shape \
      == (32, 2, 16)
  assert flat["Transformer/posembed_input/pos_embedding"].shape == (1, 17, 32)
  assert "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel" in flat
  assert "pre_logits/kernel" in flat and "Transformer/encoder_norm/scale" in flat
  loaded = vit.load(_init(model), _save(tmp_path, flat), {"rep_size": True})
  np.testing.assert_allclose(_logits(model, loaded), _logits(model, params), atol=1e-5)


@pytest.mark.parametrize("prefix, stored_scanned, model_scanned", [
    ("", False, False), ("params/", True, False), ("params/", False, True), ("", True, True)])
def test_big_vision_layouts_give_the_same_logits(tmp_path, prefix, stored_scanned,
                                                 model_scanned):
  reference = _model()
  params = _known_params(reference)
  flat = loading.flatten(params)
  if stored_scanned:
    flat = _stacked(flat)
    assert flat["Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"].shape == (2, 32, 128)
  assert flat["pos_embedding"].shape == (1, 16, 32)  # N entries: cls has none.
  path = _save(tmp_path, {prefix + k: v for k, v in flat.items()})
  model = _model(scan=model_scanned)
  loaded = vit.load(_init(model), path, {"scan": model_scanned})
  np.testing.assert_allclose(_logits(model, loaded), _logits(reference, params), atol=1e-5)


def test_old_big_vision_layout_with_cls_entry_at_top_level(tmp_path):
  model = _model()
  params = _known_params(model)
  flat = _vision_transformer_layout(params)
  flat["pos_embedding"] = flat.pop("Transformer/posembed_input/pos_embedding")
  loaded = vit.load(_init(model), _save(tmp_path, flat), {})
  np.testing.assert_allclose(_logits(model, loaded), _logits(model, params), atol=1e-5)


def test_export_round_trip_is_exact(tmp_path):
  model = _model(scan=True)
  params = _known_params(model)
  path = str(tmp_path / "out.npz")
  loading.write_npz(path, params)
  with np.load(path, allow_pickle=False) as npz:
    assert "Transformer/encoderblock/LayerNorm_0/scale" in npz.files
    assert "pos_embedding" in npz.files and "cls" in npz.files
  loaded = vit.load(_init(model), path, {"scan": True})
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
  assert not [n for n in os.listdir(tmp_path) if n != "out.npz"]  # No temp file left.


@pytest.mark.parametrize("old, new", [((4, 4), (6, 6)), ((7, 7), (12, 12)), ((12, 12), (5, 5)),
                                      ((3, 3), (3, 8)), ((5, 5), (1, 1))])
def test_resample_grid_matches_scipy_zoom_order_1(old, new):
  grid = np.random.default_rng(0).normal(size=(*old, 6)).astype(np.float32)
  expected = scipy.ndimage.zoom(grid, (new[0] / old[0], new[1] / old[1], 1), order=1)
  assert expected.shape[:2] == new
  np.testing.assert_allclose(loading.resample_grid(grid, new), expected, atol=1e-6)
  jitted = jax.jit(loading.resample_grid, static_argnums=1)(jnp.asarray(grid), new)
  np.testing.assert_allclose(jitted, expected, atol=1e-6)


def test_load_at_another_resolution_resamples_posemb_and_keeps_the_rest(tmp_path):
  params = _known_params(_model())
  path = _save(tmp_path, loading.flatten(params))
  model = _model()
  loaded = vit.load(_init(model, size=24), path, {})
  old_grid = params["pos_embedding"].reshape(4, 4, 32)
  expected = scipy.ndimage.zoom(old_grid, (1.5, 1.5, 1), order=1).reshape(1, 36, 32)
  np.testing.assert_allclose(loaded["pos_embedding"], expected, atol=1e-6)
  np.testing.assert_array_equal(loaded["cls"], params["cls"])
  assert _logits(model, loaded, size=24).shape == (3, 5)


def test_other_class_count_or_dont_load_gives_a_fresh_head(tmp_path):
  params = _known_params(_model())
  path = _save(tmp_path, loading.flatten(params))
  model = _model(num_classes=7)
  init = _init(model)
  loaded = vit.load(init, path, {})
  np.testing.assert_array_equal(loaded["head"]["kernel"], init["head"]["kernel"])
  np.testing.assert_array_equal(loaded["embedding"]["kernel"], params["embedding"]["kernel"])

  init5 = _init(_model())
  kept = vit.load(init5, path, {}, dont_load=[r"head/.*", r".*/encoder_norm/.*"])
  np.testing.assert_array_equal(kept["head"]["bias"], init5["head"]["bias"])
  np.testing.assert_array_equal(kept["Transformer"]["encoder_norm"]["scale"],
                                init5["Transformer"]["encoder_norm"]["scale"])
  np.testing.assert_array_equal(kept["cls"], params["cls"])


def test_pre_logits_dropped_when_the_model_has_no_rep_size(tmp_path):
  params = _known_params(_model(rep_size=True))
  path = _save(tmp_path, loading.flatten(params))
  model = _model()
  init = _init(model)
  loaded = vit.load(init, path, {})
  assert "pre_logits" not in loaded
  # The head read tanh(pre_logits) features: it is meaningless without them, so fresh.
  np.testing.assert_array_equal(loaded["head"]["kernel"], init["head"]["kernel"])
  np.testing.assert_array_equal(loaded["Transformer"]["encoderblock_1"]["MlpBlock_0"]
                                ["Dense_1"]["kernel"],
                                params["Transformer"]["encoderblock_1"]["MlpBlock_0"]
                                ["Dense_1"]["kernel"])


def _one_line_error(fn):
  with pytest.raises(loading.CheckpointError) as info:
    fn()
  message = str(info.value)
  assert "\n" not in message and info.value.__cause__ is None
  return message


def test_wrong_width_is_one_clear_error(tmp_path):
  path = _save(tmp_path, loading.flatten(_known_params(_model(width=64, num_heads=2))))
  message = _one_line_error(lambda: vit.load(_init(_model()), path, {}))
  name = re.match(r"parameter '(\S+)' has shape", message).group(1)
  shapes = [loading.flatten(tree)[name] for tree in (
      _known_params(_model(width=64, num_heads=2)), _init(_model()))]
  assert f"has shape {shapes[0].shape} in the '{path}' but {shapes[1].shape} in the model" \
      in message
  assert 64 in shapes[0].shape and 32 in shapes[1].shape


def test_missing_parameter_names_it_and_the_fix(tmp_path):
  flat = loading.flatten(_known_params(_model()))
  del flat["Transformer/encoder_norm/scale"]
  message = _one_line_error(lambda: vit.load(_init(_model()), _save(tmp_path, flat), {}))
  assert "'Transformer/encoder_norm/scale'" in message and "dont_load" in message


def test_bad_files_are_one_clear_error(tmp_path):
  model = _model()
  text = tmp_path / "notes.npz"
  text.write_text("these are not arrays\n")
  assert "is not an .npz file (not a zip archive)" in _one_line_error(
      lambda: vit.load(_init(model), str(text), {}))

  good = _save(tmp_path, loading.flatten(_known_params(model)), "good.npz")
  data = open(good, "rb").read()
  truncated = tmp_path / "truncated.npz"
  truncated.write_bytes(data[:len(data) // 2])
  assert "is not a complete .npz file" in _one_line_error(
      lambda: vit.load(_init(model), str(truncated), {}))

  pickled = str(tmp_path / "pickled.npz")
  np.savez(pickled, cls=np.array([{"a": 1}], dtype=object))
  assert "holds pickled Python objects" in _one_line_error(
      lambda: vit.load(_init(model), pickled, {}))

  assert "does not exist" in _one_line_error(
      lambda: vit.load(_init(model), str(tmp_path / "nope.npz"), {}))


def test_export_round_trip_with_registers_layer_scale_and_swiglu(tmp_path):
  cfg = dict(num_registers=2, layer_scale_init=1e-5, mlp_type="swiglu", qkv_bias=False,
             scan=True)
  model = _model(**cfg)
  params = _known_params(model)
  path = str(tmp_path / "out.npz")
  loading.write_npz(path, params)
  unrolled = _model(**dict(cfg, scan=False))
  loaded = vit.load(_init(unrolled), path, dict(cfg, scan=False))
  assert loaded["reg"].shape == (1, 2, 32)
  assert "LayerScale_1" in loaded["Transformer"]["encoderblock_1"]
  np.testing.assert_allclose(_logits(unrolled, loaded), _logits(model, params), atol=1e-5)


def test_npz_that_does_not_match_the_config_names_the_field(tmp_path):
  path = _save(tmp_path, loading.flatten(_known_params(_model(layer_scale_init=1e-5))))
  message = _one_line_error(lambda: vit.load(_init(_model()), path, {}))
  assert message == (f"the '{path}' has LayerScale (per-channel scales on the residual "
                     f"branches): set config.model.layer_scale_init (e.g. 1e-5; the file "
                     f"gives the values) to load it")
  path = _save(tmp_path, loading.flatten(_known_params(_model(num_registers=4))), "reg.npz")
  assert "set config.model.num_registers=4 to load it" in _one_line_error(
      lambda: vit.load(_init(_model()), path, {}))
