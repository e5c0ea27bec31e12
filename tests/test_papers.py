"""Each paper experiment holds its paper's hyper-parameters, so an edit cannot drift.

The values are written out here from the papers (and big_vision's configs where the
experiment says it follows them), independently of the experiment files.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitcls import configs, models, optim
from conftest import REPO


def _config(name, arg=""):
  spec = os.path.join(REPO, "experiments", name) + (f":{arg}" if arg else "")
  return configs.resolve(configs.load_experiment(spec))


def _num_params(config, res=224):
  model = models.build(config.model_name, config.num_classes, config.model)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, res, res, 3)))
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))


# big_vision's inception crop: TF's box sampler, bilinear without antialias, truncated.
TF_CROP = "sampling='tf',antialias=False,rounding='truncate'"
RESMALL_CROP = "resize_small(448,method='area',rounding='truncate')|random_crop(384)"


def _lr_at(config, step, total):
  return float(optim.make_schedule(config, total)(step))


@pytest.mark.parametrize("epochs, top1", [(90, 0.765), (150, 0.785), (300, 0.800)])
def test_plain_vit_baselines(epochs, top1):
  """Beyer, Zhai, Kolesnikov 2022, ViT-S/16 rows."""
  c = _config("vit_s16_i1k.py", f"epochs={epochs}")
  assert c.total_epochs == epochs and c.total_steps is None
  assert (c.input.data.name, c.input.data.split) == ("imagenet2012", "train[:99%]")
  assert c.input.batch_size == 1024 and c.num_classes == 1000
  m = c.model
  assert (m.variant, m.pool_type, m.posemb, m.rep_size) == ("S/16", "gap", "sincos2d", True)
  assert c.optax_name == "adamw" and (c.optax.b1, c.optax.b2) == (0.9, 0.999)
  assert c.lr == 1e-3 and c.wd == 1e-4 and c.wd_mode == "times_schedule"
  assert c.grad_clip_norm == 1.0 and c.label_smoothing == 0.0
  assert c.schedule.decay_type == "cosine" and c.schedule.warmup_steps == 10_000
  assert c.schedule.end_factor == 0.0
  assert c.mixup.p == 0.2 and c.mixup.alpha == 0.0 and c.cutmix.alpha == 0.0
  assert c.input.pp.startswith(f"decode|inception_crop(224,{TF_CROP})|flip_lr|"
                               "randaug(2,10)|"
                               "value_range(-1,1)|onehot(1000)")
  assert c.evals.val.split == "validation"
  assert "resize_small(256" in c.evals.val.pp and "central_crop(224)" in c.evals.val.pp
  assert dict(c.expected) == {"val/top1": top1}
  # ViT-S/16: 21,974,632 without position or class parameters, plus the 384x384 tanh
  # pre-logits layer (timm's vit_small_patch16_224, with both, has 22,050,664).
  if epochs == 90:
    assert _num_params(c) == 22_050_664 - 197 * 384 - 384 + 384 * 384 + 384
  total = 90 * 1_268_355 // 1024  # 99% of the 1,281,167 train images.
  assert _lr_at(c, 5_000, total) == pytest.approx(0.5e-3)
  assert _lr_at(c, total, total) == pytest.approx(0.0, abs=1e-9)


def test_deit_small():
  """Touvron et al. 2021, DeiT-S without distillation: 79.8% at 300 epochs."""
  c = _config("deit_s16_i1k.py")
  assert c.total_steps == 300 * 1251 and c.input.data.split == "train"
  assert c.input.batch_size == 1024
  assert c.lr == pytest.approx(5e-4 * 1024 / 512)
  assert _config("deit_s16_i1k.py", "batch=512").lr == pytest.approx(5e-4)
  assert c.optax_name == "adamw" and c.wd == 0.05 and c.wd_mode == "times_lr"
  assert c.grad_clip_norm == 0.0
  assert c.schedule.decay_type == "cosine"
  assert c.schedule.warmup_steps == 5 * 1251  # 5 epochs of DeiT's sampler.
  assert c.lr * c.schedule.end_factor == pytest.approx(1e-5)
  assert c.label_smoothing == 0.1
  assert c.mixup.alpha == 0.8 and c.cutmix.alpha == 1.0 and c.mix_switch_prob == 0.5
  m = c.model
  assert (m.variant, m.pool_type, m.posemb) == ("S/16", "tok", "learn")
  assert m.stoch_depth == 0.1 and m.dropout == 0.0
  ops = c.input.pp.split("|")
  assert "randaug_timm('rand-m9-mstd0.5-inc1',interpolation='bicubic')" in ops
  assert "random_erasing(0.25)" in ops and "flip_lr" in ops
  assert c.input.repeated_augmentation == 3 and m.weight_init == "timm"
  assert ops[1].startswith("inception_crop(224") and "normalize((0.485" in c.input.pp
  assert ops.index("random_erasing(0.25)") > ops.index(
      next(o for o in ops if o.startswith("normalize")))
  assert dict(c.expected) == {"val/top1": 0.798}
  assert _num_params(c) == 22_050_664 - 384  # Position embedding of N, not N+1 tokens.


def test_bit_paper_resnet50():
  """Kolesnikov et al. 2020 §3.3, BiT-S R50x1 upstream: SGD 0.9, lr 0.03 * b/256, 5,000
  warm-up steps, /10 at epochs 30, 60, 80 of 90 (audit: experiments/audits/bit_i1k.md)."""
  c = _config("bit_paper_i1k.py")
  assert c.model_name == "bit" and (c.model.depth, c.model.width) == (50, 1)
  assert c.total_epochs == 90 and c.input.batch_size == 4096
  assert c.optax_name == "sgd" and c.optax.momentum == 0.9
  assert c.lr == pytest.approx(0.03 * 4096 / 256)
  assert _config("bit_paper_i1k.py", "batch=1024").lr == pytest.approx(0.12)
  assert c.wd == 1e-4 and c.wd_mode == "l2"
  assert c.schedule.warmup_steps == 5000
  assert c.input.pp.startswith("decode|inception_crop(224)|flip_lr|")
  total, lr = 90_000, c.lr  # 1,000 steps an epoch.
  for epoch, factor in [(29, 1), (31, 0.1), (59, 0.1), (61, 0.01), (79, 0.01),
                        (81, 0.001), (90, 0.001)]:
    assert _lr_at(c, epoch * 1000, total) == pytest.approx(lr * factor), epoch
  assert not dict(c.expected)  # No upstream top-1 in the sources read (see the audit).


def test_bit_big_vision_config():
  """big_vision configs/bit_i1k.py: its GN/WS ResNet-v1 50, lr 0.1 * b/256, decoupled wd
  1e-4 * b/256, cosine after 1,000 warm-up steps, clipping 1.0."""
  c = _config("bit_i1k.py")
  assert c.model_name == "bit_v1" and (c.model.depth, c.model.width) == (50, 1)
  assert c.total_epochs == 90 and c.input.batch_size == 4096
  assert c.optax_name == "sgd" and c.optax.momentum == 0.9
  assert c.lr == pytest.approx(0.1 * 4096 / 256)
  assert c.wd == pytest.approx(1e-4 * 4096 / 256) and c.wd_mode == "times_schedule"
  assert c.schedule.decay_type == "cosine" and c.schedule.warmup_steps == 1000
  assert c.grad_clip_norm == 1.0
  assert _num_params(c) == 25_557_032  # torchvision's published ResNet-50 count.


@pytest.mark.parametrize("dataset, classes, lr, steps, warmup, crop, train, top1", [
    ("cifar10", 10, 0.003, 10_000, 500, RESMALL_CROP,
     "train[:98%]", 0.9855),
    ("cifar100", 100, 0.01, 10_000, 500, RESMALL_CROP,
     "train[:98%]", 0.9135),
    ("oxford_iiit_pet", 37, 0.003, 500, 100, f"inception_crop(384,{TF_CROP})", "train[:90%]",
     0.9378),
    ("oxford_flowers102", 102, 0.003, 500, 100, f"inception_crop(384,{TF_CROP})", "train[:90%]",
     0.9943),
])
def test_augreg_transfer(dataset, classes, lr, steps, warmup, crop, train, top1):
  """big_vision's transfer table for the AugReg ViT-B/32 (i21k, 300 epochs, light1)."""
  c = _config("augreg_transfer.py", f"dataset={dataset}")
  assert c.model_init.endswith("B_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0"
                               ".npz")
  assert (c.model.variant, c.model.pool_type) == ("B/32", "tok")
  assert list(c.model_load.dont_load) == ["head/.*"] and c.num_classes == classes
  assert c.optax_name == "sgd" and c.optax.momentum == 0.9 and c.wd == 0.0
  assert c.grad_clip_norm == 1.0 and c.input.batch_size == 512
  assert c.lr == lr and c.total_steps == steps and c.schedule.warmup_steps == warmup
  assert c.schedule.decay_type == "cosine"
  assert c.input.data.split == train and c.input.pp.startswith(f"decode|{crop}|flip_lr|")
  assert c.evals.test.split == "test"
  assert ("resize_small(448,method='area',rounding='truncate')|central_crop(384)"
          in c.evals.test.pp)
  assert dict(c.expected) == {"test/top1": top1}


def test_paper_arguments_are_checked():
  with pytest.raises(configs.ConfigError, match="epochs must be one of 90, 150, 300"):
    _config("vit_s16_i1k.py", "epochs=100")
  with pytest.raises(configs.ConfigError, match="unknown config argument 'schedule'"):
    _config("bit_i1k.py", "schedule=poly")
  with pytest.raises(configs.ConfigError, match="unknown dataset 'svhn'"):
    _config("augreg_transfer.py", "dataset=svhn")
  with pytest.raises(configs.ConfigError, match=r"config.expected\['val/top1'\] must be a"):
    configs.resolve(configs.ConfigDict({"expected": {"val/top1": "high"}}))


def test_mixer_big_vision_config():
  """big_vision configs/mlp_mixer_i1k.py (Tolstikhin et al. 2021, Mixer-B/16 on i1k)."""
  c = _config("mixer_b16_i1k.py")
  assert c.model_name == "mixer" and c.model.variant == "B/16" and c.model.stoch_depth == 0.1
  assert c.loss == "sigmoid_xent" and c.init_head_bias == -6.9
  assert c.total_epochs == 300 and c.input.batch_size == 4096
  assert c.input.data.split == "train[:99%]"
  assert c.input.pp.startswith(f"decode|inception_crop(224,{TF_CROP})|flip_lr|randaug(2,15)|")
  assert c.optax_name == "adamw" and (c.optax.b1, c.optax.b2) == (0.9, 0.999)
  assert c.lr == 1e-3 and c.wd == 1e-4 and c.wd_mode == "times_schedule"
  assert c.grad_clip_norm == 1.0 and (c.mixup.alpha, c.mixup.p) == (0.0, 0.5)
  total = 92_898  # About 300 epochs of 99% of 1,281,167 images in batches of 4096.
  assert _lr_at(c, 5_000, total) == pytest.approx(0.5e-3)  # Linear warm-up from 0.
  assert _lr_at(c, total, total) == pytest.approx(1e-3 * 1e-5)  # big_vision's linear_end.
  assert _lr_at(c, (10_000 + total) // 2, total) == pytest.approx(1e-3 * (1 + 1e-5) / 2,
                                                                  rel=1e-4)
  assert dict(c.expected) == {"val/top1": 0.763}
  assert dict(_config("mixer_b16_i1k.py", "epochs=60").expected) == {"val/top1": 0.705}
  assert _num_params(c) == 59_880_472  # Mixer-B/16: timm's mixer_b16_224, 59.88M.


def test_init_head_bias_fills_the_fresh_head_only():
  """big_vision's `init_head_bias`: the fresh head's bias, kernel untouched; imported
  params keep it where the head is not loaded."""
  from vitcls import state
  c = _config("mixer_b16_i1k.py", "runlocal=True")
  model = models.build(c.model_name, c.num_classes, c.model)
  init = state.make_init_fn(model, optim.make_optimizer(c, 4)[0], (32, 32, 3), 0,
                            head_bias=-6.9)
  params = jax.jit(init)().params
  np.testing.assert_array_equal(params["head"]["bias"], np.full(10, -6.9, np.float32))
  np.testing.assert_array_equal(params["head"]["kernel"], 0.0)  # Zero-init head.
  plain = jax.jit(state.make_init_fn(model, optim.make_optimizer(c, 4)[0], (32, 32, 3),
                                     0))().params
  np.testing.assert_array_equal(plain["head"]["bias"], 0.0)
  np.testing.assert_array_equal(params["stem"]["kernel"], plain["stem"]["kernel"])


def test_convnext_paper_recipe():
  """Liu et al. 2022, ImageNet-1K settings table and the official main.py defaults."""
  c = _config("convnext_t_i1k.py")
  assert c.model_name == "convnext" and c.model.variant == "T"
  assert (c.model.stoch_depth, c.model.layer_scale_init) == (0.1, 1e-6)
  assert [_config("convnext_t_i1k.py", f"variant={v}").model.stoch_depth
          for v in "SBL"] == [0.4, 0.5, 0.5]
  assert c.input.batch_size == 4096 and c.lr == 4e-3
  assert _config("convnext_t_i1k.py", "batch=1024").lr == pytest.approx(1e-3)
  assert c.optax_name == "adamw" and (c.optax.b1, c.optax.b2, c.optax.eps) == (0.9, 0.999,
                                                                                1e-8)
  assert c.wd == 0.05 and c.wd_mode == "times_lr" and c.grad_clip_norm == 0.0
  assert c.total_steps == 300 * 312 and c.schedule.warmup_steps == 20 * 312
  assert _lr_at(c, 3120, c.total_steps) == pytest.approx(2e-3)
  assert _lr_at(c, c.total_steps, c.total_steps) == pytest.approx(1e-6)  # min_lr.
  assert c.label_smoothing == 0.1 and c.mixup.alpha == 0.8 and c.cutmix.alpha == 1.0
  assert c.mix_switch_prob == 0.5 and c.ema_decay == 0.9999
  assert "randaug_timm('rand-m9-mstd0.5-inc1'" in c.input.pp
  assert "random_erasing(0.25)" in c.input.pp
  assert c.evals.val.pp.startswith("decode|resize_small(256,method='bicubic')|central_crop(224)")
  assert dict(c.expected) == {"val_ema/top1": 0.821}
  assert _num_params(c) == 28_589_128  # timm's convnext_tiny: 28.59M.


def test_deit_small_with_distillation():
  """DeiT's distilled DeiT-S: its token, hard distillation with alpha 0.5 and tau 1
  (main.py defaults), the RegNetY-16GF teacher (timm's regnety_160.deit_in1k), 81.2%."""
  c = _config("deit_s16_i1k.py", "teacher=hf-hub:timm/regnety_160.deit_in1k")
  assert c.model.distill_token and c.model.pool_type == "tok"
  assert c.distill.teacher_init == "hf-hub:timm/regnety_160.deit_in1k"
  assert (c.distill.teacher_model_name, c.distill.teacher_model.variant) == ("regnet",
                                                                           "Y-16GF")
  assert (c.distill.loss, c.distill.weight, c.distill.temperature) == ("deit_hard", 0.5, 1.0)
  assert c.distill.teacher_res == 0 and c.distill.teacher_pp == ""  # Same view and scaling.
  assert dict(c.expected) == {"val/top1": 0.812}
  assert c.evals.teacher.type == "distill"
  assert not _config("deit_s16_i1k.py").distill.teacher_init  # Without: DeiT-S, 79.8%.


def test_distill_bit_big_vision_config():
  """big_vision configs/proj/distill/bit_i1k.py: R152x2 -> R50x1, function matching."""
  c = _config("distill_bit_i1k.py")
  assert c.model_name == "bit" and (c.model.depth, c.model.width) == (50, 1)
  assert (c.distill.teacher_model_name, c.distill.teacher_model.depth,
          c.distill.teacher_model.width) == ("bit", 152, 2)
  assert c.distill.teacher_init == "R152x2_T_224.npz"
  assert (c.distill.loss, c.distill.temperature) == ("kl", 1.0)
  assert (c.mixup.alpha, c.mixup.p) == (0.0, 1.0) and c.total_epochs == 1200
  assert c.input.data.split == "train[:98%]" and c.input.batch_size == 4096
  assert c.optax_name == "adamw" and c.optax.mu_dtype == "bfloat16"
  assert c.lr == 0.03 and c.wd == 3e-4 and c.wd_mode == "times_schedule"
  assert c.schedule.decay_type == "cosine" and c.schedule.warmup_steps == 5000
  assert c.grad_clip_norm == 1.0
  assert not dict(c.expected)
  assert dict(_config("distill_bit_i1k.py", "epochs=9600").expected) == {"val/top1": 0.828}
