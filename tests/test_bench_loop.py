"""benchmarks/loop_overhead.py at tiny size: the real loop and the bare step both run, and
the figures are consistent with each other. No timing is asserted (tiny speeds mean
nothing)."""

import json

from benchmarks import common, loop_overhead


def test_loop_overhead_measures_the_loop_against_the_bare_step(tmp_path):
  result = loop_overhead.run(tiny=True)
  figures = result.figures
  assert figures["loop_steps"] == 6 and figures["batch"] == 16
  # One img/s sample per logging interval but the first (compilation): steps 2..6.
  assert len(figures["loop_intervals"]) == 5
  assert figures["loop_over_bare"] == figures["loop_img_per_s"] / figures["bare_img_per_s"]
  goals = [row for row in result.rows if row.goal]
  assert [row.goal for row in goals] == [">= 0.97"]
  path = common.write(result, str(tmp_path))
  with open(path) as f:
    assert json.load(f)["rows"][1]["value"] == figures["loop_over_bare"]
