"""Top-1 accuracy and mean cross-entropy over a whole split, counted exactly.

Every example of the split is seen once: the last batch is padded and masked, so the
numbers do not depend on the batch size or the number of processes.
"""

from __future__ import annotations

import jax

from vitcls import steps
from vitcls.configs import ConfigDict
from vitcls.data import pipeline, preprocess, sources


def defaults() -> ConfigDict:
  return ConfigDict({
      "type": "classification",
      "data": "",  # TFDS name; empty: the training dataset.
      "split": "test",
      "pp": "value_range(-1,1)|onehot(10)",
      "batch_size": 500,
      "every": 500,  # Steps between runs; it also runs at the end of training.
  })


class Evaluator:
  """Compiles the eval step once; `run(params)` returns {'top1', 'loss', 'count'}."""

  def __init__(self, config, *, model, train_config, mesh, batch_sharding):
    name = config.data or train_config.input.data.name
    self.source = sources.get_source(name, config.split, train_config.input.data_dir or None)
    # Rounded up to a multiple of the devices; the extra rows are masked padding.
    global_batch = -(-config.batch_size // mesh.size) * mesh.size
    self.dataset = pipeline.eval_dataset(
        self.source, preprocess.parse(config.pp), global_batch=global_batch,
        process_index=jax.process_index(), process_count=jax.process_count())
    self.batch_sharding = batch_sharding
    self.input = train_config.input
    self._step = jax.jit(steps.make_eval_step(model, train_config.loss))

  def run(self, params) -> dict[str, float]:
    totals = None
    batches = pipeline.iterate(self.dataset, self.batch_sharding,
                               num_threads=self.input.num_threads,
                               prefetch=self.input.prefetch, device_prefetch=1)
    for batch in batches:
      out = self._step(params, batch)
      totals = out if totals is None else jax.tree_util.tree_map(lambda a, b: a + b,
                                                                  totals, out)
    totals = jax.device_get(totals)
    count = float(totals["count"])
    return {"top1": float(totals["correct"]) / count, "loss": float(totals["loss"]) / count,
            "count": count}
