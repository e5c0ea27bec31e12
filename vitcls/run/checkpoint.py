"""Checkpoints: orbax's CheckpointManager in training (async saves, keep-last-N, exact
restore), and a workdir's weights read without its config (evaluate, predict, export,
inspection, `config.model_init`).

Both take the newest intact step through one fallback loop (`_newest_intact`): a step that
`integrity` finds damaged, from its files or when its read fails, is set aside with a
warning and the next older one is tried. In training, the processes of a multi-process run
agree on every step before going on (each reads its own shards; process 0 alone moves
files), and an intact checkpoint whose tree or shapes do not fit the config is the user's
error, left where it is. Readers outside training leave a damaged step in place while a
live trainer holds the workdir.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import threading

from absl import logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from vitcls.run import checksums, integrity
from vitcls.run import workdir as wdir
from vitcls.errors import UserError, shown


_CLOSE_AFTER_FAILURE_S = 10

# errno -> what the user reads; TensorStore reports the errno as os_error_code='N'.
_WRITE_FAILURES = {
    errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
    errno.EPERM: "permission denied", errno.EFBIG: "a file size limit was reached",
    errno.ENOTDIR: "a path component is not a folder", errno.ENOENT: "the folder vanished",
}


def write_failure(error: BaseException) -> str:
  """Why a write failed, in a few words: the errno's meaning when the error (or one of its
  causes, or TensorStore's message) carries one, else the first line of the message."""
  chain, seen = [], set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    chain.append(error)
    error = error.__cause__ or error.__context__
  for e in chain:
    code = getattr(e, "errno", None)
    if code is None:
      found = re.search(r"os_error_code='(\d+)'", str(e))
      code = int(found.group(1)) if found else None
    if code in _WRITE_FAILURES:
      return f"{_WRITE_FAILURES[code]} ({errno.errorcode.get(code, code)})"
  return integrity.first_line(chain[-1] if chain else error)


class NoCheckpointError(UserError):
  """A workdir named as a checkpoint holds no complete checkpoint."""


class CheckpointMismatchError(UserError):
  """An intact checkpoint whose tree or shapes differ from what the config builds."""


class DamagedCheckpointError(UserError):
  """The checkpoint asked for is damaged, or a damaged one could not be moved aside."""


class CheckpointSaveError(UserError):
  """A checkpoint could not be written (no space, no permission...): the run stops."""


class Checkpointer:
  """Saves and restores `TrainState`s under `<workdir>/checkpoints/<step>/`.

  A save that fails stops the run at once with one line (`CheckpointSaveError`: the cause
  and the last good checkpoint): the step folder is created before `save` returns, so a
  folder that cannot be written fails there; a write that fails later, in orbax's
  background thread, is found by `poll` after the next training step.
  """

  def __init__(self, workdir: str, *, keep: int = 2, asynchronous: bool = True):
    self.directory = wdir.checkpoints_dir(workdir)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=asynchronous, create=True,
        # Created in the background, a folder that cannot be made leaves orbax's other
        # threads waiting for it for minutes; made in `save`, it fails there, at once.
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self.last_good: int | None = None  # The newest step known to be whole on disk.
    self._pending: int | None = None  # A step whose save may still be running.
    self._failed = False

  def latest_step(self) -> int | None:
    """The newest step orbax lists, or None; not checked for damage (`restore_latest` is)."""
    return self._manager.latest_step()

  def save(self, step: int, state) -> None:
    """Starts saving `state` as `step` (returns before the write ends when async), with the
    checksums of its arrays; raises CheckpointSaveError if this or the previous save failed."""
    self._finish_pending()
    sums = checksums.of_state(state)
    try:
      self._manager.save(step, args=ocp.args.StandardSave(state),
                         custom_metadata={checksums.METADATA_KEY: sums})
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise self._save_failed(step, e) from e
    self._pending = step
    if not self._manager.is_saving_in_progress():
      self._finish_pending()

  def poll(self) -> None:
    """Raises CheckpointSaveError if a save running in the background has failed; cheap
    (no wait) while it runs."""
    if self._pending is not None and not self._manager.is_saving_in_progress():
      self._finish_pending()

  def wait(self) -> None:
    """Waits for a save in flight; raises CheckpointSaveError if it failed."""
    self._finish_pending()

  def _finish_pending(self) -> None:
    step, self._pending = self._pending, None
    if step is None:
      return
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise self._save_failed(step, e) from e
    if not os.path.isdir(os.path.join(self.directory, str(step))):
      raise self._save_failed(step, RuntimeError("the step folder was not written"))
    self.last_good = step

  def _save_failed(self, step: int, error: BaseException) -> CheckpointSaveError:
    self._failed = True
    if self.last_good is None:
      kept = "no checkpoint was saved before it"
    else:
      kept = (f"the last good checkpoint is step {self.last_good} "
              f"({os.path.join(self.directory, str(self.last_good))})")
    return CheckpointSaveError(
        f"saving the checkpoint of step {step} in {self.directory} failed: "
        f"{write_failure(error)}; {kept}. Free space or fix the permissions there, then "
        f"run the same command to resume")

  def restore(self, step: int, abstract_state):
    """Restores `step` onto `abstract_state`: ShapeDtypeStructs carrying shardings."""
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def restore_latest(self, abstract_state):
    """(step, state) of the newest intact checkpoint, or (None, None) if there is none.

    Damaged steps on the way are moved aside with a warning (by process 0; every process
    agrees on the step). Raises CheckpointMismatchError if the newest intact step does not
    fit `abstract_state`.
    """
    moved = []

    def set_aside(step: int, reason: str) -> None:
      if jax.process_index() == 0:
        dest = integrity.move_aside(self.directory, step, reason)
        if dest is None:
          raise DamagedCheckpointError(
              f"the checkpoint of step {step} in {self.directory} is damaged ({reason}) and "
              f"could not be moved aside: move that folder out of checkpoints/ and rerun")
        logging.warning("The checkpoint of step %d in %s is damaged (%s): moved it to %s; "
                        "trying the next older one.", step, self.directory, reason,
                        dest or "a new place (by another process)")
      moved.append(step)

    result = _newest_intact(self._manager.all_steps(),
                            lambda step: self._restore_everywhere(step, abstract_state),
                            set_aside, agree=_from_process_0)
    if moved:  # orbax's list of steps must forget the moved ones, on every process.
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        multihost_utils.sync_global_devices("vitcls_checkpoints_moved_aside")
      self._manager.reload()
    self.last_good = result[0]
    return result

  def _restore_everywhere(self, step: int, abstract_state):
    """(state, None) if every process restored `step`, else (None, why it is damaged):
    process 0's file checks first, then each process's read of its own shards."""
    path = os.path.join(self.directory, str(step))
    reason = integrity.find_damage(path) if jax.process_index() == 0 else None
    if _from_process_0(reason is not None):
      return None, reason or "process 0 found it damaged (see its log)"
    state, reason = self._try_restore(step, abstract_state)
    if reason and jax.process_index() != 0:
      logging.warning("Process %d cannot read the checkpoint of step %d in %s (%s).",
                      jax.process_index(), step, self.directory, reason)
    if _everywhere(state is not None):
      return state, None
    return None, reason or "its restore failed on another process (see that process's log)"

  def _try_restore(self, step: int, abstract_state):
    """(state, None), or (None, why) when the stored bytes cannot be read; raises
    CheckpointMismatchError for a checkpoint that is readable but does not fit."""
    try:
      problem = _fit_problem(os.path.join(self.directory, str(step), "default"),
                             abstract_state)
    except Exception as e:  # pylint: disable=broad-exception-caught
      why = integrity.storage_problem(e)
      if why is None:
        raise
      return None, why
    if problem:
      raise self._mismatch(step, problem)
    try:
      state, why = integrity.read_or_damage(lambda: self._restore_here(step, abstract_state))
    except (ValueError, KeyError, TypeError) as e:
      raise self._mismatch(step, f"{type(e).__name__}: {integrity.first_line(e)}") from e
    if why is None:
      why = checksums.mismatch(_stored_checksums(os.path.join(self.directory, str(step))),
                               checksums.of_state(state))
    return (None, why) if why else (state, None)

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
    """Waits for a save in flight to finish, so no good checkpoint is lost; then closes
    orbax. After a failed save, closing is bounded (`_CLOSE_AFTER_FAILURE_S`) and its
    errors, already reported, are not raised again."""
    if not self._failed:
      self._manager.wait_until_finished()
      self._manager.close()
      return
    closer = threading.Thread(target=self._close_quietly, daemon=True)
    closer.start()
    closer.join(_CLOSE_AFTER_FAILURE_S)
    if closer.is_alive():
      logging.warning("orbax did not close within %d s after the failed save; going on.",
                      _CLOSE_AFTER_FAILURE_S)

  def _close_quietly(self) -> None:
    try:
      self._manager.close()
    except Exception as e:  # pylint: disable=broad-exception-caught
      logging.info("Closing orbax after the failed save: %s", integrity.first_line(e))


def _newest_intact(steps, read, set_aside, agree=int):
  """(step, what `read(step)` gave) for the newest of `steps` that reads, or (None, None).

  `read(step)` gives (value, None), or (None, why the step is damaged): then
  `set_aside(step, why)` runs and the next older step is tried. `agree` turns each
  candidate into the one every process takes (process 0's, in training).
  """
  candidates = sorted(steps, reverse=True)
  while True:
    step = agree(candidates.pop(0) if candidates else -1)
    if step < 0:
      return None, None
    value, reason = read(step)
    if reason is None:
      return step, value
    set_aside(step, reason)


# Does a checkpoint fit the state the config builds?

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


# State fields a config adds or leaves out whole, and what their absence means.
_FEATURES = {"teacher_digest": "a teacher (config.distill.teacher_init)"}


def _fit_problem(item_dir: str, abstract_state) -> str | None:
  """How the checkpoint's arrays differ from `abstract_state`'s, or None if they match."""
  have, want = _shapes(_tree_metadata(item_dir)), _shapes(abstract_state)
  for name, feature in _FEATURES.items():
    if (name in have) != (name in want):
      return (f"it was trained {'with' if name in have else 'without'} {feature}, this "
              f"config {'has none' if name in have else 'has one'}")
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


# Reading weights outside training (evaluate, export, predict, inspection, model_init).

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
  found, weights = _newest_intact(
      steps, lambda s: _try_read(workdir, s),
      lambda s, reason: integrity.set_aside_if_idle(workdir, s, reason))
  if found is None:
    raise NoCheckpointError(f"no intact checkpoint in workdir {shown(workdir)}: steps "
                            f"{', '.join(map(str, reversed(steps)))} are damaged (see the "
                            f"warnings); train there again")
  return (found, *weights)


def load_params(workdir: str, step: int | None = None) -> dict:
  """The parameters of a workdir's checkpoint (the latest by default), as NumPy arrays."""
  return load_weights(workdir, step)[1]


def weights_of(name: str, model_name: str):
  """What a checkpoint name (`config.model_init`, `config.distill.teacher_init`) gives
  `models.load`: the path of an .npz or .safetensors file, the local `model.safetensors`
  of an `hf-hub:<repo>` (resolved, downloaded if needed, and its architecture checked
  against `model_name` by `vitcls.models.hub`), or the newest intact params of a vitcls
  workdir."""
  from vitcls.models import hub  # pylint: disable=g-import-not-at-top
  if hub.is_hub(name):
    return hub.resolve(name, model_name).path
  if os.path.isdir(name):
    return load_params(name)
  return name


def _steps(workdir: str) -> list[int]:
  directory = wdir.checkpoints_dir(workdir)
  return sorted(ocp.path.step.checkpoint_steps(directory)) if os.path.isdir(directory) else []


def _try_read(workdir: str, step: int):
  """((params, ema), None), or (None, why the checkpoint of `step` is damaged)."""
  step_dir = os.path.join(wdir.checkpoints_dir(workdir), str(step))
  reason = integrity.find_damage(step_dir)
  if reason:
    return None, reason
  weights, why = integrity.read_or_damage(
      lambda: _read_weights(os.path.join(step_dir, "default")))
  if why is None:
    params, ema = weights
    actual = {**checksums.of_arrays(params, "params"),
              **(checksums.of_arrays(ema, "ema") if ema is not None else {})}
    why = checksums.mismatch(_stored_checksums(step_dir), actual)
  return (None, why) if why else (weights, None)


def _stored_checksums(step_dir: str) -> dict[str, str] | None:
  """The checksums a save wrote into the step's metadata, or None (an older checkpoint)."""
  return integrity.custom_metadata(step_dir).get(checksums.METADATA_KEY)


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


def _host_sharding():
  return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
