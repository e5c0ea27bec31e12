"""After a resume, TensorBoard (read with its own loader) and metrics.jsonl hold each step
once, as one uninterrupted run; what they held past the restored step is kept aside."""

import collections
import glob
import json
import os
import shutil

import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer import event_file_writer

from vitcls import configs, train
from vitcls.run import workdir as wdir, writers
from conftest import DEFAULT_EXPERIMENT, read_metrics


def _config(*overrides):
  return configs.resolve(configs.load_experiment(DEFAULT_EXPERIMENT + ":runlocal=True"),
                         ["async_checkpoints=False", *overrides])


def _tensorboard(workdir):
  """{tag: [steps]} as TensorBoard's Python loader shows the workdir's run."""
  acc = event_accumulator.EventAccumulator(workdir, size_guidance={"tensors": 0})
  acc.Reload()
  return {tag: [e.step for e in acc.Tensors(tag)] for tag in acc.Tags()["tensors"]}


def _jsonl_pairs(workdir):
  return collections.Counter((r["step"], k) for r in read_metrics(workdir) for k in r
                             if k != "step")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("straight"))
  train.train(_config(), workdir)
  return workdir


def test_after_a_resume_tensorboard_and_jsonl_hold_each_step_once(straight, tmp_path):
  workdir = str(tmp_path / "resumed")
  shutil.copytree(straight, workdir)
  # As if killed after step 6 was logged but before its checkpoint was written, in the
  # middle of a JSONL line:
  shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write('{"step": 7, "lo')
  before = _tensorboard(workdir)
  assert before["loss"] == [1, 2, 3, 4, 5, 6]

  train.train(_config(), workdir)  # Resumes from step 3.
  assert len(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))) == 2
  shown = _tensorboard(workdir)
  assert shown.keys() == before.keys()
  for tag, steps in shown.items():
    assert len(steps) == len(set(steps)), (tag, steps)
    if tag not in ("steps_per_sec", "uptime"):  # clu's progress skips a resumed run's 1st.
      assert steps == before[tag], tag  # The same steps as the uninterrupted run.
  assert shown["loss"] == [1, 2, 3, 4, 5, 6] and shown["test/top1"] == [3, 6]

  pairs = _jsonl_pairs(workdir)
  assert max(pairs.values()) == 1, [p for p, n in pairs.items() if n > 1]
  assert {s for s, k in pairs if k == "loss"} == {1, 2, 3, 4, 5, 6}
  straight_losses = {r["step"]: r["loss"] for r in read_metrics(straight) if "loss" in r}
  assert {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r} == \
      straight_losses  # Bitwise-exact resume: the same curve.

  aside = os.path.join(workdir, wdir.SUPERSEDED_DIR, "after_step_3")
  with open(os.path.join(aside, "metrics.jsonl")) as f:
    dropped = f.read().splitlines()
  assert dropped[-1] == '{"step": 7, "lo'  # The torn line is kept, aside.
  assert {json.loads(l)["step"] for l in dropped[:-1]} == {4, 5, 6}
  assert glob.glob(os.path.join(aside, "events.*.tfrecord"))


def _write_events(path_dir, steps):
  writer = event_file_writer.EventFileWriter(path_dir)
  for step in steps:
    value = summary_pb2.Summary.Value(tag="loss", simple_value=float(step))
    writer.add_event(event_pb2.Event(step=step, summary=summary_pb2.Summary(value=[value])))
  writer.close()


def test_event_files_are_cut_at_the_resume_step_and_kept_whole_when_nothing_is_past_it(
    tmp_path):
  workdir = str(tmp_path)
  _write_events(workdir, [1, 2, 3, 4, 5])
  (path,) = writers.event_files(workdir)
  untouched = os.stat(path)
  aside = writers._Superseded(workdir, 5)  # pylint: disable=protected-access
  assert writers.truncate_event_files(workdir, 5, aside) == 0
  assert os.stat(path).st_mtime_ns == untouched.st_mtime_ns
  assert not os.path.exists(os.path.join(workdir, wdir.SUPERSEDED_DIR))

  assert writers.truncate_event_files(workdir, 2, writers._Superseded(workdir, 2)) == 3
  acc = event_accumulator.EventAccumulator(workdir)
  acc.Reload()
  assert [e.step for e in acc.Scalars("loss")] == [1, 2]
  assert sorted(os.listdir(workdir)) == sorted([os.path.basename(path),
                                                wdir.SUPERSEDED_DIR])


def test_a_fresh_start_in_a_workdir_with_old_metrics_sets_them_all_aside(tmp_path):
  workdir = str(tmp_path)
  _write_events(workdir, [1, 2])
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.write('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n')
  # No checkpoint survived: from scratch.
  writer = writers.DeferredWriter(workdir, None, total_steps=1, every_steps=1)
  writer.write_scalars(1, {"loss": 3.0})
  writer.close()
  assert read_metrics(workdir) == [{"step": 1, "loss": 3.0}]
  with open(os.path.join(workdir, wdir.SUPERSEDED_DIR, "after_step_0",
                         "metrics.jsonl")) as f:
    assert len(f.read().splitlines()) == 2
  acc = event_accumulator.EventAccumulator(workdir, size_guidance={"tensors": 0})
  acc.Reload()
  assert [e.step for e in acc.Tensors("loss")] == [1]  # Only the new run's step 1.
