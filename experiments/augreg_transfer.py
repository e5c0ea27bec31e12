"""Fine-tune an AugReg ViT on CIFAR-10/100, Oxford-IIIT Pets or Oxford Flowers-102.

Paper: Steiner et al., "How to train your ViT? Data, Augmentation, and Regularization in
Vision Transformers", TMLR 2022 (arXiv 2106.10270), whose ImageNet-21k checkpoints
("AugReg") are the field's standard starting point. The recipe and the expected test
top-1 are big_vision's transfer table (`configs/transfer.py`, mean of 5 runs) for the
recommended ViT-B/32 (`B_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0.npz`
from the AugReg release): CIFAR-10 98.55% (lr 0.003), CIFAR-100 91.35% (lr 0.01), Pets
93.78% (lr 0.003), Flowers 99.43% (lr 0.003). One run on CIFAR (10,000 steps at 384 px)
takes a TPU v3-8 a few hours; Pets and Flowers (500 steps) well under one.

Recipe (shared with experiments/finetune.py, which takes any checkpoint and dataset):
SGD with momentum 0.9, no weight decay, global-norm clipping at 1.0, batch 512, a linear
warmup then cosine decay; a fresh zero head; 384 px, with the position embedding
resampled from the checkpoint's 224 px grid on load. Crops as in the table: CIFAR
resize the shorter side to 448 and take a random 384 crop ("resmall_crop"); Pets and
Flowers an Inception crop to 384; flips on both; evaluation resizes to 448 and takes
the central 384. Every resize_small is area-weighted, big_vision's default (vitcls's
is bilinear). Train on the first 98% (CIFAR) or 90% (Pets, Flowers) of the train
split, validate on the rest (`val`), report the test split (`test`); both every 100
steps, as big_vision. Line-by-line audit, with what still differs and why:
experiments/audits/augreg_transfer.md (pinned by tests/test_audit_vit.py).

Data: the TFDS datasets prepared as ArrayRecord (README "Datasets as you have them").
Arguments (`--config=experiments/augreg_transfer.py:dataset=cifar100,init=PATH.npz`):
  dataset: cifar10 | cifar100 | oxford_iiit_pet | oxford_flowers102.
  init: the AugReg checkpoint file (default: the B/32 file named above, in the current
    directory); variant: its ViT variant.
  lr: the learning rate (default: the table's for the dataset).
  runlocal: the same ops, a tiny ViT from scratch on the embedded digits, for tests.
"""

from vitcls import configs

# big_vision's inception crop: TF's box sampler and bilinear without antialiasing, cast to
# uint8 by truncation (pp/ops_image.py:84-85,197-242).
TF_CROP = "sampling='tf',antialias=False,rounding='truncate'"

B32 = "B_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0.npz"

# name: (classes, train split, val split, steps, warmup, crop, lr, expected test top-1)
TASKS = {
    "cifar10": (10, "train[:98%]", "train[98%:]", 10_000, 500, "resmall_crop", 0.003,
                0.9855),
    "cifar100": (100, "train[:98%]", "train[98%:]", 10_000, 500, "resmall_crop", 0.01,
                 0.9135),
    "oxford_iiit_pet": (37, "train[:90%]", "train[90%:]", 500, 100, "inception_crop",
                        0.003, 0.9378),
    "oxford_flowers102": (102, "train[:90%]", "train[90%:]", 500, 100, "inception_crop",
                          0.003, 0.9943),
}
H_RES, L_RES = 448, 384


def get_config(arg=None):
  arg = configs.parse_arg(arg, dataset="cifar10", init=B32, variant="B/32", lr=0.0,
                          runlocal=False)
  if arg.dataset not in TASKS:
    raise configs.ConfigError(f"augreg_transfer.py: unknown dataset '{arg.dataset}': use "
                              f"one of {', '.join(TASKS)} (experiments/finetune.py takes "
                              f"any dataset)")
  classes, train, val, steps, warmup, crop, lr, expected = TASKS[arg.dataset]
  c = configs.defaults()
  c.seed = 0
  c.model_name = "vit"
  c.model = configs.ConfigDict(dict(variant=arg.variant, pool_type="tok",
                                    head_zeroinit=True))
  c.model_init = arg.init
  c.model_load.dont_load = ["head/.*"]
  c.num_classes = classes

  common = f"|value_range(-1,1)|onehot({classes})|keep('image','labels')"
  # big_vision's resize_small defaults to area (pp/ops_image.py:108), unlike vitcls's.
  crops = {"resmall_crop": f"decode|resize_small({H_RES},method='area',rounding='truncate')"
                           f"|random_crop({L_RES})",
           "inception_crop": f"decode|inception_crop({L_RES},{TF_CROP})"}
  c.input.data = configs.ConfigDict(dict(name=arg.dataset, split=train))
  c.input.pp = crops[crop] + "|flip_lr" + common
  c.input.batch_size = 512
  c.input.num_workers = 8
  c.total_steps = steps

  c.optax_name = "sgd"
  c.optax = configs.ConfigDict(dict(momentum=0.9, accumulator_dtype="bfloat16"))
  c.lr = arg.lr or lr
  c.wd = 0.0
  c.grad_clip_norm = 1.0
  c.label_smoothing = 0.0
  c.schedule.decay_type = "cosine"
  c.schedule.warmup_steps = warmup

  pp_eval = (f"decode|resize_small({H_RES},method='area',rounding='truncate')"
             f"|central_crop({L_RES})"
             + common)
  every = 100  # big_vision's log_steps (configs/transfer.py:121).
  c.evals.val = configs.ConfigDict(dict(type="classification", split=val, pp=pp_eval,
                                        batch_size=512, every=every))
  c.evals.test = configs.ConfigDict(dict(type="classification", split="test",
                                         pp=pp_eval, batch_size=512, every=every))
  c.expected = configs.ConfigDict({"test/top1": expected})
  c.log_every = 10
  c.checkpoint_every = 1000

  if arg.runlocal:
    c.model_init = ""
    c.model = configs.ConfigDict(dict(width=32, depth=1, mlp_dim=64, num_heads=2,
                                      patch_size=8, pool_type="tok"))
    c.num_classes = 10
    c.input.data = configs.ConfigDict(dict(name="digits", split="train[:98%]"))
    shrink = lambda pp: (pp.replace(f"({H_RES}", "(36").replace(f"({L_RES}", "(32")
                         .replace(f"({classes})", "(10)"))
    c.input.pp = shrink(c.input.pp)
    c.input.batch_size = 16
    c.input.num_workers = 0
    c.total_steps = 4
    c.schedule.warmup_steps = 1
    for ev in c.evals.values():
      ev.pp, ev.batch_size, ev.every = shrink(ev.pp), 128, 2
    c.evals.val.split = "train[98%:]"
    c.log_every = 1
    c.checkpoint_every = 2
  return c
