"""timm and Hugging Face ViT state dicts -> vitcls's ViT parameter tree (`vit.load` calls it).

Pure functions on dicts of NumPy arrays (a `.safetensors` file as `loading.read_params`
reads it: flat, dotted PyTorch names); torch is never imported. `convert` finds the
layout from the names, renames every tensor to one canonical set (`_LAYOUTS`: a table of
regexes per layout; fused projections split on the way), then lays the canonical set out
as vitcls names it (`_TARGETS`):

  Linear (out, in)            -> Dense kernel (in, out)
  q/k/v Linear (D, D)         -> `query`/`key`/`value` kernel (D, heads, D/heads); timm's
                                 fused `qkv` (3D, D) and the MAP heads' `kv` / `in_proj`
                                 are split in q, k, v order first
  attention output (D, D)     -> `out` kernel (heads, D/heads, D)
  patch Conv2d (O, I, kh, kw) -> `embedding` kernel (kh, kw, I, O)
  position embedding          -> `pos_embedding` of the patches only; the entries of the
                                 cls (distillation, register) tokens, where the file has
                                 them, are added to those tokens (the model adds no
                                 position to them)

Layouts: timm `VisionTransformer` (AugReg `vit_*`, `deit_*`, `deit3_*` (also the original
`gamma_1`), DINOv2 `vit_*_dinov2` / `*_reg4_dinov2` (also the original DINOv2 files:
`register_tokens`, `mlp.w12`/`w3`), SigLIP `vit_*_siglip_*` with `attn_pool`), timm's
distilled DeiT `deit_*_distilled_*` (`dist_token`, `head_dist`: into `distill_token=True`),
and Hugging Face transformers `ViTModel` / `ViTForImageClassification` (`vit.`),
`DeiTModel` / `DeiTForImageClassification(WithTeacher)` (`deit.`; `distillation_token`,
`cls_classifier`, `distillation_classifier`), `Dinov2Model` (`dinov2.`),
`Dinov2WithRegistersModel` (`dinov2_with_registers.`) and `SiglipVisionModel` /
`SiglipModel` / `SiglipForImageClassification` (`vision_model.`; the text tower is
dropped). Anything else, or a tensor vitcls's ViT has no place for, is one
`loading.CheckpointError` line naming it and the fix.
"""

from __future__ import annotations

import math
import re
from typing import Mapping, NamedTuple, Optional

from absl import logging
import numpy as np

from vitcls.models import loading

_B = r"(?P<i>\d+)"  # A block number.
_WB = r"(?P<p>weight|bias)"
# Canonical names: patch.{weight,bias}, cls, dist, reg, pos, blocks.I.{norm1,q,k,v,out,
# norm2,fc1,fc2}.{weight,bias}, blocks.I.ls{1,2}, norm.*, pool.{probe,q,k,v,out,norm,fc1,
# fc2}.*, pre_logits.*, head.*, head_dist.*. A rule is (regex fully matching a source
# name, canonical name with the regex's groups, parts): parts splits the tensor in equal
# pieces along axis 0, one per name (`{}` in the canonical name); None as canonical name
# drops the tensor.
_TIMM = (
    (r"patch_embed\.proj\." + _WB, "patch.{p}"),
    (r"cls_token", "cls"),
    (r"dist_token", "dist"),  # Distilled DeiT (VisionTransformerDistilled).
    (r"reg_token|register_tokens", "reg"),
    (r"pos_embed", "pos"),
    (r"mask_token", None),  # DINOv2's masked-image-modelling token: unused at inference.
    (rf"blocks\.{_B}\.norm(?P<n>[12])\." + _WB, "blocks.{i}.norm{n}.{p}"),
    (rf"blocks\.{_B}\.attn\.qkv\." + _WB, "blocks.{i}.{}.{p}", ("q", "k", "v")),
    (rf"blocks\.{_B}\.attn\.proj\." + _WB, "blocks.{i}.out.{p}"),
    (rf"blocks\.{_B}\.(?:ls(?P<n>[12])\.gamma|gamma_(?P<m>[12]))", "blocks.{i}.ls{n}{m}"),
    (rf"blocks\.{_B}\.mlp\.(?:fc1|w12)\." + _WB, "blocks.{i}.fc1.{p}"),
    (rf"blocks\.{_B}\.mlp\.(?:fc2|w3)\." + _WB, "blocks.{i}.fc2.{p}"),
    (r"norm\." + _WB, "norm.{p}"),
    (r"attn_pool\.latent", "pool.probe"),
    (r"attn_pool\.q\." + _WB, "pool.q.{p}"),
    (r"attn_pool\.kv\." + _WB, "pool.{}.{p}", ("k", "v")),
    (r"attn_pool\.proj\." + _WB, "pool.out.{p}"),
    (r"attn_pool\.norm\." + _WB, "pool.norm.{p}"),
    (r"attn_pool\.mlp\.(?P<f>fc[12])\." + _WB, "pool.{f}.{p}"),
    (r"pre_logits\.fc\." + _WB, "pre_logits.{p}"),
    (r"head\." + _WB, "head.{p}"),
    (r"head_dist\." + _WB, "head_dist.{p}"),
)
_HF_LAYER = r"encoder\.layer\." + _B
_HF_VIT = (  # ViT, DeiT and DINOv2 (+registers) share the embeddings and the attention.
    (r"embeddings\.cls_token", "cls"),
    (r"embeddings\.distillation_token", "dist"),  # DeiT.
    (r"embeddings\.register_tokens", "reg"),
    (r"embeddings\.position_embeddings", "pos"),
    (r"embeddings\.mask_token", None),
    (r"embeddings\.patch_embeddings\.projection\." + _WB, "patch.{p}"),
    (_HF_LAYER + r"\.(?:layernorm_before|norm1)\." + _WB, "blocks.{i}.norm1.{p}"),
    (_HF_LAYER + r"\.(?:layernorm_after|norm2)\." + _WB, "blocks.{i}.norm2.{p}"),
    (_HF_LAYER + r"\.attention\.attention\.query\." + _WB, "blocks.{i}.q.{p}"),
    (_HF_LAYER + r"\.attention\.attention\.key\." + _WB, "blocks.{i}.k.{p}"),
    (_HF_LAYER + r"\.attention\.attention\.value\." + _WB, "blocks.{i}.v.{p}"),
    (_HF_LAYER + r"\.attention\.output\.dense\." + _WB, "blocks.{i}.out.{p}"),
    (_HF_LAYER + r"\.layer_scale(?P<n>[12])\.lambda1", "blocks.{i}.ls{n}"),
    (_HF_LAYER + r"\.(?:intermediate\.dense|mlp\.fc1|mlp\.weights_in)\." + _WB,
     "blocks.{i}.fc1.{p}"),
    (_HF_LAYER + r"\.(?:output\.dense|mlp\.fc2|mlp\.weights_out)\." + _WB,
     "blocks.{i}.fc2.{p}"),
    (r"layernorm\." + _WB, "norm.{p}"),
    (r"pooler\.dense\." + _WB, "pre_logits.{p}"),  # ViTModel's tanh pooler.
    (r"(?:cls_)?classifier\." + _WB, "head.{p}"),
    (r"distillation_classifier\." + _WB, "head_dist.{p}"),  # DeiT...WithTeacher.
)
_HF_SIGLIP_LAYER = r"encoder\.layers\." + _B
_HF_SIGLIP = (
    (r"embeddings\.patch_embedding\." + _WB, "patch.{p}"),
    (r"embeddings\.position_embedding\.weight", "pos"),
    (_HF_SIGLIP_LAYER + r"\.layer_norm(?P<n>[12])\." + _WB, "blocks.{i}.norm{n}.{p}"),
    (_HF_SIGLIP_LAYER + r"\.self_attn\.(?P<x>[qkv])_proj\." + _WB, "blocks.{i}.{x}.{p}"),
    (_HF_SIGLIP_LAYER + r"\.self_attn\.out_proj\." + _WB, "blocks.{i}.out.{p}"),
    (_HF_SIGLIP_LAYER + r"\.mlp\.(?P<f>fc[12])\." + _WB, "blocks.{i}.{f}.{p}"),
    (r"post_layernorm\." + _WB, "norm.{p}"),
    (r"head\.probe", "pool.probe"),
    (r"head\.attention\.in_proj_weight", "pool.{}.weight", ("q", "k", "v")),
    (r"head\.attention\.in_proj_bias", "pool.{}.bias", ("q", "k", "v")),
    (r"head\.attention\.out_proj\." + _WB, "pool.out.{p}"),
    (r"head\.layernorm\." + _WB, "pool.norm.{p}"),
    (r"head\.mlp\.(?P<f>fc[12])\." + _WB, "pool.{f}.{p}"),
    (r"classifier\." + _WB, "head.{p}"),
    (r"text_model\..*|logit_scale|logit_bias", None),  # SiglipModel's text side.
)


class Layout(NamedTuple):
  """A state-dict layout: how to recognise it, which name prefixes to strip, its rules."""
  name: str
  marker: str  # A name only this layout has (after stripping a prefix).
  prefixes: tuple[str, ...]
  rules: tuple
  exact_gelu: bool  # What the layout's own forward computes (nn.GELU vs tanh).
  layer_norm_eps: float = 1e-6  # Its LayerNorms' epsilon (ViTConfig: 1e-12).


_LAYOUTS = (
    Layout("timm", "patch_embed.proj.weight", ("",), _TIMM, True),
    Layout("Hugging Face ViT", "embeddings.patch_embeddings.projection.weight",
           ("vit.", ""), _HF_VIT, True, 1e-12),
    Layout("Hugging Face DINOv2", "embeddings.patch_embeddings.projection.weight",
           ("dinov2.", "dinov2_with_registers.", ""), _HF_VIT, True),
    Layout("Hugging Face DeiT", "embeddings.patch_embeddings.projection.weight", ("deit.",),
           _HF_VIT, True, 1e-12),
    Layout("Hugging Face SigLIP", "embeddings.patch_embedding.weight",
           ("vision_model.", ""), _HF_SIGLIP, False),
)

# Other architectures' state dicts, told apart by name prefixes they all have.
_OTHERS = (
    (("stem.0.", "stages.0."), "a ConvNeXt state dict (timm convnext_*)"),
    (("stem.conv.", "stages.0."), "a ResNet-v2 / BiT state dict (timm resnetv2_*)"),
    (("conv1.", "layer1."), "a ResNet state dict (torchvision / timm resnet*)"),
    (("stem.proj.", "blocks.0.mlp_tokens."), "an MLP-Mixer state dict (timm mixer_*)"),
    (("layers.0.blocks.0.attn.relative_position",), "a Swin Transformer state dict"),
    (("visual.",), "an OpenAI / OpenCLIP CLIP state dict"),
    (("features.",), "a CNN state dict (torchvision VGG / MobileNet / EfficientNet)"),
)
# What leftover tensors are, for the message that refuses them.
_UNSUPPORTED = (
    (r"(.*\.)?fc_norm\..*", "timm's fc_norm (a LayerNorm after average pooling)"),
    (r"(.*\.)?norm_pre\..*", "a LayerNorm before the blocks (CLIP towers)"),
    (r".*\.[qk]_norm\..*", "query/key normalisation"),
    (r".*attn_pool\.pos_embed", "a position embedding in the attention pool"),
)
WHAT_LOADS = ("vit loads timm ViT (vit_*, deit_*, deit3_*, *_dinov2, *_siglip_*) and "
              "Hugging Face ViT / DeiT / DINOv2 / SigLIP vision state dicts")


def _error(message: str) -> loading.CheckpointError:
  return loading.CheckpointError(message)


def detect(state: Mapping[str, np.ndarray], what: str) -> tuple[Layout, str]:
  """(layout, prefix) of a flat dotted state dict; CheckpointError for anything else."""
  keys = set(state)
  for prefixes, name in _OTHERS:  # Before the layouts: a Swin has timm's patch_embed too.
    if all(any(k.startswith(p) for k in keys) for p in prefixes):
      raise _error(f"'{what}' is {name}, not a ViT: {WHAT_LOADS}; pass one of those, or "
                   f"set config.model_name to the model of its architecture")
  for layout in _LAYOUTS:
    for prefix in layout.prefixes:
      if prefix + layout.marker not in keys:
        continue
      if layout.rules is _HF_VIT:  # ViT and DINOv2: told apart by the block's norm names.
        dinov2 = any(k.startswith(prefix + "encoder.layer.0.norm1.") for k in keys)
        if dinov2 != ("DINOv2" in layout.name):
          continue
      return layout, prefix
  if any(k.endswith("embeddings.patch_embedding.weight") for k in keys):
    raise _error(f"'{what}' has a SigLIP vision tower under an unknown prefix: "
                 f"{WHAT_LOADS}; save the vision_model.* tensors alone")
  if any(k.startswith("text_model.") for k in keys):
    raise _error(f"'{what}' holds a text tower and no image tower: {WHAT_LOADS}")
  first = ", ".join(sorted(keys)[:3])
  raise _error(f"'{what}' is a PyTorch-style state dict of no layout vit knows (names such "
               f"as {first}): {WHAT_LOADS}")


def canonical(state: Mapping[str, np.ndarray], layout: Layout, prefix: str,
              what: str) -> dict[str, np.ndarray]:
  """The tensors of `state` under the canonical names (float32, fused ones split)."""
  rules = [(re.compile(r[0]), r[1], r[2] if len(r) > 2 else None) for r in layout.rules]
  out, leftover = {}, []
  for key, value in state.items():
    # Hugging Face's task heads (classifier) and SigLIP's text side sit outside the prefix.
    name = key[len(prefix):] if prefix and key.startswith(prefix) else key
    for pattern, target, parts in rules:
      match = pattern.fullmatch(name)
      if match is None:
        continue
      if target is None:
        break
      groups = {k: v or "" for k, v in match.groupdict().items()}
      value = np.asarray(value, np.float32)
      if parts:
        for part, piece in zip(parts, np.split(value, len(parts), axis=0)):
          out[target.replace("{}", part).format(**groups)] = piece
      else:
        out[target.format(**groups)] = value
      break
    else:
      leftover.append(key)
  if leftover:
    kinds = sorted({text for k in leftover for pattern, text in _UNSUPPORTED
                    if re.fullmatch(pattern, k)})
    leftover.sort()
    shown = ", ".join(leftover[:4]) + (f" and {len(leftover) - 4} more"
                                       if len(leftover) > 4 else "")
    raise _error(f"the {layout.name} state dict '{what}' has tensors vitcls's ViT has no "
                 f"place for: {shown}{' (' + '; '.join(kinds) + ')' if kinds else ''}; "
                 f"{WHAT_LOADS} of the architectures vitcls implements")
  return out


def _heads(width: int, heads: int, what: str) -> tuple[int, int]:
  """(heads, width / heads), or one line saying the model's heads do not divide width."""
  if heads < 1 or width % heads:
    raise _error(f"'{what}' has attention projections of width {width}, which the "
                 f"model's {heads} heads do not divide: set config.model.num_heads (or "
                 f"map_num_heads) as the file was trained")
  return heads, width // heads


def _attention(c: Mapping[str, np.ndarray], src: str, dst: str, heads: int,
               what: str) -> dict[str, np.ndarray]:
  """Canonical `{src}{q,k,v,out}.*` -> flat flax MultiHeadDotProductAttention params."""
  flat = {}
  for name, module in (("q", "query"), ("k", "key"), ("v", "value")):
    w, b = c.get(f"{src}{name}.weight"), c.get(f"{src}{name}.bias")
    if w is not None:
      flat[f"{dst}/{module}/kernel"] = w.T.reshape(w.shape[1], *_heads(w.shape[0], heads,
                                                                       what))
    if b is not None:
      flat[f"{dst}/{module}/bias"] = b.reshape(_heads(b.shape[0], heads, what))
  w, b = c.get(f"{src}out.weight"), c.get(f"{src}out.bias")
  if w is not None:
    flat[f"{dst}/out/kernel"] = w.T.reshape(*_heads(w.shape[1], heads, what), w.shape[0])
  if b is not None:
    flat[f"{dst}/out/bias"] = b
  return flat


def _simple(c: Mapping[str, np.ndarray], src: str, dst: str, kind: str) -> dict:
  """One Linear ("linear": kernel = weight.T) or LayerNorm ("norm": scale = weight)."""
  names = {"linear": ("kernel", "bias"), "norm": ("scale", "bias")}[kind]
  flat = {}
  for part, leaf in zip(("weight", "bias"), names):
    value = c.get(f"{src}.{part}")
    if value is not None:
      flat[f"{dst}/{leaf}"] = value.T if leaf == "kernel" else value
  return flat


def _is_square(n: int) -> bool:
  return n > 0 and math.isqrt(n) ** 2 == n


def fold_posemb(c: dict, grid_size: Optional[int], what: str) -> None:
  """Moves the position entries of the cls / distillation / register tokens (if `pos` has
  them; in that order) onto the tokens, leaving `pos` with the patches only. Which entries
  the file has is read from its length: all prefix tokens (timm's default, original ViT),
  the class tokens only (cls and, in a distilled DeiT, dist: DINOv2, Hugging Face) or none
  (timm's `no_embed_class`: DeiT-III, DINOv2-reg, SigLIP); when two readings give square
  grids, the one of the model's grid (`grid_size`) wins."""
  if "pos" not in c:
    return
  pos = c["pos"]
  if pos.ndim == 2:  # Hugging Face SigLIP: an nn.Embedding (N, D).
    pos = pos[None]
  tokens = [(name, c[name].shape[1]) for name in ("cls", "dist", "reg") if name in c]
  num_cls = sum(n for name, n in tokens if name != "reg")
  num_reg = sum(n for name, n in tokens if name == "reg")
  options = list(dict.fromkeys((num_cls + num_reg, num_cls, 0)))
  fits = [k for k in options if _is_square(pos.shape[1] - k)]
  if not fits:
    raise _error(f"the position embedding of '{what}' has {pos.shape[1]} entries: not a "
                 f"square grid of patches after its {num_cls} class and {num_reg} register "
                 f"tokens; pass a ViT of square patch grid")
  if grid_size is not None and len(fits) > 1:
    fits = [k for k in fits if pos.shape[1] - k == grid_size] or fits
  k, start = fits[0], 0
  for name, n in tokens:  # k is a sum of leading groups: each is folded whole or not.
    if start + n <= k:
      c[name] = c[name] + pos[:, start:start + n]
      start += n
  c["pos"] = pos[:, k:]


def to_tree(c: Mapping[str, np.ndarray], num_heads: int, map_num_heads: int,
            what: str) -> dict:
  """The canonical tensors as vitcls's ViT tree (per-block `encoderblock_i`). A tensor
  the file lacks is left out, for `loading.merge` to name by its vitcls path."""
  flat: dict[str, np.ndarray] = {}
  w = c.get("patch.weight")
  if w is not None:
    if w.ndim != 4:
      raise _error(f"'{what}' embeds patches with a Linear of shape {w.shape} (SigLIP 2 "
                   f"NaFlex), which vitcls's ViT does not implement: use a fixed-resolution "
                   f"SigLIP 2 checkpoint (timm vit_*_siglip2_* or Hugging Face siglip2-*-224)")
    flat["embedding/kernel"] = w.transpose(2, 3, 1, 0)
  if "patch.bias" in c:
    flat["embedding/bias"] = c["patch.bias"]
  for name, dst in (("cls", "cls"), ("dist", "dist"), ("reg", "reg"),
                    ("pos", "pos_embedding")):
    if name in c:
      flat[dst] = c[name]
  for i in sorted({int(k.split(".")[1]) for k in c if k.startswith("blocks.")}):
    src, dst = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
    flat.update(_simple(c, src + "norm1", dst + "LayerNorm_0", "norm"))
    flat.update(_attention(c, src, dst + "MultiHeadDotProductAttention_0", num_heads, what))
    flat.update(_simple(c, src + "norm2", dst + "LayerNorm_1", "norm"))
    flat.update(_simple(c, src + "fc1", dst + "MlpBlock_0/Dense_0", "linear"))
    flat.update(_simple(c, src + "fc2", dst + "MlpBlock_0/Dense_1", "linear"))
    for n in (1, 2):
      if f"{src}ls{n}" in c:
        flat[f"{dst}LayerScale_{n - 1}/scale"] = c[f"{src}ls{n}"]
  flat.update(_simple(c, "norm", "Transformer/encoder_norm", "norm"))
  if "pool.probe" in c:
    probe = c["pool.probe"]
    if probe.shape[:2] != (1, 1):
      raise _error(f"'{what}' has an attention pool of {probe.shape[1]} latent tokens; "
                   f"vitcls's MAP head has one")
    flat["MAPHead_0/probe"] = probe
    flat.update(_attention(c, "pool.", "MAPHead_0/MultiHeadDotProductAttention_0",
                           map_num_heads, what))
    flat.update(_simple(c, "pool.norm", "MAPHead_0/LayerNorm_0", "norm"))
    flat.update(_simple(c, "pool.fc1", "MAPHead_0/MlpBlock_0/Dense_0", "linear"))
    flat.update(_simple(c, "pool.fc2", "MAPHead_0/MlpBlock_0/Dense_1", "linear"))
  flat.update(_simple(c, "pre_logits", "pre_logits", "linear"))
  head = c.get("head.weight")
  width = c["patch.weight"].shape[0] if "patch.weight" in c else None
  if head is not None and head.shape[1] == 2 * (width or 0) and "pre_logits.weight" not in c:
    logging.info("The head of %s reads [cls token, mean of the patch tokens] (Hugging Face "
                 "Dinov2ForImageClassification), which vitcls's head does not: it stays "
                 "fresh.", what)
  else:
    flat.update(_simple(c, "head", "head", "linear"))
  flat.update(_simple(c, "head_dist", "head_dist", "linear"))
  return loading.unflatten(flat)


def convert(state: Mapping[str, np.ndarray], num_heads: int,
            map_num_heads: Optional[int] = None, grid_size: Optional[int] = None,
            what: str = "checkpoint") -> tuple[dict, Layout]:
  """A timm / Hugging Face ViT state dict -> (vitcls ViT params tree, its layout).

  num_heads / map_num_heads: the model's attention heads (of the blocks, of the MAP head),
  which the file does not record and its q/k/v kernels are split by. grid_size: the
  model's number of patches, to read an ambiguous position embedding (see `fold_posemb`).
  The tree has per-block `encoderblock_i`, a patches-only `pos_embedding` and whatever the
  file has of cls, dist, registers, LayerScale, MAP head, pre_logits, head and head_dist
  (a distilled DeiT's); fitting it to a
  model (scan, resampling, fresh head, config checks) is `vit.load`'s.
  """
  layout, prefix = detect(state, what)
  c = canonical(state, layout, prefix, what)
  fold_posemb(c, grid_size, what)
  return to_tree(c, num_heads, map_num_heads or num_heads, what), layout
