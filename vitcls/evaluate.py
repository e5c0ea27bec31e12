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

from absl import app, flags, logging
import jax

from vitcls import checkpoint, configs, evaluators, models, report, sharding
from vitcls.errors import UserError

FLAGS = flags.FLAGS
_OVERRIDES: list[str] = []


def _define_flags() -> None:
  """Defined when the CLI starts, not on import: `vitcls.train` defines --workdir too."""
  if "workdir" not in FLAGS:
    flags.DEFINE_string("workdir", None, "A vitcls workdir with checkpoints.")
  if "step" not in FLAGS:
    flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")


def evaluate(workdir: str, step: int | None = None, overrides=()) -> dict[str, float]:
  """Runs every evaluator of the (overridden) config on a checkpoint; writes the report."""
  config = configs.load_workdir_config(workdir, overrides)
  if not config.evals:
    raise configs.ConfigError("no evaluators: the run's config.evals is empty; add one, "
                              "e.g. --config.evals.test.type=classification")
  eval_configs = {n: evaluators.resolve(n, c) for n, c in config.evals.items()}
  mesh = sharding.make_mesh(config.mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  model = models.build(config.model_name, config.num_classes, config.model)
  step, params, ema = checkpoint.load_weights(workdir, step)
  weights = {"": params}
  if ema is not None:
    weights["_ema"] = ema
  results = {}
  for name, cfg in eval_configs.items():
    evaluator = evaluators.get(cfg.type).Evaluator(
        cfg, model=model, train_config=config, mesh=mesh, batch_sharding=batch_sharding)
    for suffix, params in weights.items():
      for key, value in evaluator.run(params).items():
        results[f"{name}{suffix}/{key}"] = float(value)
      if jax.process_index() == 0:
        report.save_artifacts(workdir, name + suffix, evaluator.artifacts)
  if jax.process_index() == 0:
    path = os.path.join(workdir, "report", report.EVALUATE_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      json.dump({"step": step, "metrics": results}, f, indent=2, sort_keys=True)
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
  _define_flags()
  app.run(main, flags_parser=configs.flags_parser(_OVERRIDES))


if __name__ == "__main__":
  run()
