"""Turns a workdir into `report/report.md` and its PNG plots.

Written at the end of every training run and by `vitcls.evaluate`: the final metrics of
every evaluator (the latest value of each, from `metrics.jsonl`, overridden by the last
`vitcls.evaluate` run) beside the published figures in `config.expected`, the run's size
and speed, and the plots a reviewer looks at: loss,
learning rate and eval curves; and, from the arrays evaluators leave in
`report/artifacts/<eval>.npz`, the confusion matrix, per-class accuracy bars, the
reliability diagram, OOD score histograms and per-label average precision.
"""

from __future__ import annotations

import glob
import json
import os

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

EVALUATE_FILE = "evaluate.json"  # The last `vitcls.evaluate` results, in report/.


def read_metrics(workdir: str) -> list[dict]:
  """Every row of the workdir's `metrics.jsonl`, in order; [] before anything is logged."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def save_artifacts(workdir: str, name: str, arrays: dict) -> None:
  """Saves an evaluator's arrays for the plots (atomically: temp file, then rename)."""
  if not arrays:
    return
  directory = os.path.join(workdir, "report", "artifacts")
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f".{name}.npz.tmp")
  with open(tmp, "wb") as f:
    np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
  os.replace(tmp, os.path.join(directory, f"{name}.npz"))


def load_artifacts(workdir: str) -> dict[str, dict[str, np.ndarray]]:
  """Each evaluator's arrays saved by `save_artifacts`, by name, for the report's plots."""
  out = {}
  for path in sorted(glob.glob(os.path.join(workdir, "report", "artifacts", "*.npz"))):
    with np.load(path, allow_pickle=False) as npz:
      out[os.path.basename(path)[:-4]] = {k: npz[k] for k in npz.files}
  return out


def _series(rows, key):
  points = [(r["step"], r[key]) for r in rows if key in r]
  return [p[0] for p in points], [p[1] for p in points]


def plot_curves(rows, path: str) -> None:
  """Training loss, lr and every `<eval>/top1` and `<eval>/loss` against the step."""
  eval_keys = sorted({k for r in rows for k in r if k.endswith(("/top1", "/loss", "/map"))})
  panels = [("loss", "train loss"), ("lr", "learning rate")] + [(k, k) for k in eval_keys]
  cols = min(len(panels), 4)
  rows_n = -(-len(panels) // cols)
  fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 3.2 * rows_n), squeeze=False)
  for ax in axes.flat[len(panels):]:
    ax.axis("off")
  for ax, (key, title) in zip(axes.flat, panels):
    steps, values = _series(rows, key)
    ax.plot(steps, values, marker="o" if len(steps) < 30 else None)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  _save(fig, path)


def _save(fig, path: str) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_confusion(confusion: np.ndarray, title: str, path: str) -> None:
  """Row-normalised confusion matrix (rows: true class), counts written in small cases."""
  k = confusion.shape[0]
  totals = np.maximum(confusion.sum(axis=1, keepdims=True), 1)
  fig, ax = plt.subplots(figsize=(1.5 + 0.45 * k, 1.2 + 0.45 * k))
  image = ax.imshow(confusion / totals, cmap="Blues", vmin=0, vmax=1)
  if k <= 20:
    for i in range(k):
      for j in range(k):
        if confusion[i, j]:
          ax.text(j, i, str(int(confusion[i, j])), ha="center", va="center", fontsize=7,
                  color="white" if confusion[i, j] / totals[i, 0] > 0.5 else "black")
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  ax.set_title(title)
  fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of the true class")
  _save(fig, path)


def plot_bars(values: np.ndarray, title: str, ylabel: str, path: str) -> None:
  """One bar per class (or label) with its value written on it; the mean as a line.

  The y axis starts a little below the worst bar, so differences of a point show; the
  written values keep the bars honest.
  """
  values = np.asarray(values, np.float64)
  fig, ax = plt.subplots(figsize=(max(4, 0.45 * len(values) + 2), 3.2))
  shown = np.nan_to_num(values)
  ax.bar(np.arange(len(values)), shown, color="tab:blue")
  mean = np.nanmean(values)
  ax.axhline(mean, color="tab:red", lw=1, label=f"mean {mean:.3f}")
  low = max(0.0, float(np.nanmin(values)) - 0.05) if np.isfinite(values).any() else 0.0
  ax.set_ylim(low, 1.0)
  if len(values) <= 40:
    for i, v in enumerate(values):
      ax.text(i, max(low, np.nan_to_num(v)), "n/a" if np.isnan(v) else f"{v:.2f}",
              ha="center", va="bottom", fontsize=7, rotation=90 if len(values) > 15 else 0)
  ax.set_xticks(np.arange(len(values)) if len(values) <= 40 else ax.get_xticks())
  ax.set_xlabel("class")
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.legend(loc="lower right")
  _save(fig, path)


def plot_reliability(arrays: dict, title: str, path: str) -> None:
  """Accuracy against confidence per bin, before and after temperature scaling.

  Marker area follows the bin's share of the examples and bins holding under 0.5% of
  them are left out: a bin of one example says nothing about calibration. Below, the
  share of examples per bin.
  """
  fig, (ax, hist) = plt.subplots(2, 1, figsize=(4.8, 5.6), sharex=True,
                                 gridspec_kw={"height_ratios": [3, 1]})
  ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="perfect calibration")
  for prefix, label, color in (("", "as trained", "tab:blue"),
                               ("scaled_", "temperature-scaled", "tab:orange")):
    count = arrays.get(f"{prefix}bin_count")
    if count is None:
      continue
    share = count / max(count.sum(), 1)
    used = share >= 0.005
    conf, acc = arrays[f"{prefix}bin_confidence"][used], arrays[f"{prefix}bin_accuracy"][used]
    ax.plot(conf, acc, color=color, lw=1, label=label)
    ax.scatter(conf, acc, s=20 + 400 * share[used], color=color, alpha=0.7)
    edges = np.linspace(0, 1, len(count) + 1)
    hist.bar(edges[:-1] + (0.25 if prefix else 0.5) / len(count), share,
             width=0.45 / len(count), color=color, align="edge" if prefix else "center")
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1)
  ax.set_ylabel("accuracy")
  ax.set_title(title)
  ax.legend(loc="lower right")
  hist.set_xlabel("confidence")
  hist.set_ylabel("share")
  _save(fig, path)


def plot_ood(arrays: dict, title: str, path: str) -> None:
  """Histograms of each OOD score, in- vs out-of-distribution (higher = more OOD)."""
  kinds = sorted(k[3:] for k in arrays if k.startswith("in_"))
  fig, axes = plt.subplots(1, len(kinds), figsize=(4 * len(kinds), 3), squeeze=False)
  for ax, kind in zip(axes[0], kinds):
    s_in, s_out = arrays[f"in_{kind}"], arrays[f"out_{kind}"]
    edges = np.histogram_bin_edges(np.concatenate([s_in, s_out]), bins=40)
    ax.hist(s_in, bins=edges, alpha=0.6, density=True, label="in-distribution")
    ax.hist(s_out, bins=edges, alpha=0.6, density=True, label="OOD")
    ax.set_title(f"{title}: {kind}")
    ax.set_xlabel("score")
    ax.legend()
  _save(fig, path)


def plot_artifacts(name: str, arrays: dict, out: str) -> list[tuple[str, str]]:
  """The plots one evaluator's arrays allow; returns (caption, file name) pairs."""
  plots = []
  def add(caption, stem, plot, *args):
    file = f"{name}_{stem}.png"
    plot(*args, os.path.join(out, file))
    plots.append((caption, file))
  if "confusion" in arrays:
    add(f"{name}: confusion matrix", "confusion", plot_confusion, arrays["confusion"], name)
  if "per_class_accuracy" in arrays:
    add(f"{name}: per-class accuracy", "per_class", plot_bars, arrays["per_class_accuracy"],
        f"{name}: per-class accuracy", "accuracy")
  if "bin_count" in arrays:
    add(f"{name}: reliability diagram", "reliability", plot_reliability, arrays, name)
  if any(k.startswith("in_") for k in arrays):
    add(f"{name}: OOD scores", "ood", plot_ood, arrays, name)
  if "ap_per_label" in arrays:
    add(f"{name}: average precision per label", "ap", plot_bars, arrays["ap_per_label"],
        f"{name}: AP per label", "average precision")
  return plots


def final_metrics(workdir: str, rows: list[dict]) -> dict[str, tuple[int, float]]:
  """metric -> (step, value): the latest of each eval metric, then `vitcls.evaluate`'s."""
  finals = {}
  for r in rows:
    finals.update({k: (r["step"], v) for k, v in r.items() if "/" in k})
  path = os.path.join(workdir, "report", EVALUATE_FILE)
  if os.path.exists(path):
    with open(path) as f:
      evaluated = json.load(f)
    finals.update({k: (evaluated["step"], v) for k, v in evaluated["metrics"].items()})
  return finals


def expected_table(expected: dict, finals: dict) -> list[str]:
  """Markdown lines setting each published figure (`config.expected`) beside this run's."""
  lines = ["## Against the published result", "",
           "| metric | expected | this run | difference |", "| --- | --- | --- | --- |"]
  for key, want in sorted(expected.items()):
    if key in finals:
      got = finals[key][1]
      lines.append(f"| {key} | {want:.4f} | {got:.4f} | {got - want:+.4f} |")
    else:
      lines.append(f"| {key} | {want:.4f} | not measured | |")
  return lines + [""]


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
  finals = final_metrics(workdir, rows)
  if finals:
    lines += ["| metric | value | step |", "| --- | --- | --- |"]
    lines += [f"| {k} | {v:.4f} | {s} |" for k, (s, v) in sorted(finals.items())]
    lines.append("")
  if config is not None and config.get("expected"):
    lines += expected_table(dict(config.expected), finals)
  speeds = [r["img_per_sec"] for r in rows if "img_per_sec" in r][1:]  # Skip compile.
  if speeds:
    lines += [f"Training speed: median {sorted(speeds)[len(speeds) // 2]:.0f} img/s.", ""]
  if rows:
    plot_curves(rows, os.path.join(out, "curves.png"))
    lines += ["![curves](curves.png)", ""]
  for name, arrays in load_artifacts(workdir).items():
    for caption, file in plot_artifacts(name, arrays, out):
      lines += [f"![{caption}]({file})", ""]
  path = os.path.join(out, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines))
  return path
