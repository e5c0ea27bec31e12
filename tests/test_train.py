"""End-to-end: the training CLI in real subprocesses, devices, processes, errors (faults: test_faults.py)."""

import glob
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from vitcls.run import checkpoint
from conftest import (DEFAULT_EXPERIMENT, REPO, losses, read_metrics, run_train, train_command,
                      xla_flags)


def _params(workdir, step, part="params"):
  """The params (or EMA, `part="ema"`) of a checkpoint, as NumPy arrays on the host."""
  _, params, ema = checkpoint.load_weights(workdir, step)
  return {"params": params, "ema": ema}[part]


def _leaves(tree, prefix=""):
  if isinstance(tree, dict):
    for k, v in sorted(tree.items()):
      yield from _leaves(v, f"{prefix}/{k}")
  else:
    yield prefix, np.asarray(tree)


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  """The default experiment at runlocal size on 1 device: (workdir, process); read only."""
  workdir = str(tmp_path_factory.mktemp("one") / "run")
  return workdir, run_train(workdir, devices=1)


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
  """The same on 8 devices, data parallel: (workdir, process); read only."""
  workdir = str(tmp_path_factory.mktemp("dp") / "run")
  return workdir, run_train(workdir, devices=8)


def test_runlocal_run_writes_the_workdir_contract(one_device, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(one_device[0], workdir)
  proc = one_device[1]
  assert "Final eval: " in proc.stdout and "test/count=1000.0000" in proc.stdout
  assert os.path.exists(os.path.join(workdir, "config.json"))
  assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
  rows = read_metrics(workdir)
  train_rows = [r for r in rows if "loss" in r]
  assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
  for key in ("lr", "grad_norm", "img_per_sec", "examples_seen"):
    assert all(key in r for r in train_rows)
  assert [r["examples_seen"] for r in train_rows] == [16 * s for s in range(1, 7)]
  # lr of step s is the schedule at s-1: warmup 2 steps to 3e-3, then cosine over 4.
  expected_lr = [0.0, 1.5e-3] + [3e-3 * 0.5 * (1 + np.cos(np.pi * k / 4)) for k in range(4)]
  np.testing.assert_allclose([r["lr"] for r in train_rows], expected_lr, rtol=1e-6)
  evals = [r for r in rows if "test/top1" in r]
  assert [r["step"] for r in evals] == [3, 6] and all(r["test/count"] == 1000 for r in evals)

  again = run_train(workdir)  # Same command, same workdir: resumes, nothing left to do.
  assert "Nothing to do" in again.stderr
  assert len(read_metrics(workdir)) == len(rows) + 1  # Only the final eval again.


def test_data_parallel_over_8_devices_matches_1_device(one_device, eight_devices, tmp_path):
  (one, one_proc), (dp, dp_proc) = one_device, eight_devices
  fsdp = str(tmp_path / "fsdp")
  fsdp_proc = run_train(fsdp, "--config.mesh=[('data', 2), ('fsdp', 4)]",
                        "--config.sharding_rules=[('.*', 'fsdp')]", devices=8)
  assert "on 1 devices" in one_proc.stderr
  assert "on 8 devices" in dp_proc.stderr and "on 8 devices" in fsdp_proc.stderr
  reference = losses(one)
  assert len(reference) == 6
  for run in (dp, fsdp):
    curve = losses(run)
    assert curve.keys() == reference.keys()
    np.testing.assert_allclose([curve[s] for s in sorted(curve)],
                               [reference[s] for s in sorted(reference)],
                               rtol=1e-5, atol=1e-6)


def test_a_user_mistake_is_one_clear_error_line_from_the_cli(tmp_path):
  proc = run_train(str(tmp_path / "bad"), "--config.lrr=0.1", check=False)
  assert proc.returncode == 2
  errors = [l for l in proc.stderr.splitlines() if l.startswith("vitcls: error:")]
  assert len(errors) == 1, proc.stderr[-2000:]
  assert "unknown config key 'lrr' (did you mean 'lr'?)" in errors[0]
  assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("override, message", [
    ("model.variant=X/16", "config.model.variant must be 'NAME/PATCH' with NAME one of"),
    ("input.pp=random_shift(2)|sharpen(3)", "unknown pp op 'sharpen'"),
    ("input.data.name=imagenet_v9", "dataset 'imagenet_v9' is not prepared in"),
])
def test_user_mistakes_are_one_line_user_errors(tmp_path, override, message):
  """In-process (the CLI prints any UserError as one line, tested above)."""
  from vitcls import configs, train
  from vitcls.errors import UserError
  config = configs.resolve(configs.load_experiment(DEFAULT_EXPERIMENT + ":runlocal=True"),
                           [override])
  with pytest.raises(UserError) as info:
    train.train(config, str(tmp_path / "bad"))
  assert message in str(info.value) and "\n" not in str(info.value)


def _train_in_process(workdir, *overrides):
  """`vitcls.train` on the runlocal default experiment, in this process (the CLI prints a
  UserError as its one line, tested above)."""
  from vitcls import configs, train
  config = configs.resolve(configs.load_experiment(DEFAULT_EXPERIMENT + ":runlocal=True"),
                           list(overrides))
  return train.train(config, workdir)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  from vitcls.errors import UserError
  workdir = str(tmp_path / "nan")
  with pytest.raises(UserError) as info:
    _train_in_process(workdir, "lr=1e30", "grad_clip_norm=0", "checkpoint_every=2",
                      "evals.test.every=1000")
  error = str(info.value)
  assert "\n" not in error
  assert "loss is nan at step 3" in error or "loss is inf at step 3" in error
  assert "the last good checkpoint (step 2) is kept" in error
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
  params = dict(_leaves(_params(workdir, 2)))
  assert all(np.isfinite(v).all() for v in params.values())


def test_resuming_with_an_incompatible_config_is_a_clear_error(tmp_path):
  from vitcls.errors import UserError
  workdir = str(tmp_path / "run")
  _train_in_process(workdir, "total_steps=3", "evals.test.every=1000")
  with pytest.raises(UserError) as info:
    _train_in_process(workdir, "model.depth=2", "total_steps=6")
  error = str(info.value)
  assert "\n" not in error
  assert "config.model.depth is 2 here but" in error and "Use a new --workdir" in error
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3"]  # Untouched.
  # Without the recorded config (a workdir copied without it), the restore still finds it.
  os.remove(os.path.join(workdir, "config.json"))
  with pytest.raises(UserError) as info:
    _train_in_process(workdir, "model.depth=2", "total_steps=6")
  error = str(info.value)
  assert "the checkpoint of step 3" in error and "does not fit this config" in error
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3"]


def test_console_script_dispatches_to_the_trainer(tmp_path):
  script = os.path.join(os.path.dirname(sys.executable), "vitcls")
  proc = subprocess.run([script, "train", *train_command(str(tmp_path), "--config.lrr=1")[3:]],
                        capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode == 2
  assert "vitcls: error: unknown config key 'lrr'" in proc.stderr
  usage = subprocess.run([script, "trian"], capture_output=True, text=True, timeout=60)
  assert usage.returncode == 2 and "expected a command (train, evaluate, predict, export, sweep, launch)" in usage.stderr


def test_two_processes_train_like_one_process_with_the_same_devices(eight_devices, tmp_path):
  """Multi-host: 2 processes x 4 devices, each feeding its half of every batch, against
  one process with 8 devices."""
  reference = eight_devices[0]
  workdir = str(tmp_path / "two")
  env = dict(os.environ, XLA_FLAGS=xla_flags(4))
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen(
      train_command(workdir, f"--coordinator=localhost:{port}", "--num_processes=2",
                    f"--process_id={i}"), cwd=REPO, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  assert "on 8 devices" in outputs[0][1]
  a, b = losses(reference), losses(workdir)
  assert a.keys() == b.keys() and len(a) == 6
  np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)],
                             rtol=1e-5, atol=1e-6)
  for w in (reference, workdir):
    assert sorted(os.listdir(os.path.join(w, "checkpoints"))) == ["3", "6"]
  one, two = dict(_leaves(_params(reference, 6))), dict(_leaves(_params(workdir, 6)))
  for name in one:  # atol: attention key biases get only rounding-noise gradients.
    np.testing.assert_allclose(two[name], one[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_each_eval_runs_on_its_own_schedule(tmp_path):
  from vitcls import configs, train
  config = configs.resolve(
      configs.load_experiment(os.path.join(REPO, "experiments", "digits_vit.py:runlocal=True")),
      ["total_steps=6", "evals.test.every=2", "evals.train.split=train",
       "evals.train.every=5"])
  final = train.train(config, str(tmp_path))
  rows = read_metrics(str(tmp_path))
  assert [r["step"] for r in rows if "test/top1" in r] == [2, 4, 6]
  assert [r["step"] for r in rows if "train/top1" in r] == [5, 6]  # 6: the end of the run.
  assert final["train/count"] == 1438 and final["test/count"] == 359


def test_recipe_fields_reach_the_run_and_bad_values_are_one_line_errors(tmp_path):
  """class_weights='balanced' from the split's counts; sigmoid loss, balanced sampling,
  EMA and accumulation train end to end; impossible values are caught before building."""
  from vitcls import configs, train, validate
  from vitcls.run import build
  from vitcls.data import sources
  digits = os.path.join(REPO, "experiments", "digits_vit.py:runlocal=True")
  config = configs.resolve(configs.load_experiment(digits), [
      "class_weights=balanced", "input.balanced_sampling=True", "loss=sigmoid_xent",
      "ema_decay=0.9", "grad_accum_steps=2", "mixup.p=0.2"])
  counts = np.bincount(np.array([e["label"] for e in sources.get_source("digits", "train")]))
  expected = counts.sum() / (10 * counts)
  options = build.step_options(config)
  np.testing.assert_allclose(options.class_weights, expected, rtol=1e-6)
  assert options.loss == "sigmoid_xent" and options.grad_accum_steps == 2
  final = train.train(config, str(tmp_path))
  assert {"test/top1", "test_ema/top1"} <= set(final)
  for override, message in [
      ("grad_accum_steps=3", "grad_accum_steps 3 must divide the per-device batch"),
      ("ema_decay=1.0", "ema_decay must be in [0, 1)"),
      ("mixup.alpha=-1.0", "mixup"),
      ("loss=hinge", "hinge"),
      ("class_weights=[1.0, 2.0]", "class_weights")]:
    bad = configs.resolve(configs.load_experiment(digits), [override])
    with pytest.raises(configs.ConfigError) as info:
      validate.check(bad, num_devices=1)
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_the_cli_turns_on_the_persistent_compilation_cache(tmp_path, monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  from vitcls import configs, train  # pylint: disable=g-import-not-at-top
  before = jax.config.jax_compilation_cache_dir
  try:
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    config = configs.resolve(configs.ConfigDict(), [f"compilation_cache_dir={tmp_path}/c"])
    train._compilation_cache(config)  # pylint: disable=protected-access
    assert jax.config.jax_compilation_cache_dir == f"{tmp_path}/c"
    jax.config.update("jax_compilation_cache_dir", before)
    train._compilation_cache(configs.resolve(  # pylint: disable=protected-access
        configs.ConfigDict(), ["compilation_cache_dir="]))
    assert jax.config.jax_compilation_cache_dir == before  # "" leaves it off.
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", before or "x")
    train._compilation_cache(config)  # pylint: disable=protected-access
    assert jax.config.jax_compilation_cache_dir == before  # The environment wins.
  finally:
    jax.config.update("jax_compilation_cache_dir", before)
