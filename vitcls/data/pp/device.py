"""JAX twins of pp ops, and the training split kept whole on the devices.

The plan (vitcls.data.pp.planning) decides which calls of a spec run in the jitted step;
this module builds them: `augmenter` for `input.on_device` (random ops, drawing from the
step's key) and `finisher` for `input.normalize_on_device` (closing value_range /
normalize, drawing nothing). Each twin is named by its op's registry entry
(`OpInfo.jax_twin`) and takes the host op's arguments.

For a dataset that fits in device memory (mnist5k is 3 MB), the host pipeline is pure
overhead: on a CPU-only machine its threads take cores from the step, and on an
accelerator they feed it through PCIe. With `config.input.on_device`, the host part
runs once per example (`load`), the results are stacked and placed on every device, and
the step gathers its batch (`gather`) and augments it.

What stays the same: which examples make up the batch of step k (the index stream is
`pipeline.train_dataset` over example indices, shuffled or class-balanced exactly as the
host pipeline), and the contract that the batch of step k is a pure function of
(seed, k), so a resumed run trains on the same batches. What differs from the host ops:
the augmentation draws come from JAX's PRNG (key `fold_in(state.rng, step)`, then
`_AUG_SALT`, then the example's position in the global batch, then the op's position in
the device part) instead of NumPy's, so the two modes see differently shifted images.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vitcls.data.pp import label, registry
from vitcls.data.pp.image import normalize_constants
from vitcls.data.pp.registry import DeviceInputError
from vitcls.errors import shown

_AUG_SALT = 0x617567  # "aug": keeps augmentation draws apart from dropout and mixing.
MAX_BYTES = 4 << 30  # Datasets above this stay on the host pipeline.

Batch = dict[str, jax.Array]
DeviceOp = Callable[[Batch, jax.Array], Batch]  # (global batch, per-example keys [B]).


def _device_ops(calls: Sequence[registry.Call]) -> list[DeviceOp]:
  ops = []
  for text, name, args, kwargs in calls:
    try:
      ops.append(registry.get(name).jax_factory()(*args, **kwargs))
    except (TypeError, ValueError) as e:
      raise DeviceInputError(f"bad arguments for pp op {shown(text)}: {shown(e)}") from e
  return ops


def augmenter(calls: Sequence[registry.Call]) -> Callable[[Batch, jax.Array], Batch]:
  """`augment(batch, key)`: the calls (a plan's device part) on a global batch.

  Example i of the batch draws from `fold_in(key, i)`, op j from `fold_in(that, j)`:
  nothing depends on how the batch is split over devices or processes.
  """
  ops = _device_ops(calls)

  def augment(batch: Batch, key: jax.Array) -> Batch:
    size = next(iter(batch.values())).shape[0]
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(size))
    batch = dict(batch)
    for j, op in enumerate(ops):
      batch = op(batch, jax.vmap(lambda k, j=j: jax.random.fold_in(k, j))(keys))
    return batch
  return augment


def finisher(calls: Sequence[registry.Call]) -> Callable[[Batch], Batch]:
  """`finish(batch)`: calls that draw nothing (a plan's closing value_range / normalize
  under `input.normalize_on_device`) on a global batch, in the host's float32 arithmetic,
  within an ulp of it."""
  ops = _device_ops(calls)

  def finish(batch: Batch) -> Batch:
    batch = dict(batch)
    for op in ops:
      batch = op(batch, None)
    return batch
  return finish


def augmentation_key(rng: jax.Array, step: jax.Array) -> jax.Array:
  """The key of step `step`'s augmentation, from the state's rng as dropout's is."""
  return jax.random.fold_in(jax.random.fold_in(rng, step), _AUG_SALT)


def load(source, host: registry.Preprocess) -> dict[str, np.ndarray]:
  """Every example of `source` through `host` (a resident plan's host part), stacked.

  Only numeric features that have one shape across examples are kept (file paths and
  ragged features stay behind, as they do in batches); the host part draws nothing, so
  its results do not depend on a seed.
  """
  rng = np.random.default_rng(0)  # Unused by deterministic ops; required by the API.
  columns: dict[str, list] = {}
  for i in range(len(source)):
    example = host(source[i], rng)
    for key, value in example.items():
      value = np.asarray(value)
      if value.dtype.kind in "biufc":
        columns.setdefault(key, []).append(value)
  data = {}
  for key, values in columns.items():
    if len(values) == len(source) and len({v.shape for v in values}) == 1:
      data[key] = np.stack(values)
  total = sum(v.nbytes for v in data.values())
  if total > MAX_BYTES:
    raise DeviceInputError(
        f"input.on_device: the prepared training split is {total / 2**30:.1f} GiB, above "
        f"the {MAX_BYTES / 2**30:.0f} GiB kept on devices: set config.input.on_device="
        f"False (the host pipeline streams it)")
  return data


def gather(data: dict[str, jax.Array], index: jax.Array) -> Batch:
  """The examples `index` of the device-resident dataset, as a batch."""
  return {key: jnp.take(values, index, axis=0) for key, values in data.items()}


def check_labels(data: dict[str, np.ndarray], calls: Sequence[registry.Call]) -> None:
  """The host `onehot` rejects a label outside its depth; so does the device part, once."""
  for _, name, args, kwargs in calls:
    if name != "onehot":
      continue
    depth = int(args[0] if args else kwargs["depth"])
    key = kwargs.get("key", args[1] if len(args) > 1 else "label")
    if key in data and data[key].size:
      bad = data[key][(data[key] < 0) | (data[key] >= depth)]
      if bad.size:
        raise DeviceInputError(f"label {int(bad[0])} is outside onehot({depth})")


# The twins, each named in its op's registration.

def _on_key(key: str, fn: Callable[[jax.Array, jax.Array], jax.Array]) -> DeviceOp:
  """Applies `fn(image, key)` to each example's `key` feature."""
  def op(batch, keys):
    batch[key] = jax.vmap(fn)(batch[key], keys)
    return batch
  return op


def random_shift(max_px, key="image") -> DeviceOp:
  """As the host op: shift by (dy, dx) each uniform in [-max_px, max_px], zeros fill."""
  m = int(max_px)
  if m < 0:
    raise ValueError(f"max_px must be >= 0, got {max_px}")

  def shift(img, k):
    padded = jnp.pad(img, ((m, m), (m, m), (0, 0)))
    dy, dx = jax.random.randint(k, (2,), 0, 2 * m + 1)
    return jax.lax.dynamic_slice(padded, (dy, dx, 0), img.shape)
  return _on_key(key, shift)


def random_crop(size, width=None, key="image") -> DeviceOp:
  """As the host op: a (size, width or size) window at a uniformly random position."""
  h, w = int(size), int(size if width is None else width)

  def crop(img, k):
    if h > img.shape[0] or w > img.shape[1]:
      raise ValueError(f"random_crop({h}, {w}) is larger than the {img.shape[:2]} image")
    k1, k2 = jax.random.split(k)
    top = jax.random.randint(k1, (), 0, img.shape[0] - h + 1)
    left = jax.random.randint(k2, (), 0, img.shape[1] - w + 1)
    return jax.lax.dynamic_slice(img, (top, left, 0), (h, w, img.shape[2]))
  return _on_key(key, crop)


def flip_lr(key="image") -> DeviceOp:
  """As the host op: left-right flip with probability 1/2."""
  return _on_key(key, lambda img, k: jnp.where(jax.random.bernoulli(k), img[:, ::-1], img))


def value_range(vmin=-1.0, vmax=1.0, in_min=0.0, in_max=255.0, key="image") -> DeviceOp:
  """As the host op: [in_min, in_max] linearly to [vmin, vmax], float32."""
  scale = (vmax - vmin) / (in_max - in_min)

  def op(batch, keys):
    del keys
    batch[key] = ((batch[key].astype(jnp.float32) - jnp.float32(in_min)) * jnp.float32(scale)
                  + jnp.float32(vmin))
    return batch
  return op


def normalize(mean, std, key="image") -> DeviceOp:
  """As the host op: float32 (x - 255 mean) / (255 std), per channel."""
  mean255, std255 = normalize_constants(mean, std)

  def op(batch, keys):
    del keys
    batch[key] = (batch[key].astype(jnp.float32) - mean255) / std255
    return batch
  return op


def onehot(depth, key="label", key_result="labels", on=1.0, off=0.0) -> DeviceOp:
  """As the host op: a float32 one-hot of the integer `key` (labels were checked on load)."""
  def op(batch, keys):
    del keys
    hot = jax.nn.one_hot(batch[key], int(depth), dtype=jnp.float32)
    batch[key_result] = hot * jnp.float32(on - off) + jnp.float32(off)
    return batch
  return op


keep = label.keep  # Only choose dict keys and draw nothing: the host ops serve batches.
drop = label.drop
