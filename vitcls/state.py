"""The training state: everything a resumed run needs, as one pytree."""

from __future__ import annotations

from typing import Any

import flax
import jax
import numpy as np


@flax.struct.dataclass
class TrainState:
  """`step` counts completed updates; the key of step s is `fold_in(rng, s)`.

  `ema` is the exponential moving average of `params` when `ema_decay` is on, else None.
  `skips` counts the updates skipped for a non-finite loss or gradient, int32
  [in a row, in total], when `skip_nonfinite_updates` is on, else None.
  `teacher_digest` names the teacher the run distils from (`config.distill`), uint32 [2]
  (`vitcls.run.teacher.digest`), else None: checkpointed with the rest, so a resume can
  refuse another teacher. The teacher's weights themselves are not in the state.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  ema: Any = None
  skips: Any = None
  teacher_digest: Any = None


def make_init_fn(model, tx, image_shape, seed: int, ema: bool = False,
                 count_skips: bool = False, head_bias: float = 0.0, teacher_digest=None):
  """Returns init(params=None) -> TrainState, pure, to be jitted with the state's shardings.

  With `params` (e.g. imported from a checkpoint) the state starts from them; without,
  from the model's own init. The keys are split the same way either way, so a run's
  training randomness does not depend on where its parameters came from. `head_bias`
  (config.init_head_bias) fills the fresh `head/bias`; a checkpoint's import keeps it
  where the head is not loaded (`dont_load`, another class count). `teacher_digest`
  (uint32 [2] or None) is stored as it is.
  """
  digest = None if teacher_digest is None else np.asarray(teacher_digest, np.uint32)

  def init(params=None):
    root = jax.random.PRNGKey(seed)
    init_key, train_key = jax.random.split(root)
    if params is None:
      dummy = jax.numpy.zeros((1, *image_shape), jax.numpy.float32)
      params = model.init({"params": init_key}, dummy, train=False)["params"]
      if head_bias and "bias" in params.get("head", {}):
        params = dict(params, head=dict(params["head"], bias=jax.numpy.full_like(
            params["head"]["bias"], head_bias)))
    return TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
                      opt_state=tx.init(params), rng=train_key,
                      ema=jax.tree_util.tree_map(jax.numpy.copy, params) if ema else None,
                      skips=jax.numpy.zeros((2,), jax.numpy.int32) if count_skips else None,
                      teacher_digest=None if digest is None else jax.numpy.asarray(digest))
  return init
