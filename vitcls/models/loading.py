"""Reading and writing parameter checkpoints shared by the model files' `load` functions.

Published checkpoints are `.npz` files of flat `/`-joined keys (big_vision,
vision_transformer, BiT); a vitcls workdir's params are read by `vitcls.run.checkpoint` and
arrive here as a tree. `read_params` turns either into one nested dict of NumPy arrays
(models know nothing of the workdir format); `merge` lays it onto a freshly initialised
tree, keeping the init where asked (`dont_load`) and failing in one line on any other
mismatch; `write_npz` writes the flat layout back out. `resample_grid` is the bilinear
resampling of position embeddings, a pure jnp function a model can also call at apply time.
"""

from __future__ import annotations

import os
import re
import zipfile
from typing import Iterable, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from vitcls.errors import UserError
from vitcls.run import workdir as wdir


class CheckpointError(UserError):
  """A checkpoint file cannot be read, or does not fit the model it is loaded into."""


def flatten(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
  """{'a': {'b': x}} -> {'a/b': x}; leaves are kept as they are."""
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(flatten(value, name + "/"))
    else:
      flat[name] = value
  return flat


def unflatten(flat: Mapping[str, np.ndarray]) -> dict:
  """{'a/b': x} -> {'a': {'b': x}}."""
  tree: dict = {}
  for name, value in flat.items():
    *parents, leaf = name.split("/")
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def read_npz(path: str) -> dict[str, np.ndarray]:
  """All arrays of an `.npz` file by key; never unpickles; one clear error otherwise."""
  if not os.path.isfile(path):
    raise CheckpointError(f"checkpoint file '{path}' does not exist: pass the path of an "
                          f".npz file or of a vitcls workdir")
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic not in (b"PK\x03\x04", b"PK\x05\x06"):  # Every .npz is a zip archive.
    raise CheckpointError(f"checkpoint '{path}' is not an .npz file (not a zip archive): "
                          f"pass an .npz of arrays, or a vitcls workdir")
  try:
    with np.load(path, allow_pickle=False) as npz:
      return {key: np.asarray(npz[key]) for key in npz.files}
  except ValueError as e:
    if "allow_pickle" in str(e) or "pickle" in str(e).lower():
      raise CheckpointError(
          f"checkpoint '{path}' holds pickled Python objects, which vitcls never loads "
          f"(they can run code): re-save it with numeric arrays only") from None
    raise CheckpointError(f"checkpoint '{path}' is not a readable .npz file: "
                          f"{str(e).splitlines()[0]}") from None
  except (zipfile.BadZipFile, EOFError, OSError, KeyError) as e:
    detail = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise CheckpointError(f"checkpoint '{path}' is not a complete .npz file (truncated or "
                          f"another format: {detail}): download or export it again") from None


def write_npz(path: str, tree: Mapping) -> None:
  """Writes `tree` as an `.npz` of flat `/`-joined keys; atomically (temp file, rename)."""
  flat = {k: np.asarray(v) for k, v in flatten(tree).items()}
  with wdir.atomic_file(path, "wb", kind=wdir.NPZ) as f:
    np.savez(f, **flat)


TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl", ".pickle")


def _is_torch_pickle(path: str) -> bool:
  """A PyTorch `torch.save` file: a zip holding `*/data.pkl`, or a bare pickle stream."""
  if path.endswith(TORCH_SUFFIXES):
    return True
  with open(path, "rb") as f:
    head = f.read(2)
  if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
    return True  # A pickle protocol 2-5 header: torch's legacy format.
  if not zipfile.is_zipfile(path):
    return False
  try:
    with zipfile.ZipFile(path) as z:
      return any(n.endswith("data.pkl") for n in z.namelist())
  except (zipfile.BadZipFile, OSError):
    return False


def refuse_torch_pickle(path: str) -> None:
  """One line telling how to turn a PyTorch pickle into safetensors; never unpickles it."""
  if os.path.isfile(path) and _is_torch_pickle(path):
    out = os.path.splitext(path)[0] + ".safetensors"
    raise CheckpointError(
        f"checkpoint '{path}' is a PyTorch pickle, which vitcls never unpickles (loading it "
        f"can run code): convert it to safetensors where torch is installed, e.g. python -c "
        f"\"import torch, safetensors.torch as st; sd = torch.load('{path}', "
        f"map_location='cpu', weights_only=True); sd = sd.get('model', sd); "
        f"st.save_file({{k: v.contiguous() for k, v in sd.items()}}, '{out}')\", then pass "
        f"the .safetensors file")


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a `.safetensors` file by their (dotted, PyTorch-style) names.

  Read with the `safetensors` NumPy reader: no torch, no pickle. bfloat16 tensors come as
  `ml_dtypes.bfloat16` arrays.
  """
  from safetensors import SafetensorError  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise CheckpointError(f"checkpoint file '{path}' does not exist: pass the path of a "
                          f".safetensors file")
  try:
    return {k: np.asarray(v) for k, v in load_file(path).items()}
  except (SafetensorError, OSError, ValueError) as e:
    raise CheckpointError(f"checkpoint '{path}' is not a complete .safetensors file "
                          f"({str(e).splitlines()[0]}): download or convert it again") from None


def is_torch_layout(tree: Mapping) -> bool:
  """True for the flat, dotted names of a timm / Hugging Face state dict
  (`blocks.0.attn.qkv.weight`), False for the `/`-nested trees of JAX checkpoints."""
  return (bool(tree) and all(isinstance(v, np.ndarray) for v in tree.values())
          and any("." in k for k in tree))  # timm's `cls_token`, `pos_embed` have no dot.


def read_params(checkpoint) -> dict:
  """Parameters from a params tree (copied: callers may edit the result), an `.npz` file
  or a `.safetensors` file.

  An npz holding a whole training state (`params/...`, `opt/target/...`) gives its
  parameters; an npz of bare parameters is returned as it is. A `.safetensors` file
  (timm / Hugging Face) is returned flat, under its dotted PyTorch names, for the model's
  `load` to convert (`is_torch_layout`). A PyTorch pickle is refused with how to convert
  it. A vitcls workdir is read by its caller (`vitcls.run.checkpoint.load_params`), which
  passes the tree.
  """
  if isinstance(checkpoint, Mapping):
    return unflatten(flatten(checkpoint))
  if os.path.isdir(checkpoint):
    raise CheckpointError(f"checkpoint '{checkpoint}' is a folder: pass an .npz file, or "
                          f"the params of a vitcls workdir (vitcls.run.checkpoint.load_params)")
  refuse_torch_pickle(checkpoint)
  if str(checkpoint).endswith(".safetensors"):
    return read_safetensors(checkpoint)
  tree = unflatten(read_npz(checkpoint))
  if isinstance(tree.get("params"), dict):
    return tree["params"]
  if isinstance(tree.get("opt"), dict) and isinstance(tree["opt"].get("target"), dict):
    return tree["opt"]["target"]
  return tree


def read_model_params(checkpoint, origin: str, *, family: str, top_level: tuple[str, ...],
                      from_torch) -> tuple[dict, str]:
  """A checkpoint of one model family as a vitcls tree of NumPy arrays, and how messages
  name it (`describe`).

  A flat PyTorch state dict (a `.safetensors` file) goes through `from_torch(flat, what)`;
  a vitcls tree (a workdir's params, an `.npz`) must have the `top_level` names, or it is
  another model's: one CheckpointError saying so.
  """
  what = describe(checkpoint, origin)
  restored = read_params(checkpoint)
  # A state dict is flat (vitcls trees nest), and some of its names need not have a dot
  # (a ViT's `cls_token`).
  if restored and not any(isinstance(v, Mapping) for v in restored.values()):
    restored = from_torch(restored, what)
  elif not all(k in restored for k in top_level):
    names = ", ".join(sorted(restored)[:4]) or "nothing"
    raise CheckpointError(
        f"'{what}' is not a vitcls {family} checkpoint (its top-level parameters are "
        f"{names}, not {' and '.join(top_level)}): pass a {family} checkpoint, or set "
        f"config.model_name to the checkpoint's model")
  return jax.tree_util.tree_map(np.asarray, restored), what


def describe(checkpoint, origin: str = "") -> str:
  """How messages name a checkpoint: `origin` (where the caller read the tree), else its
  path, else 'given params'."""
  if origin:
    return origin
  return "given params" if isinstance(checkpoint, Mapping) else str(checkpoint)


def resample_grid(grid, new_hw: tuple[int, int]):
  """Bilinear resampling of an (h, w, c) grid to `new_hw`, corners kept in place.

  The same maths as `scipy.ndimage.zoom(grid, (new_h/h, new_w/w, 1), order=1)` (output
  pixel i reads input coordinate i*(n_in-1)/(n_out-1)), written in jnp so a model can
  call it at apply time too. Weights are computed from the static shapes, so it jits.
  """
  grid = jnp.asarray(grid)
  for axis, new in enumerate(new_hw):
    old = grid.shape[axis]
    if new == old:
      continue
    pos = np.arange(new) * ((old - 1) / (new - 1)) if new > 1 else np.zeros(1)
    lo = np.clip(np.floor(pos).astype(np.int32), 0, max(old - 2, 0))
    hi = np.minimum(lo + 1, old - 1)
    frac = (pos - lo).astype(np.float32)
    shape = [1] * grid.ndim
    shape[axis] = new
    frac = jnp.asarray(frac.reshape(shape), grid.dtype)
    grid = (jnp.take(grid, lo, axis=axis) * (1 - frac)
            + jnp.take(grid, hi, axis=axis) * frac)
  return grid


def merge(restored: Mapping, init: Mapping, dont_load: Iterable[str] = (),
          fresh: Iterable[str] = (), source: str = "checkpoint") -> dict:
  """The `init` tree with every leaf taken from `restored`, except where told not to.

  dont_load: regexes (full match on the `/`-joined path) of leaves kept from `init`.
  fresh: regexes of leaves kept from `init` when `restored` lacks them or has another
    shape (the head, when the class count changes). Any other missing leaf or shape
    mismatch raises one CheckpointError naming the parameter; leaves of `restored` the
    model has no use for are ignored with a warning.
  """
  skip = [re.compile(p) for p in dont_load]
  fresh = [re.compile(p) for p in fresh]
  loaded, init_flat = flatten(restored), flatten(init)
  merged, missing, kept = {}, [], []
  for name, value in init_flat.items():
    if any(p.fullmatch(name) for p in skip):
      merged[name] = value
      kept.append(name)
      continue
    is_fresh = any(p.fullmatch(name) for p in fresh)
    if name not in loaded:
      if is_fresh:
        merged[name] = value
        kept.append(name)
      else:
        missing.append(name)
      continue
    new = loaded[name]
    if np.shape(new) != np.shape(value):
      if is_fresh:
        logging.info("Fresh init for %s: %s in the %s, %s in the model.", name,
                     np.shape(new), source, np.shape(value))
        merged[name] = value
        kept.append(name)
        continue
      raise CheckpointError(
          f"parameter '{name}' has shape {tuple(np.shape(new))} in the {source} but "
          f"{tuple(np.shape(value))} in the model: use a config of the same size, or add "
          f"the parameter to config.model_load.dont_load to keep its fresh init")
    merged[name] = np.asarray(new, dtype=np.asarray(value).dtype)
  if missing:
    raise CheckpointError(
        f"the {source} has no parameter {', '.join(repr(m) for m in missing[:5])}"
        f"{' and more' if len(missing) > 5 else ''} that the model needs: check "
        f"config.model, or add it to config.model_load.dont_load to keep its fresh init")
  unused = sorted(set(loaded) - set(init_flat))
  if unused:
    logging.warning("Not loaded (the model has no such parameter): %s", ", ".join(unused))
  if kept:
    logging.info("Kept from the fresh init: %s", ", ".join(kept))
  return unflatten(merged)
