"""How much of the bare train step's speed survives the input pipeline, in one run.

    python benchmarks/loop_overhead.py --config=experiments/mnist5k_vit.py \
        [--steps=200] [--out=results.json] [--config.KEY=VALUE ...]

Three timings of the same compiled step, each after a warm-up:
  bare_step  train_step on one batch already on device (the ceiling);
  pipeline   the input pipeline alone, batches delivered on device;
  fed_step   train_step fed by the pipeline, as in `vitcls.train`.
Ratios: `pipeline_headroom = pipeline / bare_step` (above 1, the host outruns the step)
and `fed_over_bare = fed_step / bare_step` (1 means the step never waits for input).
On a CPU-only machine host preprocessing and the step share the same cores, so
`fed_over_bare` is lower there than on an accelerator host.
"""

from __future__ import annotations

import json
import time

from absl import app, flags
import jax

from vitcls import build, configs

_CONFIG = flags.DEFINE_string("config", None, "Experiment file, `path.py[:k=v,...]`.")
_STEPS = flags.DEFINE_integer("steps", 200, "Timed steps per measurement.")
_OUT = flags.DEFINE_string("out", None, "Optional JSON file for the results.")
_OVERRIDES: list[str] = []


def _img_per_s(fn, steps: int, batch: int) -> float:
  fn(5)  # Warm-up: compilation, thread start, first transfers.
  start = time.perf_counter()
  fn(steps)
  return steps * batch / (time.perf_counter() - start)


def main(argv):
  del argv
  config = configs.resolve(configs.load_experiment(_CONFIG.value), _OVERRIDES)
  run = build.build(config)
  state = run.init_state()
  batches = run.batches(0)
  fixed = next(batches)
  holder = {"state": state}

  def bare(n):
    for _ in range(n):
      holder["state"], metrics = run.train_step(holder["state"], fixed)
    jax.block_until_ready(metrics)

  def pipe(n):
    for _ in range(n):
      batch = next(batches)
    jax.block_until_ready(batch)

  def fed(n):
    for _ in range(n):
      holder["state"], metrics = run.train_step(holder["state"], next(batches))
    jax.block_until_ready(metrics)

  b = config.input.batch_size
  results = {name: _img_per_s(fn, _STEPS.value, b)
             for name, fn in (("bare_step", bare), ("pipeline", pipe), ("fed_step", fed))}
  results.update(pipeline_headroom=results["pipeline"] / results["bare_step"],
                 fed_over_bare=results["fed_step"] / results["bare_step"],
                 config=_CONFIG.value, overrides=_OVERRIDES, steps=_STEPS.value,
                 devices=run.mesh.size, backend=jax.default_backend())
  print(json.dumps(results, indent=2))
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main, flags_parser=configs.flags_parser(_OVERRIDES))
