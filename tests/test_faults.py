"""Faults in real subprocesses: SIGTERM, SIGKILL at random moments, a dead peer process.

Every stop-and-restart chain must end with the parameters of an uninterrupted run, bit
for bit: the data stream and all randomness are functions of (seed, step), and each
restart resumes from an intact checkpoint. All recipe ingredients with randomness or
state are on (RandAugment, mixup and CutMix, EMA, gradient accumulation, stochastic
depth), so any of them leaking state across a restart shows.
"""

import os
import signal
import socket
import subprocess
import time

import numpy as np
import pytest

from conftest import DEFAULT_EXPERIMENT, REPO, assert_same_run, train_command
from conftest import xla_flags

STEPS = 150
OVERRIDES = [f"--config.total_steps={STEPS}", "--config.checkpoint_every=10",
             "--config.log_every=10", "--config.evals.test.every=1000",
             "--config.input.pp=randaug(2,10)|random_shift(2)|value_range(-1,1)|onehot(10)",
             "--config.mixup.alpha=0.2", "--config.cutmix.alpha=1.0",
             "--config.ema_decay=0.99", "--config.ema_warmup=True",
             "--config.grad_accum_steps=2", "--config.model.depth=2",
             "--config.input.on_device=False"]  # RandAugment runs on the host.


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
  """One persistent compilation cache for every process here: restarts compile once."""
  cache = str(tmp_path_factory.mktemp("jax_cache"))
  return dict(os.environ, XLA_FLAGS=xla_flags(1),
              TF_CPP_MIN_LOG_LEVEL="2", JAX_COMPILATION_CACHE_DIR=cache,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache_env):
  """The uninterrupted run every chain must reproduce."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  proc = subprocess.run(train_command(workdir, *OVERRIDES), cwd=REPO, env=cache_env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


def _start(workdir, env, *extra):
  log = open(os.path.join(os.path.dirname(workdir), os.path.basename(workdir) + ".log"),
             "a")
  return subprocess.Popen(train_command(workdir, *OVERRIDES, *extra), cwd=REPO, env=env,
                          stdout=log, stderr=subprocess.STDOUT, text=True)


def _log(workdir):
  with open(os.path.join(os.path.dirname(workdir), os.path.basename(workdir) + ".log")) as f:
    return f.read()


def _complete_steps(workdir):
  directory = os.path.join(workdir, "checkpoints")
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return sorted(int(n) for n in names if n.isdigit() and os.path.exists(
      os.path.join(directory, n, "_CHECKPOINT_METADATA")))


def _saving(workdir):
  directory = os.path.join(workdir, "checkpoints")
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return any("tmp" in n for n in names)


def _assert_same_as(straight, workdir):
  assert_same_run(straight, workdir, STEPS)


def _wait_for(predicate, proc, timeout=300):
  deadline = time.time() + timeout
  while proc.poll() is None and time.time() < deadline:
    if predicate():
      return True
    time.sleep(0.005)
  return False


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)],
                         ids=["sigterm", "ctrl-c"])
def test_a_stop_request_stops_cleanly_and_the_resumed_run_is_bitwise_equal(
    tmp_path, straight, cache_env, signum, code):
  """SIGTERM or Ctrl-C at a random step: the step finishes, its checkpoint is saved, one
  line, exit code 0 (130 for Ctrl-C: before, a KeyboardInterrupt traceback and nothing
  saved)."""
  workdir = str(tmp_path / "run")
  target = int(np.random.default_rng(int(time.time())).integers(12, 80))
  proc = _start(workdir, cache_env)
  # Metrics are flushed at checkpoints only: wait for a checkpoint, then a random delay.
  assert _wait_for(lambda: _complete_steps(workdir), proc), _log(workdir)[-3000:]
  time.sleep(target / 100)
  proc.send_signal(signum)
  assert proc.wait(timeout=300) == code, _log(workdir)[-3000:]
  log = _log(workdir)
  stopped = [line for line in log.splitlines() if "vitcls: stopped at step" in line]
  assert len(stopped) == 1 and "Traceback" not in log, log[-3000:]
  assert signal.Signals(signum).name in stopped[0]
  step = int(stopped[0].split("stopped at step ")[1].split()[0])
  assert 0 < step < STEPS and step in _complete_steps(workdir)

  resumed = _start(workdir, cache_env)
  assert resumed.wait(timeout=600) == 0, _log(workdir)[-3000:]
  assert f"Resuming from the checkpoint of step {step}" in _log(workdir)
  _assert_same_as(straight, workdir)


def test_a_second_ctrl_c_stops_at_once_and_a_second_sigterm_is_ignored():
  """The first request is read after the step; a second Ctrl-C is a person who will not
  wait for the save (KeyboardInterrupt at once), a second SIGTERM must not cut it short."""
  from vitcls.run import loop
  with loop.StopRequest() as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)  # Ignored: the checkpoint is being saved.
    assert stop.reason == "SIGTERM"
  with loop.StopRequest() as stop:
    try:
      os.kill(os.getpid(), signal.SIGINT)
    except KeyboardInterrupt:
      pytest.fail("the first Ctrl-C interrupted at once instead of asking for a stop")
    assert stop.reason == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Put back.


def test_an_interrupt_outside_the_steps_is_one_line_and_exit_130(monkeypatch, capsys,
                                                                tmp_path):
  """Ctrl-C twice, or during start-up: no traceback, the exit code of an interrupt."""
  from vitcls import flags, train
  from vitcls.run import loop

  def interrupted(config, workdir):
    raise KeyboardInterrupt
  monkeypatch.setattr(loop, "train", interrupted)

  def command(overrides):
    train._OVERRIDES[:] = overrides  # pylint: disable=protected-access
    train.main(["vitcls.train"])
  with pytest.raises(SystemExit) as exit_info:
    try:
      flags.main_in_process(["vitcls.train", f"--config={DEFAULT_EXPERIMENT}:runlocal=True",
                             f"--workdir={tmp_path / 'run'}"],
                            train._define_flags, command)  # pylint: disable=protected-access
    except KeyboardInterrupt:
      pytest.fail("KeyboardInterrupt escaped the CLI (a traceback for the user)")
  assert exit_info.value.code == 130
  err = capsys.readouterr().err
  assert err.startswith("vitcls: interrupted at once") and err.count("\n") == 1, err


def test_sigkill_at_five_random_moments_then_resume_is_bitwise_equal(
    tmp_path, straight, cache_env):
  """Kills during an async checkpoint write and at random times (imports, compilation,
  steps); after each, the next launch resumes from the newest intact checkpoint."""
  workdir = str(tmp_path / "run")
  rng = np.random.default_rng(int(time.time()))
  moments = ["save", "step", "startup", "save", "step"]
  resumed_from = []
  for moment in moments:
    before = _complete_steps(workdir)
    proc = _start(workdir, cache_env)
    if moment == "save":  # A checkpoint newer than those on disk is being written.
      _wait_for(lambda b=before: _saving(workdir) and _complete_steps(workdir) == b, proc)
    elif moment == "step":  # Mid-training: after a new checkpoint, a random delay.
      _wait_for(lambda b=before: _complete_steps(workdir) != b, proc)
      time.sleep(float(rng.uniform(0, 1)))
    else:  # Imports, data opening or compilation.
      _wait_for(lambda: False, proc, timeout=float(rng.uniform(1, 6)))
    proc.send_signal(signal.SIGKILL)
    code = proc.wait()
    if code == 0:  # Finished before the kill landed: nothing left to test this time.
      break
    assert code == -signal.SIGKILL
    resumed_from.append(before[-1] if before else None)
  final = _start(workdir, cache_env)
  assert final.wait(timeout=600) == 0, _log(workdir)[-3000:]
  log = _log(workdir)
  for step in resumed_from:
    if step is not None:  # Each launch resumed from the newest intact step it found.
      assert f"Resuming from the checkpoint of step {step}" in log
  assert sum(s is not None for s in resumed_from) >= 2, (resumed_from, log[-3000:])
  _assert_same_as(straight, workdir)


def test_when_one_process_dies_the_other_exits_within_the_timeout(tmp_path):
  """2 processes; SIGKILL one mid-training: the survivor exits non-zero, never hangs."""
  workdir = str(tmp_path / "two")
  env = dict(os.environ, XLA_FLAGS=xla_flags(1),
             TF_CPP_MIN_LOG_LEVEL="2")
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  timeout = 10
  procs = [subprocess.Popen(
      train_command(workdir, f"--coordinator=localhost:{port}", "--num_processes=2",
                    f"--process_id={i}", "--config.total_steps=100000",
                    "--config.checkpoint_every=2", f"--config.heartbeat_timeout_s={timeout}"),
      cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  try:
    assert _wait_for(lambda: _complete_steps(workdir), procs[0]), "no step was trained"
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    code = procs[0].wait(timeout=timeout + 120)
    elapsed = time.time() - killed_at
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert code != 0
  assert elapsed < timeout + 60, elapsed


def test_skip_nonfinite_updates_counts_skips_and_stops_after_too_many_in_a_row(tmp_path):
  """In-process: lr 1e30 breaks the weights at step 2; every later update is skipped
  (counted in the metrics), and the run stops after 3 in a row, one clear error."""
  from vitcls import configs, train
  from vitcls.run import loop  # pylint: disable=g-import-not-at-top
  from conftest import DEFAULT_EXPERIMENT, read_metrics  # pylint: disable=g-import-not-at-top
  config = configs.resolve(configs.load_experiment(DEFAULT_EXPERIMENT + ":runlocal=True"), [
      "lr=1e30", "grad_clip_norm=0", "skip_nonfinite_updates=True", "max_skipped_in_a_row=3",
      "total_steps=20", "checkpoint_every=100", "evals.test.every=1000"])
  with pytest.raises(loop.NonFiniteLossError, match=r"^3 updates in a row had a non-finite "
                     r"loss or gradient \(up to step 5\): stopping"):
    train.train(config, str(tmp_path))
  rows = {r["step"]: r for r in read_metrics(str(tmp_path)) if "loss" in r}
  assert [rows[s]["skipped_updates"] for s in sorted(rows)][:5] == [0, 0, 1, 2, 3]
  assert rows[2]["loss"] == rows[2]["loss"] and rows[3]["loss"] != rows[3]["loss"]  # NaN
