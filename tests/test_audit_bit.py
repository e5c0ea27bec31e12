"""Pins every row of experiments/audits/bit_i1k.md to the references as transcribed.

Table A: big_vision commit 0127fb6b (paths under big_vision/); table B: the BiT paper's
§3.3 as the issue transcribes it, big_vision `configs/bit_i21k.py` and big_transfer
commit 140de6e7. Values are written out here, independently of the experiment files.
"""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitcls import configs, models, optim
from vitcls.models import loading
from conftest import REPO

N_TRAIN = 1_268_355  # imagenet2012 train[:99%] (of 1,281,167).


def _config(name, arg=""):
  spec = os.path.join(REPO, "experiments", name) + (f":{arg}" if arg else "")
  return configs.resolve(configs.load_experiment(spec))


def _params(config, res=64):
  model = models.build(config.model_name, config.num_classes, config.model)
  return model, jax.eval_shape(model.init, jax.random.key(0),
                               jnp.zeros((1, res, res, 3)))["params"]


def _keys(table):
  text = open(os.path.join(REPO, "experiments", "audits", "bit_i1k.md")).read()
  part = text.split("## B.")[0 if table == "A" else 1]
  return re.findall(r"^\| `(\w+)` \|", part, flags=re.M)


A_KEYS = {"data", "batch", "epochs", "rounding", "shuffle", "loss", "label_smoothing",
          "mixup", "crop", "flip", "normalise", "eval_pp", "eval_splits", "eval_every",
          "model", "depth_width", "layout", "root", "head_layout", "padding", "ws", "gn",
          "init_conv", "init_gn3", "init_gn", "init_head", "params", "precision",
          "optimiser", "momentum_dtype", "clip", "lr", "wd", "wd_mask", "warmup", "decay",
          "expected"}
B_KEYS = {"data", "batch", "epochs", "model", "ws", "gn", "root", "init_head", "init_gn",
          "params", "optimiser", "momentum_dtype", "lr", "warmup", "decay", "wd", "clip",
          "label_smoothing", "crop", "normalise", "eval_pp", "eval_splits", "precision",
          "expected"}


@pytest.mark.parametrize("table, keys", [("A", A_KEYS), ("B", B_KEYS)])
def test_every_audit_row_is_pinned_here(table, keys):
  assert sorted(_keys(table)) == sorted(keys)


@pytest.fixture(scope="module")
def bv():
  return _config("bit_i1k.py")


@pytest.fixture(scope="module")
def paper():
  return _config("bit_paper_i1k.py")


def test_a_data_length_and_pp(bv):
  c = bv
  assert (c.input.data.name, c.input.data.split) == ("imagenet2012", "train[:99%]")  # :40-43
  assert c.input.batch_size == 4096  # :44
  assert c.total_epochs == 90 and c.total_steps is None  # :35
  # utils.py:1043-1053 rounds to nearest (27,869); so does vitcls (fixed).
  assert round(90 * N_TRAIN / 4096) == 27_869
  assert configs.total_steps(c, N_TRAIN) == 27_869
  assert c.loss == "softmax_xent" and c.label_smoothing == 0.0  # :37
  assert c.mixup.p == 0.0 and c.mixup.alpha == 0.0 and c.cutmix.alpha == 0.0
  ops = c.input.pp.split("|")
  # :50, area 5-100 default; pp/ops_image.py:197-242 TF sampling, no antialias, truncated.
  assert ops[:3] == ["decode", "inception_crop(224,sampling='tf',antialias=False,rounding='truncate')",
                     "flip_lr"]
  assert "value_range(-1,1)" in ops and "onehot(1000)" in ops  # :48-49
  # :51; pp/ops_image.py:108 (resize_small defaults to "area").
  for name in ("train", "minival", "val", "v2", "real"):
    e = c.evals[name]
    assert e.pp.startswith(
        "decode|resize_small(256,method='area',rounding='truncate')|central_crop(224)|")
    assert e.every == 1000  # :79
  assert c.evals.real.type == "real" and "key='real_label'" in c.evals.real.pp  # :87-88
  assert c.evals.real.pp.startswith(
      "decode|resize_small(256,method='area',rounding='truncate')|central_crop(224)")
  splits = {k: (c.evals[k].get("data", "imagenet2012"), c.evals[k].split) for k in c.evals}
  assert splits == {"train": ("imagenet2012", "train[:2%]"),  # :83-86
                    "minival": ("imagenet2012", "train[99%:]"),
                    "val": ("imagenet2012", "validation"),
                    "v2": ("imagenet_v2", "test"),
                    "real": ("imagenet2012_real", "validation")}


def test_a_optimiser_and_schedule(bv):
  c = bv
  assert c.optax_name == "sgd" and dict(c.optax) == {  # optax.py:220-222 (fixed).
      "momentum": 0.9, "accumulator_dtype": "bfloat16"}
  assert c.grad_clip_norm == 1.0  # :65
  assert c.lr == pytest.approx(0.1 * 4096 / 256)  # :69
  assert c.wd == pytest.approx(1e-4 * 4096 / 256)  # :68
  assert c.wd_mode == "times_schedule" and c.wd_mask == r".*/kernel$"  # optax.py:125-149
  assert _config("bit_i1k.py", "batch=1024").lr == pytest.approx(0.4)
  assert _config("bit_i1k.py", "batch=1024").wd == pytest.approx(4e-4)
  assert c.schedule.decay_type == "cosine" and c.schedule.warmup_steps == 1000  # :70
  assert c.schedule.end_factor == 0.0
  total = 27_869

  def bv_lr(step):  # utils.py:1113-1137, transcribed.
    progress = np.clip((step - 1000) / (total - 1000), 0.0, 1.0)
    return 1.6 * 0.5 * (1 + np.cos(np.pi * progress)) * min(1.0, step / 1000)
  for step in (0, 1, 500, 999, 1000, 1001, 14_000, total - 1, total):
    assert float(optim.make_schedule(c, total)(step)) == pytest.approx(bv_lr(step),
                                                                       abs=1e-6), step
  assert c.get("expected", {}) == {} or dict(c.expected) == {}  # :18 quotes only a time.


def test_a_decoupled_decay_matches_big_vision_chain(bv):
  """optax.py:143-149: -sched(t) * (lr * clip(g) momentum + wd * p), sched in [0, 1]."""
  c = configs.resolve(configs.ConfigDict(dict(bv)))
  c.grad_clip_norm = 0.0
  c.optax = configs.ConfigDict({"momentum": 0.9})  # The chain in float32 (bfloat16: test_optim).
  tx, schedule = optim.make_optimizer(c, 27_869)
  p = {"w": {"kernel": jnp.ones((3,))}, "g": {"scale": jnp.ones((3,))}}
  g = jax.tree.map(lambda x: 0.5 * x, p)
  state = tx.init(p)
  for step in range(3):
    updates, state = tx.update(g, state, p)
    shape = float(schedule(step)) / 1.6
    mom = 0.5 * sum(0.9 ** k for k in range(step + 1))
    np.testing.assert_allclose(updates["w"]["kernel"], -shape * (1.6 * mom + 0.0016),
                               rtol=1e-5)
    np.testing.assert_allclose(updates["g"]["scale"], -shape * 1.6 * mom, rtol=1e-5)


def test_a_model_layout_init_and_count(bv):
  c = bv
  assert c.model_name == "bit_v1" and (c.model.depth, c.model.width) == (50, 1)  # :57-61
  model, shapes = _params(c)
  assert model.dtype is None  # float32, as models/bit.py:86-90.
  flat = loading.flatten(shapes)
  assert {"conv_root/kernel", "gn_root/scale", "gn_root/bias"} <= set(flat)  # :101-103
  assert "block1/unit1/gn_proj/scale" in flat and "block1/unit2/conv_proj/kernel" not in flat
  assert not any("norm-pre-head" in n for n in flat)  # :117
  assert flat["block2/unit1/gn3/scale"].shape == (512,)  # flax GroupNorm: (C,).
  # 25,557,032: closed form (tests/test_bit.py) == torchvision's published ResNet-50.
  _, full = _params(c, res=224)
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(full)) == 25_557_032
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  flat = loading.flatten(params)
  for name, value in flat.items():
    if name.endswith("gn3/scale") or name.startswith("head/"):  # :67, :120-121
      assert not np.any(value), name
    elif name.endswith("/scale"):
      np.testing.assert_array_equal(value, 1, err_msg=name)
    elif name.endswith("/bias"):
      np.testing.assert_array_equal(value, 0, err_msg=name)
    else:  # lecun normal: std sqrt(1 / fan_in) before truncation.
      fan_in = np.prod(value.shape[:-1])
      assert 0.5 < np.std(value) * np.sqrt(fan_in) < 1.2, name


def test_b_paper_recipe(paper):
  c = paper
  assert (c.input.data.name, c.input.data.split) == ("imagenet2012", "train[:99%]")
  assert c.input.batch_size == 4096 and c.total_epochs == 90
  assert c.model_name == "bit" and (c.model.depth, c.model.width) == (50, 1)
  assert c.model.head_zeroinit is True  # models/bit_paper.py:134.
  assert models.build("bit", 1000, c.model).dtype is None
  assert c.optax_name == "sgd" and dict(c.optax) == {"momentum": 0.9}
  assert c.lr == pytest.approx(0.03 * 4096 / 256)  # §3.3; configs/bit_i21k.py:63.
  assert _config("bit_paper_i1k.py", "batch=1024").lr == pytest.approx(0.12)
  assert c.wd == 1e-4 and c.wd_mode == "l2" and c.wd_mask == r".*/kernel$"
  assert c.grad_clip_norm == 0.0
  assert c.loss == "softmax_xent" and c.label_smoothing == 0.0 and c.mixup.p == 0.0
  assert c.input.pp.split("|")[:3] == ["decode", "inception_crop(224)", "flip_lr"]
  assert "value_range(-1,1)" in c.input.pp
  assert set(c.evals) == {"minival", "val"}
  assert c.evals.val.split == "validation" and c.evals.minival.split == "train[99%:]"
  assert c.evals.val.pp.startswith("decode|resize_small(256,method='area')|central_crop(224)")
  assert c.get("expected", {}) == {} or dict(c.expected) == {}
  # Warm-up 5,000 steps linear from 0 (§3.3; configs/bit_i21k.py:65), then lr / 10 at
  # epochs 30, 60, 80 of 90 counted from the first step.
  assert c.schedule.decay_type == "stair" and c.schedule.warmup_steps == 5000
  total = configs.total_steps(c, N_TRAIN)
  per_epoch = N_TRAIN / 4096
  lr = lambda step: float(optim.make_schedule(c, total)(step))  # noqa: E731
  assert lr(0) == 0.0 and lr(2500) == pytest.approx(0.24) and lr(5000) == pytest.approx(0.48)
  for epoch, factor in [(29.9, 1), (30.1, 0.1), (59.9, 0.1), (60.1, 0.01), (79.9, 0.01),
                        (80.1, 0.001), (90, 0.001)]:
    assert lr(round(epoch * per_epoch)) == pytest.approx(0.48 * factor), epoch


def test_b_paper_network_count(paper):
  _, shapes = _params(paper, res=224)
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == 25_549_352
