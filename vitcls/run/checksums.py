"""Checksums of a checkpoint's arrays: flipped bytes that still decode are found at restore.

orbax's OCDBT files keep no checksum of the values, so a byte flipped on disk inside a
stored chunk usually still decompresses and restores as a wrong value, without an error.
Each save therefore records, in the step's own metadata (`_CHECKPOINT_METADATA`, written
with the step, atomically), two 32-bit sums per array of the state as it was in memory:
the plain sum of its 32-bit words and the sum of each word times an odd weight (2i + 1 for
the word at flat position i), both modulo 2**32. A single flipped bit changes the weighted
sum by an odd multiple of a power of two below 2**32, never by 0 modulo 2**32, so it is
always found; more damage goes unnoticed only when both sums happen to cancel.

The sums are computed where the arrays live: on the devices for a (sharded) training state,
in one jitted reduction whose result is a few bytes on the host, so a save costs no copy of
the state beyond orbax's own; with NumPy for weights read onto the host (`vitcls.evaluate`,
`predict`, `export`). Both give the same numbers (integer sums do not depend on the order).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

METADATA_KEY = "vitcls_checksums"  # In the step's custom metadata: {path: "sum:weighted"}.


def path_name(path) -> str:
  """'params/Transformer/head/kernel': a leaf's path in the state tree, as the checkpoint's
  metadata and `vitcls.run.checkpoint` name it."""
  parts = []
  for entry in path:
    for attr in ("key", "idx", "name"):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
    else:
      parts.append(str(entry))
  return "/".join(parts)


def _format(pair) -> str:
  return f"{int(pair[0]):08x}:{int(pair[1]):08x}"


# On the devices.

def _words_jax(x: jax.Array) -> jax.Array:
  """x's bits as uint32 words (narrower types widened, 64-bit ones split in two)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  size = jnp.dtype(x.dtype).itemsize
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[size]
  words = jax.lax.bitcast_convert_type(x, unsigned)
  return words.astype(jnp.uint32)


def _sums_jax(x: jax.Array) -> jax.Array:
  """[sum, weighted sum] of x's words modulo 2**32, without reshaping x (a sharded array
  stays where it is; XLA reduces across devices)."""
  words = _words_jax(x)
  if words.ndim == 0:
    words = words[None]
  flat_index = jnp.zeros(words.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(words.ndim)):
    flat_index += jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * np.uint32(
        stride % 2**32)
    stride *= words.shape[axis]
  weights = flat_index * np.uint32(2) + np.uint32(1)
  return jnp.stack([jnp.sum(words, dtype=jnp.uint32),
                    jnp.sum(words * weights, dtype=jnp.uint32)])


@functools.lru_cache(maxsize=None)
def _summer(replicated):
  """The jitted sums of a list of arrays, replicated on every device (every process can
  read them)."""
  return jax.jit(lambda leaves: [_sums_jax(x) for x in leaves], out_shardings=replicated)


def _replicated(x):
  sharding = getattr(x, "sharding", None)
  if isinstance(sharding, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  return None


def of_state(state) -> dict[str, str]:
  """{path: checksum} of every array in `state` (a pytree of jax.Arrays, maybe sharded)."""
  flat = [(path_name(p), x) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]
          if hasattr(x, "dtype")]
  if not flat:
    return {}
  sums = jax.device_get(_summer(_replicated(flat[0][1]))([x for _, x in flat]))
  return {name: _format(s) for (name, _), s in zip(flat, sums)}


# On the host.

def _sums_numpy(x: np.ndarray) -> tuple[int, int]:
  x = np.asarray(x)
  if x.dtype == np.bool_:
    x = x.astype(np.uint8)
  size = x.dtype.itemsize
  unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}[size]
  words = np.ascontiguousarray(x).view(unsigned).astype(np.uint32).ravel()
  weights = np.arange(words.size, dtype=np.uint64).astype(np.uint32) * np.uint32(2) + \
      np.uint32(1)
  return (int(np.sum(words, dtype=np.uint32)), int(np.sum(words * weights, dtype=np.uint32)))


def of_arrays(tree, prefix: str = "") -> dict[str, str]:
  """{path: checksum} of a nested dict of NumPy arrays, paths under `prefix`."""
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = path_name(path)
    out[f"{prefix}/{name}" if prefix else name] = _format(_sums_numpy(x))
  return out


def mismatch(stored: dict[str, str] | None, actual: dict[str, str]) -> str | None:
  """Why `actual` does not match the checksums a save `stored`, or None if it does (or if
  the checkpoint has none: one written before checksums existed). Only arrays present in
  both are compared: a reader may read part of a state (the params only)."""
  if not stored:
    return None
  bad = sorted(name for name, value in actual.items()
               if name in stored and stored[name] != value)
  if not bad:
    return None
  more = f" and {len(bad) - 1} more arrays" if len(bad) > 1 else ""
  return (f"the values of {bad[0]}{more} differ from the checksums written with it: "
          f"bytes changed on disk")
