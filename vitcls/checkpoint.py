"""Checkpoints with orbax's CheckpointManager: async saves, keep-last-N, exact restore.

orbax writes each step into a temporary folder and renames it only once complete, so a
crash or SIGKILL mid-save never replaces a good checkpoint; `latest_step()` sees only
completed steps, and resuming restores the state straight onto its shardings.
"""

from __future__ import annotations

import os

import orbax.checkpoint as ocp


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
