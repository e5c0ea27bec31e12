"""Every row of experiments/audits/deit_s16_i1k.md, pinned on the DeiT-S config.

Reference values are transcribed here from facebookresearch/deit at
7e160fe43f0252d17191b71cbb5826254114ea5b and timm 0.3.2 (pytorch-image-models at
6504a42832cb6687e3f595c37e003ea920268365, paths prefixed timm:), file:line beside each.
"by choice" and "to fix" rows pin the vitcls side the table states; "config" rows check
the fields the experiment sets to follow the reference.
"""

import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitcls import configs, optim
from vitcls.data import pp as pp_lib
from vitcls.models import vit
from conftest import REPO

TABLE = os.path.join(REPO, "experiments", "audits", "deit_s16_i1k.md")
N_TRAIN = 1_281_167  # ImageNet-1k train images.

REF = dict(
    batch=4 * 256,  # README_deit.md:216 (--nproc_per_node=4 --batch-size 256).
    lr=5e-4 * 4 * 256 / 512.0,  # main.py:71, 349-351.
    epochs=300,  # main.py:35.
    wd=0.05,  # main.py:66.
    eps=1e-8,  # main.py:58.
    warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5,  # main.py:86, 79, 81.
    drop_path=0.1, drop=0.0,  # main.py:46, 44.
    smoothing=0.1,  # main.py:101.
    mixup=0.8, cutmix=1.0, mixup_prob=1.0, switch_prob=0.5,  # main.py:128-137.
    reprob=0.25, remode="pixel", recount=1,  # main.py:118-123.
    aa="rand-m9-mstd0.5-inc1", train_interpolation="bicubic",  # main.py:98, 102.
    repeats=3,  # samplers.py:16; main.py:105-107 (on by default).
    eval_size=int(224 / 0.875),  # main.py:174; datasets.py:101.
    mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),  # timm:data/constants.py:2-3.
    trunc_std=0.02, trunc_a=-2.0, trunc_b=2.0,  # timm:models/layers/weight_init.py:42.
    patch_fan_in=3 * 16 * 16,  # timm:models/vision_transformer.py:158 (Conv2d 3->384, 16x16).
)


def _config(arg=""):
  spec = os.path.join(REPO, "experiments", "deit_s16_i1k.py") + (f":{arg}" if arg else "")
  return configs.resolve(configs.load_experiment(spec))


def _ops(c):
  return c.input.pp.split("|")


def _lr(c, step):
  return float(optim.make_schedule(c, configs.total_steps(c, N_TRAIN))(step))


def _table_keys():
  with open(TABLE) as f:
    return [m.group(1) for m in re.finditer(r"^\| `([a-z0-9_]+)` \|", f.read(), re.M)]


def _tiny_timm_params():
  model = vit.Model(num_classes=10, width=32, depth=1, mlp_dim=64, num_heads=2,
                    patch_size=16, pool_type="tok", posemb="learn", weight_init="timm",
                    head_zeroinit=False)
  return model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]


ROWS = {
    "batch": lambda c: c.input.batch_size == REF["batch"],
    "lr": lambda c: c.lr == pytest.approx(REF["lr"]),
    "epochs": lambda c: c.total_steps == REF["epochs"] * 1251 and c.total_epochs is None,
    # Fixed: DeiT's 1,251 x 300 steps (samplers.py:35, main.py:236-242), not rounded epochs.
    "steps": lambda c: (configs.total_steps(c, N_TRAIN) == 375_300
                        == 1_281_167 // 256 * 256 // 1024 * 300),
    "optimizer": lambda c: (c.optax_name == "adamw" and (c.optax.b1, c.optax.b2) == (0.9, 0.999)
                            and c.optax.eps == REF["eps"]),
    "wd": lambda c: c.wd == REF["wd"] and c.wd_mode == "times_lr",
    "wd_mask": lambda c: c.wd_mask == r".*/kernel$",
    "clip": lambda c: c.grad_clip_norm == 0.0,
    "amp": lambda c: c.model.get("dtype") is None,  # By choice: float32.
    "ema": lambda c: c.ema_decay == 0.0,  # By choice: DeiT never evaluates its EMA.
    # Fixed: from 1e-6 (main.py:79), over 5 epochs of N // B steps (main.py:86, 236-242).
    "warmup": lambda c: (c.schedule.warmup_steps == REF["warmup_epochs"] * 1251
                         and _lr(c, 0) == pytest.approx(REF["warmup_lr"], rel=1e-4)),
    # Fixed: timm's cosine counted from epoch 0 (cosine_lr.py:71-95): no warm-up prefix.
    "cosine": lambda c: (c.schedule.decay_type == "cosine" and c.schedule.decay_from_start),
    "min_lr": lambda c: c.lr * c.schedule.end_factor == pytest.approx(REF["min_lr"]),
    # Fixed: once per epoch (t_in_epochs), one epoch late (main.py:432): constant within
    # an epoch, and epoch e at timm's lr(e - 1).
    "per_epoch": lambda c: (_lr(c, 200 * 1251) == _lr(c, 200 * 1251 + 1250)
                            and c.schedule.steps_per_update == 1251
                            and c.schedule.update_lag == 1),
    "model": lambda c: ((c.model.variant, c.model.pool_type, c.model.posemb)
                        == ("S/16", "tok", "learn")),
    "posemb_layout": lambda c: True,  # By choice; vitcls's layout: tests/test_vit.py.
    "gelu": lambda c: True,  # By choice: vit.MlpBlock keeps big_vision's nn.gelu.
    "drop_path": lambda c: c.model.stoch_depth == REF["drop_path"],
    "dropout": lambda c: c.model.dropout == REF["drop"],
    "init_norm": lambda c: all(
        np.all(v == (1 if "scale" in jax.tree_util.keystr(k) else 0))
        for k, v in jax.tree_util.tree_leaves_with_path(_tiny_timm_params())
        if "LayerNorm" in jax.tree_util.keystr(k) or "encoder_norm" in jax.tree_util.keystr(k)),
    "init_trunc": lambda c: _trunc_normal_defaults(),
    "train_crop": lambda c: _ops(c)[1] == "inception_crop(224,area_min=8,method='bicubic')",
    "flip": lambda c: _ops(c)[2] == "flip_lr",
    "color_jitter": lambda c: not any("jitter" in op for op in _ops(c)),
    "normalize": lambda c: f"normalize({_tuple(REF['mean'])},{_tuple(REF['std'])})" in _ops(c),
    "random_erasing": lambda c: (
        f"random_erasing({REF['reprob']})" in _ops(c)
        and _ops(c).index(f"random_erasing({REF['reprob']})") > _ops(c).index(
            f"normalize({_tuple(REF['mean'])},{_tuple(REF['std'])})")),
    "mixup": lambda c: (c.mixup.alpha == REF["mixup"] and c.cutmix.alpha == REF["cutmix"]
                        and c.mix_switch_prob == REF["switch_prob"] and c.mixup.p == 0.0),
    "mix_partner": lambda c: True,  # By choice: vitcls/mixing.py rolls (its tests).
    "smoothing": lambda c: c.label_smoothing == REF["smoothing"],
    "loss": lambda c: c.loss == "softmax_xent",
    "eval_resize": lambda c: c.evals.val.pp.split("|")[1] == (
        f"resize_small({REF['eval_size']},method='bicubic')"),
    "eval_crop": lambda c: c.evals.val.pp.split("|")[2] == "central_crop(224)",
    "expected": lambda c: dict(c.expected) == {"val/top1": 0.798},
}


def _tuple(values):
  return "(" + ",".join(str(v) for v in values) + ")"


def _trunc_normal_defaults():
  """vit.trunc_normal's defaults are timm's: std .02, bounds -2, 2 in value."""
  import inspect
  sig = inspect.signature(vit.trunc_normal).parameters
  return (sig["std"].default, sig["a"].default, sig["b"].default) == (
      REF["trunc_std"], REF["trunc_a"], REF["trunc_b"])


def _init_rows_hold(c):
  """The model field the fixed init rows need, and what it draws (statistics in
  tests/test_vit.py)."""
  model = vit.Model(num_classes=10, **{**c.model, "variant": "mu/16", "depth": 1})
  p = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  bound = 1 / math.sqrt(REF["patch_fan_in"])
  return (np.all(p["cls"] != 0) and float(np.std(p["pos_embedding"])) < 0.05
          and np.all(np.abs(p["embedding"]["kernel"]) <= bound)
          and np.all(p["head"]["kernel"] != 0))


CONFIG_ROWS = {  # Each needs the experiment change the table ends with.
    "init_linear": lambda c: c.model.get("weight_init") == "timm",
    "init_tokens": lambda c: c.model.get("weight_init") == "timm" and _init_rows_hold(c),
    "init_patch": lambda c: c.model.get("weight_init") == "timm" and _init_rows_hold(c),
    "init_head": lambda c: c.model.get("head_zeroinit") is False,
    "randaug": lambda c: (
        f"randaug_timm('{REF['aa']}',interpolation='{REF['train_interpolation']}')"
        in _ops(c)),
    "repeated_aug": lambda c: c.input.repeated_augmentation == REF["repeats"],
}


def test_every_table_row_has_a_check():
  keys = _table_keys()
  assert len(keys) == len(set(keys))
  assert set(keys) == set(ROWS) | set(CONFIG_ROWS)


@pytest.mark.parametrize("key", sorted(ROWS))
def test_row(key):
  assert ROWS[key](_config())


@pytest.mark.parametrize("key", sorted(CONFIG_ROWS))
def test_config_row(key):
  assert CONFIG_ROWS[key](_config())


def test_config_row_pieces_exist():
  """What the config rows need is in vitcls: the pp op, the data field, the model fields."""
  pp_lib.parse(f"randaug_timm('{REF['aa']}',interpolation='{REF['train_interpolation']}')")
  assert configs.defaults().input.repeated_augmentation == 1
  c = _config()
  with c.unlocked():  # The change the table ends with, made here on a copy.
    c.model.weight_init, c.model.head_zeroinit = "timm", False
    c.input.repeated_augmentation = REF["repeats"]
    c.input.pp = c.input.pp.replace(
        "randaug(2,9)",
        f"randaug_timm('{REF['aa']}',interpolation='{REF['train_interpolation']}')")
  pp_lib.parse(c.input.pp)
  assert all(check(c) for check in CONFIG_ROWS.values())


def test_the_schedule_follows_timm_as_deit_steps_it():
  """timm's per-epoch lr (cosine_lr.py:68-95, stepped after each epoch, main.py:432),
  transcribed here, against vitcls's schedule at the first step of every epoch."""
  def timm_lr(t):  # t: the epoch index the scheduler was last stepped with.
    if t < REF["warmup_epochs"]:
      return REF["warmup_lr"] + t * (REF["lr"] - REF["warmup_lr"]) / REF["warmup_epochs"]
    return REF["min_lr"] + 0.5 * (REF["lr"] - REF["min_lr"]) * (
        1 + math.cos(math.pi * t / REF["epochs"]))
  trained = [timm_lr(max(e - 1, 0)) for e in range(REF["epochs"])]  # Epoch e's lr.
  assert trained[0] == trained[1] == REF["warmup_lr"]
  assert trained[6] == pytest.approx(0.99932e-3, rel=1e-4)  # t=5: no warm-up prefix.
  c = _config()
  per_epoch = N_TRAIN // 1024
  for epoch in range(REF["epochs"]):
    for step in (epoch * per_epoch, epoch * per_epoch + per_epoch - 1):
      assert _lr(c, step) == pytest.approx(trained[epoch], rel=1e-5), (epoch, step)