"""The one evaluation runner, shared by the training loop and `vitcls.evaluate`.

`Evaluations(config, ...)` builds the evaluators of `config.evals` once; `run` puts each
on the params, and on their EMA as `<name>_ema/...` when the run keeps one, and saves the
arrays each returns (process 0) under the workdir for the report's plots. So a metric means
the same thing whether it was logged during training or computed later on a checkpoint.
"""

from __future__ import annotations

import jax

from vitcls import evaluators
from vitcls.run import report


class Evaluations:
  """The evaluators of a config by name, each with its resolved `evals.<name>` config."""

  def __init__(self, config, workdir: str, *, model, mesh, batch_sharding):
    self.configs = {n: evaluators.resolve(n, c) for n, c in config.evals.items()}
    self.workdir = workdir
    self._evaluators = {
        name: evaluators.get(cfg.type).Evaluator(
            cfg, model=model, train_config=config, mesh=mesh, batch_sharding=batch_sharding)
        for name, cfg in self.configs.items()}

  def run(self, params, ema=None, names=None) -> dict:
    """`<name>/<key>` scalars of each named evaluator (all by default) on `params`, and
    `<name>_ema/<key>` on `ema` unless it is None; saves their arrays for the report."""
    weights = {"": params}
    if ema is not None:
      weights["_ema"] = ema
    results = {}
    for name in self._evaluators if names is None else names:
      for suffix, tree in weights.items():
        scalars, arrays = self._evaluators[name].run(tree)
        for key, value in scalars.items():
          results[f"{name}{suffix}/{key}"] = value
        if jax.process_index() == 0:  # The latest arrays behind the report's plots.
          report.save_artifacts(self.workdir, name + suffix, arrays)
    return results
