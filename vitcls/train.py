"""`python -m vitcls.train --config=experiments/NAME.py[:k=v,...] --workdir=DIR`.

The command line of the training loop (`vitcls.loop`). It checks the whole config first
(`vitcls.validate`), before JAX, TensorFlow or flax are imported, so a mistake is
reported in about a second, every problem at once; then it joins the other processes of
a multi-host run and trains. Running the same command on the same workdir resumes
exactly where the last checkpoint left off. `--config.KEY=VALUE` overrides one field of
the experiment's config. Exit codes: 0 done or stopped on request (SIGTERM, preemption:
the checkpoint of the last step is saved), 2 a user error (one line), other: a crash.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TensorFlow only builds datasets here.

from absl import app, flags, logging

from vitcls import configs, validate
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


def train(config, workdir: str) -> dict[str, float]:
  """Trains (or resumes) `config` in `workdir`: `vitcls.loop.train`."""
  from vitcls import loop  # pylint: disable=g-import-not-at-top
  return loop.train(config, workdir)


_OVERRIDES: list[str] = []


class _QuietLibraries:
  """Drops INFO logs of orbax and grain, which report every file they touch."""
  _NOISY = ("/orbax/", "/grain/")

  def filter(self, record) -> bool:
    return record.levelno > 20 or not any(n in record.pathname for n in self._NOISY)


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
  if _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                               _PROCESS_ID.value, **timeouts)
  elif _DISTRIBUTED.value:
    jax.distributed.initialize(**timeouts)


def main(argv) -> None:
  """absl entry point: checks the config before JAX loads, joins the cluster, trains.

  A user error exits 2 with one line; a preempted run exits 0 (the same command resumes).
  """
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  try:
    if not _CONFIG.value or not _WORKDIR.value:
      raise UserError("both --config=experiments/NAME.py and --workdir=DIR are required")
    bad_overrides = []
    config = configs.resolve(configs.load_experiment(_CONFIG.value), _OVERRIDES,
                             errors=bad_overrides)
    # Everything but the devices now, before any heavy import; the devices once known.
    validate.check(config, process_count=_NUM_PROCESSES.value or 1, known=bad_overrides)
    _compilation_cache(config)
    _join_cluster(config)
    import jax  # pylint: disable=g-import-not-at-top
    validate.check(config, num_devices=jax.device_count(),
                   process_count=jax.process_count())
    from vitcls import loop  # pylint: disable=g-import-not-at-top
    try:
      final = loop.train(config, _WORKDIR.value)
    except loop.Preempted as e:
      print(f"vitcls: {e}", file=sys.stderr)
      sys.exit(0)
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
