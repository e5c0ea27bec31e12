"""`python -m vitcls.evaluate --workdir=DIR [--step=N] [--config.evals.NAME.KEY=VALUE ...]`.

Evaluates a workdir's checkpoint (the latest, or `--step`) with the evaluators of its
config, or others added on the command line (e.g. `--config.evals.ood.type=ood
--config.evals.ood.ood_data=digits`), on the params and on their EMA when the run kept
one. It prints the metrics, then writes `report/evaluate.json`, the evaluators' arrays and
`report/report.md` with its plots; where it cannot write (a read-only workdir), it says so
in one line and exits 1, the metrics shown. Training history (`metrics.jsonl`) is left as
it is.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Sequence

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


def measure(workdir: str, step: int | None = None, overrides=()):
  """(step, config, metrics, evaluators' arrays) of every evaluator of the (overridden)
  config on a checkpoint; writes nothing (`save` does)."""
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
  results, arrays = evals.measure(params, ema)
  return step, config, {k: float(v) for k, v in results.items()}, arrays


def save(workdir: str, config, step: int, results: dict, arrays: dict) -> None:
  """Writes `measure`'s results under `report/` (process 0): the arrays, evaluate.json,
  then report.md with its plots."""
  if jax.process_index() != 0:
    return
  evaluation.save_arrays(workdir, arrays)
  wdir.atomic_write(wdir.evaluate_path(workdir), json.dumps(
      {"step": step, "metrics": results}, indent=2, sort_keys=True))
  logging.info("Report: %s", report.write(workdir, config))


def evaluate(workdir: str, step: int | None = None, overrides=()) -> dict[str, float]:
  """Runs every evaluator of the (overridden) config on a checkpoint; writes the report."""
  step, config, results, arrays = measure(workdir, step, overrides)
  save(workdir, config, step, results, arrays)
  return results


def _unsaved(workdir: str, error: Exception) -> str:
  """The one warning line for results that could not be written, and why."""
  where = wdir.report_dir(workdir)
  why = getattr(error, "problem", None) or (
      f"cannot write under {where}: {getattr(error, 'strerror', None) or error}")
  return (f"vitcls: warning: the metrics above are not saved ({why}): make {where} "
          f"writable, or evaluate a copy of the workdir")


def _evaluate(overrides) -> int:
  """The command: prints each metric first, then saves them; 1 when they could not be."""
  if not FLAGS.workdir:
    raise UserError("--workdir=DIR is required: the workdir of a training run")
  step, config, results, arrays = measure(FLAGS.workdir, FLAGS.step, overrides)
  print("\n".join(f"{k}: {v:.4f}" for k, v in sorted(results.items())), flush=True)
  try:
    save(FLAGS.workdir, config, step, results, arrays)
  except (OSError, wdir.OutputError) as e:
    print(_unsaved(FLAGS.workdir, e), file=sys.stderr)
    return 1
  return 0


def main(argv: Sequence[str]) -> int:
  """Runs the CLI in-process on `argv` (program name first); returns the exit status."""
  return flags.main_in_process(argv, _define_flags, _evaluate)


def run(argv: Sequence[str] | None = None) -> None:
  """Entry point shared by `python -m vitcls.evaluate` and `vitcls evaluate`."""
  app.run(lambda rest: flags.run_command(rest, _OVERRIDES, _evaluate), argv=argv,
          flags_parser=flags.parser(_OVERRIDES, _define_flags()))


if __name__ == "__main__":
  run()
