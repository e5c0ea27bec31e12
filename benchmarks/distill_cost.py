"""What a distillation teacher costs the train step: step time with it over without it.

    python -m benchmarks.distill_cost [--tiny]

Both steps are `vitcls.run.build.build`'s, on the default experiment's data kept on the
device (experiments/mnist5k_vit.py, batch 128, random shifts and mixup in the step): the
student is `experiments/mnist5k_distill.py`'s (ViT width 32, depth 2, MLP 64, patch 7),
and the teacher, run inside the same jitted step on the same mixed images, is either
`make train`'s ViT (width 128, depth 4, MLP 256) or a copy of the student's size. The
teachers' weights are fresh inits saved as `.npz` (what they compute does not change
their cost). The steps are timed interleaved, in one
process; the headline is the step time with the larger teacher over without one.
XLA's FLOP counts of the three programs are reported beside the times. `--tiny`: batch
16 and smaller models, a smoke test only.
"""

from __future__ import annotations

import os
import statistics
import tempfile

import jax
import jax.numpy as jnp

from benchmarks import common
from vitcls import configs, models
from vitcls.models import loading
from vitcls.run import build

NAME = "distill_cost"
EXPERIMENT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "experiments", "mnist5k_vit.py")
STUDENT = dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=7, pool_type="gap",
               posemb="learn", stoch_depth=0.0)
TEACHERS = {"large": dict(width=128, depth=4, mlp_dim=256, num_heads=4, patch_size=7,
                          pool_type="gap", posemb="learn"),
            "same": STUDENT}
TINY = {"student": dict(STUDENT, width=16, depth=1, mlp_dim=32),
        "large": dict(TEACHERS["large"], width=32, depth=1, mlp_dim=64, num_heads=2),
        "same": dict(STUDENT, width=16, depth=1, mlp_dim=32)}


def _teacher_file(folder: str, fields: dict) -> str:
  """A fresh init of a 10-class ViT with `fields` at 28 px, saved as an .npz."""
  model = models.build("vit", 10, fields)
  params = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 28, 28, 1)), train=False)
  path = os.path.join(folder, f"teacher_{len(os.listdir(folder))}.npz")
  loading.write_npz(path, jax.device_get(params["params"]))
  return path


def _run(tiny: bool, teacher: str = "", fields=None):
  student = TINY["student"] if tiny else STUDENT
  overrides = ["mixup.p=0.5", f"model={student!r}", "evals={}"]
  if tiny:
    overrides.append("input.batch_size=16")
  if teacher:
    overrides += [f"distill.teacher_init={teacher}", "distill.teacher_model_name=vit",
                  f"distill.teacher_model={fields!r}"]
  config = configs.resolve(configs.load_experiment(EXPERIMENT), overrides)
  return build.build(config)


def run(tiny: bool) -> common.Result:
  """Seconds per train step without a teacher and with each, interleaved; their ratios."""
  steps, repeats = (2, 2) if tiny else (20, 7)
  with tempfile.TemporaryDirectory() as folder:
    runs = {"none": _run(tiny)}
    for name in TEACHERS:
      fields = TINY[name] if tiny else TEACHERS[name]
      runs[name] = _run(tiny, _teacher_file(folder, fields), fields)
    states, batches, flops = {}, {}, {}
    for name, r in runs.items():
      states[name] = r.init_state()
      batches[name] = next(r.batches(0))
      cost = r.train_step.lower(states[name], batches[name]).compile().cost_analysis()
      flops[name] = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])

    def steps_of(name):
      def go():
        for _ in range(steps):
          states[name], metrics = runs[name].train_step(states[name], batches[name])
        jax.block_until_ready(metrics)
      return go

    seconds = {name: [] for name in runs}
    for name in runs:  # Compile and warm up each before any timing.
      common.time_it(steps_of(name), repeats=1, warmup=1)
    for _ in range(repeats):
      for name in runs:
        seconds[name].append(common.time_it(steps_of(name), repeats=1, warmup=0).median)
  timings = {n: common.Timing(statistics.median(s) / steps, min(s) / steps, max(s) / steps,
                              len(s)) for n, s in seconds.items()}
  batch = 16 if tiny else 128
  ratio = {n: timings[n].median / timings["none"].median for n in TEACHERS}
  spread = {n: f"{min(a / b for a, b in zip(seconds[n], seconds['none'])):.2f}-"
               f"{max(a / b for a, b in zip(seconds[n], seconds['none'])):.2f}"
            for n in TEACHERS}
  figures = {"batch": batch, "steps_per_timing": steps,
             "student": TINY["student"] if tiny else STUDENT,
             "teachers": {n: TINY[n] if tiny else TEACHERS[n] for n in TEACHERS},
             "step_s": {n: t.as_dict() for n, t in timings.items()},
             "img_per_s": {n: batch / t.median for n, t in timings.items()},
             "xla_flops": flops,
             "flops_ratio": {n: flops[n] / flops["none"] for n in TEACHERS},
             "step_time_ratio": ratio}
  large = figures["teachers"]["large"]
  rows = [
      common.Row(NAME, "student train step alone (mnist5k, batch "
                 f"{batch})", batch / timings["none"].median, "img/s"),
      common.ratio_row(NAME, f"step time with a {large['depth']}-block width-"
                       f"{large['width']} teacher / without", ratio["large"],
                       spread=spread["large"]),
      common.ratio_row(NAME, "step time with a teacher of the student's size / without",
                       ratio["same"], spread=spread["same"]),
  ]
  return common.Result(NAME, figures, rows, tiny=tiny)


if __name__ == "__main__":
  common.main(run)
