"""MLP-Mixer-B/16 on ImageNet-1k from scratch: big_vision's Mixer recipe.

Paper: Tolstikhin et al., "MLP-Mixer: An all-MLP Architecture for Vision", NeurIPS 2021
(arXiv 2105.01601): Mixer-B/16 trained on ImageNet-1k alone reaches 76.44% top-1 (its
Table 2). This file follows big_vision's `configs/mlp_mixer_i1k.py` (at 0127fb6), whose
docstring reports 76.3% on the validation set after 300 epochs, in 2 h 11 min on a TPU
v3-128 (60 epochs: 70.5% in 27 min): `config.expected` holds that 76.3%.

Recipe (big_vision's file, value by value): Mixer-B/16, stochastic depth 0.1; sigmoid
cross-entropy with the head's bias started at -6.9 (`init_head_bias`, about log(1/1000));
batch 4096; Adam (b1 0.9, b2 0.999) with lr 1e-3, 10,000 linear warm-up steps, then
linear decay to 1e-5 x lr; weight decay 1e-4 decoupled as big_vision applies it (scaled
by the schedule's shape: `wd_mode="times_schedule"`); global-norm clipping at 1.0;
Inception crop to 224, horizontal flips, RandAugment(2, 15); mixup with p=0.5 (a ~
Beta(0.5, 0.5), folded to max(a, 1 - a), every batch). Trained on 99% of the train
split; evaluated as big_vision does: shorter side to 256, central 224 crop; `train` is the
first 2% of the train split, `minival` the held-out 1%, `val` the validation set, `v2`
ImageNet-v2 and `real` ImageNet-ReaL (when prepared). big_vision's few-shot evaluators
are not run.

Data: `imagenet2012` prepared as ArrayRecord in the TFDS data dir (README "Datasets as you
have them"). Arguments (`--config=experiments/mixer_b16_i1k.py:epochs=60`):
  epochs: 300 (the paper), or 60 (big_vision's shorter run, 70.5% expected).
  batch: global batch (big_vision: 4096; 512 in its 8-GPU mode); the lr is not rescaled.
  runlocal: the same ops and model family, shrunk to seconds on CPU, for tests.
"""

from vitcls import configs

TF_CROP = "sampling='tf',antialias=False,rounding='truncate'"  # big_vision's inception crop.
EXPECTED_TOP1 = {300: 0.763, 60: 0.705}


def get_config(arg=None):
  arg = configs.parse_arg(arg, epochs=300, batch=4096, runlocal=False)
  if arg.epochs not in EXPECTED_TOP1:
    raise configs.ConfigError(f"mixer_b16_i1k.py: epochs must be one of "
                              f"{', '.join(map(str, EXPECTED_TOP1))}, got {arg.epochs}")
  c = configs.defaults()
  c.seed = 0
  c.total_epochs = float(arg.epochs)
  c.num_classes = 1000
  c.loss = "sigmoid_xent"
  c.init_head_bias = -6.9

  c.input.data = configs.ConfigDict(dict(name="imagenet2012", split="train[:99%]"))
  c.input.batch_size = arg.batch
  c.input.num_workers = 16
  common = "|value_range(-1,1)|onehot(1000)|keep('image','labels')"
  c.input.pp = f"decode|inception_crop(224,{TF_CROP})|flip_lr|randaug(2,15)" + common
  resized = "decode|resize_small(256,method='area',rounding='truncate')|central_crop(224)"
  pp_real = resized + "|value_range(-1,1)|multihot(1000,key='real_label',key_result='labels')"

  c.model_name = "mixer"
  c.model = configs.ConfigDict(dict(variant="B/16", stoch_depth=0.1))

  c.optax_name = "adamw"  # big_vision's scale_by_adam plus its decoupled weight decay.
  c.optax = configs.ConfigDict(dict(b1=0.9, b2=0.999))
  c.lr = 1e-3
  c.wd = 1e-4
  c.wd_mode = "times_schedule"
  c.grad_clip_norm = 1.0
  c.schedule.decay_type = "linear"
  c.schedule.warmup_steps = 10_000
  c.schedule.end_factor = 1e-5
  c.mixup = configs.ConfigDict(dict(alpha=0.0, p=0.5))

  def evaluation(split, name="imagenet2012"):
    return configs.ConfigDict(dict(type="classification", data=name, split=split,
                                   pp=resized + common, batch_size=1024, every=2500))
  c.evals.train = evaluation("train[:2%]")
  c.evals.minival = evaluation("train[99%:]")
  c.evals.val = evaluation("validation")
  c.evals.v2 = evaluation("test", name="imagenet_v2")
  c.evals.real = configs.ConfigDict(dict(type="real", data="imagenet2012_real",
                                         split="validation", pp=pp_real, batch_size=1024,
                                         every=2500))
  c.expected = configs.ConfigDict({"val/top1": EXPECTED_TOP1[arg.epochs]})
  c.log_every = 50
  c.checkpoint_every = 1000
  c.keep_checkpoints = 2

  if arg.runlocal:
    configs.imagenet_runlocal(c, dict(hidden_dim=32, num_blocks=2, tokens_mlp_dim=16,
                                      channels_mlp_dim=64, patch_size=8, stoch_depth=0.1))
  return c
