"""Every row of experiments/audits/{vit_s16_i1k,augreg_transfer}.md, pinned on the configs.

Values are transcribed here from big_vision at 0127fb6b337ee2a27bf4e54dea79cff176527356
(file:line beside each check, under big_vision/); "to fix" and "by choice" rows pin the
vitcls side the table states, so neither side drifts without the table changing.
"""

import os
import re

import pytest

from vitcls import configs, optim
from conftest import REPO

AUDITS = os.path.join(REPO, "experiments", "audits")


def _config(name, arg=""):
  spec = os.path.join(REPO, "experiments", name) + (f":{arg}" if arg else "")
  return configs.resolve(configs.load_experiment(spec))


def _table_keys(name):
  with open(os.path.join(AUDITS, name)) as f:
    return [m.group(1) for m in re.finditer(r"^\| `([a-z0-9_]+)` \|", f.read(), re.M)]


def _ops(pp):
  return pp.split("|")


def _lr(c, step, total):
  return float(optim.make_schedule(c, total)(step))


TRAIN_99 = 1_268_355  # 99% of ImageNet's 1,281,167 train images (TFDS slicing).

VIT = {  # key: check(config of vit_s16_i1k, epochs=90).
    # configs/vit_s16_i1k.py:43-46, :47, :38
    "data": lambda c: (c.input.data.name, c.input.data.split) == ("imagenet2012",
                                                                  "train[:99%]"),
    "batch": lambda c: c.input.batch_size == 1024,
    "epochs": lambda c: c.total_epochs == 90 and c.total_steps is None,
    # utils.py:1043-1053 max(1, round()): vitcls rounds the same way (fixed).
    "rounding": lambda c: (round(90 * TRAIN_99 / 1024)
                           == configs.total_steps(c, TRAIN_99) == 111_477
                           and configs.total_steps(configs.resolve(c, ["total_epochs=150"]),
                                                   TRAIN_99) == 185_794),
    "shuffle": lambda c: True,  # By choice: grain's permutation, nothing in the config.
    "loss": lambda c: c.loss == "softmax_xent",  # configs/vit_s16_i1k.py:40
    "label_smoothing": lambda c: c.label_smoothing == 0.0,  # utils.py:276-281
    "decode": lambda c: _ops(c.input.pp)[0] == "decode",  # pp/ops_image.py:197-242
    # :199 area 5..100 (the default); pp/ops_image.py:197-242 TF's sampler (fixed);
    # :201,238 and 84-85 bilinear without antialias, truncated to uint8 (fixed).
    "crop_area": lambda c: _ops(c.input.pp)[1].startswith("inception_crop(224,"),
    "crop_sampling": lambda c: "sampling='tf'" in _ops(c.input.pp)[1],
    "crop_resize": lambda c: (_ops(c.input.pp)[1]
                              == "inception_crop(224,sampling='tf',antialias=False,rounding='truncate')"),
    "flip": lambda c: _ops(c.input.pp)[2] == "flip_lr",  # configs/vit_s16_i1k.py:57
    "randaug": lambda c: _ops(c.input.pp)[3] == "randaug(2,10)",  # :57, :63
    "randaug_contrast": lambda c: "randaug(2,10)" in c.input.pp,  # By choice (pp).
    "value_range": lambda c: _ops(c.input.pp)[4] == "value_range(-1,1)",  # :52
    "labels": lambda c: _ops(c.input.pp)[5] == "onehot(1000)",  # :53
    "variant": lambda c: c.model.variant == "S/16",  # :71
    "pool": lambda c: c.model.pool_type == "gap",  # :73
    "posemb": lambda c: c.model.posemb == "sincos2d",  # :74
    "rep_size": lambda c: c.model.rep_size is True,  # :72
    # models/vit.py:212-214, :93-98, :66-69, :261: the model's own initialisers.
    "init_stem": lambda c: "kernel_init" not in c.model,
    "init_attn": lambda c: "kernel_init" not in c.model,
    "init_mlp": lambda c: "kernel_init" not in c.model,
    "init_prelogits": lambda c: "kernel_init" not in c.model,
    "init_head": lambda c: c.model.get("head_zeroinit", True) is True,  # :199, :270-274
    "layernorm": lambda c: "epsilon" not in c.model,  # :92 flax default 1e-6.
    "dropout": lambda c: (c.model.get("dropout", 0.0), c.model.get("stoch_depth", 0.0))
                         == (0.0, 0.0),  # models/vit.py:197
    "dtype": lambda c: c.model.get("dtype") in (None, "float32"),  # :203
    # configs/vit_s16_i1k.py:79-80: scale_by_adam(mu_dtype='bfloat16'), optax defaults.
    "optimizer": lambda c: (c.optax_name, c.optax.b1, c.optax.b2, c.optax.mu_dtype,
                            c.optax.get("eps", 1e-8)) == ("adamw", 0.9, 0.999,
                                                          "bfloat16", 1e-8),
    "lr": lambda c: c.lr == 0.001,  # :82
    "wd": lambda c: c.wd == 0.0001 and c.wd_mode == "times_schedule",  # :83; optax.py:132
    "wd_mask": lambda c: c.wd_mask == ".*/kernel$",  # optax.py:133
    "clip": lambda c: c.grad_clip_norm == 1.0,  # :78
    # :84; utils.py:1136-1137: lr * min(1, step / 10_000), 0 at step 0.
    "warmup": lambda c: (c.schedule.warmup_steps == 10_000 and _lr(c, 0, 111_477) == 0.0
                         and _lr(c, 2_500, 111_477) == pytest.approx(0.00025)),
    # :84; utils.py:1113-1120: cosine of (step - warmup) / (total - warmup), to 0.
    "decay": lambda c: (c.schedule.decay_type == "cosine" and c.schedule.end_factor == 0.0
                        and _lr(c, 10_000 + 101_477 // 2, 111_477)
                        == pytest.approx(0.0005, rel=1e-4)),
    "mixup": lambda c: c.mixup.p == 0.2 and c.mixup.alpha == 0.0,  # :86; utils.py:1146
    "mixup_scope": lambda c: c.cutmix.alpha == 0.0,  # By choice: global roll.
    "ema": lambda c: c.ema_decay == 0.0,
    "seed": lambda c: c.seed == 0,  # :37
    # :60 decode|resize_small(256)|central_crop(224)|value_range(-1, 1)|onehot(1000)
    "eval_pp": lambda c: all(_ops(c.evals[k].pp)[:5] == [
        "decode", "resize_small(256,method='area',rounding='truncate')", "central_crop(224)",
        "value_range(-1,1)", "onehot(1000)"] for k in ("train", "minival", "val", "v2")),
    "eval_resize": lambda c: "method='area'" in c.evals.val.pp,  # pp/ops_image.py:108
    "eval_every": lambda c: all(e.every == 2500 for e in c.evals.values()),  # :95
    "eval_train": lambda c: c.evals.train.split == "train[:2%]",  # :98
    "eval_minival": lambda c: c.evals.minival.split == "train[99%:]",  # :99
    "eval_val": lambda c: c.evals.val.split == "validation",  # :100
    "eval_v2": lambda c: (c.evals.v2.data, c.evals.v2.split) == ("imagenet_v2", "test"),
    # :102-103; evaluators/classification.py:40-53.
    "eval_real": lambda c: ((c.evals.real.type, c.evals.real.data, c.evals.real.split)
                            == ("real", "imagenet2012_real", "validation")
                            and "multihot(1000,key='real_label',key_result='labels')"
                            in c.evals.real.pp
                            and _ops(c.evals.real.pp)[:4] == _ops(c.evals.val.pp)[:4]),
    "expected": lambda c: dict(c.expected) == {"val/top1": 0.765},  # :18
    "log_ckpt": lambda c: c.log_every == 50 and c.checkpoint_every == 1000,  # :65-66
}

B32 = "B_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0.npz"
# configs/transfer.py:23-26, :67-77: (classes, train, val, steps, warmup, lr, top1).
TASKS = {"cifar10": (10, "train[:98%]", "train[98%:]", 10_000, 500, 0.003, 0.9855),
         "cifar100": (100, "train[:98%]", "train[98%:]", 10_000, 500, 0.01, 0.9135),
         "oxford_iiit_pet": (37, "train[:90%]", "train[90%:]", 500, 100, 0.003, 0.9378),
         "oxford_flowers102": (102, "train[:90%]", "train[90%:]", 500, 100, 0.003, 0.9943)}
RESMALL = "resize_small(448,method='area',rounding='truncate')"


def _crop(d):  # configs/transfer.py:23-26 (the table's crop per dataset).
  return "resmall_crop" if d.startswith("cifar") else "inception_crop"


AUGREG = {  # key: check(config, dataset).
    "checkpoint": lambda c, d: c.model_init == B32,  # configs/transfer.py:45-47
    "model": lambda c, d: ((c.model.variant, c.model.pool_type) == ("B/32", "tok")
                           and c.model.get("posemb", "learn") == "learn"
                           and not c.model.get("rep_size", False)),  # :48
    "head": lambda c, d: (list(c.model_load.dont_load) == ["head/.*"]
                          and c.model.head_zeroinit is True),  # :41-42
    "posemb_resample": lambda c, d: c.model.get("posemb", "learn") == "learn",
    "tasks": lambda c, d: ((c.num_classes, c.input.data.split, c.evals.val.split,
                            c.total_steps, c.schedule.warmup_steps)
                           == TASKS[d][:5] and c.evals.test.split == "test"),
    "lr": lambda c, d: c.lr == TASKS[d][5],
    "expected": lambda c, d: dict(c.expected) == {"test/top1": TASKS[d][6]},
    "crop": lambda c, d: _ops(c.input.pp)[1].startswith(
        "resize_small" if _crop(d) == "resmall_crop" else "inception_crop"),
    # :102-103, :109-110
    "resmall_crop": lambda c, d: (_crop(d) != "resmall_crop" or _ops(c.input.pp)[:4] == [
        "decode", RESMALL, "random_crop(384)", "flip_lr"]),
    "resize_kernel": lambda c, d: all(  # pp/ops_image.py:108 area.
        "resize_small(" not in op or op == RESMALL
        for pp in (c.input.pp, c.evals.val.pp, c.evals.test.pp) for op in _ops(pp)),
    "inception_crop": lambda c, d: (_crop(d) != "inception_crop" or _ops(c.input.pp)[:3]
                                    == ["decode", "inception_crop(384,sampling='tf',antialias=False,rounding='truncate')",
                                        "flip_lr"]),
    "value_range": lambda c, d: _ops(c.input.pp)[-3:-1] == [
        "value_range(-1,1)", f"onehot({TASKS[d][0]})"],  # :94-98
    "eval_pp": lambda c, d: all(_ops(e.pp)[:3] == ["decode", RESMALL, "central_crop(384)"]
                                for e in (c.evals.val, c.evals.test)),  # :113
    "batch": lambda c, d: c.input.batch_size == 512,  # :155
    # :168 momentum_hp (bfloat16 accumulator): fixed.
    "optimizer": lambda c, d: c.optax_name == "sgd" and dict(c.optax) == {
        "momentum": 0.9, "accumulator_dtype": "bfloat16"},
    "wd": lambda c, d: c.wd == 0.0,  # :170
    "clip": lambda c, d: c.grad_clip_norm == 1.0,  # :169
    "schedule": lambda c, d: (c.schedule.decay_type == "cosine"
                              and c.schedule.end_factor == 0.0),  # :88-91
    "loss": lambda c, d: (c.loss == "softmax_xent" and c.label_smoothing == 0.0
                          and c.mixup.p == 0.0 and c.mixup.alpha == 0.0),  # :171, :173
    "eval_every": lambda c, d: c.evals.val.every == c.evals.test.every == 100,  # :121
    "log_ckpt": lambda c, d: (c.log_every, c.checkpoint_every, c.seed) == (10, 1000, 0),
}


@pytest.mark.parametrize("table, checks", [("vit_s16_i1k.md", VIT),
                                           ("augreg_transfer.md", AUGREG)])
def test_every_row_has_a_check(table, checks):
  keys = _table_keys(table)
  assert len(keys) == len(set(keys)) and set(keys) == set(checks)


@pytest.mark.parametrize("key", sorted(VIT))
def test_vit_s16_i1k_row(key):
  assert VIT[key](_config("vit_s16_i1k.py")), key


@pytest.mark.parametrize("dataset", sorted(TASKS))
def test_augreg_transfer_rows(dataset):
  c = _config("augreg_transfer.py", f"dataset={dataset}")
  failed = [key for key, check in AUGREG.items() if not check(c, dataset)]
  assert not failed, failed
