"""Every row of experiments/audits/mixer_b16_i1k.md, pinned on the Mixer-B/16 config.

Reference values are transcribed here from big_vision at
0127fb6b337ee2a27bf4e54dea79cff176527356 (file:line beside each, under big_vision/).
"by choice" and "to fix" rows pin the vitcls side the table states, so neither side drifts
without the table changing; behaviour rows (schedule, weight decay, head bias, model
numerics, RandAugment at magnitude 15) are checked numerically against vitcls's code.
"""

import functools
import math
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vitcls import configs, losses, mixing, models, optim, state, treeutil
from vitcls.data.pp import randaug
from vitcls.models import common, mixer
from conftest import REPO

TABLE = os.path.join(REPO, "experiments", "audits", "mixer_b16_i1k.md")
TRAIN_99 = 1_268_355  # 99% of ImageNet's 1,281,167 train images (TFDS slicing).

REF = dict(
    batch=4096, epochs=300, short_epochs=60,  # configs/mlp_mixer_i1k.py:45, :35, :113-118
    lr=0.001, wd=1e-4, clip=1.0,  # :85, :86, :83
    warmup=10_000, linear_end=1e-5,  # :89-90 (a fraction of the schedule's base 1.0)
    head_bias=-6.9, mixup_p=0.5, stoch_depth=0.1,  # :38, :79, :77
    blocks=12, hidden=768, tokens_mlp=384, channels_mlp=3072,  # models/mlp_mixer.py:100-105
    ln_eps=1e-6,  # flax's nn.LayerNorm default, models/mlp_mixer.py:48,53,79
    eval_every=2500,  # :100
)
# pp/archive/autoaugment.py:473-476, 488-527 at magnitude 15 (level / 10 times the constant).
M15 = dict(rotate=45.0, shear=0.45, translate=150.0, enhance=2.8, posterize=6,
           solarize_add=165, cutout=60, solarize=384)
# pp/archive/autoaugment.py:680-683: the 16 ops, in order.
BV_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "Color",
          "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX",
          "TranslateY", "Cutout", "SolarizeAdd")
EVAL_PP = ["decode", "resize_small(256,method='area',rounding='truncate')",
           "central_crop(224)", "value_range(-1,1)"]


def _config(arg=""):
  spec = os.path.join(REPO, "experiments", "mixer_b16_i1k.py") + (f":{arg}" if arg else "")
  return configs.resolve(configs.load_experiment(spec))


def _ops(pp):
  return pp.split("|")


def _table_keys():
  with open(TABLE) as f:
    return [m.group(1) for m in re.finditer(r"^\| `([a-z0-9_]+)` \|", f.read(), re.M)]


def _total(c):
  return configs.total_steps(c, TRAIN_99)


def bv_schedule(step, total):
  """utils.py:1113-1118, 1136-1137 with base 1.0 (optax.py:85-88): linear to linear_end,
  times min(1, step / warmup)."""
  progress = jnp.clip((step - REF["warmup"]) / (total - REF["warmup"]), 0.0, 1.0)
  zero = REF["linear_end"]
  return (zero + (1.0 - zero) * (1.0 - progress)) * jnp.minimum(1.0, step / REF["warmup"])


def bv_chain(total):
  """optax.py:143-149 for this config: clip, scale_by_adam(), scale(lr), decayed weights
  on `.*/kernel$` (:133), scale_by_schedule, scale(-1)."""
  mask = lambda p: jax.tree_util.tree_map(  # noqa: E731
      lambda path: bool(re.fullmatch(r".*/kernel$", path)), treeutil.paths(p))
  return optax.chain(optax.clip_by_global_norm(REF["clip"]), optax.scale_by_adam(),
                     optax.scale(REF["lr"]), optax.add_decayed_weights(REF["wd"], mask),
                     optax.scale_by_schedule(lambda t: bv_schedule(t, total)),
                     optax.scale(-1.0))


def _at_count(opt_state, t):
  """The optimiser state with every step counter at t (moments untouched)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: (jnp.asarray(t, x.dtype) if jax.tree_util.keystr(path).endswith(".count")
                       else x), opt_state)


def _tiny_params():
  rng = np.random.default_rng(0)
  shapes = {"stem": {"kernel": (3, 4), "bias": (4,)}, "head": {"kernel": (4, 2), "bias": (2,)}}
  return jax.tree_util.tree_map(lambda s: rng.normal(size=s).astype(np.float32), shapes,
                                is_leaf=lambda s: isinstance(s, tuple))


def _optimizer_matches_big_vision(c, wd_only=False):
  """vitcls's update equals big_vision's chain at steps inside and after the warm-up."""
  total = _total(c)
  params = _tiny_params()
  rng = np.random.default_rng(1)
  grads = jax.tree_util.tree_map(lambda p: 3 * rng.normal(size=p.shape).astype(np.float32),
                                 params)
  tx, _ = optim.make_optimizer(c, total)
  ref = bv_chain(total)
  ours_at = jax.jit(lambda t: tx.update(grads, _at_count(tx.init(params), t), params)[0])
  theirs_at = jax.jit(lambda t: ref.update(grads, _at_count(ref.init(params), t), params)[0])
  for t in (1, 5_000, 50_000, total - 1):
    ours, theirs = ours_at(t), theirs_at(t)
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)):
      if not np.allclose(a, b, rtol=1e-4, atol=0):
        return False
  return True


@functools.lru_cache(maxsize=None)
def _spy_model():
  """(drop rates of the blocks, LayerNorm epsilons, params shapes, input shapes of
  `pre_head_layer_norm` and `head`) of the config's Mixer-B/16."""
  rates, eps, inputs = [], set(), {}

  def spy(next_fun, args, kwargs, context):
    if isinstance(context.module, mixer.MixerBlock) and context.method_name == "__call__":
      rates.append(context.module.drop_rate)
    if isinstance(context.module, nn.LayerNorm):
      eps.add(context.module.epsilon)
    if context.module.name in ("pre_head_layer_norm", "head"):
      inputs[context.module.name] = args[0].shape
    return next_fun(*args, **kwargs)

  c = _config()
  model = models.build(c.model_name, c.num_classes, c.model)
  with nn.intercept_methods(spy):
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  return rates, eps, shapes["params"], inputs


def _mlp_unit(x):
  """MlpBlock(1) with unit kernels, zero biases: its activation at x."""
  unit = {"kernel": jnp.ones((1, 1)), "bias": jnp.zeros(1)}
  return float(mixer.MlpBlock(mlp_dim=1).apply({"params": {"Dense_0": unit, "Dense_1": unit}},
                                              jnp.full((1, 1), x))[0, 0])


@functools.lru_cache(maxsize=None)
def _fresh_params(head_bias):
  """A one-block Mixer (fan-in 256, the same initialisers) through vitcls's init with
  `head_bias`, as the trainer starts a run (state.make_init_fn)."""
  model = mixer.Model(num_classes=10, hidden_dim=256, num_blocks=1, tokens_mlp_dim=64,
                      channels_mlp_dim=1024, patch_size=8)
  init = state.make_init_fn(model, optax.identity(), (32, 32, 3), 0, head_bias=head_bias)
  params = jax.jit(init)().params
  return {k: np.asarray(v) for k, v in zip(jax.tree_util.tree_leaves(treeutil.paths(params)),
                                            jax.tree_util.tree_leaves(params))}


def _head_at_init(c):
  p = _fresh_params(c.init_head_bias)
  return {"bias": p["head/bias"], "kernel": p["head/kernel"]}


def _dense_init_ok():
  """flax's lecun_normal (std 1/sqrt(fan_in)) kernels and zero biases, the stem too."""
  p = _fresh_params(REF["head_bias"])
  dense = p["MixerBlock_0/channel_mixing/Dense_0/kernel"]
  return (abs(dense.std() * math.sqrt(256) - 1) < 0.02
          and all(np.all(v == 0) for k, v in p.items() if k.endswith("/bias") and k != "head/bias")
          and float(np.std(p["stem/kernel"])) > 0)


def _image():
  return np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)


def _layer(name, seed=0):
  return randaug.LAYERS[name](_image(), 15.0, np.random.default_rng(seed))


def _either_sign(name, op, value):
  out = _layer(name)
  return np.array_equal(out, op(_image(), value)) or np.array_equal(out, op(_image(), -value))


def _randaug_m15():
  return (_either_sign("Rotate", randaug.rotate, M15["rotate"])
          and _either_sign("ShearX", randaug.shear_x, M15["shear"])
          and _either_sign("TranslateY", randaug.translate_y, M15["translate"])
          and np.array_equal(_layer("Brightness"), randaug.brightness(_image(), M15["enhance"]))
          and np.array_equal(_layer("Color"), randaug.color(_image(), M15["enhance"]))
          and np.array_equal(_layer("Posterize"), randaug.posterize(_image(), M15["posterize"]))
          and np.array_equal(_layer("SolarizeAdd"),
                             randaug.solarize_add(_image(), M15["solarize_add"]))
          and np.array_equal(_layer("Cutout"),
                             randaug.cutout(_image(), M15["cutout"], np.random.default_rng(0))))


def _solarize_as_table_says():
  """Fixed: TF casts the threshold 384 to uint8, 384 % 256 = 128; vitcls does the same."""
  img = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
  ours = randaug.LAYERS["Solarize"](img, 15.0, np.random.default_rng(0))
  tf_like = np.where(img < M15["solarize"] % 256, img, 255 - img)
  return np.array_equal(ours, tf_like) and not np.array_equal(ours, img)


def _sigmoid_xent_matches():
  """utils.py:236-243: -sum_c(y log s(x) + (1 - y) log s(-x)), then the batch mean."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 7)).astype(np.float32) * 3
  labels = (rng.random((4, 7)) < 0.3).astype(np.float32)
  ref = np.mean(-np.sum(labels * np.log(1 / (1 + np.exp(-logits)))
                        + (1 - labels) * np.log(1 / (1 + np.exp(logits))), axis=-1))
  return float(jnp.mean(losses.sigmoid_xent(jnp.asarray(logits), jnp.asarray(labels)))) == (
      pytest.approx(ref, rel=1e-5))


def _mixup_folded_roll(c):
  """utils.py:1146-1154: a = max(a, 1 - a) of Beta(p, p), images and labels rolled by one."""
  x = jnp.arange(4 * 2 * 2 * 1, dtype=jnp.float32).reshape(4, 2, 2, 1)
  y = jnp.eye(4)
  mix = jax.jit(lambda k: mixing.mix(k, x, y, mixup_p=c.mixup.p))
  for seed in range(8):
    images, labels, info = mix(jax.random.key(seed))
    lam = float(info["mix_lam"])
    if not (0.5 <= lam <= 1.0 and np.allclose(images, lam * x + (1 - lam) * jnp.roll(x, 1, 0))
            and np.allclose(labels, lam * y + (1 - lam) * jnp.roll(y, 1, 0))):
      return False
  return True


ROWS = {  # key: check(config of mixer_b16_i1k, epochs=300).
    # configs/mlp_mixer_i1k.py:41-44, :45, :35 and :113-118.
    "data": lambda c: (c.input.data.name, c.input.data.split) == ("imagenet2012",
                                                                  "train[:99%]"),
    "batch": lambda c: c.input.batch_size == REF["batch"],
    "epochs": lambda c: (c.total_epochs == REF["epochs"] and c.total_steps is None
                         and _config("epochs=60").total_epochs == REF["short_epochs"]
                         and _config("epochs=60,batch=512").input.batch_size == 512),
    # utils.py:1043-1053: max(1, round(epochs * n / batch)).
    "rounding": lambda c: (_total(c) == max(1, round(300 * TRAIN_99 / 4096)) == 92_897
                           and _total(_config("epochs=60"))
                           == round(60 * TRAIN_99 / 4096) == 18_579),
    "shuffle": lambda c: True,  # By choice: grain's permutation, nothing in the config.
    "loss": lambda c: c.loss == "sigmoid_xent" and _sigmoid_xent_matches(),  # :37
    "label_smoothing": lambda c: c.label_smoothing == 0.0,
    # :38; train.py:200-203: the fresh head's bias, the (zero) kernel untouched.
    "init_head_bias": lambda c: (c.init_head_bias == REF["head_bias"] and np.all(
        _head_at_init(c)["bias"] == np.float32(REF["head_bias"]))),
    "decode": lambda c: _ops(c.input.pp)[0] == "decode",  # By choice (PIL).
    # pp/ops_image.py:199-201, 223-229, 238, 84-85.
    "crop_area": lambda c: (_ops(c.input.pp)[1].startswith("inception_crop(224,")
                            and "area_" not in _ops(c.input.pp)[1]),
    "crop_sampling": lambda c: "sampling='tf'" in _ops(c.input.pp)[1],
    "crop_resize": lambda c: (_ops(c.input.pp)[1] == "inception_crop(224,sampling='tf',"
                              "antialias=False,rounding='truncate')"),
    "flip": lambda c: _ops(c.input.pp)[2] == "flip_lr",  # :51
    # :52; pp/archive/autoaugment.py:676-683.
    "randaug": lambda c: (_ops(c.input.pp)[3] == "randaug(2,15)"
                          and randaug.BIG_VISION_OPS == BV_OPS and randaug.FILL == 128),
    "randaug_m15": lambda c: _randaug_m15(),
    "randaug_solarize": lambda c: _solarize_as_table_says(),  # Fixed (vitcls pp).
    "randaug_contrast": lambda c: "randaug(2,15)" in c.input.pp,  # By choice (pp).
    "value_range": lambda c: _ops(c.input.pp)[4] == "value_range(-1,1)",  # :53
    "labels": lambda c: _ops(c.input.pp)[5] == "onehot(1000)",  # :54
    # :76; models/mlp_mixer.py:100-105.
    "variant": lambda c: (c.model_name == "mixer" and c.model.variant == "B/16"
                          and mixer.decode_variant("B/16") == dict(
                              hidden_dim=REF["hidden"], num_blocks=REF["blocks"],
                              tokens_mlp_dim=REF["tokens_mlp"],
                              channels_mlp_dim=REF["channels_mlp"], patch_size=(16, 16))),
    "stem": lambda c: _spy_model()[2]["stem"]["kernel"].shape == (16, 16, 3, REF["hidden"]),
    "block": lambda c: sorted(_spy_model()[2]["MixerBlock_0"]) == [
        "LayerNorm_0", "LayerNorm_1", "channel_mixing", "token_mixing"],
    # models/mlp_mixer.py:36: flax's nn.gelu, tanh-approximate.
    "gelu": lambda c: ("gelu_approximate" not in c.model and _mlp_unit(1.0) == pytest.approx(
        0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * 1.044715)), abs=1e-6)),
    "layernorm": lambda c: "epsilon" not in c.model and _spy_model()[1] == {REF["ln_eps"]},
    "init_dense": lambda c: "kernel_init" not in c.model and _dense_init_ok(),
    "init_head": lambda c: (c.model.get("head_zeroinit", True) is True
                            and np.all(_head_at_init(c)["kernel"] == 0)),
    # models/mlp_mixer.py:79-80: LayerNorm on the 196 tokens, then their mean to the head.
    "pool": lambda c: _spy_model()[3] == {"pre_head_layer_norm": (1, 196, REF["hidden"]),
                                          "head": (1, REF["hidden"])},
    # :77; models/mlp_mixer.py:76: block i at i / (n - 1) * 0.1.
    "stoch_depth": lambda c: (c.model.stoch_depth == REF["stoch_depth"] and _spy_model()[0]
                              == pytest.approx([i / (REF["blocks"] - 1) * REF["stoch_depth"]
                                                for i in range(REF["blocks"])])),
    # By choice: vitcls rescales kept examples (models/mlp_mixer.py:173-177 does not).
    "stoch_depth_scale": lambda c: set(np.unique(np.asarray(common.drop_path(
        jnp.ones((256, 1)), 0.5, jax.random.key(0))))) == {0.0, 2.0},
    "dtype": lambda c: c.model.get("dtype") in (None, "float32"),
    # :82; optax.py:110-111: scale_by_adam() with optax's defaults.
    "optimizer": lambda c: (c.optax_name == "adamw" and (c.optax.b1, c.optax.b2) == (0.9, 0.999)
                            and c.optax.get("eps", 1e-8) == 1e-8 and "mu_dtype" not in c.optax
                            and _optimizer_matches_big_vision(c)),
    "lr": lambda c: c.lr == REF["lr"] and _config("batch=512").lr == REF["lr"],  # :85
    # :86; optax.py:115, 132-149 (vitcls's times_lr would not match big_vision's chain).
    "wd": lambda c: (c.wd == REF["wd"] and c.wd_mode == "times_schedule"
                     and _optimizer_matches_big_vision(c)
                     and not _optimizer_matches_big_vision(
                         configs.resolve(c, ["wd_mode=times_lr"]))),
    # optax.py:133: the stem, 48 Dense and head kernels.
    "wd_mask": lambda c: c.wd_mask == r".*/kernel$" and sorted(
        k for k, m in zip(jax.tree_util.tree_leaves(treeutil.paths(_spy_model()[2])),
                          jax.tree_util.tree_leaves(treeutil.regex_mask(_spy_model()[2],
                                                                        c.wd_mask))) if m
    ) == sorted(["stem/kernel", "head/kernel"] + [
        f"MixerBlock_{i}/{mlp}_mixing/Dense_{j}/kernel" for i in range(REF["blocks"])
        for mlp in ("token", "channel") for j in (0, 1)]),
    "clip": lambda c: c.grad_clip_norm == REF["clip"],  # :83
    # :89; utils.py:1136-1137 and :87-91; utils.py:1113-1118 (base 1.0, optax.py:85-88).
    "warmup": lambda c: c.schedule.warmup_steps == REF["warmup"] and all(
        float(optim.make_schedule(c, _total(c))(t)) == pytest.approx(
            REF["lr"] * float(bv_schedule(t, _total(c))), rel=1e-5, abs=1e-12)
        for t in (0, 1, 2_500, 9_999, 10_000)),
    "decay": lambda c: c.schedule.decay_type == "linear" and all(
        float(optim.make_schedule(c, _total(c))(t)) == pytest.approx(
            REF["lr"] * float(bv_schedule(t, _total(c))), rel=1e-4, abs=1e-10)
        for t in (10_001, 30_000, 51_448, 92_000, _total(c) - 1, _total(c))),
    "mixup": lambda c: (c.mixup.p == REF["mixup_p"] and c.mixup.alpha == 0.0
                        and c.cutmix.alpha == 0.0 and _mixup_folded_roll(c)),  # :79
    "mixup_fold_in": lambda c: "fold_in" not in c.mixup,  # One lam per global batch.
    "mixup_scope": lambda c: c.cutmix.alpha == 0.0,  # By choice: global roll.
    "ema": lambda c: c.ema_decay == 0.0,
    "seed": lambda c: c.seed == 0,  # :34
    # :57-63, :98.
    "eval_pp": lambda c: all(_ops(c.evals[k].pp)[:5] == EVAL_PP + ["onehot(1000)"]
                             for k in ("train", "minival", "val", "v2")),
    "eval_resize": lambda c: all("method='area'" in e.pp for e in c.evals.values()),
    "eval_size": lambda c: _eval_shapes_match_tf(),  # pp/ops_image.py:97-98, 126-130.
    "eval_crop": lambda c: all(_ops(e.pp)[2] == "central_crop(224)" for e in c.evals.values()),
    "eval_every": lambda c: all(e.every == REF["eval_every"] for e in c.evals.values()),
    "eval_batch": lambda c: all(e.batch_size == 1024 for e in c.evals.values()),  # By choice.
    "eval_loss": lambda c: c.loss == "sigmoid_xent",  # evaluators/classification.py:43-45
    "eval_train": lambda c: c.evals.train.split == "train[:2%]",  # :104
    "eval_minival": lambda c: c.evals.minival.split == "train[99%:]",  # :105
    "eval_val": lambda c: c.evals.val.split == "validation",  # :106
    "eval_v2": lambda c: (c.evals.v2.data, c.evals.v2.split) == ("imagenet_v2", "test"),
    # :108-109; evaluators/classification.py:40-53.
    "eval_real": lambda c: ((c.evals.real.type, c.evals.real.data, c.evals.real.split)
                            == ("real", "imagenet2012_real", "validation")
                            and _ops(c.evals.real.pp)[:4] == EVAL_PP
                            and "multihot(1000,key='real_label',key_result='labels')"
                            in c.evals.real.pp),
    "fewshot": lambda c: not any(e.type == "fewshot" for e in c.evals.values()),  # :111
    # :18-19.
    "expected": lambda c: (dict(c.expected) == {"val/top1": 0.763}
                           and dict(_config("epochs=60").expected) == {"val/top1": 0.705}),
    "log_ckpt": lambda c: c.log_every == 50 and c.checkpoint_every == 1000,  # :68-69
}


def _eval_shapes_match_tf():
  """big_vision's float32 `round(h * (256 / min))` against vitcls's shape, over sizes."""
  from vitcls.data.pp import image
  for short in (333, 375, 400, 427, 480, 500, 512, 600, 683):
    for long in range(short, 3 * short, 7):
      f = np.float32(256) / np.float32(short)
      want = (int(np.round(np.float32(short) * f)), int(np.round(np.float32(long) * f)))
      if image.resize_small_shape(short, long, 256) != want:
        return False
  return True


def test_every_table_row_has_a_check():
  keys = _table_keys()
  assert len(keys) == len(set(keys)) and set(keys) == set(ROWS)


@pytest.fixture(scope="module")
def config():
  return _config()


@pytest.mark.parametrize("key", sorted(ROWS))
def test_row(key, config):
  assert ROWS[key](config), key
