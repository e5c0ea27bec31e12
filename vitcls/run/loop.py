"""The training loop: the order of a run's effects, step after step.

It builds the run's pieces (model, optimiser, shardings, steps, data stream), restores
the newest intact checkpoint in the workdir if there is one, then runs
batch -> step -> metrics -> periodic eval / checkpoint until `total_steps`; files are
written through the other modules of `vitcls.run`, in the order set here. Running it
again on the same workdir resumes exactly where the last checkpoint left off: the data
stream and per-step randomness are functions of (seed, step).

Stopping: SIGTERM or Ctrl-C (or, in a multi-process run, JAX's preemption sync point,
which every process reaches at the same step) ends the loop after the current step, saves
that step's checkpoint, waits for it and raises `Preempted`, which the CLI turns into
exit code 0 (130 for Ctrl-C); a second SIGTERM during the save is ignored, a second Ctrl-C
stops at once. A non-finite loss stops the run with `NonFiniteLossError` (the last good
checkpoint is kept), or, with `skip_nonfinite_updates`, after `max_skipped_in_a_row`
skipped updates in a row. A checkpoint that cannot be written stops the run after the
step that finds it (`checkpoint.CheckpointSaveError`, naming the last good one).

The workdir's `config.json` is written only once a start is accepted and will train
(`config_record`).
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

from vitcls.run import build, checkpoint, config_record, evaluation, lock as workdir_lock
from vitcls.run import report, writers
from vitcls.errors import UserError


class NonFiniteLossError(UserError):
  """The loss became NaN or infinite; the run stops without saving that state."""


class Preempted(Exception):
  """The run stopped on request after saving its checkpoint; the same command resumes.

  `interrupted`: the request was Ctrl-C (SIGINT), which the CLI's exit code says.
  """

  def __init__(self, step: int, reason: str, directory: str):
    super().__init__(f"stopped at step {step} ({reason}); its checkpoint is saved in "
                     f"{directory}: run the same command to resume")
    self.step = step
    self.interrupted = reason == "SIGINT"


class StopRequest:
  """Turns SIGTERM and Ctrl-C (SIGINT) into a request the loop reads after each step (main
  thread only).

  The first asks the loop to stop; a later SIGTERM, while the last checkpoint is written,
  is logged and ignored, so it cannot cut the save short; a second Ctrl-C is a person who
  will not wait: KeyboardInterrupt at once (the previous checkpoint is intact, since a
  step is renamed into place only when whole).
  """

  def __init__(self):
    self.reason: str | None = None
    self._previous: dict[int, object] = {}

  def __enter__(self) -> "StopRequest":
    # Several processes: JAX's own SIGTERM notifier feeds the preemption sync point, and
    # Ctrl-C, which reaches one process, stops that one at once (the others then stop on
    # the heartbeat timeout).
    if (threading.current_thread() is threading.main_thread()
        and jax.process_count() == 1):
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)

  def _handle(self, signum, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.reason is None:
      self.reason = name
      logging.warning("%s received: stopping after this step, once its checkpoint is "
                      "saved%s.", name,
                      " (Ctrl-C again stops at once)" if signum == signal.SIGINT else "")
    elif signum == signal.SIGINT:
      raise KeyboardInterrupt
    else:
      logging.warning("%s received again: already stopping; the checkpoint is being "
                      "saved.", name)


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
  """`train` once the workdir is held: steps from the newest checkpoint to the last."""
  ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints,
                                 asynchronous=config.async_checkpoints)
  changed = (config_record.check_resume(workdir, config)
             if ckpt.latest_step() is not None else [])
  run = _build(config)
  resume_step, train_state = _restore_or_init(run, ckpt)
  start, total_steps = int(train_state.step), run.total_steps
  if jax.process_index() == 0:
    config_record.write(workdir, config, changed, resume_step, trains=start < total_steps)
  evals = evaluation.Evaluations(config, workdir, model=run.model, mesh=run.mesh,
                                 batch_sharding=run.batch_sharding, teacher=run.teacher)
  # clu's writers import TensorFlow: in the background, once the first step is queued.
  writer = writers.DeferredWriter(workdir, resume_step, total_steps, config.log_every)
  batches = run.batches(start)
  last_saved, pending, final, stopped = resume_step, None, {}, None
  last_log = (time.perf_counter(), start)  # For the throughput of the next log.
  try:
    for step in range(start + 1, total_steps + 1):
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        train_state, metrics = run.train_step(train_state, next(batches))
      if pending is not None:  # Waits for step-1 only; this step is already queued.
        _check_finite(config, pending[1], pending[0], last_saved, ckpt.directory)
      pending = (step, metrics)
      ckpt.poll()  # A save that failed in the background stops the run here.
      writer.start()
      writer.progress(step)
      lock.refresh()
      if _due(step, config.log_every, total_steps):
        last_log = _log_metrics(writer, config, step, metrics, last_log)
      stopped = _stop_reason(stop, step)
      if not stopped:
        names = [n for n, c in evals.configs.items() if _due(step, c.every, total_steps)]
        final.update(_evaluate(evals, train_state, step, writer, names))
      if stopped or _due(step, config.checkpoint_every, total_steps):
        last_saved = _save(ckpt, writer, config, train_state, metrics, step, last_saved)
      if stopped:
        break
    if start >= total_steps:
      logging.info("Nothing to do: the workdir already holds step %d of %d.", start,
                   total_steps)
      final = _evaluate(evals, train_state, start, writer)
    ckpt.wait()  # The last save's failure is this run's, said before "saved" is claimed.
  finally:
    ckpt.close()  # Lets a started save finish, so a good checkpoint is never lost.
    writer.flush()
    writer.close()
  if stopped:
    raise Preempted(last_saved, stopped, ckpt.directory)
  if jax.process_index() == 0:
    logging.info("Report: %s", report.write(workdir, config))
  return final


def _due(step: int, every: int, total_steps: int) -> bool:
  """Whether a periodic action (log, eval, checkpoint) runs after `step`: every `every`
  steps, and after the last step whatever `every` is."""
  return step % every == 0 or step == total_steps


def _build(config) -> build.Run:
  """Builds the run and says what it is."""
  run = build.build(config)
  logging.info("Model %s: %s parameters; %d steps of %d examples on %d devices.",
               config.model_name, f"{run.num_params:,}", run.total_steps,
               config.input.batch_size, run.mesh.size)
  return run


def _restore_or_init(run: build.Run, ckpt: checkpoint.Checkpointer):
  """(step restored or None, state): the newest intact checkpoint, else the step-0 state.

  A checkpoint trained with another distillation teacher stops the run here."""
  resume_step, train_state = ckpt.restore_latest(run.abstract_state)
  if resume_step is not None:
    run.check_resumed(train_state, resume_step, ckpt.directory)
    logging.info("Resuming from the checkpoint of step %d in %s.", resume_step,
                 ckpt.directory)
  else:
    train_state = run.init_state()
  return resume_step, train_state


def _log_metrics(writer, config, step: int, metrics, last_log: tuple[float, int]):
  """Writes the step's metrics, with the throughput since `last_log` (time, step); returns
  this log's (time, step)."""
  metrics = jax.device_get(metrics)
  now = time.perf_counter()
  img_per_s = (step - last_log[1]) * config.input.batch_size / (now - last_log[0])
  writer.write_scalars(step, {**metrics, "img_per_sec": img_per_s,
                              "examples_seen": step * config.input.batch_size})
  return now, step


def _evaluate(evals: evaluation.Evaluations, train_state, step: int, writer,
              names=None) -> dict[str, float]:
  """The named evals (all by default) on the params and their EMA, written and logged."""
  results = evals.run(train_state.params, train_state.ema, names)
  if results:
    writer.write_scalars(step, results)
    logging.info("Eval at step %d: %s", step,
                 ", ".join(f"{k}={v:.4f}" for k, v in sorted(results.items())))
  return results


def _save(ckpt: checkpoint.Checkpointer, writer, config, train_state, metrics, step: int,
          last_saved: int | None) -> int:
  """Checks the step's loss, flushes the metrics, then saves `step` unless it is saved
  already; returns it, the new last saved step."""
  _check_finite(config, metrics, step, last_saved, ckpt.directory)
  writer.flush()  # Metrics up to a checkpoint survive a kill right after it.
  if last_saved != step:
    ckpt.save(step, train_state)
  return step
