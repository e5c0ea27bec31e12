"""What the checkpoints' checksums cost: their computation against orbax's save and restore.

    python -m benchmarks.checkpoint_cost [--tiny]

Every save computes two 32-bit sums per array of the train state (`vitcls.run.checksums`,
one jitted reduction on the devices) and every restore computes them again to compare.
Measured here on a ViT-S/16 train state (params and AdamW's two moments, 224 px, 1,000
classes), in one process: the checksums of the whole state, a synchronous orbax save of
it (what an async save's background thread does; the main thread computes the sums) and
its restore, interleaved. `--tiny`: a ViT-Ti/16 at 32 px.
"""

from __future__ import annotations

import shutil
import tempfile

from benchmarks import common

NAME = "checkpoint_cost"


def _state(tiny: bool):
  """A ViT train state's arrays: params, AdamW mu and nu, with random values."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vitcls.models import vit  # pylint: disable=g-import-not-at-top
  variant, size = ("Ti/16", 32) if tiny else ("S/16", 224)
  model = vit.Model(num_classes=1000, variant=variant)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), train=False))["params"]
  keys = iter(jax.random.split(jax.random.PRNGKey(1), 3 * len(jax.tree_util.tree_leaves(
      shapes))))
  state = {part: jax.tree_util.tree_map(
      lambda s: jax.random.normal(next(keys), s.shape, s.dtype), shapes)
           for part in ("params", "mu", "nu")}
  return variant, jax.block_until_ready(state)


def run(tiny: bool) -> common.Result:
  """Checksums / save and checksums / restore on a ViT train state."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from vitcls.run import checksums  # pylint: disable=g-import-not-at-top
  variant, state = _state(tiny)
  numbers = sum(x.size for x in jax.tree_util.tree_leaves(state))
  folder = tempfile.mkdtemp(prefix="vitcls-bench-ckpt-")
  checkpointer = ocp.StandardCheckpointer()
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
  saves = iter(range(10**6))
  last = []

  def save():
    path = f"{folder}/{next(saves)}"
    checkpointer.save(path, state)
    checkpointer.wait_until_finished()
    last[:] = [path]

  def restore():
    jax.block_until_ready(checkpointer.restore(last[0], abstract))

  repeats = 2 if tiny else 5
  try:
    sums = common.time_it(lambda: checksums.of_state(state), repeats=repeats)
    saved = common.time_it(save, repeats=repeats)
    restored = common.time_it(restore, repeats=repeats)
    sums_after = common.time_it(lambda: checksums.of_state(state), repeats=repeats)
  finally:
    checkpointer.close()
    shutil.rmtree(folder, ignore_errors=True)
  sum_s = min(sums.median, sums_after.median)
  figures = {"model": f"ViT-{variant}", "numbers": numbers,
             "bytes": 4 * numbers, "checksums_s": [sums.as_dict(), sums_after.as_dict()],
             "save_s": saved.as_dict(), "restore_s": restored.as_dict(),
             "checksums_over_save": sum_s / saved.median,
             "checksums_over_restore": sum_s / restored.median}
  rows = [
      common.Row(NAME, f"checksums of a ViT-{variant} train state", sum_s * 1000, "ms",
                 f"{min(sums.low, sums_after.low) * 1000:.0f}-"
                 f"{max(sums.high, sums_after.high) * 1000:.0f}"),
      common.ratio_row(NAME, "checksums / orbax save (synchronous)",
                       figures["checksums_over_save"]),
      common.ratio_row(NAME, "checksums / orbax restore", figures["checksums_over_restore"]),
  ]
  return common.Result(NAME, figures, rows, tiny=tiny)


if __name__ == "__main__":
  common.main(run)
