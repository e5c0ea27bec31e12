"""The local sweep runner: trains the members as `python -m vitcls.train` subprocesses,
`parallel` at a time, and keeps the sweep's table current as they finish.

A member's record (`sweep_member.json`: status, attempts, wall time) and its log
(`train.log`) live in its workdir, so a rerun skips the members that are done and resumes
the others from their checkpoints. The sweep holds its folder's lock (the trainer's lock
class, `vitcls.run.lock`) while it runs: a second runner there stops at once.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Sequence

from vitcls.run import lock as lock_lib
from vitcls.run import workdir as wdir
from vitcls.sweep import members as members_lib
from vitcls.sweep import table as table_lib


def _die_with_parent(parent: int):
  """preexec_fn: the child gets SIGKILL when the sweep dies (Linux), so a killed sweep
  leaves no training behind."""
  def preexec():
    try:
      libc = ctypes.CDLL(None, use_errno=True)
      libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
      return
    if os.getppid() != parent:  # The sweep died before prctl took effect.
      os._exit(1)
  return preexec


class _Stop(Exception):
  """SIGTERM / SIGINT reached the sweep."""


def sweep_lock(workdir: str) -> lock_lib.WorkdirLock:
  """The lock of a sweep's folder (not yet taken): one sweep runner at a time there."""
  return lock_lib.WorkdirLock(workdir, name=wdir.SWEEP_LOCK_FILE, user="sweep",
                              instead="sweep into another --workdir")


def device_count(timeout_s: float = 120) -> int | None:
  """The JAX devices each member's trainer will see (it runs here, in this environment),
  or None when they cannot be counted (then each trainer checks its own as it starts).

  Counted by a child Python, not here: importing jax in the sweep would cost its quick
  error path a second or more, and on GPUs keep a share of every GPU's memory away from
  the members for the whole sweep.
  """
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  try:
    proc = subprocess.run([sys.executable, "-c", "import jax; print(jax.device_count())"],
                          capture_output=True, text=True, env=env, timeout=timeout_s,
                          stdin=subprocess.DEVNULL)
  except (OSError, subprocess.TimeoutExpired):
    return None
  words = proc.stdout.split()
  return int(words[-1]) if proc.returncode == 0 and words and words[-1].isdigit() else None


_GPU_MEMORY_VARS = ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE",
                    "XLA_PYTHON_CLIENT_ALLOCATOR")


class LocalRunner:
  """Trains the members as `python -m vitcls.train` subprocesses, `parallel` at a time."""

  def __init__(self, spec: str, workdir: str, members: Sequence[members_lib.Member], configs_,
               common: Sequence[str], parallel: int = 1, metric: str | None = None,
               out=None):
    self.spec, self.workdir, self.members = spec, workdir, list(members)
    self.common, self.parallel, self.metric = list(common), parallel, metric
    self.totals = [members_lib.planned_steps(c) for c in configs_]
    self.out = out or sys.stdout
    self.trainer = [sys.executable, "-m", "vitcls.train"]  # + --config, --workdir, ...
    self.running: dict[str, tuple] = {}  # name -> (member, Popen, start, info, log)

  def say(self, text: str) -> None:
    """Prints one `[sweep]` progress line to `out`, flushed so logs read live keep up."""
    print(f"[sweep] {text}", file=self.out, flush=True)

  def _dir(self, m: members_lib.Member) -> str:
    return os.path.join(self.workdir, m.name)

  def _record(self, m: members_lib.Member, info: dict) -> None:
    members_lib.write_record(self._dir(m), info)

  def _refresh(self) -> dict:
    table = table_lib.collect(self.workdir, self.members, self.totals, self.running,
                              self.metric)
    table_lib.write_reports(self.workdir, table, self.spec, self.common)
    return table

  def _start(self, m: members_lib.Member) -> None:
    directory = self._dir(m)
    os.makedirs(directory, exist_ok=True)
    info = members_lib.read_record(directory)
    info.update(name=m.name, overrides=m.values, command_overrides=self.common + m.texts,
                status="running", returncode=None, attempts=info.get("attempts", 0) + 1,
                wall_time_s=info.get("wall_time_s", 0.0))
    argv = [*self.trainer, f"--config={self.spec}",
            f"--workdir={directory}", *[f"--config.{o}" for o in self.common + m.texts]]
    log = open(os.path.join(directory, wdir.MEMBER_LOG), "ab")
    log.write((f"==== vitcls.sweep: attempt {info['attempts']}, "
               f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(argv)}\n").encode())
    log.flush()
    env = dict(os.environ)
    if self.parallel > 1 and not any(k in env for k in _GPU_MEMORY_VARS):
      # jax takes 75% of each GPU's memory up front: members sharing GPUs split it.
      env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.9 / self.parallel:.3f}"
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=env,
                            preexec_fn=_die_with_parent(os.getpid())
                            if sys.platform.startswith("linux") else None)
    info["pid"] = proc.pid
    self._record(m, info)
    self.running[m.name] = (m, proc, time.monotonic(), info, log)
    self.say(f"start {m.name} (member {m.index + 1} of {len(self.members)}, attempt "
             f"{info['attempts']}): log in {os.path.join(directory, wdir.MEMBER_LOG)}")

  def _finish(self, name: str, returncode: int | None, left: int) -> None:
    m, _, start, info, log = self.running.pop(name)
    log.close()
    elapsed = time.monotonic() - start
    info.update(wall_time_s=round(info["wall_time_s"] + elapsed, 3), returncode=returncode,
                pid=None,
                status="done" if returncode == 0 else
                "failed" if returncode is not None else "interrupted")
    self._record(m, info)
    table = self._refresh()
    took = table_lib.format_duration(elapsed)
    if returncode is None:
      self.say(f"stopped {m.name} after {took}")
      return
    if returncode == 0:
      main = table["main"]
      score = next((r["metrics"].get(main) for r in table["rows"] if r["member"] is m), None)
      result = f"{main}={score:.4f}, " if score is not None else ""
      self.say(f"done {m.name}: {result}{took}; {left} left")
    else:
      self.say(f"FAILED {m.name} (exit code {returncode}) after {took}: see "
               f"{os.path.join(self._dir(m), wdir.MEMBER_LOG)}; {left} left")

  def _note_times(self) -> None:
    for m, _, start, info, _ in self.running.values():
      self._record(m, {**info, "wall_time_s": round(
          info["wall_time_s"] + time.monotonic() - start, 3)})

  def _stop_all(self) -> None:
    for _, proc, *_ in self.running.values():
      if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    for name, (_, proc, *_) in list(self.running.items()):
      try:
        proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
      self._finish(name, None, 0)

  def run(self) -> int:
    """Trains every member not yet done (a rerun resumes the sweep); returns the exit status.

    0 when all are done, 1 when any failed, 128 + the signal number when interrupted.
    """
    os.makedirs(self.workdir, exist_ok=True)
    lock = sweep_lock(self.workdir).acquire()
    todo = []
    for m in self.members:
      info = members_lib.read_record(self._dir(m))
      if info.get("status") == "done":
        if info.get("command_overrides") != self.common + m.texts:
          self.say(f"note: {m.name} finished with other overrides "
                   f"({' '.join(info.get('command_overrides') or [])}); it is kept: delete "
                   f"{self._dir(m)} to train it again")
        continue
      todo.append(m)
    done = len(self.members) - len(todo)
    self.say(f"{len(self.members)} members in {self.workdir}: {done} already done, "
             f"{len(todo)} to run, {self.parallel} at a time")

    def stop(signum, frame):
      del frame
      raise _Stop(signum)
    previous = ({s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
                if threading.current_thread() is threading.main_thread() else {})
    try:
      self._refresh()
      last_note = time.monotonic()
      while todo or self.running:
        while todo and len(self.running) < self.parallel:
          self._start(todo.pop(0))
        time.sleep(0.1)
        if time.monotonic() - last_note > 15:  # A killed sweep keeps most of the time.
          last_note = time.monotonic()
          self._note_times()
        for name, (_, proc, *_) in list(self.running.items()):
          returncode = proc.poll()
          if returncode is not None:
            self._finish(name, returncode, len(todo) + len(self.running) - 1)
    except _Stop as e:
      signal.signal(signal.SIGINT, signal.SIG_IGN)
      signal.signal(signal.SIGTERM, signal.SIG_IGN)
      self.say("interrupted: stopping the running members")
      self._stop_all()
      print("vitcls: sweep interrupted: run the same command again to resume it",
            file=sys.stderr)
      return 128 + int(e.args[0])
    finally:
      for s, handler in previous.items():
        signal.signal(s, handler)
      lock.release()

    table = table_lib.collect(self.workdir, self.members, self.totals, (), self.metric)
    failed = [r["member"] for r in table["rows"] if r["status"] != "done"]
    self.say(f"finished: {len(self.members) - len(failed)} of {len(self.members)} done; "
             f"table in {os.path.join(self.workdir, wdir.SWEEP_MARKDOWN)}")
    if table["main"] and not any(table["main"] in r["metrics"] for r in table["rows"]):
      self.say(f"note: no member logged the metric '{table['main']}'; known ones: "
               f"{', '.join(table['metrics']) or 'none'}")
    if failed:
      print(f"vitcls: error: {len(failed)} of {len(self.members)} sweep members failed: "
            + ", ".join(f"{m.name} (see {os.path.join(self._dir(m), wdir.MEMBER_LOG)})"
                        for m in failed)
            + ": fix the cause and run the same command again to retry them",
            file=sys.stderr)
      return 1
    return 0
