"""timm's architecture names -> the vitcls model and config that read their weights.

A timm checkpoint says what it is only by name (`vit_base_patch14_reg4_dinov2`,
`convnext_tiny`, `mixer_b16_224`, `regnety_160`, and on the Hub
`timm/<name>.<pretrained tag>`), so `experiments/finetune.py` turns the name into
`config.model_name` and `config.model` here, without reading the file or the network. The
sizes are those of timm's model definitions (`vision_transformer.py`, `convnext.py`,
`mlp_mixer.py`, `regnet.py`) and of the papers; timm runs PyTorch's exact GELU, so the
models here do too (`gelu_approximate=False`), which keeps their logits equal to timm's.
`normalization` is the input scaling the weights were trained with (timm's
`pretrained_cfg` mean and std), as a vitcls pp op.

`model_config` raises ValueError in one line for a name outside these families. Distilled
DeiTs (`deit_*_distilled_*`) get DeiT's distillation token (`distill_token=True`).
"""

from __future__ import annotations

import re

# name: (width, depth, mlp_dim, num_heads), as timm's vision_transformer.py defines them.
VIT_SIZES = {
    "tiny": (192, 12, 768, 3), "small": (384, 12, 1536, 6), "medium": (512, 12, 2048, 8),
    "base": (768, 12, 3072, 12), "large": (1024, 24, 4096, 16),
    "huge": (1280, 32, 5120, 16), "so400m": (1152, 27, 4304, 16),
    # DINOv2's giant: SwiGLU with a hidden width of 4096 (timm's packed fc1 is 8192 wide).
    "giant": (1536, 40, 4096, 24),
}
# name: (depths, dims), as timm's convnext.py defines them (v1 and v2 share them).
CONVNEXT_SIZES = {
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "xlarge": ((3, 3, 27, 3), (256, 512, 1024, 2048)),
    "huge": ((3, 3, 27, 3), (352, 704, 1408, 2816)),
}
IMAGENET = "normalize((0.485,0.456,0.406),(0.229,0.224,0.225))"
MINUS_ONE_TO_ONE = "value_range(-1,1)"  # Mean 0.5, std 0.5: AugReg, SigLIP, Mixer.


def architecture(name: str) -> str:
  """`hf-hub:timm/convnext_tiny.fb_in1k`, `timm/convnext_tiny.fb_in1k` -> `convnext_tiny`."""
  name = name.removeprefix("hf-hub:").split("@")[0]
  return name.rsplit("/", 1)[-1].split(".")[0]


def regnet_variant(flops: str) -> str:
  """timm's `regnety_NNN` digits (NNN x 10^8 FLOPs) -> the paper's name, the variant of
  `vitcls.models.regnet`: "002" -> "Y-200MF", "016" -> "Y-1.6GF", "160" -> "Y-16GF"."""
  n = int(flops)
  if n < 10:
    return f"Y-{n * 100}MF"
  return f"Y-{n / 10:.1f}GF" if n < 100 else f"Y-{n // 10}GF"


def _regnet(arch: str) -> dict:
  """regnety_NNN -> its variant; timm's _tv, _sgn and other RegNets are not RegNetY's
  sizes (`group_min_ratio`, GroupNorm, pre-activation) and are refused."""
  from vitcls import models  # pylint: disable=g-import-not-at-top  # Reads source: no flax.
  m = re.fullmatch(r"regnety_(\d{3,4})", arch)
  if not m or regnet_variant(m.group(1)) not in models.field_rules("regnet")["variant"]:
    raise ValueError(arch)
  return dict(variant=regnet_variant(m.group(1)))


def _vit(arch: str) -> tuple[dict, str]:
  m = re.fullmatch(r"(vit|deit|deit3)_([a-z0-9]+)(_distilled)?_patch(\d+)(?:_(.*))?", arch)
  if not m or m.group(2) not in VIT_SIZES:
    raise ValueError(arch)
  family, size, patch, rest = m.group(1), m.group(2), int(m.group(4)), m.group(5) or ""
  width, depth, mlp_dim, heads = VIT_SIZES[size]
  cfg = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads, patch_size=patch,
             pool_type="tok", gelu_approximate=False)
  norm = IMAGENET
  if m.group(3):  # DeiT's distillation token and its head.
    cfg["distill_token"] = True
  if rest.endswith("dinov2"):
    cfg["layer_scale_init"] = 1e-5
    registers = re.match(r"reg(\d+)_", rest)
    if registers:
      cfg["num_registers"] = int(registers.group(1))
    if size == "giant":
      cfg["mlp_type"] = "swiglu"
  elif "siglip" in rest:
    cfg.update(class_token=False, pool_type="gap" if "_gap" in rest else "map")
    norm = MINUS_ONE_TO_ONE
  elif family == "deit3":
    cfg["layer_scale_init"] = 1e-6
  elif family == "vit":  # AugReg and the original ViT weights: inputs in [-1, 1].
    norm = MINUS_ONE_TO_ONE
  return cfg, norm


def model_config(name: str) -> tuple[str, dict, str]:
  """(vitcls model_name, config.model, normalisation pp op) for a timm architecture.

  `name` is an architecture (`deit3_small_patch16_224`) or a Hub name
  (`hf-hub:timm/deit3_small_patch16_224.fb_in22k_ft_in1k`).
  """
  arch = architecture(name)
  try:
    if arch.startswith(("vit_", "deit_", "deit3_")):
      cfg, norm = _vit(arch)
      return "vit", cfg, norm
    m = re.fullmatch(r"convnext(v2)?_([a-z]+)", arch)
    if m and m.group(2) in CONVNEXT_SIZES:
      depths, dims = CONVNEXT_SIZES[m.group(2)]
      return "convnext", dict(depths=depths, dims=dims, version=2 if m.group(1) else 1), \
          IMAGENET
    if arch.startswith("regnety_"):
      return "regnet", _regnet(arch), IMAGENET
    m = re.fullmatch(r"mixer_([sbl])(16|32)_224", arch)
    if m:
      return "mixer", dict(variant=f"{m.group(1).upper()}/{m.group(2)}",
                           gelu_approximate=False), MINUS_ONE_TO_ONE
    raise ValueError(arch)
  except ValueError:
    raise ValueError(
        f"timm architecture '{arch}' is not one vitcls reads: vit_/deit_/deit3_ "
        f"(AugReg, DeiT, distilled DeiT, DeiT-III, DINOv2 with or without registers, "
        f"SigLIP), convnext_/convnextv2_, mixer_ and regnety_NNN models are") from None
