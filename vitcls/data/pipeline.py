"""The input pipeline: grain over a random-access source, delivering global jax.Arrays.

Contract (what exact resume relies on): the training stream is an endless sequence of
source examples that is a pure function of (seed, position), with per-example
preprocessing randomness seeded by (seed, position in the stream). By default it is the
source shuffled globally per epoch from `seed` (grain's index shuffle, reseeded each
epoch), repeated without end. With `balanced_labels` it is class-balanced instead (see
`BalancedSource`): positions come in blocks of k, the number of classes present; block b
visits every class once, in an order drawn from (seed, b); and the j-th visit to class c,
made in block j, takes the next example of c's own epochs, each a shuffle drawn from
(seed, c, epoch). With `repeats` r > 1 (repeated augmentation, DeiT's RASampler) each
position of that stream is seen r times, its copies at least B//r apart (see
`RepeatedStream`); every copy is its own stream position, so it gets its own
preprocessing randomness. Global batch k holds stream positions [k*B, (k+1)*B); process p
of P holds the contiguous slice [k*B + p*B/P, k*B + (p+1)*B/P). So the batch of step k is a
pure function of (seed, k, process layout), and the *global* batch is a function of
(seed, k) alone: resuming at step k builds the stream at k directly, without replaying
earlier steps.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import sys
from typing import Any, Iterator

import grain
from grain import experimental as grain_experimental
import jax
import numpy as np

from vitcls.data.pp.registry import Preprocess


def _check_divisible(global_batch: int, process_count: int) -> int:
  if global_batch % process_count:
    raise ValueError(f"batch size {global_batch} is not divisible by the number of "
                     f"processes {process_count}: change input.batch_size")
  return global_batch // process_count


# The length of the balanced stream: it has no epochs to repeat (each class runs through
# its own epochs at its own pace, and every block's order is drawn afresh, so the stream
# never cycles), so it is simply unbounded, like the ordinary stream after `.repeat()`
# (the same sys.maxsize), and no length ever needs to be a multiple of k or of any class
# size. Positions are Python ints and every seed is hashed from them, so nothing
# overflows or wraps within this length.
_UNBOUNDED = sys.maxsize


# Permutations of at most this many elements are drawn whole with NumPy and cached;
# larger ones go through grain's index shuffle, which maps one index in O(1) but is slow
# on small domains (milliseconds per call below ~100 elements in grain 0.2.18, a few
# microseconds above ~4,000).
_SMALL_PERMUTATION = 4096


@functools.lru_cache(maxsize=2048)  # A block order and each class's epoch; <= 16 MB.
def _small_permutation(n: int, words: tuple[int, ...]) -> np.ndarray:
  perm = np.random.default_rng(words).permutation(n).astype(np.uint16)
  perm.flags.writeable = False
  return perm


@functools.lru_cache(maxsize=4096)
def _seed32(words: tuple[int, ...]) -> int:
  return int(np.random.SeedSequence(words).generate_state(1, np.uint32)[0])


def _shuffled(index: int, n: int, words: tuple[int, ...]) -> int:
  """Element `index` of a permutation of range(n) drawn from the integers `words`.

  A pure function whose cost is bounded whatever n: NumPy's PCG64 from
  SeedSequence(words) up to _SMALL_PERMUTATION elements (drawn whole once, then cached),
  grain's index shuffle above, seeded from a SeedSequence hash of `words` (hashing keeps
  distinct tuples from sharing seeds, as consecutive integers would: grain reseeds each
  epoch with seed + epoch). Both are defined bit-exactly, so every process and machine
  (on the same NumPy) draws the same.
  """
  if n <= _SMALL_PERMUTATION:
    return int(_small_permutation(n, words)[index])
  return grain_experimental.index_shuffle(index, max_index=n - 1, seed=_seed32(words),
                                          rounds=4)


class BalancedSource:
  """`source` seen through class-balanced sampling: position i is source[index(i)].

  Positions come in blocks of k, the number of classes present in `labels`; block b
  visits every class once, in an order drawn from (seed, b). So every class gets exactly
  1/k of every block, whatever its size. Class c's j-th visit is made in block j, so it
  takes element j of c's own stream of examples: its epochs back to back, epoch e a
  shuffle of c's examples drawn from (seed, c, e). Within an epoch a class's examples are
  seen without replacement; small classes simply run through more epochs than large ones.

  `index(i)` is O(1) (two draws from `_shuffled`, mostly cache hits in a stream read in
  order), a pure function of (seed, labels, i): the same fresh or resumed, in any
  process, on any machine. It has no end (see `_UNBOUNDED`), so it takes no `.shuffle()`
  or `.repeat()`.
  """

  def __init__(self, source, labels, seed: int):
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != len(source):
      raise ValueError(f"balanced sampling needs one label per example: got labels of "
                       f"shape {labels.shape} for a source of {len(source)} examples")
    if not len(labels):
      raise ValueError("balanced sampling needs at least one example")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
      raise ValueError(f"balanced sampling needs non-negative integer labels, got "
                       f"{labels.dtype} from {labels.min()} to {labels.max()}")
    self._source = source
    self._seed = int(seed)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    self.classes = classes  # The labels present, ascending: block slots shuffle these.
    # Example indices grouped by class, ascending within each; class c's are
    # members[starts[c]:starts[c] + counts[c]].
    self._members = np.argsort(inverse, kind="stable")
    self._starts = np.cumsum(counts) - counts
    self._counts = counts

  def __len__(self) -> int:
    return _UNBOUNDED

  def index(self, position: int) -> int:
    """The source index of stream position `position`."""
    k = len(self.classes)
    block, slot = divmod(int(position), k)
    c = _shuffled(slot, k, (self._seed, 0, block))
    n = int(self._counts[c])
    epoch, visit = divmod(block, n)
    j = _shuffled(visit, n, (self._seed, 1, int(self.classes[c]), epoch))
    return int(self._members[self._starts[c] + j])

  def __getitem__(self, position: int):
    return self._source[self.index(position)]


def _repeated_position(position: int, n: int, repeats: int, width: int) -> int:
  """The base-stream position that `position` of a `RepeatedStream` shows (pure, O(1))."""
  cycle, offset = divmod(int(position), repeats * n)
  blocks = max(1, n // width)  # The last also takes the n mod width left over.
  first = min(offset // (repeats * width), blocks - 1) * width
  if first == (blocks - 1) * width:
    width = n - first
  return cycle * n + first + (offset - repeats * first) % width


class RepeatedStream:
  """Repeated augmentation: each position of `base` seen `repeats` (r) times.

  Cycle c (positions [c*r*n, (c+1)*r*n)) shows base positions [c*n, (c+1)*n), each r
  times: with the plain stream, base epoch c, so every example exactly r times. A cycle
  is cut into blocks of w = `width` base positions (the pipeline's B//r), the last block
  of a cycle also taking the n mod w left over (or all n when n < w); a block of v base
  positions fills r*v stream positions, copy j of its i-th at offset i + j*v. So copies
  are at least min(w, n) apart: never adjacent (unless that is 1), and on different
  processes whenever P >= r (a process's slice, B/P, is then at most w long), as DeiT
  spreads them over its ranks (deit samplers.py:11-12, :55). They lie within r*w <= B
  positions, so in one global batch or two consecutive ones, except in a cycle's last
  block (within 2B: up to three): like DeiT's, whose global batch is a contiguous run of
  its interleaved indices (samplers.py:48, :55). A pure function of the position.
  """

  def __init__(self, base, n: int, repeats: int, width: int):
    if repeats < 1 or width < 1 or n < 1:
      raise ValueError(f"repeated augmentation needs repeats, width and examples >= 1, "
                       f"got {repeats}, {width} and {n}")
    self._base, self._n, self._repeats, self._width = base, n, repeats, width

  def __len__(self) -> int:
    return _UNBOUNDED

  def position(self, position: int) -> int:
    """The base-stream position shown at `position`."""
    return _repeated_position(position, self._n, self._repeats, self._width)

  def __getitem__(self, position: int):
    return self._base[self.position(position)]


def example_stream(source, seed: int, balanced_labels=None, *, repeats: int = 1,
                   global_batch: int = 1) -> grain.MapDataset:
  """Stream position -> source example: shuffled per epoch, or class-balanced.

  `repeats` > 1 shows each of those positions that many times (`RepeatedStream`), the
  copies `global_batch // repeats` apart; at 1 the stream is exactly the one without it.
  """
  if balanced_labels is None:
    ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat()
  else:
    ds = grain.MapDataset.source(BalancedSource(source, balanced_labels, seed)).seed(seed)
  if repeats == 1:
    return ds
  width = max(1, global_batch // repeats)
  return grain.MapDataset.source(RepeatedStream(ds, len(source), repeats, width)).seed(seed)


def train_dataset(source, pp: Preprocess, *, global_batch: int, seed: int,
                  start_step: int = 0, process_index: int = 0, process_count: int = 1,
                  balanced_labels: np.ndarray | None = None,
                  repeats: int = 1) -> grain.MapDataset:
  """Element i is this process's part of global batch `start_step + i` (dict of arrays).

  `balanced_labels` (the label of every example by index, as `sources.labels` gives)
  switches the stream to class-balanced sampling; without it the stream is the plain
  per-epoch shuffle, exactly as it always was. `repeats` (`input.repeated_augmentation`)
  shows each example of either stream that many times, each copy at its own position,
  so with its own preprocessing randomness: grain's `random_map` seeds each element's
  rng from (seed, its position in this stream) (grain 0.2.18
  _src/python/dataset/transformations/map.py:214), not from the example's index.
  """
  local_batch = _check_divisible(global_batch, process_count)
  ds = example_stream(source, seed, balanced_labels, repeats=repeats,
                      global_batch=global_batch).random_map(pp)
  ds = ds.batch(local_batch, drop_remainder=True)  # Local batch j = positions j*b..(j+1)*b.
  ds = ds[process_index::process_count]  # Local batch k*P + p is this process's part of k.
  return ds[start_step:]


def eval_dataset(source, pp: Preprocess, *, global_batch: int,
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
  """Assembles each process's local arrays into global arrays on `sharding`.

  Non-numeric features (file paths, text) stay on the host: devices hold numbers only.
  """
  numeric = {k: v for k, v in local_batch.items()
             if np.asarray(v).dtype.kind in "biufc"}
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), numeric)


_M_MMAP_THRESHOLD = -3  # mallopt's parameter number, from glibc's malloc.h.


def keep_freed_memory(*unused) -> None:
  """Lets glibc reuse freed batch buffers instead of returning them to the kernel.

  glibc serves every allocation above its mmap threshold (at most 32 MB by default) with
  a fresh mmap and unmaps it on free, so each new batch of that size (64 float32
  224-px images are 38 MB) page-faults all its memory in again, under a lock every
  preprocessing thread shares: the pipeline ran 1.4-3x slower than with the threshold at
  256 MB. The cost is that the process keeps up to that much freed memory for reuse.
  A no-op where the C library has no mallopt.
  """
  del unused  # Also serves as grain's worker_init_fn, which passes worker arguments.
  with contextlib.suppress(OSError, AttributeError):
    ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, 256 << 20)


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
  keep_freed_memory()
  host_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                 prefetch_buffer_size=prefetch))
  if num_workers > 0:
    host_ds = host_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers),
                                  worker_init_fn=keep_freed_memory)
  host = iter(host_ds)
  queue = collections.deque()
  for local in host:
    queue.append(to_global(local, sharding))
    if len(queue) > device_prefetch:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
