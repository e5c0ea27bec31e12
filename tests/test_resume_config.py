"""The workdir's config.json across starts: written once a start is accepted, earlier
versions kept, changes on resume named or refused."""

import json
import os

from absl import logging
import pytest

from vitcls.errors import UserError
from vitcls.run import config_record
from conftest import DEFAULT_EXPERIMENT


def _config(*overrides):
  from vitcls import configs
  return configs.resolve(configs.load_experiment(DEFAULT_EXPERIMENT + ":runlocal=True"),
                         ["evals.test.every=1000", *overrides])


def _train(workdir, *overrides):
  from vitcls.run import loop
  return loop.train(_config(*overrides), workdir)


def _recorded(workdir):
  with open(os.path.join(workdir, "config.json")) as f:
    return f.read()


def test_changes_and_what_they_mean():
  before = {"lr": 0.1, "model": {"width": 128, "dtype": "float32"}, "schedule": {"a": 1}}
  after = {"lr": 0.5, "model": {"width": 128, "dtype": "bfloat16"}, "schedule": {},
           "new": [1, 2]}
  assert config_record.changes(before, after) == [
      ("lr", 0.1, 0.5), ("model.dtype", "float32", "bfloat16"), ("new", None, [1, 2]),
      ("schedule", None, {}), ("schedule.a", 1, None)]
  assert config_record.changes_meaning("model.width")
  assert config_record.changes_meaning("model_name")
  assert config_record.changes_meaning("num_classes")
  assert not config_record.changes_meaning("model.dtype")
  assert not config_record.changes_meaning("model.remat")
  assert not config_record.changes_meaning("lr")
  assert not config_record.changes_meaning("model_init")


@pytest.fixture()
def warnings_seen(monkeypatch):
  seen = []
  real = logging.warning
  monkeypatch.setattr(logging, "warning",
                      lambda msg, *a: (seen.append(msg % a), real(msg, *a)))
  return seen


def test_refused_and_no_op_starts_leave_config_json_as_the_checkpoints_need(
    tmp_path, warnings_seen):
  """Defect: every start rewrote config.json, even one refused or with nothing to do."""
  workdir = str(tmp_path / "run")
  _train(workdir, "total_steps=3")
  original = _recorded(workdir)

  # A model change without a shape change the restore would notice: refused by name.
  with pytest.raises(UserError) as info:
    _train(workdir, "total_steps=3", "model.pool_type=tok")
  assert "\n" not in str(info.value)
  assert "config.model.pool_type is \"tok\"" in str(info.value)
  assert _recorded(workdir) == original
  with pytest.raises(UserError):  # A shape change too, before anything is built.
    _train(workdir, "total_steps=3", "model.width=64")
  assert _recorded(workdir) == original

  # Nothing left to train: the change is named as not applied, config.json untouched.
  _train(workdir, "total_steps=3", "lr=0.5")
  assert _recorded(workdir) == original
  assert any("not applied" in w and "lr 0.003 -> 0.5" in w for w in warnings_seen)

  # A resume that trains under a new lr: recorded, the old config kept, the change named.
  _train(workdir, "total_steps=5", "lr=0.5")
  assert json.loads(_recorded(workdir))["lr"] == 0.5
  kept = os.path.join(workdir, "superseded", "config_to_step_3.json")
  with open(kept) as f:
    assert f.read() == original
  assert any("Resuming from step 3 with a changed config" in w and "lr 0.003 -> 0.5" in w
             and "total_steps 3 -> 5" in w for w in warnings_seen)
  assert not [n for n in os.listdir(workdir) if n.endswith(".tmp")]
