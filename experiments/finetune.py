"""Fine-tune a ViT, BiT, Mixer or ConvNeXt checkpoint on any dataset and resolution.

The defaults are big_vision's transfer recipe (its `configs/transfer.py`, which reproduces
the AugReg ViT-B/32 transfer results, e.g. 98.55% on CIFAR-10 and 93.78% on Pets): SGD
with momentum 0.9, no weight decay, global-norm clipping at 1.0, batch 512, lr 0.01, a
linear warmup then cosine decay (500 steps with 100 of warmup for small datasets such as
Pets and Flowers; 10,000 with 500 for CIFAR), and a fresh zero-initialised head
(`model_load.dont_load=['head/.*']`). The position embedding is resampled to the new
patch grid on load, so `res` may differ from the checkpoint's resolution (ConvNeXt and
BiT take any resolution as they are; a Mixer only its own patch grid).

Arguments (`--config=experiments/finetune.py:init=PATH,dataset=NAME,classes=N,res=R`):
  init: the checkpoint: a big_vision / vision_transformer / BiT / Mixer `.npz`, a timm or
    Hugging Face `.safetensors` file (name its timm architecture with `arch`), a Hub name
    `hf-hub:timm/<architecture>.<tag>` (e.g. `hf-hub:timm/convnext_tiny.fb_in1k`,
    `hf-hub:timm/vit_small_patch14_reg4_dinov2.lvd142m`), or a vitcls workdir, whose
    architecture (`model_name`, `model` in its config.json) is then used as it is. A Hub
    name or `arch` sets the model from timm's architecture name
    (`vitcls.models.timm_names`) and `model`, `variant`, `pool` are ignored. Empty:
    train from scratch.
  arch: the timm architecture of a `.safetensors` file (e.g. `deit3_small_patch16_224`).
  model: "vit", "bit", "mixer" or "convnext".
  variant: the ViT variant ("B/16", "S/32", ...), BiT size ("R50x1", "R101x3", ...),
    Mixer variant ("B/16") or ConvNeXt variant ("T", "V2-T"); empty: B/16, R50x1, B/16, T.
  pool: ViT pooling of the checkpoint ("tok" for AugReg / vision_transformer files).
  dataset, classes: TFDS name (prepared in the data dir, or an embedded one) or
    `folder:PATH` (a folder of images, one sub-folder per class), and its class count;
    train on split `train`, evaluate on `test`.
  res: input resolution. crop: "resize" (resize to res) or "resize_crop" (resize to
    res * 7/6, then a random res crop: big_vision's resize_crop, 448 then 384).
  flip: random horizontal flips (big_vision's recipe uses them on natural images).
  rgb: repeat grey images to three channels (published checkpoints are RGB). False for a
    checkpoint trained on grey images, such as the mnist5k ViT of `make train`: every
    image is then made grey, one channel (`decode(channels=1)` first in both pp: RGB
    images, as a folder's always are, are converted; grey ones are left as they are).
  norm: the input scaling: empty for the checkpoint's own (timm's mean and std for a
    Hub name or `arch`, else [-1, 1] as big_vision's), or "imagenet" / "minus1_1".
  layer_decay: layer-wise lr decay (`config.layer_decay`; BEiT / DeiT-III / DINOv2 /
    ConvNeXt fine-tuning use 0.65-0.9); 1 turns it off.
  steps, warmup, lr, batch: as in the recipe above.
  runlocal: a few steps with small batches, for tests; from scratch (no `init`), also a
    tiny model at no more than 32 px.

Measured in vitcls (2 CPU cores, README "Start from a published checkpoint"): the mnist5k
ViT of `make train` fine-tuned on scikit-learn's 8x8 digits upsampled to 42 px (a 6x6
patch grid instead of 4x4), batch 128, lr 0.03: 91.9% test top-1 after 100 steps against
89.7% from scratch; after 300 steps 96.4% against 96.7% (the head start is gone).
"""

import json
import os

from vitcls import configs
from vitcls.models import timm_names

NORMS = {"imagenet": timm_names.IMAGENET, "minus1_1": timm_names.MINUS_ONE_TO_ONE}
DEFAULT_VARIANTS = {"vit": "B/16", "bit": "R50x1", "mixer": "B/16", "convnext": "T"}


def _bit_size(variant: str) -> dict:
  """"R50x1" -> dict(depth=50, width=1)."""
  depth, _, width = variant.lstrip("Rr").partition("x")
  if not (depth.isdigit() and width.isdigit()):
    raise configs.ConfigError(f"BiT variant '{variant}' must look like R50x1")
  return dict(depth=int(depth), width=int(width))


def _architecture(arg) -> tuple[str, dict, str]:
  """(model_name, model config, normalisation op) for `arg.init`."""
  saved = os.path.join(arg.init, "config.json")
  if arg.init and os.path.isfile(saved):
    with open(saved) as f:
      trained = json.load(f)
    return trained["model_name"], trained["model"], timm_names.MINUS_ONE_TO_ONE
  arch = arg.arch or (arg.init if arg.init.startswith("hf-hub:") else "")
  if arch:
    try:
      return timm_names.model_config(arch)
    except ValueError as e:
      raise configs.ConfigError(f"finetune.py: {e}") from None
  variant = arg.variant or DEFAULT_VARIANTS.get(arg.model, "")
  norm = timm_names.MINUS_ONE_TO_ONE
  if arg.model == "vit":
    return "vit", dict(variant=variant, pool_type=arg.pool), norm
  if arg.model == "bit":
    return "bit", _bit_size(variant), norm
  if arg.model == "mixer":
    return "mixer", dict(variant=variant), norm
  if arg.model == "convnext":
    return "convnext", dict(variant=variant), timm_names.IMAGENET
  raise configs.ConfigError(f"finetune.py: unknown model '{arg.model}': use "
                            f"{', '.join(DEFAULT_VARIANTS)}")


def get_config(arg=None):
  arg = configs.parse_arg(
      arg, init="", arch="", model="vit", variant="", pool="tok", dataset="digits",
      classes=10, res=224, crop="resize", flip=False, rgb=True, norm="", layer_decay=1.0,
      steps=500, warmup=100, lr=0.01, batch=512, runlocal=False)
  if arg.runlocal and not arg.init:
    arg.res = min(arg.res, 32)
  c = configs.defaults()
  c.seed = 0
  c.model_name, model, norm = _architecture(arg)
  if arg.norm:
    if arg.norm not in NORMS:
      raise configs.ConfigError(f"finetune.py: unknown norm '{arg.norm}': use "
                                f"{' or '.join(NORMS)}")
    norm = NORMS[arg.norm]
  c.model = configs.ConfigDict(model)
  c.model.head_zeroinit = True
  c.model_init = arg.init
  c.model_load.dont_load = ["head/.*"]
  c.num_classes = arg.classes

  crops = {"resize": f"resize({arg.res})",
           "resize_crop": f"resize({arg.res * 7 // 6})|random_crop({arg.res})"}
  if arg.crop not in crops:
    raise configs.ConfigError(f"finetune.py: unknown crop '{arg.crop}': use "
                              f"{' or '.join(crops)}")
  grey = "" if arg.rgb else "decode(channels=1)|"  # Folders decode to RGB: back to grey.
  common = ("|to_rgb" if arg.rgb else "") + f"|{norm}|onehot({arg.classes})"
  c.input.data = configs.ConfigDict(dict(name=arg.dataset, split="train"))
  c.input.pp = grey + crops[arg.crop] + ("|flip_lr" if arg.flip else "") + common
  c.input.batch_size = arg.batch
  c.total_steps = arg.steps

  c.optax_name = "sgd"
  c.optax = configs.ConfigDict(dict(momentum=0.9))
  c.lr = arg.lr
  c.wd = 0.0
  c.layer_decay = arg.layer_decay
  c.grad_clip_norm = 1.0
  c.label_smoothing = 0.0
  c.schedule.decay_type = "cosine"
  c.schedule.warmup_steps = arg.warmup

  c.evals.test = configs.ConfigDict(dict(
      type="classification", split="test", pp=f"{grey}resize({arg.res})" + common,
      batch_size=500, every=max(arg.steps // 5, 1)))
  c.log_every = 25
  c.checkpoint_every = max(arg.steps // 2, 1)

  if arg.runlocal:
    c.total_steps = min(arg.steps, 4)
    c.input.batch_size = 16
    c.schedule.warmup_steps = 1
    c.evals.test.every = 2
    c.log_every = 1
    c.checkpoint_every = 2
    if not arg.init:  # From scratch: a tiny model, so the smoke test takes seconds.
      c.model = configs.ConfigDict(dict(width=32, depth=1, mlp_dim=64, num_heads=2,
                                        patch_size=8, pool_type=arg.pool))
      tiny = {"bit": dict(depth=[1, 1, 1, 1], width=1),
              "mixer": dict(hidden_dim=32, num_blocks=1, tokens_mlp_dim=16,
                            channels_mlp_dim=64, patch_size=8),
              "convnext": dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32))}
      if c.model_name in tiny:
        c.model = configs.ConfigDict(tiny[c.model_name])
      c.input.pp = c.input.pp.replace(f"resize({arg.res})", "resize(32)")
      c.evals.test.pp = c.evals.test.pp.replace(f"resize({arg.res})", "resize(32)")
  return c
