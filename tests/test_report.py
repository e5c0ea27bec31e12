"""The end-of-run report: final numbers from metrics.jsonl and a curves figure."""

import json
import os

from PIL import Image

from vitcls import report


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
