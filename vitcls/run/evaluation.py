"""The one evaluation runner, shared by the training loop and `vitcls.evaluate`.

`Evaluations(config, ...)` builds the evaluators of `config.evals` once (an evaluator
module that sets `NEEDS_TEACHER` is also given the run's distillation teacher, loaded
here once when the caller has none); `measure` puts each on the params, and on their EMA
as `<name>_ema/...` when the run keeps one; `save_arrays` writes the arrays each returns
(process 0) under the workdir for the report's plots; `run` does both. So a metric means
the same thing whether it was logged during training or computed later on a checkpoint,
and a command can show it before it writes anything.
"""

from __future__ import annotations

import jax

from vitcls import evaluators
from vitcls.run import report
from vitcls.run import teacher as teacher_lib


class Evaluations:
  """The evaluators of a config by name, each with its resolved `evals.<name>` config."""

  def __init__(self, config, workdir: str, *, model, mesh, batch_sharding, teacher=None):
    self.configs = {n: evaluators.resolve(n, c) for n, c in config.evals.items()}
    self.workdir = workdir
    self._evaluators = {}
    for name, cfg in self.configs.items():
      module = evaluators.get(cfg.type)
      context = dict(model=model, train_config=config, mesh=mesh,
                     batch_sharding=batch_sharding)
      if getattr(module, "NEEDS_TEACHER", False):
        if teacher is None:
          teacher = teacher_lib.load(config, mesh)
        context["teacher"] = teacher
      self._evaluators[name] = module.Evaluator(cfg, **context)

  def measure(self, params, ema=None, names=None) -> tuple[dict, dict]:
    """(`<name>/<key>` scalars, `<name>` arrays) of each named evaluator (all by default)
    on `params`, and `<name>_ema/...` on `ema` unless it is None; writes nothing, so a
    caller can show the results before anything can fail to be written."""
    weights = {"": params}
    if ema is not None:
      weights["_ema"] = ema
    results, arrays = {}, {}
    for name in self._evaluators if names is None else names:
      for suffix, tree in weights.items():
        scalars, arrays[name + suffix] = self._evaluators[name].run(tree)
        for key, value in scalars.items():
          results[f"{name}{suffix}/{key}"] = value
    return results, arrays

  def run(self, params, ema=None, names=None) -> dict:
    """`measure`'s scalars; its arrays saved for the report (`save_arrays`)."""
    results, arrays = self.measure(params, ema, names)
    save_arrays(self.workdir, arrays)
    return results


def save_arrays(workdir: str, arrays: dict) -> None:
  """Saves `Evaluations.measure`'s arrays (process 0): the latest behind the report's plots."""
  if jax.process_index() == 0:
    for name, named in arrays.items():
      report.save_artifacts(workdir, name, named)
