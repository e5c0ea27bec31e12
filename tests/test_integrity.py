"""Damaged checkpoints: found at start-up, moved aside (never deleted), the run resumes from
the newest intact step and ends bitwise where an uninterrupted run ends; evaluation and
export fall back the same way; a checkpoint that merely does not fit the config is left
alone and stays the user's error."""

import glob
import logging
import os
import shutil

import jax
import numpy as np
import pytest

from vitcls import configs, export, train
from vitcls.run import build, checkpoint, lock as workdir_lock
from vitcls.run import workdir as wdir
from conftest import DEFAULT_EXPERIMENT


def _config(*overrides):
  return configs.resolve(configs.load_experiment(DEFAULT_EXPERIMENT + ":runlocal=True"),
                         ["async_checkpoints=False", *overrides])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted 6-step run: checkpoints 3 and 6."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  train.train(_config(), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
  return workdir


def _biggest_array_file(step_dir):
  files = glob.glob(os.path.join(step_dir, "default", "ocdbt.process_*", "d", "*"))
  return max(files, key=os.path.getsize)


def _truncate_array_file(step_dir):
  path = _biggest_array_file(step_dir)
  os.truncate(path, os.path.getsize(path) // 2)
  return os.path.relpath(path, step_dir)


def _delete_array_file(step_dir):
  path = _biggest_array_file(step_dir)
  os.remove(path)
  return None


def _corrupt_array_data(step_dir):
  """Zeroes the zstd frame header of one stored array chunk: the files all look whole, only
  reading that array fails (what bit rot in a data file looks like)."""
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  item = os.path.join(step_dir, "default") + os.sep
  base = ts.KvStore.open({"driver": "file", "path": item}).result()
  root = ts.ocdbt.dump(base).result()["versions"][-1]["root"]["location"]
  entries = ts.ocdbt.dump(base, root).result()["entries"]
  location = next(e["indirect_value"] for e in entries
                  if "indirect_value" in e and e["key"].startswith(b"params."))
  head, offset, _ = location[len("value:"):].rsplit(":", 2)
  with open(item + head.replace(":", "", 1), "r+b") as f:
    f.seek(int(offset))
    f.write(b"\0" * 8)


def _remover(name):
  def damage(step_dir):
    os.remove(os.path.join(step_dir, name))
  return damage


def _garble(name):
  def damage(step_dir):
    with open(os.path.join(step_dir, name), "w") as f:
      f.write('{"tree_metadata": {"cut')
  return damage


DAMAGES = {
    "truncated array file": _truncate_array_file,
    "deleted array file": _delete_array_file,
    "corrupted array data": _corrupt_array_data,
    "deleted commit marker": _remover("commit_success.txt"),
    "deleted checkpoint metadata": _remover("_CHECKPOINT_METADATA"),
    "deleted tree metadata": _remover(os.path.join("default", "_METADATA")),
    "unreadable tree metadata": _garble(os.path.join("default", "_METADATA")),
    "deleted OCDBT manifest": _remover(os.path.join("default", "manifest.ocdbt")),
    "deleted OCDBT index node": lambda d: os.remove(glob.glob(os.path.join(d, "default", "d",
                                                                           "*"))[0]),
}


REASONS = {  # What the warning says about each.
    "truncated array file": "is truncated",
    "deleted array file": "is missing",
    "corrupted array data": "ZSTD_decompressStream() failed",
    "deleted commit marker": "no commit marker (commit_success.txt)",
    "deleted checkpoint metadata": "_CHECKPOINT_METADATA is missing",
    "deleted tree metadata": "default/_METADATA is missing",
    "unreadable tree metadata": "default/_METADATA is not valid JSON",
    "deleted OCDBT manifest": "manifest.ocdbt is missing",
    "deleted OCDBT index node": "its OCDBT index cannot be read (NOT_FOUND",
}


def _damaged_copy(reference, tmp_path, damage):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  step_dir = os.path.join(workdir, "checkpoints", "6")
  files_before = sorted(os.path.relpath(os.path.join(r, n), step_dir)
                        for r, _, names in os.walk(step_dir) for n in names)
  DAMAGES[damage](step_dir)
  files_after = sorted(os.path.relpath(os.path.join(r, n), step_dir)
                       for r, _, names in os.walk(step_dir) for n in names)
  assert files_after != files_before or damage.startswith(("truncated", "unreadable",
                                                          "corrupted"))
  return workdir, files_after


def _assert_moved_aside(workdir, files):
  moved = os.path.join(workdir, wdir.BROKEN_CHECKPOINTS_DIR, "6")
  assert sorted(os.path.relpath(os.path.join(r, n), moved)
                for r, _, names in os.walk(moved) for n in names) == files
  with open(moved + ".reason.txt") as f:
    assert "Step 6 was moved here" in f.read()


def _leaves(tree):
  return jax.tree_util.tree_leaves_with_path(tree)


def _assert_bitwise_equal(a, b):
  a, b = _leaves(a), _leaves(b)
  assert [p for p, _ in a] == [p for p, _ in b] and a
  for (path, x), (_, y) in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


@pytest.mark.parametrize("damage", ["truncated array file", "deleted commit marker"])
def test_training_resumes_from_the_newest_intact_step_and_ends_bitwise_equal(
    reference, tmp_path, caplog, damage):
  workdir, files = _damaged_copy(reference, tmp_path, damage)
  with caplog.at_level(logging.INFO, logger="absl"):
    train.train(_config(), workdir)
  warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
  assert len(warnings) == 1 and "checkpoint of step 6" in warnings[0], warnings
  assert os.path.join(wdir.BROKEN_CHECKPOINTS_DIR, "6") in warnings[0]
  assert any("Resuming from the checkpoint of step 3" in r.getMessage()
             for r in caplog.records)
  _assert_moved_aside(workdir, files)  # Kept as it was, only elsewhere.
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
  _assert_bitwise_equal(checkpoint.load_weights(reference, 6)[1],
                        checkpoint.load_weights(workdir, 6)[1])


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_each_kind_of_damage_is_found_and_the_older_step_restored(reference, tmp_path,
                                                                  caplog, damage):
  workdir, files = _damaged_copy(reference, tmp_path, damage)
  run = build.build(_config())
  ckpt = checkpoint.Checkpointer(workdir, asynchronous=False)
  try:
    with caplog.at_level(logging.WARNING, logger="absl"):
      step, state = ckpt.restore_latest(run.abstract_state)
    (warning,) = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert REASONS[damage] in warning, warning
    assert step == 3 and int(state.step) == 3
    assert ckpt.latest_step() == 3  # orbax's list forgot the moved step.
  finally:
    ckpt.close()
  _assert_moved_aside(workdir, files)
  _assert_bitwise_equal(state.params, checkpoint.load_weights(reference, 3)[1])


def test_a_second_damaged_step_goes_aside_under_a_new_name_and_none_left_is_a_fresh_start(
    reference, tmp_path):
  workdir, _ = _damaged_copy(reference, tmp_path, "deleted commit marker")
  os.makedirs(os.path.join(workdir, wdir.BROKEN_CHECKPOINTS_DIR, "6"))  # From an earlier time.
  with open(os.path.join(workdir, wdir.BROKEN_CHECKPOINTS_DIR, "6", "keep.txt"), "w") as f:
    f.write("earlier")
  _remover("commit_success.txt")(os.path.join(workdir, "checkpoints", "3"))
  run = build.build(_config())
  ckpt = checkpoint.Checkpointer(workdir, asynchronous=False)
  try:
    assert ckpt.restore_latest(run.abstract_state) == (None, None)
    assert ckpt.latest_step() is None
  finally:
    ckpt.close()
  assert sorted(os.listdir(os.path.join(workdir, wdir.BROKEN_CHECKPOINTS_DIR))) == [
      "3", "3.reason.txt", "6", "6.1", "6.1.reason.txt"]
  assert os.listdir(os.path.join(workdir, wdir.BROKEN_CHECKPOINTS_DIR, "6")) == ["keep.txt"]


@pytest.mark.parametrize("damage", ["truncated array file", "corrupted array data"])
def test_evaluate_and_export_fall_back_and_move_aside_only_without_a_live_trainer(
    reference, tmp_path, caplog, damage):
  workdir, files = _damaged_copy(reference, tmp_path, damage)
  expected = checkpoint.load_weights(reference, 3)[1]
  with workdir_lock.WorkdirLock(workdir), caplog.at_level(logging.WARNING, logger="absl"):
    step, params, _ = checkpoint.load_weights(workdir)  # A trainer holds the workdir...
  assert step == 3
  _assert_bitwise_equal(params, expected)
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "6"))  # ...so 6 stays put.
  assert any("left in place because a training run holds the workdir" in r.getMessage()
             for r in caplog.records)

  with pytest.raises(checkpoint.DamagedCheckpointError) as info:  # Asked for by number.
    checkpoint.load_weights(workdir, 6)
  assert "the checkpoint of step 6" in str(info.value) and "\n" not in str(info.value)
  assert "pass another --step (steps there: 3)" in str(info.value)

  out = export.export_npz(workdir, str(tmp_path / "params.npz"))  # Nobody holds it now.
  with np.load(out) as saved:
    np.testing.assert_array_equal(saved["head/kernel"], expected["head"]["kernel"])
  _assert_moved_aside(workdir, files)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3"]


def test_a_checkpoint_that_does_not_fit_the_config_is_the_users_error_and_stays(
    reference, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  # Without its config.json (a copy of the checkpoints alone), only the restore can tell;
  # with it, the changed field is named first (test_resume_config.py).
  os.remove(os.path.join(workdir, wdir.CONFIG_FILE))
  for overrides, detail in [(["model.mlp_dim=128"], "in the checkpoint, ("),
                            (["model.depth=2"], "is not in the checkpoint")]:
    with pytest.raises(checkpoint.CheckpointMismatchError) as info:
      train.train(_config(*overrides), workdir)
    message = str(info.value)
    assert "the checkpoint of step 6" in message and "does not fit this config" in message
    assert detail in message and "\n" not in message, message
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
  assert not os.path.exists(os.path.join(workdir, wdir.BROKEN_CHECKPOINTS_DIR))


def test_a_checkpoint_from_before_a_state_field_existed_still_resumes(tmp_path):
  """A field added to TrainState later (None when its feature is off, like `skips`) is
  absent from older checkpoints; they restore, with the field None."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vitcls.state import TrainState  # pylint: disable=g-import-not-at-top
  state = TrainState(step=jnp.int32(7), params={"w": jnp.arange(6.0).reshape(2, 3)},
                     opt_state=(jnp.zeros(3),), rng=jax.random.PRNGKey(1))
  older = {"step": state.step, "params": state.params, "opt_state": state.opt_state,
           "rng": state.rng, "ema": None}  # What a version without `skips` wrote.
  ckpt = checkpoint.Checkpointer(str(tmp_path), asynchronous=False)
  ckpt.save(7, older)
  ckpt.close()
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=jax.sharding.SingleDeviceSharding(
                                         jax.devices()[0])), state)
  step, restored = checkpoint.Checkpointer(str(tmp_path)).restore_latest(abstract)
  assert step == 7 and restored.skips is None and restored.ema is None
  np.testing.assert_array_equal(restored.params["w"], state.params["w"])
