"""Checkpoints with orbax's CheckpointManager: async saves, keep-last-N, exact restore.

orbax writes each step into a temporary folder and renames it only once complete, so a
crash or SIGKILL mid-save never replaces a good checkpoint; `latest_step()` sees only
completed steps, and resuming restores the state straight onto its shardings.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from vitcls.errors import UserError


class Checkpointer:
  """Saves and restores `TrainState`s under `<workdir>/checkpoints/<step>/`."""

  def __init__(self, workdir: str, *, keep: int = 2, asynchronous: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=asynchronous, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state) -> None:
    """Starts saving `state` as `step` (returns before the write ends when async)."""
    self._manager.save(step, args=ocp.args.StandardSave(state))

  def restore(self, step: int, abstract_state):
    """Restores `step` onto `abstract_state`: ShapeDtypeStructs carrying shardings."""
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


class NoCheckpointError(UserError):
  """A workdir named as a checkpoint holds no complete checkpoint."""


def _complete_step(workdir: str, step: int | None) -> int:
  """`step` (default: the newest) if the workdir holds it complete, else one clear error."""
  directory = os.path.join(workdir, "checkpoints")
  steps = ocp.CheckpointManager(os.path.abspath(directory)).all_steps() \
      if os.path.isdir(directory) else []
  if not steps:
    raise NoCheckpointError(f"no checkpoint in workdir '{workdir}': train there first, or "
                            f"pass an .npz file")
  if step is not None and step not in steps:
    raise NoCheckpointError(f"workdir '{workdir}' has no checkpoint of step {step}: "
                            f"it has steps {', '.join(map(str, sorted(steps)))}")
  return max(steps) if step is None else step


def load_weights(workdir: str, step: int | None = None) -> tuple[int, dict, dict | None]:
  """(step, params, ema or None) of a workdir's checkpoint (the latest by default).

  Reads the saved state once onto the host, as NumPy arrays, without knowing the config
  that wrote it (the tree comes from the checkpoint's metadata): what evaluation, model
  import, export and prediction need.
  """
  step = _complete_step(workdir, step)
  path = os.path.abspath(os.path.join(workdir, "checkpoints", str(step), "default"))
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(path)
  tree = getattr(metadata, "item_metadata", metadata)
  target = jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=_host_sharding()), tree)
  restored = checkpointer.restore(path, target)
  checkpointer.close()
  as_numpy = lambda part: (None if restored.get(part) is None  # noqa: E731
                           else jax.tree_util.tree_map(np.asarray, dict(restored[part])))
  return step, as_numpy("params"), as_numpy("ema")


def load_params(workdir: str, step: int | None = None) -> dict:
  """The parameters of a workdir's checkpoint (the latest by default), as NumPy arrays."""
  return load_weights(workdir, step)[1]


def _host_sharding():
  return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
