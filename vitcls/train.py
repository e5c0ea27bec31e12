"""`python -m vitcls.train --config=experiments/NAME.py[:k=v,...] --workdir=DIR`.

The command line of the training loop (`vitcls.run.loop`). It checks the whole config first
(`vitcls.validate`), before JAX, TensorFlow or flax are imported, so a mistake is
reported in about a second, every problem at once; then it joins the other processes of
a multi-host run and trains. Running the same command on the same workdir resumes
exactly where the last checkpoint left off. `--config.KEY=VALUE` overrides one field of
the experiment's config. Exit codes: 0 done or stopped on request (SIGTERM, preemption:
the checkpoint of the last step is saved), 130 stopped by Ctrl-C (the same, saved; twice:
at once), 2 a user error or a checkpoint that cannot be written (one line), other: a
crash.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TensorFlow only builds datasets here.

from absl import app, logging

from vitcls import configs, flags, validate
from vitcls.errors import UserError

FLAGS = flags.FLAGS


def _define_flags() -> list[str]:
  """This CLI's flags (defined when it starts); their names."""
  return [
      *flags.define_run(),
      flags.define("bool", "distributed", False, "Call jax.distributed.initialize() "
                   "(cluster auto-detection: TPU pods, SLURM, ...); implied by "
                   "--coordinator."),
      flags.define("string", "coordinator", None, "host:port of process 0, for clusters "
                   "without auto-detection."),
      flags.define("integer", "num_processes", None, "With --coordinator."),
      flags.define("integer", "process_id", None, "With --coordinator."),
  ]


def train(config, workdir: str) -> dict[str, float]:
  """Trains (or resumes) `config` in `workdir`: `vitcls.run.loop.train`."""
  from vitcls.run import loop  # pylint: disable=g-import-not-at-top
  return loop.train(config, workdir)


_OVERRIDES: list[str] = []
_INTERRUPTED = 128 + 2  # The shell's exit code for a process ended by Ctrl-C (SIGINT).


class _QuietLibraries:
  """Drops INFO logs of orbax and grain, which report every file they touch, and the
  tracebacks of orbax's background threads: a failed save is reported by vitcls in one
  line (its cause and the last good checkpoint), each of orbax's threads would add a
  page of the same error."""
  _NOISY = ("/orbax/", "/grain/")

  def filter(self, record) -> bool:
    if "/asyncio/" in record.pathname and "/orbax/" in str(record.msg) + str(record.args):
      return False  # "Task exception was never retrieved": orbax's writes after a failure.
    if not any(n in record.pathname for n in self._NOISY):
      return True
    if record.levelno <= 20:
      return False
    record.exc_info, record.exc_text = None, None
    return True


def _quiet_closed_event_loops(unraisable, default=sys.unraisablehook) -> None:
  """Drops 'Event loop is closed' from TensorStore callbacks: when a save fails, orbax
  closes its event loop while that save's other writes are in flight, and each of them
  reports it with a traceback (hundreds); vitcls reports the failure once."""
  error = unraisable.exc_value
  if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
    return
  default(unraisable)


def _compilation_cache(config) -> None:
  """Turns on JAX's persistent compilation cache where the config says (see defaults)."""
  import jax  # pylint: disable=g-import-not-at-top
  if config.compilation_cache_dir and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir",
                      os.path.expanduser(config.compilation_cache_dir))


def _join_cluster(config) -> None:
  """jax.distributed.initialize when asked, with the config's failure timeout."""
  import jax  # pylint: disable=g-import-not-at-top
  timeouts = dict(heartbeat_timeout_seconds=config.heartbeat_timeout_s)
  if FLAGS.coordinator:
    jax.distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id,
                               **timeouts)
  elif FLAGS.distributed:
    jax.distributed.initialize(**timeouts)


def main(argv) -> None:
  """absl entry point: checks the config before JAX loads, joins the cluster, trains.

  A user error exits 2 with one line; a preempted run exits 0 (the same command resumes).
  """
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  sys.unraisablehook = _quiet_closed_event_loops
  try:
    if not FLAGS.config or not FLAGS.workdir:
      raise UserError("both --config=experiments/NAME.py and --workdir=DIR are required")
    bad_overrides = []
    config = configs.resolve(configs.load_experiment(FLAGS.config), _OVERRIDES,
                             errors=bad_overrides)
    # Everything but the devices now, before any heavy import; the devices once known.
    validate.check(config, process_count=FLAGS.num_processes or 1, known=bad_overrides)
    validate.check_workdir(FLAGS.workdir)
    _compilation_cache(config)
    _join_cluster(config)
    import jax  # pylint: disable=g-import-not-at-top
    validate.check(config, num_devices=jax.device_count(),
                   process_count=jax.process_count())
    from vitcls.run import loop  # pylint: disable=g-import-not-at-top
    try:
      final = loop.train(config, FLAGS.workdir)
    except loop.Preempted as e:
      print(f"vitcls: {e}", file=sys.stderr)
      sys.exit(_INTERRUPTED if e.interrupted else 0)
  except UserError as e:
    print(f"vitcls: error: {e}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print("vitcls: interrupted at once (Ctrl-C twice, or before training started): "
          "steps since the last checkpoint are lost; run the same command to resume",
          file=sys.stderr)
    sys.exit(_INTERRUPTED)
  if final:
    print("Final eval: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(final.items())))


def run() -> None:
  """Entry point shared by `python -m vitcls.train` and `vitcls train`."""
  app.run(main, flags_parser=flags.parser(_OVERRIDES, _define_flags()))


if __name__ == "__main__":
  run()
