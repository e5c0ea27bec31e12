"""`python -m vitcls.train --config=experiments/NAME.py[:k=v,...] --workdir=DIR`.

The training loop, and the only place with effects: it reads the config, builds the
pure pieces (model, optimiser, shardings, steps, data stream), restores the latest
complete checkpoint in the workdir if there is one, then runs
batch -> step -> metrics -> periodic eval / checkpoint until `total_steps`.
Running the same command on the same workdir resumes exactly where the last checkpoint
left off: the data stream and per-step randomness are functions of (seed, step).
`--config.KEY=VALUE` overrides one field of the experiment's config.
"""

from __future__ import annotations

import math
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TensorFlow only builds datasets here.

from absl import app, flags, logging
from clu import periodic_actions
import jax

from vitcls import build, checkpoint, configs, evaluators, report, writers
from vitcls.errors import UserError

_CONFIG = flags.DEFINE_string("config", None, "Experiment file, `path.py[:k=v,...]`.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (cluster auto-detection: "
    "TPU pods, SLURM, ...); implied by --coordinator.")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0, for "
                                   "clusters without auto-detection.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --coordinator.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --coordinator.")


class NonFiniteLossError(UserError):
  """The loss became NaN or infinite; the run stops without saving that state."""


def _check_finite(loss, step: int, last_saved: int | None, ckpt_dir: str) -> None:
  value = float(loss)
  if not math.isfinite(value):
    kept = (f"the last good checkpoint (step {last_saved}) is kept in {ckpt_dir}"
            if last_saved is not None else "no checkpoint had been saved yet")
    raise NonFiniteLossError(
        f"loss is {value} at step {step}: stopping; {kept}. Lower config.lr, set "
        f"config.grad_clip_norm, or check the input pipeline")


def train(config, workdir: str) -> dict[str, float]:
  """Trains (or resumes) `config` in `workdir`; returns the final eval metrics."""
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(configs.to_json(config))

  run = build.build(config)
  total_steps = run.total_steps
  logging.info("Model %s: %s parameters; %d steps of %d examples on %d devices.",
               config.model_name, f"{run.num_params:,}", total_steps,
               config.input.batch_size, run.mesh.size)

  ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints,
                                 asynchronous=config.async_checkpoints)
  resume_step = ckpt.latest_step()
  if resume_step is not None:
    logging.info("Resuming from the checkpoint of step %d in %s.", resume_step,
                 ckpt.directory)
    try:
      train_state = ckpt.restore(resume_step, run.abstract_state)
    except (ValueError, KeyError, TypeError) as e:
      raise UserError(f"the checkpoint of step {resume_step} in {ckpt.directory} does not "
                      f"fit this config (model or optimiser changed?): use a new --workdir "
                      f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
  else:
    train_state = run.init_state()
  start = int(train_state.step)

  eval_configs = {n: evaluators.resolve(n, c) for n, c in config.evals.items()}
  evals = {
      name: evaluators.get(cfg.type).Evaluator(
          cfg, model=run.model, train_config=config, mesh=run.mesh,
          batch_sharding=run.batch_sharding)
      for name, cfg in eval_configs.items()}

  writer = writers.make_writer(workdir, resume_step)
  progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                             every_steps=config.log_every)
  batches = run.batches(start)

  def run_evals(step: int, names) -> dict[str, float]:
    """Each named eval on the params, and on their EMA as `<name>_ema/...` when it is on."""
    results = {}
    weights = {"": train_state.params}
    if train_state.ema is not None:
      weights["_ema"] = train_state.ema
    for name in names:
      for suffix, params in weights.items():
        for key, value in evals[name].run(params).items():
          results[f"{name}{suffix}/{key}"] = value
        if jax.process_index() == 0:  # The latest arrays behind the report's plots.
          report.save_artifacts(workdir, name + suffix, getattr(evals[name], "artifacts", {}))
    if results:
      writer.write_scalars(step, results)
      logging.info("Eval at step %d: %s", step,
                   ", ".join(f"{k}={v:.4f}" for k, v in sorted(results.items())))
    return results

  last_saved = resume_step
  pending = None  # (step, loss) of the previous step, checked one step late.
  log_time, log_step = time.perf_counter(), start
  final = {}
  try:
    for step in range(start + 1, total_steps + 1):
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        batch = next(batches)
        train_state, metrics = run.train_step(train_state, batch)
      if pending is not None:  # Waits for step-1 only; this step is already queued.
        _check_finite(pending[1], pending[0], last_saved, ckpt.directory)
      pending = (step, metrics["loss"])
      progress(step)

      if step % config.log_every == 0 or step == total_steps:
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        img_per_s = (step - log_step) * config.input.batch_size / (now - log_time)
        log_time, log_step = now, step
        writer.write_scalars(step, {**metrics, "img_per_sec": img_per_s,
                                    "examples_seen": step * config.input.batch_size})
      due = [n for n, c in eval_configs.items() if step % c.every == 0 or step == total_steps]
      final.update(run_evals(step, due))
      if step % config.checkpoint_every == 0 or step == total_steps:
        _check_finite(pending[1], step, last_saved, ckpt.directory)
        writer.flush()  # Metrics up to a checkpoint survive a kill right after it.
        ckpt.save(step, train_state)
        last_saved = step
    if start >= total_steps:
      logging.info("Nothing to do: the workdir already holds step %d of %d.", start,
                   total_steps)
      final = run_evals(start, evals)
  finally:
    ckpt.close()  # Lets a started save finish, so a good checkpoint is never lost.
    writer.flush()
    writer.close()
  if jax.process_index() == 0:
    logging.info("Report: %s", report.write(workdir, config))
  return final


_OVERRIDES: list[str] = []


class _QuietLibraries:
  """Drops INFO logs of orbax and grain, which report every file they touch."""
  _NOISY = ("/orbax/", "/grain/")

  def filter(self, record) -> bool:
    return record.levelno > 20 or not any(n in record.pathname for n in self._NOISY)


def main(argv) -> None:
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  try:
    if not _CONFIG.value or not _WORKDIR.value:
      raise UserError("both --config=experiments/NAME.py and --workdir=DIR are required")
    config = configs.resolve(configs.load_experiment(_CONFIG.value), _OVERRIDES)
    if _COORDINATOR.value:
      jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                                 _PROCESS_ID.value)
    elif _DISTRIBUTED.value:
      jax.distributed.initialize()
    final = train(config, _WORKDIR.value)
  except UserError as e:
    print(f"vitcls: error: {e}", file=sys.stderr)
    sys.exit(2)
  if final:
    print("Final eval: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(final.items())))


def run() -> None:
  """Entry point shared by `python -m vitcls.train` and `vitcls train`."""
  app.run(main, flags_parser=configs.flags_parser(_OVERRIDES))


if __name__ == "__main__":
  run()
