"""The config check before anything heavy: every problem at once, one line each."""

import dataclasses
import glob
import os

import jax
import pytest

from vitcls import configs, losses, models, optim, sharding, validate
from conftest import REPO


def _resolve(*overrides, experiment="mnist5k_vit.py:runlocal=True"):
  path = os.path.join(REPO, "experiments", experiment)
  return configs.resolve(configs.load_experiment(path), list(overrides))


def test_a_good_config_has_no_problems():
  assert validate.problems(_resolve(), num_devices=8) == []


def test_every_problem_is_reported_at_once_one_line_each():
  config = _resolve("lr=-1", "label_smoothing=1.5", "schedule.decay_type=cosin",
                    "optax_name=adam", "input.pp=resize(32)|valu_range(-1,1)",
                    "model.widht=3", "evals.test.evry=3", "model_init=/no/such.npz",
                    "input.batch_size=12", "keep_checkpoints=0")
  found = validate.problems(config, num_devices=8)
  assert all("\n" not in p for p in found)
  expected = ["config.lr must be >= 0", "config.label_smoothing must be in [0, 1)",
              "config.schedule.decay_type: unknown value 'cosin'",
              "config.optax_name: unknown value 'adam'", "unknown pp op 'valu_range'",
              "unknown config key 'model.widht' for model 'vit'",
              "unknown config key 'evals.test.evry'", "'/no/such.npz' does not exist",
              "batch_size 12 is not divisible by the 8 devices",
              "config.keep_checkpoints must be >= 1"]
  for fragment in expected:
    assert sum(fragment in p for p in found) == 1, (fragment, found)
  assert len(found) == len(expected)
  with pytest.raises(configs.ConfigError, match=r"^10 problems in the config:\n  "):
    validate.check(config, num_devices=8)


def test_types_are_checked_against_the_defaults():
  config = _resolve()
  with config.unlocked(), config.ignore_type():
    config.lr = "0.1"
    config.input.batch_size = 16.0
    config.async_checkpoints = 1
    config.total_steps = None
    config.total_epochs = 2  # An int where a float is expected is fine.
  found = validate.problems(config)
  assert sorted(found) == ["config.async_checkpoints must be true or false, got 1",
                           "config.input.batch_size must be an integer, got 16.0",
                           "config.lr must be a number, got '0.1'"]


@pytest.mark.parametrize("overrides, fragment", [
    (["mesh=[('data', 3)]"], "config.mesh [('data', 3)] does not divide the 8 devices"),
    (["mesh=[('data', 4)]"], "config.mesh [('data', 4)] needs 4 devices but 8 are present"),
    (["schedule.warmup_steps=7"], "warmup (7 steps) is longer than the run (6 steps)"),
    (["total_steps=None", "total_examples=64", "schedule.warmup_steps=5"],
     "warmup (5 steps) is longer than the run (4 steps)"),
    (["mixup.alpha=inf"], "config.mixup.alpha must be a finite number >= 0"),
    (["mesh=[('data', -1), ('fsdp', -1)]"], "at most one axis may have size -1"),
    (["grad_accum_steps=4"], "grad_accum_steps 4 must divide the per-device batch (2 on"),
    (["sharding_rules=[('.*', 'shard')]"], "(regex, replicate | fsdp)"),
    (["lr_mults=[('[', 2.0)]"], "config.lr_mults: bad regex '['"),
    (["mixup.alpha=0.2", "mixup.p=0.2"], "set alpha (timm) or p (big_vision), not both"),
    (["schedule.decay_type=stair"], "config.schedule.boundaries must be increasing"),
    (["class_weights=[1.0, 2.0]"], "config.class_weights must list 10 non-negative"),
    (["input.data.name=folder:/no/such/dir"], "folder '/no/such/dir' does not exist"),
    (["input.data.name=cifar10"], "dataset 'cifar10' is not prepared in"),
    (["evals.test.ood_pp=x"], "unknown config key 'evals.test.ood_pp'"),
])
def test_each_kind_of_problem(overrides, fragment):
  found = validate.problems(_resolve(*overrides), num_devices=8)
  assert len(found) == 1 and fragment in found[0], found


def test_processes_must_divide_the_batch():
  found = validate.problems(_resolve("input.batch_size=15"), process_count=2)
  assert found == ["config.input.batch_size 15 is not divisible by the 2 processes"]


def test_names_known_to_the_check_are_those_the_code_accepts():
  # pylint: disable=protected-access
  assert set(configs.LOSSES) == set(losses._LOSSES)
  assert set(configs.OPTIMIZERS) == set(optim._OPTIMIZERS)
  assert set(configs.WD_MODES) == set(optim._WD_MODES)
  assert set(configs.SHARDING_KINDS) == set(sharding._KINDS)
  for decay in configs.DECAY_TYPES:
    overrides = {"schedule.decay_type": decay, "schedule.boundaries": [0.5]}
    config = _resolve(*(f"{k}={v}" for k, v in overrides.items()))
    optim.make_schedule(config, 10)
  for name in models.available():
    fields = {f.name for f in dataclasses.fields(models.get(name))}
    assert models.fields(name) == fields - {"num_classes", "parent", "name"}


def test_what_only_build_knows_is_checked_here_too():
  """The run's length from total_epochs, the optax keys, the labels' counts, the mesh."""
  config = _resolve("total_steps=None", "total_epochs=1.0", "schedule.warmup_steps=50",
                    "schedule.decay_type=stair", "schedule.boundaries=[0.5]",
                    "optax.beta1=0.9")
  assert validate.problems(config, num_devices=8) == []
  adamw = optim.optimizer_arguments("adamw")
  with pytest.raises(configs.ConfigError, match=r"^2 problems in the config:\n  ") as e:
    validate.check_built(config, total_steps=40, optax_arguments=adamw)
  assert "warmup (50 steps) is longer than the run (40 steps)" in str(e.value)
  assert "unknown config key 'optax.beta1' for adamw: known ones are b1, b2," in str(e.value)
  with pytest.raises(configs.ConfigError, match=r"^config.schedule.boundaries: the first "
                     r"boundary \(step 49\) falls inside the warmup \(50 steps\)$"):
    validate.check_built(config, total_steps=98, optax_arguments=adamw | {"beta1"})
  validate.check_built(config, total_steps=100, optax_arguments=adamw | {"beta1"})
  validate.check_class_counts([3, 1], 2)
  with pytest.raises(configs.ConfigError, match=r"^config.class_weights 'balanced': class 1 "
                     r"has no examples"):
    validate.check_class_counts([3, 0], 2)
  validate.check_mesh([("data", 2), ("fsdp", -1)], 8)
  with pytest.raises(configs.ConfigError, match=r"^config.mesh \[\('data', 2\)\] does not "
                     r"divide the 1 devices$"):
    sharding.make_mesh([("data", 2)], jax.devices()[:1])


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "experiments", "*.py"))),
                         ids=os.path.basename)
def test_every_experiment_passes_apart_from_data_not_prepared_here(path):
  config = configs.resolve(configs.load_experiment(path))
  found = validate.problems(config, num_devices=8)
  allowed = ("is not prepared in", "config.model_init: ")  # ImageNet, checkpoints.
  assert all(any(a in p for a in allowed) for p in found), found


def test_an_experiment_that_fails_names_its_file_and_line(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("from vitcls import configs\n\ndef get_config(arg=None):\n"
                 "  c = configs.defaults()\n  c.lr = 1 / 0\n  return c\n")
  with pytest.raises(configs.ConfigError, match=rf"^experiment {bad}:5 failed in get_config: "
                     r"ZeroDivisionError: division by zero$"):
    configs.load_experiment(str(bad))
  bad.write_text("def get_config(arg=None)\n  return None\n")
  with pytest.raises(configs.ConfigError, match=rf"^experiment {bad}:1 cannot be imported: "
                     r"SyntaxError"):
    configs.load_experiment(str(bad))
