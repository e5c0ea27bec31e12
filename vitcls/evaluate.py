"""`python -m vitcls.evaluate --workdir=DIR [--step=N] [--config.evals.NAME.KEY=VALUE ...]`.

Evaluates a workdir's checkpoint (the latest, or `--step`) with the evaluators of its
config, or others added on the command line (e.g. `--config.evals.ood.type=ood
--config.evals.ood.ood_data=digits`), on the params and on their EMA when the run kept
one; writes `report/evaluate.json`, the evaluators' arrays and `report/report.md` with
its plots. Training history (`metrics.jsonl`) is left as it is.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app, logging
import jax

from vitcls import configs, flags, models, sharding, validate
from vitcls.run import checkpoint, evaluation, report
from vitcls.run import workdir as wdir
from vitcls.errors import UserError

FLAGS = flags.FLAGS
_OVERRIDES: list[str] = []


def _define_flags() -> list[str]:
  """This CLI's flags (defined when it starts); their names."""
  return flags.define_checkpoint()


def evaluate(workdir: str, step: int | None = None, overrides=()) -> dict[str, float]:
  """Runs every evaluator of the (overridden) config on a checkpoint; writes the report."""
  config = configs.load_workdir_config(workdir, overrides)
  validate.check(config, training=False)  # The mesh against the devices: make_mesh.
  if not config.evals:
    raise configs.ConfigError("no evaluators: the run's config.evals is empty; add one, "
                              "e.g. --config.evals.test.type=classification")
  mesh = sharding.make_mesh(config.mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  model = models.build(config.model_name, config.num_classes, config.model)
  step, params, ema = checkpoint.load_weights(workdir, step)
  evals = evaluation.Evaluations(config, workdir, model=model, mesh=mesh,
                                 batch_sharding=batch_sharding)
  results = {k: float(v) for k, v in evals.run(params, ema).items()}
  if jax.process_index() == 0:
    wdir.atomic_write(wdir.evaluate_path(workdir), json.dumps(
        {"step": step, "metrics": results}, indent=2, sort_keys=True))
    logging.info("Report: %s", report.write(workdir, config))
  return results


def main(argv) -> None:
  """absl entry point: evaluates `--workdir`, prints each metric; a user error exits 2."""
  del argv
  try:
    if not FLAGS.workdir:
      raise UserError("--workdir=DIR is required: the workdir of a training run")
    results = evaluate(FLAGS.workdir, FLAGS.step, _OVERRIDES)
  except UserError as e:
    print(f"vitcls: error: {e}", file=sys.stderr)
    sys.exit(2)
  print("\n".join(f"{k}: {v:.4f}" for k, v in sorted(results.items())))


def run() -> None:
  """Entry point shared by `python -m vitcls.evaluate` and `vitcls evaluate`."""
  app.run(main, flags_parser=flags.parser(_OVERRIDES, _define_flags()))


if __name__ == "__main__":
  run()
