"""Turns a workdir into `report/report.md` and its PNG plots.

Written at the end of every training run and by `vitcls.evaluate`: the final metrics of
every evaluator (the latest value of each, from `metrics.jsonl`, overridden by the last
`vitcls.evaluate` run) beside the published figures in `config.expected`, a distilled
student beside its teacher (the distill evaluators' numbers), the classes an
evaluator's split had nothing of (which its per-class averages leave out), the run's
size and speed, and the plots a reviewer looks at: loss,
learning rate and eval curves; and, from the arrays evaluators leave in
`report/artifacts/<eval>.npz`, the confusion matrix, per-class accuracy bars, the
reliability diagram, OOD score histograms and per-label average precision, with the
classes named when the evaluator saved their names. Figures are drawn on bare
`matplotlib.figure.Figure`s, never through pyplot, so importing this module leaves
matplotlib's backend (a notebook's inline figures, say) as it was.
"""

from __future__ import annotations

import glob
import json
import os

from matplotlib import ticker
from matplotlib.figure import Figure
import numpy as np

from vitcls.run import workdir as wdir


def save_artifacts(workdir: str, name: str, arrays: dict) -> None:
  """Saves an evaluator's arrays for the plots (atomically: temp file, then rename)."""
  if not arrays:
    return
  path = os.path.join(wdir.artifacts_dir(workdir), f"{name}.npz")
  with wdir.atomic_file(path, "wb") as f:
    np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})


def load_artifacts(workdir: str) -> dict[str, dict[str, np.ndarray]]:
  """Each evaluator's arrays saved by `save_artifacts`, by name, for the report's plots."""
  out = {}
  for path in sorted(glob.glob(os.path.join(wdir.artifacts_dir(workdir), "*.npz"))):
    with np.load(path, allow_pickle=False) as npz:
      out[os.path.basename(path)[:-4]] = {k: npz[k] for k in npz.files}
  return out


# Eval metrics that are fractions in [0, 1]: their axes start at 0, so noise of a point or
# two does not look like learning (`plot_curves`).
FRACTION_METRICS = ("top1", "top5", "accuracy", "map")
MAX_CLASS_TICKS = 20  # One tick per class up to this many; every n-th above.


def _series(rows, key):
  points = [(r["step"], r[key]) for r in rows if key in r]
  return [p[0] for p in points], [p[1] for p in points]


def is_fraction(key: str, values) -> bool:
  """True for an accuracy-like metric (`FRACTION_METRICS`) whose values all lie in [0, 1]."""
  values = np.asarray(values, np.float64)
  return (key.rsplit("/", 1)[-1].endswith(FRACTION_METRICS) and values.size > 0
          and bool(np.all((values >= 0) & (values <= 1))))


def fraction_top(values) -> float:
  """The top of a fraction's y axis (which starts at 0): at least 0.1 above the largest
  value, rounded up to a tenth, at most 1."""
  top = np.ceil(round((float(np.max(values)) + 0.1) * 10, 6)) / 10
  return float(min(top, 1.0))


def format_curve(ax, key: str, steps, values) -> None:
  """The axes of one metric against the step, as the report draws them: integer step
  ticks, and for an accuracy-like metric (`is_fraction`) a y axis from 0 to
  `fraction_top`, its points drawn even on the axis' edges; other metrics keep matplotlib's
  scaling. For notebooks that draw `metrics.jsonl` themselves, after plotting on `ax`."""
  ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
  if len(steps) and max(steps) - min(steps) < 2:  # Room for integer ticks around a point.
    ax.set_xlim(min(steps) - 1, max(steps) + 1)
  if is_fraction(key, values):
    ax.set_ylim(0, fraction_top(values))
    for line in ax.get_lines():
      line.set_clip_on(False)


def plot_curves(rows, path: str) -> None:
  """Training loss, lr and every `<eval>/top1`, `<eval>/loss` and `<eval>/map` against the
  step (integer steps). Accuracy-like panels show 0 to at least 0.1 above their best
  value; loss and lr are scaled to their data."""
  eval_keys = sorted({k for r in rows for k in r if k.endswith(("/top1", "/loss", "/map"))})
  panels = [("loss", "train loss"), ("lr", "learning rate")] + [(k, k) for k in eval_keys]
  cols = min(len(panels), 4)
  rows_n = -(-len(panels) // cols)
  fig = Figure(figsize=(4 * cols, 3.2 * rows_n), layout="tight")
  axes = fig.subplots(rows_n, cols, squeeze=False)
  for ax in axes.flat[len(panels):]:
    ax.axis("off")
  for ax, (key, title) in zip(axes.flat, panels):
    steps, values = _series(rows, key)
    ax.plot(steps, values, marker="o" if len(steps) < 30 else None)
    format_curve(ax, key, steps, values)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  _save(fig, path)


def _save(fig: Figure, path: str) -> None:
  # A bare `Figure` is not pyplot's: nothing to close, and the backend is never touched.
  fig.savefig(path, dpi=100, bbox_inches="tight", pad_inches=0.1)


def class_labels(names, k: int) -> list[str]:
  """The `k` class names as strings, or the class indices when `names` is None or does not
  name `k` classes."""
  if names is None or len(names) != k:
    return [str(i) for i in range(k)]
  return [str(n) for n in names]


def _class_axis(axis, labels: list[str], spacing_pt: float, rotate: bool) -> None:
  """Ticks of one class axis: every class up to MAX_CLASS_TICKS, else every n-th; the tick
  font fits the space between ticks, and long names are slanted (`rotate`)."""
  k = len(labels)
  step = max(1, -(-k // MAX_CLASS_TICKS))
  ticks = np.arange(0, k, step)
  size = float(np.clip(0.5 * spacing_pt * step, 6, 10))
  axis.set_ticks(ticks, [labels[i] for i in ticks], fontsize=size)
  if rotate and max(len(labels[i]) for i in ticks) * 0.6 * size > 0.9 * spacing_pt * step:
    for text in axis.get_ticklabels():
      text.set(rotation=45, ha="right", rotation_mode="anchor")


def plot_confusion(confusion: np.ndarray, title: str, path: str, class_names=None) -> None:
  """Row-normalised confusion matrix (rows: true class), with counts in each cell for up
  to 20 classes; classes named by `class_names` when given (else by index).

  The matrix is 3 to 12 inches square whatever the class count, and the counts' and
  names' fonts follow the cell size.
  """
  k = confusion.shape[0]
  labels = class_labels(class_names, k)
  totals = np.maximum(confusion.sum(axis=1, keepdims=True), 1)
  side = float(np.clip(0.5 * k, 3.0, 12.0))  # Inches of the matrix.
  cell_pt = 72 * side / k
  name_in = 0.07 * min(max(len(n) for n in labels), 24)  # Room for the longest name.
  fig = Figure(figsize=(side + 1.8 + name_in, side + 1.0 + name_in), layout="constrained")
  ax = fig.subplots()
  image = ax.imshow(confusion / totals, cmap="Blues", vmin=0, vmax=1)
  if k <= MAX_CLASS_TICKS:
    digits = len(str(int(confusion.max(initial=0))))
    size = float(np.clip(min(0.32 * cell_pt, 0.8 * cell_pt / (0.6 * digits)), 5, 14))
    for i in range(k):
      for j in range(k):
        if confusion[i, j]:
          ax.text(j, i, str(int(confusion[i, j])), ha="center", va="center", fontsize=size,
                  color="white" if confusion[i, j] / totals[i, 0] > 0.5 else "black")
  _class_axis(ax.xaxis, labels, cell_pt, rotate=True)
  _class_axis(ax.yaxis, labels, cell_pt, rotate=False)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  ax.set_title(title)
  fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of the true class")
  _save(fig, path)


def plot_bars(values: np.ndarray, title: str, ylabel: str, path: str, class_names=None,
              xlabel: str = "class") -> None:
  """One bar per class (or label) with its value written on it; the mean as a line.

  Bars are named by `class_names` when given (else by index). The y axis starts a little
  below the worst bar, so differences of a point show; the written values keep the bars
  honest.
  """
  values = np.asarray(values, np.float64)
  k = len(values)
  labels = class_labels(class_names, k)
  width = float(np.clip(0.45 * k + 2, 4.5, 16.0))
  bar_pt = 72 * (width - 1.8) / max(k, 1)  # Space per bar, in points.
  longest = max((len(n) for n in labels), default=1)
  fig = Figure(figsize=(width, 3.2 + 0.05 * min(longest, 24)), layout="constrained")
  ax = fig.subplots()
  ax.bar(np.arange(k), np.nan_to_num(values), color="tab:blue")
  known = np.isfinite(values).any()
  low = max(0.0, float(np.nanmin(values)) - 0.05) if known else 0.0
  ax.set_ylim(low, 1.0)
  span = 1.0 - low
  if k <= 40:
    size = float(np.clip(0.45 * bar_pt, 6, 10))
    vertical = 4 * 0.6 * size > 0.9 * bar_pt  # "0.97" does not fit across the bar.
    for i, v in enumerate(values):
      inside = not np.isnan(v) and v - low > 0.2 * span  # Written in the bar, at its top.
      y = v - 0.01 * span if inside else max(low, np.nan_to_num(v)) + 0.01 * span
      ax.text(i, y, "n/a" if np.isnan(v) else f"{v:.2f}", ha="center",
              va="top" if inside else "bottom", color="white" if inside else "black",
              fontsize=size, rotation=90 if vertical else 0)
  if known:
    mean = float(np.nanmean(values))
    ax.axhline(mean, color="tab:red", lw=1)
    ax.annotate(f"mean\n{mean:.3f}", xy=(1, mean), xycoords=("axes fraction", "data"),
                xytext=(4, 0), textcoords="offset points", ha="left", va="center",
                color="tab:red", fontsize=9, annotation_clip=False)
  ax.set_xlim(-0.6, k - 0.4)
  _class_axis(ax.xaxis, labels, bar_pt, rotate=True)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  _save(fig, path)


def plot_reliability(arrays: dict, title: str, path: str) -> None:
  """Accuracy against confidence per bin, before and after temperature scaling.

  Marker area follows the bin's share of the examples and bins holding under 0.5% of
  them are left out: a bin of one example says nothing about calibration. Below, the
  share of examples per bin.
  """
  fig = Figure(figsize=(4.8, 5.6), layout="tight")
  ax, hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
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
  fig = Figure(figsize=(4 * len(kinds), 3), layout="tight")
  axes = fig.subplots(1, len(kinds), squeeze=False)
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
  """The plots one evaluator's arrays allow; returns (caption, file name) pairs.

  Classes (and labels) are named by the arrays' `class_names` when the evaluator saved
  them, else numbered.
  """
  plots = []
  names = arrays.get("class_names")
  def add(caption, stem, plot, *args, **kwargs):
    file = f"{name}_{stem}.png"
    plot(*args, os.path.join(out, file), **kwargs)
    plots.append((caption, file))
  if "confusion" in arrays:
    add(f"{name}: confusion matrix", "confusion", plot_confusion, arrays["confusion"],
        f"{name}: confusion matrix", class_names=names)
  if "per_class_accuracy" in arrays:
    add(f"{name}: per-class accuracy", "per_class", plot_bars, arrays["per_class_accuracy"],
        f"{name}: per-class accuracy", "accuracy", class_names=names)
  if "bin_count" in arrays:
    add(f"{name}: reliability diagram", "reliability", plot_reliability, arrays, name)
  if any(k.startswith("in_") for k in arrays):
    add(f"{name}: OOD scores", "ood", plot_ood, arrays, name)
  if "ap_per_label" in arrays:
    add(f"{name}: average precision per label", "ap", plot_bars, arrays["ap_per_label"],
        f"{name}: AP per label", "average precision", class_names=names, xlabel="label")
  return plots


def final_metrics(workdir: str, rows: list[dict]) -> dict[str, tuple[int, float]]:
  """metric -> (step, value): the latest of each eval metric, then `vitcls.evaluate`'s."""
  finals = {}
  for r in rows:
    finals.update({k: (r["step"], v) for k, v in r.items() if "/" in k})
  path = wdir.evaluate_path(workdir)
  if os.path.exists(path):
    with open(path) as f:
      evaluated = json.load(f)
    finals.update({k: (evaluated["step"], v) for k, v in evaluated["metrics"].items()})
  return finals


# Per-class arrays of the evaluators, NaN where a class (a label) had nothing to measure:
# (what the entries are, what they lacked, the summary numbers that leave them out).
PER_CLASS = {
    "per_class_accuracy": ("classes", "examples", "balanced and worst-class accuracy"),
    "ap_per_label": ("labels", "positives", "mAP"),
}
MAX_NAMED = 20  # Classes a line names; the rest are counted.


def absent_classes(artifacts: dict) -> list[str]:
  """Markdown lines naming, per evaluator, the classes (labels) its split had nothing of.

  Their per-class figure is n/a and the averages over classes leave them out, so a reader
  must know those averages describe the other classes only (a split with one class of
  three has balanced and worst-class accuracy 1.0 when that class is right).
  """
  lines = []
  for name, arrays in artifacts.items():
    for key, (kind, lacked, summaries) in PER_CLASS.items():
      values = np.asarray(arrays.get(key, []), np.float64)
      absent = np.flatnonzero(np.isnan(values))
      if not absent.size:
        continue
      labels = class_labels(arrays.get("class_names"), values.size)
      named = ", ".join(labels[i] for i in absent[:MAX_NAMED])
      if absent.size > MAX_NAMED:
        named += f" and {absent.size - MAX_NAMED} more"
      lines.append(f"- {name}: {absent.size} of {values.size} {kind} have no {lacked} "
                   f"({named}): n/a in the plot, and {summaries} are over the other "
                   f"{values.size - absent.size}.")
  return lines + [""] if lines else []


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


def teacher_table(finals: dict) -> list[str]:
  """Markdown lines setting, per distill evaluator (`<eval>/teacher_top1` among the final
  metrics), the student's top-1 beside its teacher's, their agreement and KL."""
  names = sorted(k[:-len("/teacher_top1")] for k in finals if k.endswith("/teacher_top1"))
  if not names:
    return []
  lines = ["## Student and teacher", "",
           "| eval | student top-1 | teacher top-1 | agreement | KL(teacher, student) | step |",
           "| --- | --- | --- | --- | --- | --- |"]
  for name in names:
    cells = [finals.get(f"{name}/{k}") for k in ("top1", "teacher_top1", "agreement",
                                                   "kl_to_teacher")]
    shown = " | ".join("" if c is None else f"{c[1]:.4f}" for c in cells)
    lines.append(f"| {name} | {shown} | {finals[f'{name}/teacher_top1'][0]} |")
  return lines + [""]


def write(workdir: str, config=None) -> str:
  """Writes the report of `workdir`; returns the path of report.md."""
  rows = wdir.read_metrics(workdir)
  out = wdir.report_dir(workdir)
  os.makedirs(out, exist_ok=True)
  lines = ["# Training report", ""]
  if config is not None:
    lines += [f"- experiment: model `{config.model_name}` {dict(config.model)}",
              f"- data: `{config.input.data.name}` ({config.input.pp}), batch "
              f"{config.input.batch_size}, seed {config.seed}"]
    distill = config.get("distill")
    if distill is not None and distill.teacher_init:
      lines.append(f"- teacher: `{distill.teacher_init}`, loss `{distill.loss}` "
                   f"(temperature {distill.temperature:g}, weight {distill.weight:g})")
    lines.append("")
  finals = final_metrics(workdir, rows)
  if finals:
    lines += ["| metric | value | step |", "| --- | --- | --- |"]
    lines += [f"| {k} | {v:.4f} | {s} |" for k, (s, v) in sorted(finals.items())]
    lines.append("")
  lines += teacher_table(finals)
  artifacts = load_artifacts(workdir)
  lines += absent_classes(artifacts)
  if config is not None and config.get("expected"):
    lines += expected_table(dict(config.expected), finals)
  speeds = [r["img_per_sec"] for r in rows if "img_per_sec" in r][1:]  # Skip compile.
  if speeds:
    lines += [f"Training speed: median {sorted(speeds)[len(speeds) // 2]:.0f} img/s.", ""]
  if rows:
    plot_curves(rows, os.path.join(out, "curves.png"))
    lines += ["![curves](curves.png)", ""]
  for name, arrays in artifacts.items():
    for caption, file in plot_artifacts(name, arrays, out):
      lines += [f"![{caption}]({file})", ""]
  path = os.path.join(out, wdir.REPORT_FILE)
  wdir.atomic_write(path, "\n".join(lines))
  return path
