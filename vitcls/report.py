"""Turns a workdir into `report/report.md` and `report/curves.png`.

The report is written at the end of every training run: the final eval numbers, the
run's size and speed, and one figure with the training loss, the learning rate and each
eval metric against the step. Later evaluators (per-class, calibration, OOD) add
sections here.
"""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _series(rows, key):
  points = [(r["step"], r[key]) for r in rows if key in r]
  return [p[0] for p in points], [p[1] for p in points]


def plot_curves(rows, path: str) -> None:
  """Training loss, lr and every `<eval>/top1` and `<eval>/loss` against the step."""
  eval_keys = sorted({k for r in rows for k in r if "/" in k and not k.endswith("/count")})
  panels = [("loss", "train loss"), ("lr", "learning rate")] + [(k, k) for k in eval_keys]
  fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
  for ax, (key, title) in zip(axes[0], panels):
    steps, values = _series(rows, key)
    ax.plot(steps, values, marker="o" if len(steps) < 30 else None)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write(workdir: str, config=None) -> str:
  """Writes the report of `workdir`; returns the path of report.md."""
  rows = read_metrics(workdir)
  out = os.path.join(workdir, "report")
  os.makedirs(out, exist_ok=True)
  lines = ["# Training report", ""]
  if config is not None:
    lines += [f"- experiment: model `{config.model_name}` {dict(config.model)}",
              f"- data: `{config.input.data.name}` ({config.input.pp}), batch "
              f"{config.input.batch_size}, seed {config.seed}", ""]
  finals = {}
  for r in rows:
    finals.update({k: (r["step"], v) for k, v in r.items() if "/" in k})
  if finals:
    lines += ["| metric | value | step |", "| --- | --- | --- |"]
    lines += [f"| {k} | {v:.4f} | {s} |" for k, (s, v) in sorted(finals.items())]
    lines.append("")
  speeds = [r["img_per_sec"] for r in rows if "img_per_sec" in r][1:]  # Skip compile.
  if speeds:
    lines += [f"Training speed: median {sorted(speeds)[len(speeds) // 2]:.0f} img/s.", ""]
  if rows:
    plot_curves(rows, os.path.join(out, "curves.png"))
    lines += ["![curves](curves.png)", ""]
  path = os.path.join(out, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines))
  return path
