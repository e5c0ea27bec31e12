"""Every experiment file runs (shrunk with runlocal), and a real run really learns."""

import glob
import os

import pytest

from vitcls import configs, train
from conftest import REPO, read_metrics

EXPERIMENTS = sorted(glob.glob(os.path.join(REPO, "experiments", "*.py")))


def test_there_are_experiments():
  assert {"mnist5k_vit.py", "digits_vit.py"} <= {os.path.basename(p) for p in EXPERIMENTS}


# Experiments whose arguments pick another model: each such choice runs too.
VARIANTS = [p + ":runlocal=True" for p in EXPERIMENTS] + [
    os.path.join(REPO, "experiments", f"finetune.py:model={m},runlocal=True")
    for m in ("bit", "mixer", "convnext")] + [
    os.path.join(REPO, "experiments", f"mnist5k_models.py:model={m},runlocal=True")
    for m in ("convnext_v2", "vit_reg")]


@pytest.mark.parametrize("spec", VARIANTS, ids=lambda s: os.path.basename(s))
def test_experiment_runs_a_few_steps(spec, tmp_path):
  config = configs.resolve(configs.load_experiment(spec))
  final = train.train(config, str(tmp_path))
  assert any(k.endswith("/count") and v > 0 for k, v in final.items()), final
  assert all(0.0 <= v <= 1.0 for k, v in final.items()
             if k.endswith(("/top1", "/map", "_f1")))
  steps = [r["step"] for r in read_metrics(str(tmp_path)) if "loss" in r]
  assert steps == list(range(1, config.total_steps + 1))


def test_digits_run_learns(tmp_path):
  """300 steps on 1,438 8x8 digits: 92.5% when measured; chance is 10%."""
  config = configs.resolve(configs.load_experiment(
      os.path.join(REPO, "experiments", "digits_vit.py")))
  final = train.train(config, str(tmp_path))
  assert final["test/top1"] > 0.85 and final["test/count"] == 359
  losses = [r["loss"] for r in read_metrics(str(tmp_path)) if "loss" in r]
  assert losses[-1] < 0.5 * losses[0]
