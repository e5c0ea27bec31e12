"""Checkpoints with orbax's CheckpointManager: async saves, keep-last-N, exact restore, and
a damaged latest checkpoint set aside instead of ending (or silently restarting) the run.

orbax writes each step into a temporary folder and renames it only once complete, so a
crash or SIGKILL mid-save never replaces a good checkpoint. But a finished step can still be
damaged afterwards (a full or flaky disk, an interrupted copy of the workdir, a file removed
by hand), and orbax lists it as if it were whole: its restore then fails deep inside
TensorStore, or, for a missing `_METADATA`, with an error that looks like a config mismatch.
So the newest step is checked before it is trusted, cheapest first:
1. its files: the commit marker (`commit_success.txt`), `_CHECKPOINT_METADATA` with a commit
   time, each item's `_METADATA` tree, and the OCDBT database: `manifest.ocdbt`, its b-tree
   nodes (small; read with TensorStore's OCDBT dump), and every data file the b-tree points
   into, which must exist and reach the end of the last value stored in it (a stat, not a
   read): this finds deleted and truncated array files without reading an array;
2. its tree and shapes against the state the config builds: a checkpoint that does not fit
   is the user's "does not fit this config" error, and is left where it is;
3. the restore itself: an I/O or decoding error there (bytes damaged inside a data file)
   condemns the step too. In multi-process runs each process reads its own shards, so the
   processes agree on the outcome before going on, and process 0 alone moves files.
A damaged step is moved, never deleted, to `WORKDIR/checkpoints_broken/<step>[.<n>]`, with a
`.reason.txt` beside it, outside the folder orbax scans, and the next older step is tried.
What neither orbax nor these checks can tell: flipped bytes inside a stored array that
still decode (OCDBT keeps no checksum of the values) restore without any error.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import gc
import json
import os
import sys
import time

from absl import logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from vitcls import workdir_lock
from vitcls.errors import UserError, shown

BROKEN_DIR = "checkpoints_broken"
_COMMIT_MARKER = "commit_success.txt"  # orbax 0.12 writes it last, then renames the step.
_STEP_METADATA = "_CHECKPOINT_METADATA"
_TREE_METADATA = "_METADATA"
_OCDBT_MANIFEST = "manifest.ocdbt"
# TensorStore status codes that mean "the stored bytes are not what they should be".
_STORAGE_CODES = ("NOT_FOUND", "OUT_OF_RANGE", "DATA_LOSS", "FAILED_PRECONDITION",
                  "INVALID_ARGUMENT", "UNAVAILABLE", "INTERNAL", "UNKNOWN")


class NoCheckpointError(UserError):
  """A workdir named as a checkpoint holds no complete checkpoint."""


class CheckpointMismatchError(UserError):
  """An intact checkpoint whose tree or shapes differ from what the config builds."""


class DamagedCheckpointError(UserError):
  """The checkpoint asked for is damaged, or a damaged one could not be moved aside."""


class Checkpointer:
  """Saves and restores `TrainState`s under `<workdir>/checkpoints/<step>/`."""

  def __init__(self, workdir: str, *, keep: int = 2, asynchronous: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=asynchronous, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    """The newest step orbax lists, or None; not checked for damage (`restore_latest` is)."""
    return self._manager.latest_step()

  def save(self, step: int, state) -> None:
    """Starts saving `state` as `step` (returns before the write ends when async)."""
    self._manager.save(step, args=ocp.args.StandardSave(state))

  def restore(self, step: int, abstract_state):
    """Restores `step` onto `abstract_state`: ShapeDtypeStructs carrying shardings."""
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def restore_latest(self, abstract_state):
    """(step, state) of the newest intact checkpoint, or (None, None) if there is none.

    Damaged steps on the way are moved aside with a warning (by process 0; every process
    agrees on the step). Raises CheckpointMismatchError if the newest intact step does not
    fit `abstract_state`.
    """
    candidates = sorted(self._manager.all_steps(), reverse=True)
    moved = False
    while True:
      step = _from_process_0(candidates.pop(0) if candidates else -1)
      if step < 0:
        result = (None, None)
        break
      path = os.path.join(self.directory, str(step))
      reason = find_damage(path) if jax.process_index() == 0 else None
      if not _from_process_0(reason is not None):
        state, reason = self._try_restore(step, abstract_state)
        if reason and jax.process_index() != 0:
          logging.warning("Process %d cannot read the checkpoint of step %d in %s (%s).",
                          jax.process_index(), step, self.directory, reason)
        if _everywhere(state is not None):
          result = (step, state)
          break
        reason = reason or "its restore failed on another process (see that process's log)"
      if jax.process_index() == 0:
        dest = _move_aside(self.directory, step, reason)
        if dest is None:
          raise DamagedCheckpointError(
              f"the checkpoint of step {step} in {self.directory} is damaged ({reason}) and "
              f"could not be moved aside: move that folder out of checkpoints/ and rerun")
        logging.warning("The checkpoint of step %d in %s is damaged (%s): moved it to %s; "
                        "trying the next older one.", step, self.directory, reason,
                        dest or "a new place (by another process)")
      moved = True
    if moved:  # orbax's list of steps must forget the moved ones, on every process.
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        multihost_utils.sync_global_devices("vitcls_checkpoints_moved_aside")
      self._manager.reload()
    return result

  def _try_restore(self, step: int, abstract_state):
    """(state, None), or (None, why) when the stored bytes cannot be read; raises
    CheckpointMismatchError for a checkpoint that is readable but does not fit."""
    try:
      problem = _fit_problem(os.path.join(self.directory, str(step), "default"),
                             abstract_state)
    except Exception as e:  # pylint: disable=broad-exception-caught
      why = _storage_problem(e)
      if why is None:
        raise
      return None, why
    if problem:
      raise self._mismatch(step, problem)
    with _quiet_abandoned_reads() as reads:
      try:
        return self._restore_here(step, abstract_state), None
      except Exception as e:  # pylint: disable=broad-exception-caught
        why = _storage_problem(e)
        if why is None:
          if isinstance(e, (ValueError, KeyError, TypeError)):
            raise self._mismatch(step, f"{type(e).__name__}: {_first_line(e)}") from e
          raise
        reads.failed()
    return None, why

  def _restore_here(self, step: int, abstract_state):
    """`restore` without orbax's closing barrier across processes: when the damage shows on
    some processes only (each reads its own shards), the others would wait there for
    ever; the processes meet in `_everywhere` instead, whatever happened."""
    item_dir = epath.Path(self.directory) / str(step) / "default"
    target, absent = _fields_on_disk(str(item_dir), abstract_state)
    handler = ocp.StandardCheckpointHandler()
    try:
      restored = handler.restore(item_dir, args=ocp.args.StandardRestore(target))
    finally:
      handler.close()
    if not absent:
      return restored
    return abstract_state.replace(**dict(restored), **{k: None for k in absent})

  def _mismatch(self, step: int, problem: str) -> CheckpointMismatchError:
    return CheckpointMismatchError(
        f"the checkpoint of step {step} in {self.directory} does not fit this config (model "
        f"or optimiser changed?): use a new --workdir ({problem[:200]})")

  def close(self) -> None:
    """Waits for a save in flight to finish, so no good checkpoint is lost; then closes orbax."""
    self._manager.wait_until_finished()
    self._manager.close()


# Checks.

def _read_json(path: str):
  """(object, None) or (None, what is wrong with the file)."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    return None, "is missing"
  except OSError as e:
    return None, f"cannot be read ({type(e).__name__}: {e.strerror or e})"
  try:
    value = json.loads(data)
  except ValueError:
    return None, f"is not valid JSON ({len(data)} bytes: truncated or overwritten?)"
  if not isinstance(value, dict):
    return None, "is not a JSON object"
  return value, None


def _ocdbt_problem(item_dir: str) -> str | None:
  """What is wrong with an item's OCDBT database: its manifest, its b-tree, or a data file
  that is missing or shorter than the values the b-tree places in it. Reads the manifest
  and the b-tree nodes (small), then only sizes of the data files."""
  manifest = os.path.join(item_dir, _OCDBT_MANIFEST)
  if not os.path.isfile(manifest):
    return f"{_OCDBT_MANIFEST} is missing"
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  ends: dict[str, int] = {}  # data file -> the end of the last value stored in it.
  try:
    base = ts.KvStore.open({"driver": "file", "path": item_dir + os.sep}).result()
    versions = ts.ocdbt.dump(base).result().get("versions") or []
    if not versions:
      return f"{_OCDBT_MANIFEST} holds no version of the database"
    nodes, keys = [versions[-1]["root"].get("location")], 0
    while nodes:
      location = nodes.pop()
      if not location:
        continue
      for entry in ts.ocdbt.dump(base, location).result().get("entries", []):
        keys += "key" in entry
        for value in entry.values():
          if isinstance(value, str) and value.startswith("btreenode:"):
            nodes.append(value)
          elif isinstance(value, str) and value.startswith("value:"):
            # value:<prefix>:<file>:<offset>:<length>, the file being <prefix><file>.
            head, offset, length = value[len("value:"):].rsplit(":", 2)
            path = head.replace(":", "", 1)
            ends[path] = max(ends.get(path, 0), int(offset) + int(length))
  except Exception as e:  # pylint: disable=broad-exception-caught
    return f"its OCDBT index cannot be read ({_first_line(e)})"
  if not keys:
    return "its OCDBT index lists no arrays"
  for name, end in sorted(ends.items()):
    try:
      size = os.path.getsize(os.path.join(item_dir, name))
    except OSError:
      return f"data file {name} is missing"
    if size < end:
      return f"data file {name} is truncated ({size} bytes, values up to byte {end})"
  return None


def find_damage(step_dir: str) -> str | None:
  """Why the step folder is not a whole orbax checkpoint, from its files; None if it looks
  whole. Cheap: reads metadata and the OCDBT index, never the arrays."""
  if not os.path.isdir(step_dir):
    return "not a folder"
  if not os.path.isfile(os.path.join(step_dir, _COMMIT_MARKER)):
    return f"no commit marker ({_COMMIT_MARKER})"
  meta, problem = _read_json(os.path.join(step_dir, _STEP_METADATA))
  if problem:
    return f"{_STEP_METADATA} {problem}"
  if not meta.get("commit_timestamp_nsecs"):
    return f"{_STEP_METADATA} has no commit time: the save never finished"
  for item in meta.get("item_handlers") or {"default": None}:
    item_dir = os.path.join(step_dir, item)
    if not os.path.isdir(item_dir):
      return f"its item folder '{item}' is missing"
    tree, problem = _read_json(os.path.join(item_dir, _TREE_METADATA))
    if problem:
      return f"{item}/{_TREE_METADATA} {problem}"
    if not isinstance(tree.get("tree_metadata"), dict) or not tree["tree_metadata"]:
      return f"{item}/{_TREE_METADATA} lists no arrays"
    uses_ocdbt = os.path.exists(os.path.join(item_dir, _OCDBT_MANIFEST)) or any(
        n.startswith("ocdbt.process_") for n in os.listdir(item_dir))
    problem = _ocdbt_problem(item_dir) if uses_ocdbt else None
    if problem:
      return f"{item}: {problem}"
  return None


def _key_name(entry) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _shapes(tree) -> dict[str, tuple]:
  """{'a/b/c': shape} of the array leaves of a state, or of a checkpoint's metadata tree."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(_key_name(k) for k in path): tuple(leaf.shape)
          for path, leaf in leaves if hasattr(leaf, "shape")}


def _tree_metadata(item_dir: str):
  """The metadata tree (shapes, dtypes) of an item folder, from its `_METADATA`."""
  handler = ocp.StandardCheckpointHandler()
  try:
    return handler.metadata(epath.Path(item_dir))
  finally:
    handler.close()


def _fields_on_disk(item_dir: str, abstract_state):
  """(restore target, fields left out): a state field that is None (a feature that is
  off, such as `skips`) and absent from a checkpoint written before it existed is left
  out of the target, so older checkpoints keep resuming."""
  if not dataclasses.is_dataclass(abstract_state):
    return abstract_state, []
  stored = set(_tree_metadata(item_dir).keys())
  fields = {f.name: getattr(abstract_state, f.name)
            for f in dataclasses.fields(abstract_state)}
  absent = [k for k, v in fields.items() if v is None and k not in stored]
  if not absent:
    return abstract_state, []
  return {k: v for k, v in fields.items() if k not in absent}, absent


def _fit_problem(item_dir: str, abstract_state) -> str | None:
  """How the checkpoint's arrays differ from `abstract_state`'s, or None if they match."""
  have, want = _shapes(_tree_metadata(item_dir)), _shapes(abstract_state)
  missing = sorted(set(want) - set(have))
  if missing:
    return f"{missing[0]} is not in the checkpoint ({len(missing)} arrays missing)"
  extra = sorted(set(have) - set(want))
  if extra:
    return f"the checkpoint has {extra[0]}, which the config does not build ({len(extra)} more)"
  for name in sorted(want):
    if have[name] != want[name]:
      return f"{name} has shape {have[name]} in the checkpoint, {want[name]} in the config"
  return None


@contextlib.contextmanager
def _quiet_abandoned_reads():
  """When one array read of a restore fails, orbax abandons the others, and each of their
  coroutines would print a traceback of the same damage when collected: they are collected
  here, silently, so that the one warning naming the damage is what is seen. Call
  `.failed()` from the `except` clause; the collection runs once it has ended."""
  previous = sys.unraisablehook

  def hook(unraisable):
    if not asyncio.iscoroutine(unraisable.object):
      previous(unraisable)

  class Failure:
    happened = False

    def failed(self):
      self.happened = True

  failure = Failure()
  sys.unraisablehook = hook
  try:
    yield failure
  finally:
    if failure.happened:
      gc.collect()
    sys.unraisablehook = previous


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return (text.splitlines()[0] if text else type(e).__name__)[:300]


def _storage_problem(e: BaseException) -> str | None:
  """A one-line reason if the restore error `e` says the stored files are damaged."""
  chain, seen = [], set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    chain.append(e)
    e = e.__cause__ or e.__context__
  for x in reversed(chain):  # The innermost cause is the most specific.
    text = _first_line(x)
    if isinstance(x, (OSError, EOFError, json.JSONDecodeError)):
      return f"{type(x).__name__}: {text}"
    if text.startswith(_STORAGE_CODES) or "Encountered error while reading" in text:
      return text
  return None


# Moving aside.

def _move_aside(checkpoints_dir: str, step: int, reason: str) -> str | None:
  """Moves `checkpoints/<step>` to `checkpoints_broken/<step>[.<n>]`; its new path, or None
  if it could not be moved (an empty string if another process moved it first)."""
  broken = os.path.join(os.path.dirname(checkpoints_dir), BROKEN_DIR)
  source = os.path.join(checkpoints_dir, str(step))
  try:
    os.makedirs(broken, exist_ok=True)
  except OSError:
    return None
  for n in range(1000):
    dest = os.path.join(broken, str(step) if n == 0 else f"{step}.{n}")
    if os.path.lexists(dest):
      continue
    try:
      os.rename(source, dest)
    except FileNotFoundError:
      return ""
    except OSError as e:
      if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
        continue  # Taken meanwhile.
      return None
    try:
      with open(dest + ".reason.txt", "w") as f:
        f.write(f"Step {step} was moved here from {checkpoints_dir} at "
                f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}: {reason}.\n"
                f"Nothing in it was changed. Move it back to resume from it.\n")
    except OSError:
      pass
    return dest
  return None


def _from_process_0(value) -> int:
  """Process 0's `value` (an int or bool) on every process."""
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def _everywhere(flag: bool) -> bool:
  """True if `flag` holds on every process."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.int32(flag))))


# Reading weights outside training (evaluate, export, predict, model import).

def _steps(workdir: str) -> list[int]:
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  return sorted(ocp.path.step.checkpoint_steps(directory)) if os.path.isdir(directory) else []


def _read_weights(path: str):
  """(params, ema or None) of the item folder `path`, as NumPy arrays on this host."""
  tree = _tree_metadata(path)
  target = jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=_host_sharding()), tree)
  checkpointer = ocp.StandardCheckpointer()
  try:
    restored = checkpointer.restore(path, target)
  finally:
    checkpointer.close()
  as_numpy = lambda part: (None if restored.get(part) is None  # noqa: E731
                           else jax.tree_util.tree_map(np.asarray, dict(restored[part])))
  return as_numpy("params"), as_numpy("ema")


def _try_read(workdir: str, step: int):
  """((params, ema), None), or (None, why the checkpoint of `step` is damaged)."""
  step_dir = os.path.abspath(os.path.join(workdir, "checkpoints", str(step)))
  reason = find_damage(step_dir)
  if reason:
    return None, reason
  with _quiet_abandoned_reads() as reads:
    try:
      return _read_weights(os.path.join(step_dir, "default")), None
    except Exception as e:  # pylint: disable=broad-exception-caught
      reason = _storage_problem(e)
      if reason is None:
        raise
      reads.failed()
  return None, reason


def _set_aside_if_idle(workdir: str, step: int, reason: str) -> None:
  """Moves a damaged step aside, unless a live trainer holds the workdir (it may be
  writing or rotating checkpoints right now) or this is not process 0."""
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  holder = workdir_lock.live_holder(workdir)
  if holder is not None:
    logging.warning("The checkpoint of step %d in %s is damaged (%s); left in place because "
                    "a training run holds the workdir (%s); using an older one.", step,
                    directory, reason, holder.describe())
    return
  dest = _move_aside(directory, step, reason) if jax.process_index() == 0 else ""
  logging.warning("The checkpoint of step %d in %s is damaged (%s)%s; using an older one.",
                  step, directory, reason, f": moved it to {dest}" if dest else "")


def load_weights(workdir: str, step: int | None = None) -> tuple[int, dict, dict | None]:
  """(step, params, ema or None) of a workdir's checkpoint (the newest intact one by
  default).

  Reads the saved state once onto the host, as NumPy arrays, without knowing the config
  that wrote it (the tree comes from the checkpoint's metadata): what evaluation, model
  import, export and prediction need. A damaged newest checkpoint gives a warning and the
  next older one is used; it is moved aside too unless a training run holds the workdir.
  """
  steps = _steps(workdir)
  if not steps:
    raise NoCheckpointError(f"no checkpoint in workdir {shown(workdir)}: train there first, or "
                            f"pass an .npz file")
  if step is not None:
    if step not in steps:
      raise NoCheckpointError(f"workdir {shown(workdir)} has no checkpoint of step {step}: "
                              f"it has steps {', '.join(map(str, steps))}")
    weights, reason = _try_read(workdir, step)
    if reason:
      others = ", ".join(str(s) for s in steps if s != step) or "none"
      raise DamagedCheckpointError(f"the checkpoint of step {step} in workdir {shown(workdir)} is "
                                   f"damaged ({reason}): pass another --step (steps there: "
                                   f"{others})")
    return (step, *weights)
  damaged = []
  for candidate in reversed(steps):
    weights, reason = _try_read(workdir, candidate)
    if reason is None:
      return (candidate, *weights)
    damaged.append(str(candidate))
    _set_aside_if_idle(workdir, candidate, reason)
  raise NoCheckpointError(f"no intact checkpoint in workdir {shown(workdir)}: steps "
                          f"{', '.join(damaged)} are damaged (see the warnings); train there "
                          f"again")


def load_params(workdir: str, step: int | None = None) -> dict:
  """The parameters of a workdir's checkpoint (the latest by default), as NumPy arrays."""
  return load_weights(workdir, step)[1]


def _host_sharding():
  return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
