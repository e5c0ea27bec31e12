"""The training loop, and the only place with effects.

It builds the pure pieces (model, optimiser, shardings, steps, data stream), restores
the newest intact checkpoint in the workdir if there is one, then runs
batch -> step -> metrics -> periodic eval / checkpoint until `total_steps`. Running it
again on the same workdir resumes exactly where the last checkpoint left off: the data
stream and per-step randomness are functions of (seed, step).

Stopping: SIGTERM (or, in a multi-process run, JAX's preemption sync point, which
every process reaches at the same step) ends the loop after the current step, saves
that step's checkpoint, waits for it and raises `Preempted`, which the CLI turns into
exit code 0; a second SIGTERM during the save is ignored. A non-finite loss stops the
run with `NonFiniteLossError` (the last good checkpoint is kept), or, with
`skip_nonfinite_updates`, after `max_skipped_in_a_row` skipped updates in a row.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time

from absl import logging
import jax
from jax.experimental import multihost_utils

from vitcls import (build, checkpoint, configs, evaluators, report, workdir_lock,
                    writers)
from vitcls.errors import UserError


class NonFiniteLossError(UserError):
  """The loss became NaN or infinite; the run stops without saving that state."""


class Preempted(Exception):
  """The run stopped on request after saving its checkpoint; the same command resumes."""

  def __init__(self, step: int, reason: str, directory: str):
    super().__init__(f"stopped at step {step} ({reason}); its checkpoint is saved in "
                     f"{directory}: run the same command to resume")
    self.step = step


class StopRequest:
  """Turns SIGTERM into a request the loop reads after each step (main thread only).

  The first SIGTERM asks the loop to stop; later ones, while the last checkpoint is
  written, are logged and ignored, so they cannot cut the save short.
  """

  def __init__(self):
    self.reason: str | None = None
    self._previous = None

  def __enter__(self) -> "StopRequest":
    # Several processes: JAX's own SIGTERM notifier feeds the preemption sync point.
    if (threading.current_thread() is threading.main_thread()
        and jax.process_count() == 1):
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _handle(self, signum, frame) -> None:
    del frame
    if self.reason is None:
      self.reason = signal.Signals(signum).name
      logging.warning("%s received: stopping after this step, once its checkpoint is "
                      "saved.", self.reason)
    else:
      logging.warning("%s received again: already stopping; the checkpoint is being "
                      "saved.", signal.Signals(signum).name)


def _stop_reason(request: StopRequest, step: int) -> str | None:
  """Why to stop after `step`, agreed by every process, or None."""
  if jax.process_count() > 1:
    # The coordination service turns a preemption notice into the same step everywhere.
    if multihost_utils.reached_preemption_sync_point(step):
      return "preemption notice"
    return None
  return request.reason


def _check_finite(config, metrics, step: int, last_saved: int | None,
                  ckpt_dir: str) -> None:
  kept = (f"the last good checkpoint (step {last_saved}) is kept in {ckpt_dir}"
          if last_saved is not None else "no checkpoint had been saved yet")
  if config.skip_nonfinite_updates:
    in_a_row = int(metrics["skipped_in_a_row"])
    if in_a_row >= config.max_skipped_in_a_row:
      raise NonFiniteLossError(
          f"{in_a_row} updates in a row had a non-finite loss or gradient (up to step "
          f"{step}): stopping; {kept}. Lower config.lr, set config.grad_clip_norm, or "
          f"check the input pipeline")
    return
  value = float(metrics["loss"])
  if not math.isfinite(value):
    raise NonFiniteLossError(
        f"loss is {value} at step {step}: stopping; {kept}. Lower config.lr, set "
        f"config.grad_clip_norm, config.skip_nonfinite_updates, or check the input "
        f"pipeline")


def train(config, workdir: str) -> dict[str, float]:
  """Trains (or resumes) `config` in `workdir`; returns the final eval metrics.

  Holds the workdir's lock throughout: a second trainer there stops at once. Raises
  `Preempted` after saving when asked to stop (SIGTERM, preemption notice).
  """
  os.makedirs(workdir, exist_ok=True)
  with workdir_lock.hold(workdir) as lock, StopRequest() as stop:
    return _train(config, workdir, lock, stop)


def _train(config, workdir: str, lock, stop: StopRequest) -> dict[str, float]:
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
  resume_step, train_state = ckpt.restore_latest(run.abstract_state)
  if resume_step is not None:
    logging.info("Resuming from the checkpoint of step %d in %s.", resume_step,
                 ckpt.directory)
  else:
    train_state = run.init_state()
  start = int(train_state.step)

  eval_configs = {n: evaluators.resolve(n, c) for n, c in config.evals.items()}
  evals = {
      name: evaluators.get(cfg.type).Evaluator(
          cfg, model=run.model, train_config=config, mesh=run.mesh,
          batch_sharding=run.batch_sharding)
      for name, cfg in eval_configs.items()}

  # clu's writers import TensorFlow: in the background, once the first step is queued.
  writer = writers.DeferredWriter(workdir, resume_step, total_steps, config.log_every)
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
  pending = None  # (step, metrics) of the previous step, checked one step late.
  log_time, log_step = time.perf_counter(), start
  final = {}
  stopped = None
  try:
    for step in range(start + 1, total_steps + 1):
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        batch = next(batches)
        train_state, metrics = run.train_step(train_state, batch)
      if pending is not None:  # Waits for step-1 only; this step is already queued.
        _check_finite(config, pending[1], pending[0], last_saved, ckpt.directory)
      pending = (step, metrics)
      writer.start()
      writer.progress(step)
      lock.refresh()

      if step % config.log_every == 0 or step == total_steps:
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        img_per_s = (step - log_step) * config.input.batch_size / (now - log_time)
        log_time, log_step = now, step
        writer.write_scalars(step, {**metrics, "img_per_sec": img_per_s,
                                    "examples_seen": step * config.input.batch_size})
      stopped = _stop_reason(stop, step)
      due = [n for n, c in eval_configs.items() if step % c.every == 0 or step == total_steps]
      if not stopped:
        final.update(run_evals(step, due))
      if stopped or step % config.checkpoint_every == 0 or step == total_steps:
        _check_finite(config, pending[1], step, last_saved, ckpt.directory)
        writer.flush()  # Metrics up to a checkpoint survive a kill right after it.
        if last_saved != step:
          ckpt.save(step, train_state)
        last_saved = step
      if stopped:
        break
    if start >= total_steps:
      logging.info("Nothing to do: the workdir already holds step %d of %d.", start,
                   total_steps)
      final = run_evals(start, evals)
  finally:
    ckpt.close()  # Lets a started save finish, so a good checkpoint is never lost.
    writer.flush()
    writer.close()
  if stopped:
    raise Preempted(last_saved, stopped, ckpt.directory)
  if jax.process_index() == 0:
    logging.info("Report: %s", report.write(workdir, config))
  return final
