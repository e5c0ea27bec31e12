"""The ImageNet paper experiments run shrunk with runlocal (their own file, so that the test
workers share the experiment runs evenly); the rest are in tests/test_experiments.py."""

import os

import pytest

from test_experiments import VARIANTS, is_paper_experiment, run_experiment
from test_experiments import teachers  # noqa: F401  # The fixture, shared.


@pytest.mark.parametrize("spec", [v for v in VARIANTS if is_paper_experiment(v)],
                         ids=lambda s: os.path.basename(s))
def test_paper_experiment_runs_a_few_steps(spec, tmp_path, teachers):  # noqa: F811
  run_experiment(spec, tmp_path, teachers)
