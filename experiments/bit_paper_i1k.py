"""BiT-S ResNet-50x1 upstream on ImageNet-1k, as the BiT paper's text describes it.

Paper: Kolesnikov et al., "Big Transfer (BiT): General Visual Representation Learning",
ECCV 2020 (arXiv 1912.11370), §3.3 "Upstream pre-training" (as transcribed in
`experiments/audits/bit_i1k.md`; the paper itself was not readable here): ResNet-v2
with GroupNorm and weight standardisation (vitcls's `bit`, big_vision's `bit_paper`),
SGD with momentum 0.9, initial lr 0.03 x batch / 256, batch 4096, weight decay 1e-4,
5,000 steps of linear warm-up, 90 epochs with the lr divided by 10 at epochs 30, 60 and
80; Inception crop to 224 and random horizontal flips. big_vision's `configs/bit_i1k.py`
trains another network with another recipe: `bit_i1k.py`.

Not said by the text, chosen here (each in the audit): the weight decay is an L2 term
through the momentum (`wd_mode="l2"`, classic SGD); no gradient clipping; warm-up from 0;
the step boundaries counted from the first step; eval by big_vision's
`resize_small(256)` (area) and the central 224 crop; a zero-initialised head
(big_vision `models/bit_paper.py:134`).
Expected result: the paper reports transfer results of its upstream models; no
ILSVRC-2012 top-1 of the upstream BiT-S R50x1 itself could be read from the sources
available here (big_vision, big_transfer), so `config.expected` is left empty.

Data: `imagenet2012` prepared as ArrayRecord in the TFDS data dir. Arguments
(`--config=experiments/bit_paper_i1k.py:batch=1024`):
  batch: global batch; the lr follows the linear scaling rule (warm-up stays 5,000 steps).
  depth, width: another BiT ResNet (101 / 152, width 2 / 3 / 4).
  runlocal: the same ops and model family, shrunk to seconds on CPU, for tests.
"""

from vitcls import configs


def get_config(arg=None):
  arg = configs.parse_arg(arg, batch=4096, depth=50, width=1, runlocal=False)
  c = configs.defaults()
  c.seed = 0
  c.total_epochs = 90.0
  c.num_classes = 1000
  c.loss = "softmax_xent"

  c.input.data = configs.ConfigDict(dict(name="imagenet2012", split="train[:99%]"))
  c.input.batch_size = arg.batch
  c.input.num_workers = 16
  common = "|value_range(-1,1)|onehot(1000)|keep('image','labels')"
  c.input.pp = "decode|inception_crop(224)|flip_lr" + common
  pp_eval = "decode|resize_small(256,method='area')|central_crop(224)" + common

  c.model_name = "bit"
  c.model = configs.ConfigDict(dict(depth=arg.depth, width=arg.width, head_zeroinit=True))

  c.optax_name = "sgd"
  c.optax = configs.ConfigDict(dict(momentum=0.9))
  c.lr = 0.03 * arg.batch / 256
  c.wd = 1e-4
  c.wd_mode = "l2"
  c.wd_mask = r".*/kernel$"
  c.grad_clip_norm = 0.0
  c.schedule.decay_type = "stair"
  c.schedule.warmup_steps = 5000
  c.schedule.boundaries = [30 / 90, 60 / 90, 80 / 90]
  c.schedule.stair_factor = 0.1

  def evaluation(split):
    return configs.ConfigDict(dict(type="classification", split=split, pp=pp_eval,
                                   batch_size=1024, every=1000))
  c.evals.minival = evaluation("train[99%:]")
  c.evals.val = evaluation("validation")
  c.log_every = 50
  c.checkpoint_every = 1000

  if arg.runlocal:
    configs.imagenet_runlocal(c, dict(depth=[1, 1, 1, 1], width=1), batch=8, steps=9)
  return c
