"""The config check before anything heavy: every problem at once, one line each."""

import dataclasses
import glob
import os
import re
import subprocess
import sys

import jax
import pytest

from vitcls import configs, losses, models, optim, sharding, validate
from conftest import DEFAULT_EXPERIMENT, REPO


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
    (["layer_decay=1.5"], "config.layer_decay must be in (0, 1] (1.0 turns it off"),
    (["layer_decay=0.0"], "config.layer_decay must be in (0, 1]"),
    (["model_init=hf-hub:"], "config.model_init: 'hf-hub:' names no repo: write "
                             "hf-hub:<owner>/<repo>[@<revision>]"),
    (["model_init=hf-hub:timm/a..b"], "'hf-hub:timm/a..b' is not a Hub repo id"),
    (["mixup.alpha=0.2", "mixup.p=0.2"], "set alpha (timm) or p (big_vision), not both"),
    (["schedule.decay_type=stair"], "config.schedule.boundaries must be increasing"),
    (["class_weights=[1.0, 2.0]"], "config.class_weights must list 10 non-negative"),
    (["input.data.name=folder:/no/such/dir"], "folder '/no/such/dir' does not exist"),
    (["input.data.name=cifar10"], "dataset 'cifar10' is not prepared in"),
    (["evals.test.ood_pp=x"], "unknown config key 'evals.test.ood_pp'"),
    (["seed=-1"], "config.seed must be in [0, 2**63)"),
    (["model.width=-8"], "config.model.width must be a positive integer or a list of "
                         "them, got -8"),
    (["model.patch_size=0"], "config.model.patch_size must be a positive integer or a "
                             "(height, width) pair of them, got 0"),
    (["model.num_heads=0"], "config.model.num_heads must be a positive integer"),
    (["model.variant=S/x"], "config.model.variant must be 'NAME/PATCH' with NAME one of "
                            "mu, Ti, S, M, B, L, H, g"),
    (["model.pool_type=max"], "config.model.pool_type must be one of 'gap', 'tok', 'map'"),
    (["model.stoch_depth=1.5"], "config.model.stoch_depth must be a number in [0, 1]"),
    (["input.pp=value_range(-1,1)|onehot(5)"],
     "config.input.pp makes labels of depth 5 but config.num_classes is 10: give its "
     "label op (onehot, multihot) depth 10"),
    (["evals.test.pp=value_range(-1,1)|onehot(5)"],
     "config.evals.test.pp makes labels of depth 5 but config.num_classes is 10"),
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
  allowed = ("is not prepared in", "config.model_init: ",  # ImageNet, checkpoints,
             "config.distill.teacher_init: ")  # distillation teachers.
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


@pytest.mark.parametrize("overrides, fragment", [
    (["model.patch_size=30"], "config.model.patch_size=30: its 30x30 patches do not fit "
                              "in the 28x28 images config.input.pp makes of dataset "
                              "'mnist5k': use a patch of at most 28x28 pixels"),
    # The training pp resizes: the evaluator's, which does not, gives the model 28 px.
    (["model.patch_size=30", "input.on_device=False",
      "input.pp=resize(32)|value_range(-1,1)|onehot(10)"],
     "do not fit in the 28x28 images config.evals.test.pp makes of dataset 'mnist5k'"),
    (["model.patch_size=None", "model.variant=S/32"], "config.model.variant='S/32': its "
                                                      "32x32 patches do not fit in the 28x28"),
])
def test_a_patch_larger_than_the_images_is_found_before_anything_runs(overrides, fragment):
  """ViT's patch embedding of a too small image has no patch: training NaN, not an error."""
  found = validate.problems(_resolve(*overrides))
  assert len(found) == 1 and fragment in found[0], found
  # Images resized to fit the patch in every pp: no problem, whatever the data's size.
  pp = "resize(32)|value_range(-1,1)|onehot(10)"
  assert validate.problems(_resolve(*overrides, "input.on_device=False", f"input.pp={pp}",
                                    f"evals.test.pp={pp}")) == []


def _folder(root, counts):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for name, n in counts.items():
    os.makedirs(root / name)
    for i in range(n):
      Image.new("RGB", (10 + i, 12), (i, 9, 9)).save(root / name / f"{i}.png")
  return f"folder:{root}"


def test_a_folder_whose_classes_disagree_with_num_classes_is_one_line(tmp_path):
  name = _folder(tmp_path, {"a": 20, "b": 2, "c": 1})
  pp = "resize(28)|value_range(-1,1)|onehot({})"
  def problems(classes):
    return validate.problems(_resolve(
        f"input.data.name={name}", f"num_classes={classes}", "input.on_device=False",
        f"input.pp={pp.format(classes)}", f"evals.test.pp={pp.format(classes)}"))
  assert problems(3) == []
  assert problems(2) == [f"config.num_classes is 2 but folder '{tmp_path}' (config.input."
                         f"data.name) has 3 classes (a, b, c): set config.num_classes=3"]
  assert "has 3 classes (a, b, c)" in problems(10)[0]
  # An evaluator's own folder is checked against the classes its labels are for.
  other = _folder(tmp_path / "other", {"x": 3, "y": 3})
  found = validate.problems(_resolve(f"evals.test.data={other}",
                                     f"evals.test.pp={pp.format(10)}"))
  assert found == [f"config.evals.test.data: folder '{tmp_path / 'other'}' has 2 classes "
                   f"(x, y) but the model has 10 (config.num_classes): evaluate on data "
                   f"with its classes"]


def test_one_class_is_refused_whatever_the_data():
  """A softmax over one class is 1: loss 0 and top-1 1.0 whatever the model learns."""
  one = ["num_classes=1", "input.pp=value_range(-1,1)|onehot(1)",
         "evals.test.pp=value_range(-1,1)|onehot(1)"]
  found = validate.problems(_resolve(*one))
  assert found[0] == ("config.num_classes must be >= 2 with loss softmax_xent (over one "
                      "class every prediction is right: loss 0, top-1 1.0), got 1")
  # Once mnist5k is prepared, its 10 classes are known too.
  assert all(p.startswith("config.num_classes is 1 but dataset 'mnist5k'") for p in found[1:])
  found = validate.problems(_resolve(*one, "loss=sigmoid_xent"))
  assert not any("must be >= 2" in p for p in found)


def test_field_rules_name_real_fields_and_agree_with_the_models():
  # pylint: disable=protected-access
  from vitcls.models import bit, vit  # pylint: disable=g-import-not-at-top
  for name in models.available():
    rules = models.field_rules(name)
    assert rules and set(rules) <= models.fields(name), name
    for rule in rules.values():
      assert isinstance(rule, (dict, tuple)) or rule in validate._RULE_KINDS, rule
  assert models.field_rules("vit") == vit.FIELD_RULES
  assert models.field_rules("bit") == bit.FIELD_RULES
  # What the check accepts the model builds, and the other way round for what it refuses.
  for ok in ("S/16", "mu/2"):
    assert validate._follows(ok, vit.FIELD_RULES["variant"])
    vit.decode_variant(ok)
  for bad in ("S/0", "X/16", "S16"):
    assert not validate._follows(bad, vit.FIELD_RULES["variant"])
    with pytest.raises(ValueError):
      vit.decode_variant(bad)


def test_workdir_that_is_a_file_under_a_file_or_read_only_is_one_line(tmp_path,
                                                                      monkeypatch):
  validate.check_workdir(str(tmp_path / "new" / "run"))  # Made when missing.
  validate.check_workdir(str(tmp_path))
  afile = tmp_path / "afile"
  afile.write_text("x")
  f = re.escape(str(afile))
  with pytest.raises(configs.ConfigError, match=rf"^--workdir '{f}' is a file, not a "
                     r"folder: give the path of a folder \(it is made when missing\)$"):
    validate.check_workdir(str(afile))
  with pytest.raises(configs.ConfigError, match=rf"^--workdir '{f}/run' lies under "
                     rf"'{f}', which is a file, not a folder"):
    validate.check_workdir(str(afile / "run"))
  locked = tmp_path / "locked"
  locked.mkdir(mode=0o555)
  if os.access(locked, os.W_OK):  # root writes anyway: as another user would see it.
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: (
        real(p, mode) and not (os.fspath(p) == str(locked) and mode & os.W_OK)))
  d = re.escape(str(locked))
  with pytest.raises(configs.ConfigError, match=rf"^--workdir '{d}/run' cannot be "
                     rf"written: '{d}', where it would be made, is read-only"):
    validate.check_workdir(str(locked / "run"))


def _train_in_process(capsys, *args):
  """`python -m vitcls.train ARGS` in this process: (exit status, stderr)."""
  # pylint: disable=protected-access
  from vitcls import flags, train  # pylint: disable=g-import-not-at-top
  def command(overrides):
    train._OVERRIDES[:] = overrides
    train.main(["vitcls.train"])
  try:
    status = flags.main_in_process(["vitcls.train", *args], train._define_flags, command)
  except SystemExit as e:
    status = e.code
  return status, capsys.readouterr().err


def test_the_trainer_checks_its_workdir_with_the_config(tmp_path, capsys):
  afile = tmp_path / "afile"
  afile.write_text("x")
  status, err = _train_in_process(capsys, f"--config={DEFAULT_EXPERIMENT}:runlocal=True",
                                  f"--workdir={afile}")
  assert status == 2 and err == (f"vitcls: error: --workdir '{afile}' is a file, not a "
                                 f"folder: give the path of a folder (it is made when "
                                 f"missing)\n")


def test_the_check_imports_no_jax_flax_or_tensorflow():
  """Model field values, the pp's images and labels, the workdir: all before JAX loads."""
  code = f"""
import sys
from vitcls import configs, validate
c = configs.resolve(configs.load_experiment({DEFAULT_EXPERIMENT + ':runlocal=True'!r}),
                    ['model.patch_size=30', 'model.width=-8'])
print(len(validate.problems(c)))
validate.check_workdir('.')
print(sorted(m for m in ('jax', 'flax', 'tensorflow', 'grain') if m in sys.modules))
"""
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split() == ["2", "[]"]  # The width and the patch, at once.


def test_an_offline_hub_checkpoint_is_checked_in_the_cache_without_jax(tmp_path):
  """hf-hub: names are not paths: their form, and offline the Hub cache, in well under a
  second (huggingface_hub's import included), before JAX loads."""
  code = f"""
import sys, time
from vitcls import configs, validate
c = configs.resolve(configs.load_experiment({DEFAULT_EXPERIMENT + ':runlocal=True'!r}),
                    ['model_init=hf-hub:timm/vit_base_patch16_224.augreg2_in21k_ft_in1k'])
start = time.perf_counter()
from vitcls.models import hub
found = hub.problems(c.model_init, c.model_name)
print(round(time.perf_counter() - start, 3))
print(validate.problems(c) == ['config.model_init: ' + p for p in found], len(found))
print(sorted(m for m in ('jax', 'flax', 'tensorflow', 'grain') if m in sys.modules))
"""
  env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path),
             HF_HOME=str(tmp_path))
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                        text=True, timeout=120, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  seconds, same, count, modules = proc.stdout.split()
  assert float(seconds) < 1.0 and same == "True" and count == "1" and modules == "[]"
