"""big_vision's `configs/bit_i1k.py`: a GN/WS ResNet-50 trained on ImageNet-1k.

Follows big_vision's config (commit 0127fb6b, file:line below) with the network it
trains, big_vision's `bit` model: a ResNet-v1 with GroupNorm and weight standardisation
(vitcls's `bit_v1`), not the BiT paper's pre-activation ResNet-v2 (`bit_paper` there,
`bit` here; see `bit_paper_i1k.py` for the paper's own recipe). Every row is pinned in
`experiments/audits/bit_i1k.md` and `tests/test_audit_bit.py`.

Recipe (big_vision `configs/bit_i1k.py`): 90 epochs (:35) of `train[:99%]` (:42) at batch
4096 (:44); Inception crop to 224 and flips (:50); SGD with momentum 0.9 (`momentum_hp`,
:64; `optax.py:220`); global-norm clipping at 1.0 (:65); lr 0.1 x batch / 256 and
decoupled weight decay 1e-4 x batch / 256 on kernels, both scaled by the schedule's shape
and the decay not by the lr (:68-69; `optax.py:132-149`: vitcls's
`wd_mode="times_schedule"`); cosine decay to 0 after 1,000 linear warmup steps from 0
(:70; `utils.py:1113-1137`). Eval: `resize_small(256)` (area, `pp/ops_image.py:108`)
and the central 224 crop (:51) on minival `train[99%:]`, `validation`, `train[:2%]`,
ImageNet-v2 and ImageNet-ReaL (:83-88).
Differences (see the audit): vitcls's momentum accumulator is float32 (big_vision:
bfloat16); its resizes are PIL's (antialiased bilinear, box for area), not TF's.
Expected result: big_vision's config quotes no accuracy, only "~32min on v3-128" (:18),
so `config.expected` is left empty.

Data: `imagenet2012` (and `imagenet_v2` for its eval) prepared as ArrayRecord in the TFDS
data dir. Arguments (`--config=experiments/bit_i1k.py:batch=1024`):
  batch: global batch; lr and weight decay follow the linear scaling rule (:67-69).
  depth, width: another ResNet (26 / 101 / 152, width 2 / 3 / 4).
  runlocal: the same ops and model family, shrunk to seconds on CPU, for tests.
"""

from vitcls import configs

# big_vision's inception crop: TF's box sampler and bilinear without antialiasing, cast to
# uint8 by truncation (pp/ops_image.py:84-85,197-242).
TF_CROP = "sampling='tf',antialias=False,rounding='truncate'"


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
  common = "|onehot(1000)|value_range(-1,1)|keep('image','labels')"
  c.input.pp = f"decode|inception_crop(224,{TF_CROP})|flip_lr" + common
  pp_eval = "decode|resize_small(256,method='area',rounding='truncate')|central_crop(224)" + common

  c.model_name = "bit_v1"
  c.model = configs.ConfigDict(dict(depth=arg.depth, width=arg.width))

  c.optax_name = "sgd"
  c.optax = configs.ConfigDict(dict(momentum=0.9, accumulator_dtype="bfloat16"))
  c.grad_clip_norm = 1.0
  c.lr = 0.1 * arg.batch / 256
  c.wd = 1e-4 * arg.batch / 256
  c.wd_mode = "times_schedule"
  c.wd_mask = r".*/kernel$"
  c.schedule.decay_type = "cosine"
  c.schedule.warmup_steps = 1000
  c.schedule.end_factor = 0.0

  def evaluation(split, name="imagenet2012"):
    return configs.ConfigDict(dict(type="classification", data=name, split=split,
                                   pp=pp_eval, batch_size=1024, every=1000))
  c.evals.train = evaluation("train[:2%]")
  c.evals.minival = evaluation("train[99%:]")
  c.evals.val = evaluation("validation")
  c.evals.v2 = evaluation("test", name="imagenet_v2")
  pp_real = ("decode|resize_small(256,method='area',rounding='truncate')|central_crop(224)"
             "|value_range(-1,1)"
             "|multihot(1000,key='real_label',key_result='labels')")  # :87-88
  c.evals.real = configs.ConfigDict(dict(type="real", data="imagenet2012_real",
                                         split="validation", pp=pp_real, batch_size=1024,
                                         every=1000))
  c.log_every = 50
  c.checkpoint_every = 1000

  if arg.runlocal:
    configs.imagenet_runlocal(c, dict(depth=[1, 1, 1, 1], width=1), batch=8)
  return c
