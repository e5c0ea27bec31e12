"""Every row of experiments/audits/convnext_t_i1k.md, pinned on the ConvNeXt-T config.

Reference values are transcribed here from facebookresearch/ConvNeXt at
048efcea897d999aed302f2639b6270aedf8d4c8 and timm 0.3.2 (pytorch-image-models at
6504a42832cb6687e3f595c37e003ea920268365, paths prefixed timm:), file:line beside each.
"by choice" rows pin the vitcls side the table states; behaviour rows (the lr schedule at
every step, the AdamW update, which parameters decay, drop-path rates, init, numerics) are
checked numerically against vitcls's code.
"""

import functools
import math
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitcls import configs, models, optim, treeutil
from vitcls.models import convnext
from conftest import REPO

TABLE = os.path.join(REPO, "experiments", "audits", "convnext_t_i1k.md")
N_TRAIN, N_VAL = 1_281_167, 50_000  # datasets.py:33-37 (ImageFolder train / val).
GPUS = 4 * 8  # TRAINING.md:16 (--nodes 4 --ngpus 8).

REF = dict(
    per_gpu=128, update_freq=1,  # TRAINING.md:18.
    lr=4e-3, epochs=300, warmup_epochs=20, min_lr=1e-6,  # TRAINING.md:18; main.py:53,95,93.
    wd=0.05, eps=1e-8, betas=(0.9, 0.999),  # main.py:84,76; torch AdamW's default betas.
    drop_path=0.1, layer_scale=1e-6, head_init_scale=1.0,  # TRAINING.md:17; main.py:64,140.
    ema_decay=0.9999,  # main.py:69.
    smoothing=0.1, mixup=0.8, cutmix=1.0, mixup_prob=1.0, switch_prob=0.5,  # main.py:105-134.
    aa="rand-m9-mstd0.5-inc1", train_interpolation="bicubic",  # main.py:103,107.
    reprob=0.25, remode="pixel", recount=1,  # main.py:114-118.
    crop_pct=224 / 256, input_size=224,  # datasets.py:85-86; main.py:62.
    mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),  # timm:data/constants.py:2-3.
    depths=(3, 3, 9, 3), dims=(96, 192, 384, 768),  # models/convnext.py:160.
    ln_eps=1e-6, trunc_std=0.02, trunc_a=-2.0, trunc_b=2.0,  # convnext.py:29; weight_init.py:42
    top1=0.821,  # README.md:36.
)
BATCH = GPUS * REF["per_gpu"] * REF["update_freq"]  # TRAINING.md:28: 4096.
STEPS_PER_EPOCH = N_TRAIN // BATCH  # main.py:327-328.
MEAN, STD = "(0.485,0.456,0.406)", "(0.229,0.224,0.225)"


def _config(arg=""):
  spec = os.path.join(REPO, "experiments", "convnext_t_i1k.py") + (f":{arg}" if arg else "")
  return configs.resolve(configs.load_experiment(spec))


def _ops(pp):
  return pp.split("|")


def _table_keys():
  with open(TABLE) as f:
    return [m.group(1) for m in re.finditer(r"^\| `([a-z0-9_]+)` \|", f.read(), re.M)]


def cosine_scheduler(base, final, epochs, niter_per_ep, warmup_epochs):
  """utils.py:428-445 (warmup_steps=-1, start_warmup_value=0): one value per iteration."""
  warmup_iters = warmup_epochs * niter_per_ep
  warmup = np.linspace(0, base, warmup_iters)
  iters = np.arange(epochs * niter_per_ep - warmup_iters)
  decay = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
  return np.concatenate((warmup, decay))


@functools.lru_cache(maxsize=None)
def _ref_schedule():
  """The official lr at every iteration of the run."""
  return cosine_scheduler(REF["lr"], REF["min_lr"], REF["epochs"], STEPS_PER_EPOCH,
                          REF["warmup_epochs"])


def _schedules(c):
  """(the official per-iteration lr, vitcls's lr for `c` at every step of the run).
  vitcls's is float32: 1e-9 absolute (2.5e-7 of the peak) is its rounding, below."""
  ours = np.asarray(jax.jit(jax.vmap(optim.make_schedule(c, c.total_steps)))(
      jnp.arange(c.total_steps)), np.float64)
  return _ref_schedule(), ours


def _warmup_as_table_says(c):
  """By choice: lr t / 6240 where the code's linspace has lr t / 6239."""
  ref, ours = _schedules(c)
  w = REF["warmup_epochs"] * STEPS_PER_EPOCH
  return (ref[w - 1] == REF["lr"] and ours[w - 1] < REF["lr"]
          and np.allclose(ours[:w], ref[:w] * (w - 1) / w, rtol=1e-6, atol=1e-9)
          and np.max(np.abs(ours[:w] - ref[:w])) <= REF["lr"] / (w - 1) + 1e-10)


def _cosine_matches(c):
  ref, ours = _schedules(c)
  w = REF["warmup_epochs"] * STEPS_PER_EPOCH
  return len(ours) == len(ref) and np.allclose(ours[w:], ref[w:], rtol=1e-6, atol=1e-9)


def _at_count(opt_state, t):
  """The optimiser state with every step counter at t (moments untouched, zero)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: (jnp.asarray(t, x.dtype) if jax.tree_util.keystr(path).endswith(".count")
                       else x), opt_state)


def _adamw_matches(c):
  """torch 1.8 AdamW (decoupled wd times the lr, bias-corrected moments, eps outside the
  sqrt) at iteration t from zero moments, against vitcls's update, for a kernel (decayed)
  and a bias (not)."""
  rng = np.random.default_rng(0)
  params = {"fc": {"kernel": rng.normal(size=(3, 4)).astype(np.float32),
                   "bias": rng.normal(size=4).astype(np.float32)}}
  grads = jax.tree_util.tree_map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
  tx, _ = optim.make_optimizer(c, c.total_steps)
  ref_lr = _ref_schedule()
  b1, b2 = REF["betas"]
  ours_at = jax.jit(lambda t: tx.update(grads, _at_count(tx.init(params), t), params)[0])
  for t in (10_000, 50_000, c.total_steps - 1):
    ours = ours_at(t)
    for leaf in ("kernel", "bias"):
      g, p = grads["fc"][leaf].astype(np.float64), params["fc"][leaf].astype(np.float64)
      m_hat = (1 - b1) * g / (1 - b1 ** (t + 1))
      v_hat = (1 - b2) * g * g / (1 - b2 ** (t + 1))
      decay = REF["wd"] * p if leaf == "kernel" else 0.0  # optim_factory.py:80-85.
      want = -ref_lr[t] * (m_hat / (np.sqrt(v_hat) + REF["eps"]) + decay)
      if not np.allclose(ours["fc"][leaf], want, rtol=1e-5, atol=0):
        return False
  return True


@functools.lru_cache(maxsize=None)
def _spy_model():
  """(block drop rates, LayerNorm epsilons, param shapes, input shapes of the top-level
  `norm` and `head`) of the config's ConvNeXt-T."""
  rates, eps, inputs = [], set(), {}

  def spy(next_fun, args, kwargs, context):
    if isinstance(context.module, convnext.Block) and context.method_name == "__call__":
      rates.append(context.module.drop_rate)
    if isinstance(context.module, nn.LayerNorm):
      eps.add(context.module.epsilon)
    if isinstance(context.module.parent, convnext.Model) and context.module.name in ("norm",
                                                                                     "head"):
      inputs[context.module.name] = args[0].shape
    return next_fun(*args, **kwargs)

  c = _config()
  model = models.build(c.model_name, c.num_classes, c.model)
  with nn.intercept_methods(spy):
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  return tuple(rates), frozenset(eps), shapes["params"], inputs


def _leaves(tree):
  return dict(zip(jax.tree_util.tree_leaves(treeutil.paths(tree)),
                  jax.tree_util.tree_leaves(tree)))


def _official_decayed_params():
  """optim_factory.py:80-85 on models/convnext.py:28-32,74,81,97: conv and Linear weights."""
  d, depths = REF["dims"], REF["depths"]
  stem = 4 * 4 * 3 * d[0]
  downsample = sum(2 * 2 * d[i] * d[i + 1] for i in range(3))
  blocks = sum(n * (7 * 7 * c + 2 * 4 * c * c) for n, c in zip(depths, d))
  return stem + downsample + blocks + d[-1] * 1000, 1 + 3 + 3 * sum(depths) + 1


def _wd_mask_matches(c):
  """`wd_mask` selects exactly the official rule's tensors: not 1-D and not a bias."""
  shapes = _leaves(_spy_model()[2])
  mask = _leaves(treeutil.regex_mask(_spy_model()[2], c.wd_mask))
  official = {k: len(v.shape) != 1 and not k.endswith("/bias") for k, v in shapes.items()}
  decayed = [k for k in shapes if mask[k]]
  return (mask == official and (sum(int(np.prod(shapes[k].shape)) for k in decayed),
                                len(decayed)) == _official_decayed_params() == (28_524_000, 59))


@functools.lru_cache(maxsize=None)
def _fresh_params():
  """The config's model at T's widths, one block per stage (same initialisers), fresh."""
  c = _config()
  model = convnext.Model(num_classes=1000, **{**c.model, "depths": (1, 1, 1, 1),
                                              "dims": REF["dims"]})
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  return {k: np.asarray(v) for k, v in _leaves(params).items()}


def _init_matches():
  """trunc_normal(.02) kernels (convnext.py:103-106), zero biases, LN 1/0, gamma 1e-6."""
  p = _fresh_params()
  kernels = [v for k, v in p.items() if k.endswith("/kernel")]
  big = [v for v in kernels if v.size >= 100_000]
  return (all(np.all(v == 0) for k, v in p.items() if k.endswith("/bias"))
          and all(np.all(np.abs(v) <= REF["trunc_b"]) for v in kernels)
          and all(abs(float(np.std(v)) / REF["trunc_std"] - 1) < 0.02 for v in big)
          and len(big) >= 4 and "head/kernel" in p)


def _mlp_unit(x):
  """convnext.Mlp(1) with unit kernels, zero biases: its activation at x."""
  unit = {"kernel": jnp.ones((1, 1)), "bias": jnp.zeros(1)}
  return float(convnext.Mlp(hidden=1).apply({"params": {"fc1": unit, "fc2": unit}},
                                            jnp.full((1, 1), x))[0, 0])


ROWS = {  # key: check(config of convnext_t_i1k, variant=T).
    "data": lambda c: ((c.input.data.name, c.input.data.split) == ("imagenet2012", "train")
                       and c.evals.val.split == "validation" and c.num_classes == 1000),
    "batch": lambda c: c.input.batch_size == BATCH == 4096,
    "lr": lambda c: c.lr == REF["lr"] and _config("batch=1024").lr == pytest.approx(1e-3),
    "epochs": lambda c: c.total_steps == REF["epochs"] * STEPS_PER_EPOCH and c.total_epochs is None,
    # main.py:327-328; DistributedSampler pads to ceil(N / 32), drop_last (main.py:250-256).
    "steps": lambda c: (configs.total_steps(c, N_TRAIN) == 93_600
                        and STEPS_PER_EPOCH == -(-N_TRAIN // GPUS) // REF["per_gpu"] == 312),
    "sampler": lambda c: c.input.repeated_augmentation == 1,  # By choice: grain's order.
    "optimizer": lambda c: (c.optax_name == "adamw" and (c.optax.b1, c.optax.b2) == REF["betas"]
                            and c.optax.eps == REF["eps"] and _adamw_matches(c)),
    "wd": lambda c: c.wd == REF["wd"] and c.wd_mode == "times_lr" and _adamw_matches(c),
    "wd_mask": lambda c: c.wd_mask == r".*/kernel$" and _wd_mask_matches(c),
    "clip": lambda c: c.grad_clip_norm == 0.0,  # main.py:80.
    "amp": lambda c: c.model.get("dtype") is None,  # main.py:191: off.
    "warmup": lambda c: (c.schedule.warmup_steps == REF["warmup_epochs"] * STEPS_PER_EPOCH
                         and c.schedule.warmup_start == 0.0 and _warmup_as_table_says(c)),
    "cosine": lambda c: (c.schedule.decay_type == "cosine" and not c.schedule.decay_from_start
                         and c.schedule.steps_per_update == 1 and _cosine_matches(c)),
    "min_lr": lambda c: (c.lr * c.schedule.end_factor == pytest.approx(REF["min_lr"])
                         and _schedules(c)[1][-1] == pytest.approx(REF["min_lr"], rel=1e-3)),
    "ema": lambda c: c.ema_decay == REF["ema_decay"] and c.ema_warmup is False,
    "ema_eval": lambda c: list(c.expected) == ["val_ema/top1"],  # Evaluated beside val/.
    "mixup": lambda c: (c.mixup.alpha == REF["mixup"] and c.cutmix.alpha == REF["cutmix"]
                        and c.mix_switch_prob == REF["switch_prob"] and c.mixup.p == 0.0),
    "mix_partner": lambda c: True,  # By choice: vitcls/mixing.py rolls (its tests).
    "mix_scope": lambda c: True,  # By choice: one lam per global batch (vitcls/mixing.py).
    "smoothing": lambda c: c.label_smoothing == REF["smoothing"],
    "loss": lambda c: c.loss == "softmax_xent",
    "train_crop": lambda c: _ops(c.input.pp)[1] == "inception_crop(224,area_min=8,method='bicubic')",
    "flip": lambda c: _ops(c.input.pp)[2] == "flip_lr",
    "color_jitter": lambda c: not any("jitter" in op for op in _ops(c.input.pp)),
    "randaug": lambda c: _ops(c.input.pp)[3] == (
        f"randaug_timm('{REF['aa']}',interpolation='{REF['train_interpolation']}')"),
    "normalize": lambda c: _ops(c.input.pp)[4] == f"normalize({MEAN},{STD})",
    "random_erasing": lambda c: _ops(c.input.pp)[5] == f"random_erasing({REF['reprob']})",
    # datasets.py:85-92: int(224 / 0.875) = 256, bicubic; CenterCrop(224).
    "eval_resize": lambda c: _ops(c.evals.val.pp)[1] == (
        f"resize_small({int(REF['input_size'] / REF['crop_pct'])},method='bicubic')"),
    "eval_crop": lambda c: _ops(c.evals.val.pp)[2:4] == ["central_crop(224)",
                                                         f"normalize({MEAN},{STD})"],
    "eval_every": lambda c: c.evals.val.every == 2500,  # By choice (and at the end).
    "eval_dist": lambda c: c.evals.val.split == "validation",  # By choice: 50,000 once.
    "variant": lambda c: (c.model.variant == "T" and convnext.decode_variant("T") == dict(
        version=1, depths=REF["depths"], dims=REF["dims"])
        and sum(int(np.prod(v.shape)) for v in _leaves(_spy_model()[2]).values()) == 28_589_128),
    "stem": lambda c: (_leaves(_spy_model()[2])["stem/conv/kernel"].shape == (4, 4, 3, 96)
                       and _leaves(_spy_model()[2])["stages_1/downsample/conv/kernel"].shape
                       == (2, 2, 96, 192)),
    "block": lambda c: (_leaves(_spy_model()[2])["stages_0/blocks_0/conv_dw/kernel"].shape
                        == (7, 7, 1, 96)
                        and _leaves(_spy_model()[2])["stages_0/blocks_0/mlp/fc1/kernel"].shape
                        == (96, 384)),
    # convnext.py:96-97, 112-117: the grid's mean, LayerNorm, Linear.
    "head": lambda c: (_spy_model()[3] == {"norm": (1, 768), "head": (1, 768)}
                       and _leaves(_spy_model()[2])["head/kernel"].shape == (768, 1000)),
    "layernorm": lambda c: _spy_model()[1] == {REF["ln_eps"]},
    "gelu": lambda c: _mlp_unit(1.0) == pytest.approx(0.5 * (1 + math.erf(1 / math.sqrt(2))),
                                                      abs=1e-6),
    "layer_scale": lambda c: (c.model.layer_scale_init == REF["layer_scale"] and all(
        np.all(v == np.float32(REF["layer_scale"])) for k, v in _fresh_params().items()
        if k.endswith("/layer_scale"))),
    # convnext.py:86: torch.linspace(0, 0.1, 18).
    "drop_path": lambda c: (c.model.stoch_depth == REF["drop_path"] and _spy_model()[0]
                            == pytest.approx(np.linspace(0, REF["drop_path"],
                                                         sum(REF["depths"])).tolist())),
    "init_linear": lambda c: "head_zeroinit" not in c.model and _init_matches(),
    "init_norm": lambda c: all(np.all(v == (1 if k.endswith("/scale") else 0))
                               for k, v in _fresh_params().items()
                               if k.split("/")[-2] == "norm"),
    "head_init_scale": lambda c: (c.model.get("head_init_scale", 1.0) == REF["head_init_scale"]
                                  and abs(float(np.std(_fresh_params()["head/kernel"]))
                                          / REF["trunc_std"] - 1) < 0.02),
    "seed": lambda c: c.seed == 0,
    "expected": lambda c: dict(c.expected) == {"val_ema/top1": REF["top1"]},
}


def test_every_table_row_has_a_check():
  keys = _table_keys()
  assert len(keys) == len(set(keys)) and set(keys) == set(ROWS)


@pytest.fixture(scope="module")
def config():
  return _config()


@pytest.mark.parametrize("key", sorted(ROWS))
def test_row(key, config):
  assert ROWS[key](config), key


def test_trunc_normal_is_timms():
  """vit.trunc_normal (convnext's initialiser) has timm's defaults: std .02, bounds -2, 2."""
  import inspect
  from vitcls.models import vit
  sig = inspect.signature(vit.trunc_normal).parameters
  assert (sig["std"].default, sig["a"].default, sig["b"].default) == (
      REF["trunc_std"], REF["trunc_a"], REF["trunc_b"])
