"""Every experiment file runs (shrunk with runlocal), and a real run really learns."""

import glob
import os

import jax
import jax.numpy as jnp
import pytest

from vitcls import configs, models, train
from vitcls.models import loading
from conftest import REPO, read_metrics

EXPERIMENTS = sorted(glob.glob(os.path.join(REPO, "experiments", "*.py")))


def test_there_are_experiments():
  assert {"mnist5k_vit.py", "digits_vit.py"} <= {os.path.basename(p) for p in EXPERIMENTS}


# Experiments whose arguments pick another model: each such choice runs too.
VARIANTS = [p + ":runlocal=True" for p in EXPERIMENTS] + [
    os.path.join(REPO, "experiments", "finetune.py:model=bit,runlocal=True"),
    os.path.join(REPO, "experiments", "mnist5k_models.py:model=vit_reg,runlocal=True"),
    os.path.join(REPO, "experiments", "deit_s16_i1k.py:runlocal=True,teacher=TEACHER")]


# Experiments that take a teacher: the experiment whose runlocal run makes it. The first
# two always distil; the others only in their variants with a `teacher=TEACHER` argument.
DISTILLING = ("mnist5k_distill.py", "distill_bit_i1k.py")
# A teacher needs no training to be run: distill_bit_i1k's, a BiT, is a fresh init saved
# as an .npz (its runlocal config names the model), which saves a BiT training run.
TEACHERS = {"mnist5k_distill.py": "mnist5k_vit.py:runlocal=True",
            "distill_bit_i1k.py": "fresh BiT",
            "deit_s16_i1k.py": "finetune.py:runlocal=True"}


def _fresh_bit_teacher(folder: str) -> str:
  model = models.build("bit", 10, {"depth": [1, 1, 1, 1], "width": 1})
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
  path = os.path.join(folder, "teacher.npz")
  loading.write_npz(path, jax.device_get(params["params"]))
  return path


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
  """Lazily trained teacher workdirs, one per teacher experiment, shared by the module."""
  made = {}

  def get(spec):
    if spec not in made:
      workdir = str(tmp_path_factory.mktemp("teacher"))
      if spec == "fresh BiT":
        made[spec] = _fresh_bit_teacher(workdir)
        return made[spec]
      train.train(configs.resolve(configs.load_experiment(
          os.path.join(REPO, "experiments", spec))), workdir)
      made[spec] = workdir
    return made[spec]
  return get


# The ImageNet paper experiments (and their teacher variants) run in
# tests/test_paper_experiments.py, so that the test workers share these runs evenly.
def is_paper_experiment(spec: str) -> bool:
  name = os.path.basename(spec).split(":")[0]
  return name.endswith("_i1k.py") or name == "augreg_transfer.py"


def run_experiment(spec, tmp_path, teachers):
  """Runs `spec` (its teacher made first when it takes one) and checks what it logged."""
  name = os.path.basename(spec).split(":")[0]
  if "TEACHER" in spec:
    spec = spec.replace("TEACHER", teachers(TEACHERS[name]))
  elif name in DISTILLING:
    spec += f",teacher={teachers(TEACHERS[name])}"
  config = configs.resolve(configs.load_experiment(spec))
  final = train.train(config, str(tmp_path))
  assert any(k.endswith("/count") and v > 0 for k, v in final.items()), final
  assert all(0.0 <= v <= 1.0 for k, v in final.items()
             if k.endswith(("/top1", "/map", "_f1")))
  steps = [r["step"] for r in read_metrics(str(tmp_path)) if "loss" in r]
  assert steps == list(range(1, config.total_steps + 1))


@pytest.mark.parametrize("spec", [v for v in VARIANTS if not is_paper_experiment(v)],
                         ids=lambda s: os.path.basename(s))
def test_experiment_runs_a_few_steps(spec, tmp_path, teachers):
  run_experiment(spec, tmp_path, teachers)


def test_digits_run_learns(tmp_path):
  """300 steps on 1,438 8x8 digits: 92.5% when measured; chance is 10%."""
  config = configs.resolve(configs.load_experiment(
      os.path.join(REPO, "experiments", "digits_vit.py")))
  final = train.train(config, str(tmp_path))
  assert final["test/top1"] > 0.85 and final["test/count"] == 359
  losses = [r["loss"] for r in read_metrics(str(tmp_path)) if "loss" in r]
  assert losses[-1] < 0.5 * losses[0]
