"""How much of the bare train step's speed the real training loop keeps.

    python -m benchmarks.loop_overhead [--tiny]

`loop` is `vitcls.run.loop.train` itself on the default experiment (experiments/
mnist5k_vit.py: its input pipeline, logging every 50 steps, async checkpoints every
500, as configured; evals off): img/s from its own `img_per_sec` metric, each logging
interval after the first (which holds compilation) one sample. `bare` is the same
model's jitted train step called back to back on one batch already on the device: the
ceiling. The headline is loop / bare; the same loop with the host input pipeline
(`input.on_device=False`) is measured beside it, to show what keeping the data on the
device buys.
"""

from __future__ import annotations

import os
import statistics
import tempfile

from absl import logging
import jax

from benchmarks import common
from vitcls import configs
from vitcls.run import build, loop
from vitcls.run import workdir as wdir

EXPERIMENT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "experiments", "mnist5k_vit.py")


def _config(tiny: bool, overrides=()):
  arg = ":runlocal=True" if tiny else ""
  return configs.resolve(configs.load_experiment(EXPERIMENT + arg), list(overrides))


def bare_img_per_s(config, steps: int, repeats: int) -> common.Timing:
  """Seconds per `steps` bare steps: the host-pipeline build's step on one fixed batch."""
  host = configs.resolve(config, ["input.on_device=False"])
  run = build.build(host)
  holder = {"state": run.init_state()}
  batch = next(run.batches(0))

  def steps_fn():
    for _ in range(steps):
      holder["state"], metrics = run.train_step(holder["state"], batch)
    jax.block_until_ready(metrics)
  return common.time_it(steps_fn, repeats=repeats, warmup=1)


def loop_img_per_s(config, steps: int) -> list[float]:
  """img/s of each logging interval of a real `loop.train` run, the first one left out."""
  config = configs.resolve(config, [f"total_steps={steps}"])
  config.evals = configs.ConfigDict()
  with tempfile.TemporaryDirectory() as workdir:
    loop.train(config, workdir)
    rows = wdir.read_metrics(workdir)
  rates = [r["img_per_sec"] for r in rows if "img_per_sec" in r]
  return rates[1:] or rates


def run(tiny: bool) -> common.Result:
  """Training loop / bare step img/s on the default experiment (goal >= 0.97), host pp beside it."""
  logging.set_verbosity(logging.WARNING)
  config = _config(tiny)
  steps = 6 if tiny else 1000
  batch = config.input.batch_size
  bare_steps, repeats = (3, 2) if tiny else (50, 3)
  before = bare_img_per_s(config, bare_steps, repeats)
  device_rates = loop_img_per_s(config, steps)
  # Tiny: the host pipeline's loop is left out (it only adds a comparison row).
  host_rates = device_rates if tiny else loop_img_per_s(
      configs.resolve(config, ["input.on_device=False"]), steps // 2)
  after = bare_img_per_s(config, bare_steps, repeats)
  bare_samples = sorted(bare_steps * batch / t for t in (before.median, after.median))
  bare = statistics.mean(bare_samples)
  loop_rate, host_rate = statistics.median(device_rates), statistics.median(host_rates)
  figures = {
      "experiment": "experiments/mnist5k_vit.py" + (":runlocal=True" if tiny else ""),
      "batch": batch, "loop_steps": steps,
      "bare_img_per_s": bare, "bare_before_and_after": bare_samples,
      "loop_img_per_s": loop_rate, "loop_intervals": device_rates,
      "host_pipeline_loop_img_per_s": host_rate, "host_pipeline_intervals": host_rates,
      "loop_over_bare": loop_rate / bare,
      "host_pipeline_loop_over_bare": host_rate / bare,
  }
  spread = f"{min(device_rates) / bare:.2f}-{max(device_rates) / bare:.2f}"
  rows = [
      common.Row("loop_overhead", "bare step img/s (default experiment)", bare, "img/s",
                 f"{bare_samples[0]:.0f}-{bare_samples[-1]:.0f}"),
      common.ratio_row("loop_overhead", "training loop / bare step", loop_rate / bare, 0.97,
                       spread),
      common.ratio_row("loop_overhead", "same with the host input pipeline",
                       host_rate / bare,
                       spread=f"{min(host_rates) / bare:.2f}-{max(host_rates) / bare:.2f}"),
  ]
  return common.Result("loop_overhead", figures, rows)


if __name__ == "__main__":
  common.main(run)
