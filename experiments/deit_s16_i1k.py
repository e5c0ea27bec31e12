"""DeiT-S on ImageNet-1k from scratch, without distillation: the DeiT recipe.

Paper: Touvron et al., "Training data-efficient image transformers & distillation
through attention", ICML 2021 (arXiv 2012.12877): DeiT-S, 300 epochs, 79.8% ImageNet
top-1 at 224 px (its main results table; `config.expected`). The authors train DeiT-S
in under 3 days on 4 GPUs (DeiT-B: 53 hours on one node of 8 GPUs).

Recipe (the paper's ingredients table and its default training settings): ViT-S/16 with
a class token and learned position embeddings, stochastic depth 0.1, no dropout; AdamW
with lr 5e-4 x batch / 512 (1e-3 at batch 1024), weight decay 0.05 (AdamW's, times the
lr: `wd_mode="times_lr"`), 5 warmup epochs then cosine decay to 1e-5, no gradient
clipping; random-resized crop to 224 (bicubic), flips, timm's RandAugment
"rand-m9-mstd0.5-inc1" (`randaug_timm`: per-op probability 0.5, magnitude noise 0.5, the
increasing op set, bicubic, ImageNet-mean fill), repeated augmentation with 3 copies
(`input.repeated_augmentation`), mixup 0.8 and CutMix 1.0 (one of the two per batch,
with probability 0.5 each), label smoothing 0.1, random erasing 0.25 (after ImageNet
mean/std normalisation); timm's initialisers (`weight_init="timm"`: truncated normal
0.02, zero biases, no zero-init head); evaluation resizes the shorter side to 256
(bicubic) and takes the central 224. Checked line by line against DeiT's `main.py`,
`datasets.py`, `samplers.py` and timm 0.3.2 in `experiments/audits/deit_s16_i1k.md`
(what differs, and why: fp16, the mixup partner). The run has DeiT's 375,300 steps; the lr
follows timm's scheduler as DeiT steps it: from 1e-6, once per epoch, one epoch late.

Data: `imagenet2012` prepared as ArrayRecord in the TFDS data dir (README "Datasets as you
have them"). Arguments (`--config=experiments/deit_s16_i1k.py:batch=1024`):
  batch: global batch; the lr follows the paper's linear scaling rule.
  epochs: 300 in the paper.
  teacher: with a teacher, DeiT-S with distillation (the paper's DeiT-S with the
    distillation symbol, 81.2%, `config.expected`): the ViT gains DeiT's distillation
    token and head (`distill_token`; evaluation averages the two heads), trained with
    hard distillation (`distill.loss="deit_hard"`: half the cross-entropy with the labels
    on the class token's head, half with the teacher's argmax on the distillation
    token's, main.py `--distillation-type hard --distillation-alpha 0.5
    --distillation-tau 1.0`) from DeiT's teacher, a RegNetY-16GF (82.9%) that sees the
    same mixed images: timm's copy of it, `teacher=hf-hub:timm/regnety_160.deit_in1k`.
  runlocal: the same ops and model family, shrunk to seconds on CPU, for tests.
"""

from vitcls import configs

IMAGENET_TRAIN = 1_281_167  # Examples in imagenet2012's train split.
MEAN, STD = "(0.485,0.456,0.406)", "(0.229,0.224,0.225)"


def get_config(arg=None):
  arg = configs.parse_arg(arg, batch=1024, epochs=300, teacher="", runlocal=False)
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
  c.input.repeated_augmentation = 3  # DeiT main.py --repeated-aug, samplers.RASampler.
  pp_eval = "decode|resize_small(256,method='bicubic')|central_crop(224)" + norm + labels

  c.model_name = "vit"
  c.model = configs.ConfigDict(dict(variant="S/16", pool_type="tok", posemb="learn",
                                    dropout=0.0, stoch_depth=0.1, weight_init="timm",
                                    head_zeroinit=False))

  c.optax_name = "adamw"
  c.optax = configs.ConfigDict(dict(b1=0.9, b2=0.999, eps=1e-8))
  c.lr = 5e-4 * arg.batch / 512
  c.wd = 0.05
  c.wd_mode = "times_lr"
  c.grad_clip_norm = 0.0
  # timm 0.3.2's CosineLRScheduler as DeiT drives it (main.py:79-92, 432): epochs of
  # RASampler's N // 256 * 256 examples in batches of B, the last partial one dropped
  # (samplers.py:35, main.py:236-242: 1,251 steps at B=1024), warm-up from 1e-6 over 5
  # epochs, cosine to 1e-5 counted from step 0, the lr set once per epoch, one epoch late.
  steps_per_epoch = IMAGENET_TRAIN // 256 * 256 // arg.batch
  c.total_steps = arg.epochs * steps_per_epoch
  c.schedule.decay_type = "cosine"
  c.schedule.warmup_steps = 5 * steps_per_epoch
  c.schedule.warmup_start = 1e-6 / c.lr
  c.schedule.end_factor = 1e-5 / c.lr
  c.schedule.decay_from_start = True
  c.schedule.steps_per_update = steps_per_epoch
  c.schedule.update_lag = 1
  c.label_smoothing = 0.1
  c.mixup = configs.ConfigDict(dict(alpha=0.8, p=0.0))
  c.cutmix = configs.ConfigDict(dict(alpha=1.0))
  c.mix_switch_prob = 0.5

  c.evals.val = configs.ConfigDict(dict(type="classification", split="validation",
                                        pp=pp_eval, batch_size=1024, every=2500))
  c.expected = configs.ConfigDict({"val/top1": 0.798})
  if arg.teacher:  # DeiT-S with distillation: its token, its teacher, hard labels.
    c.model.distill_token = True
    c.distill.teacher_init = arg.teacher
    c.distill.teacher_model_name = "regnet"
    c.distill.teacher_model = configs.ConfigDict(dict(variant="Y-16GF"))
    c.distill.loss = "deit_hard"
    c.distill.weight = 0.5
    c.distill.temperature = 1.0
    c.evals.teacher = configs.ConfigDict(dict(type="distill", split="validation",
                                              pp=pp_eval, batch_size=1024, every=2500))
    c.expected = configs.ConfigDict({"val/top1": 0.812})
  c.log_every = 50
  c.checkpoint_every = 1000

  if arg.runlocal:
    configs.imagenet_runlocal(c, dict(width=32, depth=2, mlp_dim=64, num_heads=2,
                                      patch_size=8, pool_type="tok", posemb="learn",
                                      stoch_depth=0.1, weight_init="timm",
                                      head_zeroinit=False,
                                      distill_token=bool(arg.teacher)))
    if arg.teacher:  # A tiny teacher of the suite's: its workdir says what it is.
      c.distill.teacher_model_name = ""
      c.distill.teacher_model = configs.ConfigDict()
      c.evals.teacher = configs.ConfigDict(dict(type="distill", split="test[:200]",
                                                pp=c.evals.val.pp, batch_size=200, every=2))
  return c
