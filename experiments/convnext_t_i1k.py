"""ConvNeXt-T on ImageNet-1k from scratch: the ConvNeXt paper's recipe.

Paper: Liu et al., "A ConvNet for the 2020s", CVPR 2022 (arXiv 2201.03545): ConvNeXt-T
(28M parameters, 4.5 GFLOPs) reaches 82.1% ImageNet-1k top-1 at 224 px after 300 epochs
(its ImageNet-1K results table; `config.expected`), evaluated with the EMA weights as the
official training command does (`--model_ema true --model_ema_eval true`).

Recipe (the paper's ImageNet-1K training-settings table, and the defaults of the official
code's `main.py` at 048efce that its TRAINING.md command keeps): AdamW (b1 0.9, b2 0.999,
eps 1e-8) with lr 4e-3 at batch 4096, weight decay 0.05 (AdamW's, times the lr) on the
kernels only (the code skips 1-D parameters and biases), no gradient clipping; 20 warm-up
epochs from 0, then cosine decay to 1e-6, set every iteration; stochastic depth 0.1 for
T (0.4 S, 0.5 B and L), LayerScale initialised at 1e-6; label smoothing 0.1; mixup 0.8
and CutMix 1.0 (one of the two per batch, probability 0.5 each); random-resized crop to
224 (bicubic), flips, timm's RandAugment "rand-m9-mstd0.5-inc1" (colour jitter is off
when RandAugment is on), ImageNet mean/std, random erasing 0.25 (per-pixel noise); EMA of
the weights with decay 0.9999, evaluated beside the weights. Evaluation resizes the
shorter side to 256 (crop_pct 0.875, bicubic) and takes the central 224. Epochs are
1,281,167 // 4096 = 312 steps (a distributed sampler that drops the last partial batch),
so the run is 93,600 steps with 6,240 of warm-up.

Data: `imagenet2012` prepared as ArrayRecord in the TFDS data dir (README "Datasets as you
have them"). Arguments (`--config=experiments/convnext_t_i1k.py:variant=S`):
  variant: T (the default), S, B or L: the stochastic-depth rate follows the paper.
  batch: global batch; the lr is scaled linearly from 4e-3 at 4096.
  runlocal: the same ops and model family, shrunk to seconds on CPU, for tests.
"""

from vitcls import configs

IMAGENET_TRAIN = 1_281_167
MEAN, STD = "(0.485,0.456,0.406)", "(0.229,0.224,0.225)"
# variant: (stochastic depth, ImageNet-1k top-1 in the paper at 224 px).
VARIANTS = {"T": (0.1, 0.821), "S": (0.4, 0.831), "B": (0.5, 0.838), "L": (0.5, 0.843)}


def get_config(arg=None):
  arg = configs.parse_arg(arg, variant="T", batch=4096, runlocal=False)
  if arg.variant not in VARIANTS:
    raise configs.ConfigError(f"convnext_t_i1k.py: variant must be one of "
                              f"{', '.join(VARIANTS)}, got {arg.variant}")
  stoch_depth, top1 = VARIANTS[arg.variant]
  c = configs.defaults()
  c.seed = 0
  c.num_classes = 1000

  c.input.data = configs.ConfigDict(dict(name="imagenet2012", split="train"))
  c.input.batch_size = arg.batch
  c.input.num_workers = 16
  norm = f"|normalize({MEAN},{STD})"
  labels = "|onehot(1000)|keep('image','labels')"
  c.input.pp = ("decode|inception_crop(224,area_min=8,method='bicubic')|flip_lr|"
                "randaug_timm('rand-m9-mstd0.5-inc1',interpolation='bicubic')" + norm +
                "|random_erasing(0.25)" + labels)
  pp_eval = "decode|resize_small(256,method='bicubic')|central_crop(224)" + norm + labels

  c.model_name = "convnext"
  c.model = configs.ConfigDict(dict(variant=arg.variant, stoch_depth=stoch_depth,
                                    layer_scale_init=1e-6))

  c.optax_name = "adamw"
  c.optax = configs.ConfigDict(dict(b1=0.9, b2=0.999, eps=1e-8))
  c.lr = 4e-3 * arg.batch / 4096
  c.wd = 0.05
  c.wd_mode = "times_lr"
  c.wd_mask = r".*/kernel$"  # Convolution and dense kernels; no biases, norms, LayerScale.
  c.grad_clip_norm = 0.0
  steps_per_epoch = IMAGENET_TRAIN // arg.batch
  c.total_steps = 300 * steps_per_epoch
  c.schedule.decay_type = "cosine"
  c.schedule.warmup_steps = 20 * steps_per_epoch
  c.schedule.end_factor = 1e-6 / c.lr
  c.label_smoothing = 0.1
  c.mixup = configs.ConfigDict(dict(alpha=0.8, p=0.0))
  c.cutmix = configs.ConfigDict(dict(alpha=1.0))
  c.mix_switch_prob = 0.5
  c.ema_decay = 0.9999

  c.evals.val = configs.ConfigDict(dict(type="classification", split="validation",
                                        pp=pp_eval, batch_size=1024, every=2500))
  c.expected = configs.ConfigDict({"val_ema/top1": top1})  # The EMA weights, as reported.
  c.log_every = 50
  c.checkpoint_every = 1000

  if arg.runlocal:
    configs.imagenet_runlocal(c, dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32),
                                      stoch_depth=0.1, layer_scale_init=1e-6))
  return c
