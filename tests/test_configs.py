"""Config loading, overrides, validation and durations."""

import json
import re

import pytest

from vitcls import configs
from conftest import DEFAULT_EXPERIMENT


def test_experiment_resolves_and_round_trips_to_json():
  c = configs.resolve(configs.load_experiment(DEFAULT_EXPERIMENT))
  assert c.input.data.name == "mnist5k" and c.total_steps == 2000
  assert set(configs.defaults().keys()) == set(c.keys())
  assert json.loads(configs.to_json(c))["lr"] == c.lr


def test_config_argument_is_parsed_and_typed():
  c = configs.load_experiment(DEFAULT_EXPERIMENT + ":steps=7,runlocal=True")
  assert c.total_steps == 6  # runlocal caps at 6.
  arg = configs.parse_arg("variant=B/32,steps=10,flag=false", variant="S/16", steps=1,
                          flag=True)
  assert (arg.variant, arg.steps, arg.flag) == ("B/32", 10, False)
  with pytest.raises(configs.ConfigError, match="unknown config argument 'stpes'"):
    configs.parse_arg("stpes=3", steps=1)


def test_overrides_convert_to_the_field_type():
  c = configs.resolve(configs.load_experiment(DEFAULT_EXPERIMENT), [
      "lr=0.5", "total_steps=12", "input.pp=resize(8)|onehot(10)",
      "mesh=[('data', 2), ('fsdp', -1)]", "model.depth=3", "evals.test.every=7",
      "async_checkpoints=false", "total_epochs=2.5"])
  assert c.lr == 0.5 and isinstance(c.lr, float)
  assert c.total_steps == 12 and isinstance(c.total_steps, int)
  assert c.input.pp == "resize(8)|onehot(10)"
  assert list(c.mesh) == [("data", 2), ("fsdp", -1)]
  assert c.model.depth == 3 and c.evals.test.every == 7
  assert c.async_checkpoints is False and c.total_epochs == 2.5


@pytest.mark.parametrize("override, message", [
    ("lrr=0.1", "unknown config key 'lrr' (did you mean 'lr'?)"),
    ("input.batch_sise=3", "unknown config key 'input.batch_sise' (did you mean "
                           "'input.batch_size'?)"),
    ("total_steps=abc", "config key 'total_steps' expects a int, got 'abc'"),
    ("lr", "must look like --config.KEY=VALUE"),
    ("lr.x=1", "config key 'lr' is a value, not a dict"),
])
def test_bad_overrides_are_one_clear_error(override, message):
  with pytest.raises(configs.ConfigError) as e:
    configs.resolve(configs.load_experiment(DEFAULT_EXPERIMENT), [override])
  assert message in str(e.value) and "\n" not in str(e.value)


def test_unknown_key_in_an_experiment_file_is_an_error():
  c = configs.ConfigDict({"lr": 0.1, "input": {"batchsize": 3}})
  with pytest.raises(configs.ConfigError, match="unknown config key 'input.batchsize'"):
    configs.resolve(c)


def test_missing_config_file_is_a_clear_error():
  with pytest.raises(configs.ConfigError, match="does not exist"):
    configs.load_experiment("experiments/nope.py")


def test_resolved_config_is_locked():
  c = configs.resolve(configs.load_experiment(DEFAULT_EXPERIMENT))
  with pytest.raises(AttributeError):
    c.not_a_key = 1


@pytest.mark.parametrize("fields, expected", [
    (dict(total_steps=10, total_examples=1000, total_epochs=3.0), 10),
    (dict(total_examples=1000, total_epochs=3.0), 8),  # round(7.8125)
    (dict(total_epochs=2.5), 78),  # round(2.5 * 4000 / 128 = 78.125), as big_vision
    (dict(total_epochs=0.001), 1),  # At least one step.
])
def test_duration_precedence(fields, expected):
  c = configs.resolve(configs.ConfigDict({"input": {"batch_size": 128}}))
  c.unlock()
  c.update(fields)
  assert configs.total_steps(c, num_train_examples=4000) == expected


def test_no_duration_is_an_error():
  with pytest.raises(configs.ConfigError, match="no training length"):
    configs.total_steps(configs.resolve(configs.ConfigDict()), 100)


def test_get_config_that_returns_no_config_is_one_line_naming_the_file(tmp_path):
  path = tmp_path / "exp.py"
  path.write_text("def get_config(arg=None):\n  c = dict(lr=0.1)\n")  # No `return c`.
  with pytest.raises(configs.ConfigError, match=rf"^experiment {re.escape(str(path))}: "
                     r"get_config returned NoneType, not a ConfigDict: end it with "
                     r"`return config`$"):
    configs.load_experiment(str(path))


@pytest.mark.parametrize("arg, fix", [
    ("--total_steps=5", "give --config.total_steps=5"),
    ("--input.batch_size=4", "give --config.input.batch_size=4"),
    ("--model.patch_size=4", "give --config.model.patch_size=4"),
])
def test_a_config_field_given_as_a_flag_is_shown_as_its_override(arg, fix, capsys):
  from vitcls import flags, train  # pylint: disable=g-import-not-at-top
  ran = []
  status = flags.main_in_process(
      ["vitcls.train", f"--config={DEFAULT_EXPERIMENT}", "--workdir=unused", arg],
      train._define_flags, ran.append)  # pylint: disable=protected-access
  assert status == 2 and not ran
  assert capsys.readouterr().err == (f"vitcls: error: unknown flag {arg}: a config field is "
                                     f"set with --config.KEY=VALUE: {fix}\n")
