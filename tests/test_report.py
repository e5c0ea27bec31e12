"""The end-of-run report: final numbers from metrics.jsonl, a curves figure and the plots of
the evaluators' arrays, drawn without touching matplotlib's backend."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from vitcls.run import report
from conftest import REPO


def test_report_lists_the_last_value_of_each_eval_metric_and_plots(tmp_path):
  rows = [{"step": s, "loss": 2.0 / s, "lr": 0.1, "img_per_sec": 100.0 + s}
          for s in range(1, 11)]
  rows += [{"step": 5, "test/top1": 0.5, "test/loss": 1.2, "test/count": 100},
           {"step": 10, "test/top1": 0.875, "test/loss": 0.4, "test/count": 100}]
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  text = open(report.write(str(tmp_path))).read()
  assert "| test/top1 | 0.8750 | 10 |" in text and "| test/loss | 0.4000 | 10 |" in text
  assert "median 106 img/s" in text  # Median of 102..110, the first step skipped.
  figure = Image.open(tmp_path / "report" / "curves.png")
  assert figure.size[0] > 4 * figure.size[1] / 2  # Four panels side by side.
  assert os.path.getsize(tmp_path / "report" / "curves.png") > 10_000


def test_report_sets_the_published_figures_beside_the_run(tmp_path):
  from vitcls import configs
  rows = [{"step": 100, "val/top1": 0.7712, "val/loss": 1.0}]
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  config = configs.resolve(configs.ConfigDict(
      {"expected": {"val/top1": 0.765, "v2/top1": 0.642}}))
  text = open(report.write(str(tmp_path), config)).read()
  assert "| val/top1 | 0.7650 | 0.7712 | +0.0062 |" in text
  assert "| v2/top1 | 0.6420 | not measured | |" in text


def test_report_leaves_matplotlib_backend_alone(tmp_path):
  """A notebook's backend (here svg, set as a notebook sets its inline one) stays as it
  was when vitcls.run.report is imported and draws; pyplot figures keep working."""
  code = f"""
import json, os, sys
import matplotlib
matplotlib.use("svg")
import matplotlib.pyplot as plt
before = matplotlib.get_backend()
import numpy as np
from vitcls.run import report
assert matplotlib.get_backend() == before, matplotlib.get_backend()
workdir = {str(tmp_path)!r}
with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
  f.write(json.dumps({{"step": 1, "loss": 1.0, "lr": 0.1, "test/top1": 0.5}}) + "\\n")
report.save_artifacts(workdir, "test", {{"confusion": np.eye(3, dtype=np.int64),
                                        "per_class_accuracy": np.ones(3)}})
report.write(workdir)
assert matplotlib.get_backend() == before, matplotlib.get_backend()
assert not plt.get_fignums(), plt.get_fignums()  # No figure left with pyplot.
fig, ax = plt.subplots()
ax.plot([0, 1])
fig.savefig(os.path.join(workdir, "mine.svg"))
print(before)
"""
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip() == "svg"
  assert sorted(os.listdir(tmp_path / "report")) == [
      "artifacts", "curves.png", "report.md", "test_confusion.png", "test_per_class.png"]


def _write_artifacts(tmp_path, **arrays):
  report.save_artifacts(str(tmp_path), "test", arrays)
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.write(json.dumps({"step": 1, "test/top1": 0.5}) + "\n")
  report.write(str(tmp_path))
  return tmp_path / "report"


def test_class_names_saved_by_the_evaluator_label_the_plots(tmp_path):
  names = np.asarray(["circle", "square", "triangle"])
  out = _write_artifacts(tmp_path, confusion=np.array([[9, 1, 0], [0, 8, 2], [1, 0, 9]]),
                         per_class_accuracy=np.array([0.9, 0.8, 0.9]), class_names=names)
  assert report.load_artifacts(str(tmp_path))["test"]["class_names"].tolist() == list(names)
  confusion = Image.open(out / "test_confusion.png")
  assert min(confusion.size) >= 350  # A 3-class matrix is not a thumbnail.
  assert report.class_labels(names, 3) == ["circle", "square", "triangle"]
  assert report.class_labels(None, 3) == ["0", "1", "2"]  # Artifacts without names.
  assert report.class_labels(names, 4) == ["0", "1", "2", "3"]  # Names of another dataset.


def test_artifacts_without_names_and_many_classes_still_plot(tmp_path):
  rng = np.random.default_rng(0)
  k = 100
  out = _write_artifacts(tmp_path, confusion=rng.integers(0, 5, (k, k)),
                         per_class_accuracy=rng.uniform(0.5, 1.0, k))
  for name in ("test_confusion.png", "test_per_class.png"):
    width, height = Image.open(out / name).size
    assert width <= 2000 and height <= 2000, (name, width, height)  # Capped, not 0.45"/class.


def test_accuracy_axes_start_at_zero_and_loss_is_left_alone():
  assert report.is_fraction("test/top1", [0.13, 0.145])
  assert report.is_fraction("val/balanced_accuracy", [0.5])
  assert not report.is_fraction("test/loss", [0.5, 0.4])
  assert not report.is_fraction("test/top1", [12.0])  # A percentage: not a fraction.
  assert report.fraction_top([0.13, 0.145]) == 0.3  # 0.13-0.145 looks flat from 0 to 0.3.
  assert report.fraction_top([0.2]) == 0.3
  assert report.fraction_top([0.5, 0.97]) == 1.0


def test_curve_axes_have_integer_steps_and_accuracy_from_zero():
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  top1, loss = Figure().subplots(1, 2)
  top1.plot([2, 4], [0.13, 0.145])
  report.format_curve(top1, "val/top1", [2, 4], [0.13, 0.145])
  assert top1.get_ylim() == (0.0, 0.3)
  assert all(float(t).is_integer() for t in top1.get_xticks())
  loss.plot([3], [2.3])
  report.format_curve(loss, "val/loss", [3], [2.3])
  assert loss.get_xlim() == (2, 4) and list(loss.get_xticks()) == [2, 3, 4]
  assert loss.get_ylim()[0] > 2  # Loss keeps its own scale.


def test_report_names_the_classes_an_eval_had_no_example_of(tmp_path):
  """An eval split with examples of one class of three: its balanced and worst-class
  accuracy describe that class alone, and the report says so beside the numbers."""
  _write_artifacts(tmp_path, confusion=np.array([[40, 0, 0], [0, 0, 0], [0, 0, 0]]),
                   per_class_accuracy=np.array([1.0, np.nan, np.nan]),
                   class_names=np.asarray(["big", "two", "one"]))
  text = open(tmp_path / "report" / "report.md").read()
  assert ("- test: 2 of 3 classes have no examples (two, one): n/a in the plot, and "
          "balanced and worst-class accuracy are over the other 1.") in text
  _write_artifacts(tmp_path, confusion=np.eye(3, dtype=int),
                   per_class_accuracy=np.ones(3))
  assert "have no examples" not in open(tmp_path / "report" / "report.md").read()
