"""The input pipeline: grain over a random-access source, delivering global jax.Arrays.

Contract (what exact resume relies on): the training stream is the source shuffled
globally per epoch from `seed` (grain's index shuffle, reseeded each epoch), repeated
without end, with per-example preprocessing randomness seeded by (seed, position in the
stream). Global batch k holds stream positions [k*B, (k+1)*B); process p of P holds the
contiguous slice [k*B + p*B/P, k*B + (p+1)*B/P). So the batch of step k is a pure function
of (seed, k, process layout), and the *global* batch is a function of (seed, k) alone:
resuming at step k builds the stream at k directly, without replaying earlier steps.
"""

from __future__ import annotations

import collections
from typing import Any, Iterator

import grain
import jax
import numpy as np

from vitcls.data import preprocess


def _check_divisible(global_batch: int, process_count: int) -> int:
  if global_batch % process_count:
    raise ValueError(f"batch size {global_batch} is not divisible by the number of "
                     f"processes {process_count}: change input.batch_size")
  return global_batch // process_count


def train_dataset(source, pp: preprocess.Preprocess, *, global_batch: int, seed: int,
                  start_step: int = 0, process_index: int = 0,
                  process_count: int = 1) -> grain.MapDataset:
  """Element i is this process's part of global batch `start_step + i` (dict of arrays)."""
  local_batch = _check_divisible(global_batch, process_count)
  ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat()
  ds = ds.random_map(pp)
  ds = ds.batch(local_batch, drop_remainder=True)  # Local batch j = positions j*b..(j+1)*b.
  ds = ds[process_index::process_count]  # Local batch k*P + p is this process's part of k.
  return ds[start_step:]


def eval_dataset(source, pp: preprocess.Preprocess, *, global_batch: int,
                 process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """The whole source once, in order, padded to full global batches.

  Each example gets `_mask` (1 real, 0 padding) so metrics count every real example
  exactly once, whatever the batch size and process count.
  """
  local_batch = _check_divisible(global_batch, process_count)
  n = len(source)
  padded = -(-n // global_batch) * global_batch

  def load(index: int) -> dict[str, Any]:
    example = pp(source[min(index, n - 1)], np.random.default_rng(index))
    example["_mask"] = np.float32(index < n)
    return example

  ds = grain.MapDataset.range(padded).map(load).batch(local_batch, drop_remainder=True)
  return ds[process_index::process_count]


def to_global(local_batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  """Assembles each process's local arrays into global arrays on `sharding`."""
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      local_batch)


def iterate(ds: grain.MapDataset, sharding, *, num_threads: int = 4, prefetch: int = 4,
            num_workers: int = 0,
            device_prefetch: int = 2) -> Iterator[dict[str, jax.Array]]:
  """Yields global batches; `device_prefetch` of them are already placed on devices.

  Host-side, grain prepares `prefetch` batches with `num_threads` threads, in
  `num_workers` worker processes when above 0 (for preprocessing that the GIL would
  serialise; the order, and so every batch, is the same); device-side, the next batches
  are transferred while the current step runs, so in steady state the step never waits
  on the host as long as the host keeps up.
  """
  host_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                 prefetch_buffer_size=prefetch))
  if num_workers > 0:
    host_ds = host_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  host = iter(host_ds)
  queue = collections.deque()
  for local in host:
    queue.append(to_global(local, sharding))
    if len(queue) > device_prefetch:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
