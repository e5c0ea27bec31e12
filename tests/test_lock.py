"""One writer per workdir: a second trainer stops at once naming the holder; a lock left by
a process that is gone is taken over with a warning; of racing starters exactly one wins."""

import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from vitcls import configs, train
from vitcls.run import lock as workdir_lock
from vitcls.run import workdir as wdir
from vitcls.errors import UserError
from vitcls.run.lock import WorkdirLock, WorkdirLockedError, WorkdirLockLostError
from conftest import DEFAULT_EXPERIMENT, REPO


def _config(*overrides):
  return configs.resolve(configs.load_experiment(DEFAULT_EXPERIMENT + ":runlocal=True"),
                         ["async_checkpoints=False", *overrides])


def _write_lock(workdir, age_s=0.0, **fields):
  """A lock file as another holder would have written it (this machine's by default)."""
  holder = dataclasses.replace(workdir_lock.this_process(), **fields)
  path = os.path.join(workdir, wdir.TRAIN_LOCK_FILE)
  with open(path, "w") as f:
    json.dump(dataclasses.asdict(holder), f)
  if age_s:
    past = time.time() - age_s
    os.utime(path, (past, past))
  return holder


def _dead_pid():
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


@pytest.fixture
def sleeper():
  proc = subprocess.Popen(["sleep", "60"])
  yield proc
  proc.kill()
  proc.wait()


def test_a_second_trainer_on_a_workdir_in_use_stops_at_once_naming_the_holder(
    tmp_path, sleeper, monkeypatch):
  from vitcls.run import build  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path)
  holder = _write_lock(workdir, pid=sleeper.pid,
                       process_start=workdir_lock._process_start(sleeper.pid))
  def must_not_build(config):
    raise AssertionError("built the run although the workdir is in use")
  monkeypatch.setattr(build, "build", must_not_build)  # Stops before building anything.
  with pytest.raises(WorkdirLockedError) as info:
    train.train(_config(), workdir)
  message = str(info.value)
  assert "\n" not in message and f"workdir '{workdir}' is in use" in message
  assert f"host {socket.gethostname()}, pid {sleeper.pid}, since {holder.since}" in message
  assert os.listdir(workdir) == [wdir.TRAIN_LOCK_FILE]  # Not even config.json written.


def test_this_process_holding_the_lock_is_a_live_holder_too(tmp_path):
  workdir = str(tmp_path)
  with WorkdirLock(workdir):
    with pytest.raises(WorkdirLockedError) as info:
      WorkdirLock(workdir).acquire()
    assert f"pid {os.getpid()}" in str(info.value)
    assert workdir_lock.live_holder(workdir).pid == os.getpid()
  assert not os.path.exists(os.path.join(workdir, wdir.TRAIN_LOCK_FILE))  # Released.
  assert workdir_lock.live_holder(workdir) is None


def test_the_lock_is_released_when_training_fails(tmp_path, monkeypatch):
  from vitcls.run import build  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  held = []

  def failing_build(config):
    held.append(os.path.exists(os.path.join(workdir, wdir.TRAIN_LOCK_FILE)))
    raise UserError("dataset imagenet_v9 is not prepared")
  monkeypatch.setattr(build, "build", failing_build)
  with pytest.raises(UserError, match="imagenet_v9"):
    train.train(_config(), workdir)
  assert held == [True]  # It failed inside the lock...
  assert not os.path.exists(os.path.join(workdir, wdir.TRAIN_LOCK_FILE))  # ...released.
  assert not os.path.exists(os.path.join(workdir, wdir.CONFIG_FILE))  # Nothing recorded.


@pytest.mark.parametrize("kind", ["dead pid", "reused pid", "other boot", "foreign host"])
def test_a_lock_left_by_a_process_that_is_gone_is_taken_over_with_a_warning(
    tmp_path, caplog, kind):
  workdir = str(tmp_path)
  fields, why = {
      "dead pid": ({"pid": _dead_pid()}, "that process has ended"),
      "reused pid": ({"process_start": "1"}, "its pid now belongs to another process"),
      "other boot": ({"boot_id": "an-earlier-boot"}, "this machine has restarted since"),
      "foreign host": ({"host": "node-17", "pid": 4242}, "not been refreshed for 60 min"),
  }[kind]
  stale = _write_lock(workdir, age_s=3600 if kind == "foreign host" else 0, **fields)
  with caplog.at_level(logging.WARNING, logger="absl"):
    with WorkdirLock(workdir):
      assert workdir_lock.live_holder(workdir).token != stale.token
  warnings = [r.getMessage() for r in caplog.records if "Took over the lock" in r.getMessage()]
  assert len(warnings) == 1 and why in warnings[0], warnings
  assert f"host {stale.host}, pid {stale.pid}" in warnings[0]


def test_an_unreadable_lock_is_an_error_while_recent_and_taken_over_once_stale(tmp_path):
  workdir = str(tmp_path)
  path = os.path.join(workdir, wdir.TRAIN_LOCK_FILE)
  with open(path, "w") as f:
    f.write('{"host": "node-17", "pi')  # A holder that died while writing it.
  with pytest.raises(WorkdirLockedError) as info:
    WorkdirLock(workdir).acquire()
  assert "which cannot be read" in str(info.value) and "delete that file" in str(info.value)
  past = time.time() - 3600
  os.utime(path, (past, past))
  with WorkdirLock(workdir):
    assert workdir_lock.live_holder(workdir).pid == os.getpid()


def test_a_recent_lock_of_another_host_is_live_and_the_message_says_when_it_expires(
    tmp_path):
  workdir = str(tmp_path)
  _write_lock(workdir, age_s=60, host="node-17", pid=4242)
  with pytest.raises(WorkdirLockedError) as info:
    WorkdirLock(workdir).acquire()
  assert "host node-17, pid 4242" in str(info.value)
  assert "taken over once it is 10 min without a heartbeat" in str(info.value)


def test_training_takes_over_a_stale_lock_and_releases_it(tmp_path, caplog):
  workdir = str(tmp_path)
  _write_lock(workdir, pid=_dead_pid())
  with caplog.at_level(logging.WARNING, logger="absl"):
    train.train(_config("total_steps=2", "evals.test.every=1000"), workdir)
  assert any("Took over the lock" in r.getMessage() for r in caplog.records)
  assert not os.path.exists(os.path.join(workdir, wdir.TRAIN_LOCK_FILE))


def test_the_holder_heartbeats_and_notices_a_lost_lock(tmp_path):
  workdir = str(tmp_path)
  path = os.path.join(workdir, wdir.TRAIN_LOCK_FILE)
  lock = WorkdirLock(workdir, stale_after=1.0).acquire()  # Heartbeat every 0.2 s.
  try:
    past = time.time() - 3600
    os.utime(path, (past, past))
    deadline = time.time() + 20  # Generous: the suite may load the machine.
    while time.time() - os.stat(path).st_mtime > 60 and time.time() < deadline:
      time.sleep(0.05)
    assert time.time() - os.stat(path).st_mtime < 60  # Touched again by the heartbeat.
    lock.refresh()
    os.remove(path)  # Someone judged us stale and took over (another host's lock now).
    _write_lock(workdir, host="node-17", pid=4242)
    with pytest.raises(WorkdirLockLostError) as info:
      while time.time() < deadline:  # refresh() notices within a heartbeat (0.2 s).
        lock.refresh()
        time.sleep(0.05)
    assert "host node-17, pid 4242" in str(info.value) and "\n" not in str(info.value)
  finally:
    lock.release()
  assert os.path.exists(path)  # Not ours any more: left alone.


def test_racing_threads_for_a_stale_lock_exactly_one_wins(tmp_path):
  workdir = str(tmp_path)
  _write_lock(workdir, pid=_dead_pid())
  go, results = threading.Barrier(8), []

  def start():
    go.wait()
    try:
      results.append(WorkdirLock(workdir).acquire())
    except WorkdirLockedError as e:
      results.append(e)

  threads = [threading.Thread(target=start) for _ in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  winners = [r for r in results if isinstance(r, WorkdirLock)]
  assert len(winners) == 1 and len(results) == 8
  winners[0].release()


_RACER = """
import os, sys, time
from vitcls.run import lock as workdir_lock
workdir, go, release = sys.argv[1], float(sys.argv[2]), sys.argv[3]
time.sleep(max(0.0, go - time.time()))
try:
  lock = workdir_lock.WorkdirLock(workdir).acquire()
except workdir_lock.WorkdirLockedError as e:
  print("LOST", e, flush=True)
else:
  print("WON", flush=True)
  deadline = time.time() + 120
  while not os.path.exists(release) and time.time() < deadline:  # Held till all have tried.
    time.sleep(0.05)
  lock.release()
"""


def test_racing_processes_for_a_stale_lock_exactly_one_wins(tmp_path):
  workdir, release = str(tmp_path / "run"), str(tmp_path / "release")
  os.makedirs(workdir)
  _write_lock(workdir, pid=_dead_pid())
  go = time.time() + 3.0  # Time for all to import and wait.
  procs = [subprocess.Popen([sys.executable, "-c", _RACER, workdir, str(go), release],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for _ in range(6)]
  deadline = time.time() + 120
  while sum(p.poll() is not None for p in procs) < 5 and time.time() < deadline:
    time.sleep(0.05)
  open(release, "w").close()
  outputs = [p.communicate(timeout=120) for p in procs]
  assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
  verdicts = [out.split()[0] for out, _ in outputs]
  assert sorted(verdicts) == ["LOST"] * 5 + ["WON"], outputs
  assert not os.path.exists(os.path.join(workdir, wdir.TRAIN_LOCK_FILE))
