"""One training run per workdir, one sweep per sweep folder: a lock file naming its holder.

Two trainers on one workdir interleave their checkpoints and metrics and ruin the run, and
neither orbax nor TensorBoard notices. So the trainer holds `WORKDIR/train.lock` while it
runs: a JSON file (host, pid, start time) created atomically, so that of two starters only
one creates it. A second trainer finds it and stops at once with a message naming the
holder. A lock left behind by a process that is gone (killed, preempted, crashed machine) is
taken over with a warning, so a restarted job resumes without help. Whether the holder is
gone is decided
- on the same machine (same hostname, boot and pid namespace) by its pid: the process must
  exist and have started when the lock says (pids are reused);
- anywhere else (another node sharing the filesystem) by a heartbeat: the holder touches the
  file every minute from a background thread, and a lock untouched for `stale_after`
  seconds (10 minutes by default) is stale.
Taking over is exclusive too: a starter first creates `train.lock.takeover` (O_EXCL), judges
the lock again under it, moves it away by rename and checks that what it moved is the very
file it judged (by content: inodes are reused), so of several starters racing for one stale
lock exactly one wins. A sweep holds its folder's `.sweep.lock` the same way
(`WorkdirLock(folder, name=SWEEP_LOCK_FILE, user="sweep")`), so a second sweep runner
there stops at once too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import socket
import threading
import time
import uuid
from typing import NamedTuple

from absl import logging

from vitcls.errors import UserError, shown
from vitcls.run import workdir as wdir

STALE_AFTER_S = 600.0  # A lock of another machine untouched this long is stale.
_HEARTBEAT_S = 60.0  # The holder touches the file this often (at most stale_after / 5).
_TAKEOVER_STALE_S = 60.0  # A takeover mutex older than this was left by a dead starter.


class WorkdirLockedError(UserError):
  """Another live training run (or sweep) holds the workdir."""


class WorkdirLockLostError(UserError):
  """This run's lock was taken over by another run (its heartbeat was judged stale)."""


@dataclasses.dataclass(frozen=True)
class Holder:
  """Who holds a lock, as written in the file."""
  host: str
  pid: int
  started: float  # time.time() when the lock was taken.
  token: str = ""
  boot_id: str | None = None  # Linux: /proc/sys/kernel/random/boot_id.
  pid_namespace: str | None = None  # Linux: /proc/self/ns/pid (containers).
  process_start: str | None = None  # Linux: the pid's start time in clock ticks after boot.

  @property
  def since(self) -> str:
    """When the lock was taken, as UTC text for messages."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))

  def describe(self) -> str:
    """Host, pid and start of the holder, for messages that tell the user which run it is."""
    host = self.host if self.host.isprintable() else repr(self.host)
    return f"host {host}, pid {self.pid}, since {self.since}"


def _read_text(path: str) -> str | None:
  try:
    with open(path) as f:
      return f.read().strip()
  except OSError:
    return None


def _process_start(pid: int) -> str | None:
  """The start time of `pid` (clock ticks after boot, /proc/PID/stat field 22), if known."""
  stat = _read_text(f"/proc/{pid}/stat")
  if not stat or ")" not in stat:
    return None
  fields = stat[stat.rfind(")") + 2:].split()  # The name (field 2) may hold spaces.
  return fields[19] if len(fields) > 19 else None


def _pid_namespace() -> str | None:
  try:
    return os.readlink("/proc/self/ns/pid")
  except OSError:
    return None


def this_process() -> Holder:
  """This process as a lock holder, with the ids that tell a restart or reused pid apart."""
  pid = os.getpid()
  return Holder(host=socket.gethostname(), pid=pid, started=time.time(),
                token=uuid.uuid4().hex, boot_id=_read_text("/proc/sys/kernel/random/boot_id"),
                pid_namespace=_pid_namespace(), process_start=_process_start(pid))


def _gone(holder: Holder, age_s: float, stale_after: float) -> str | None:
  """Why `holder` is known to be gone (its lock may be taken over), or None if it may live."""
  me = this_process()
  same_host = holder.host == me.host
  if same_host and holder.boot_id and me.boot_id and holder.boot_id != me.boot_id:
    return "this machine has restarted since"
  same_pids = same_host and (holder.pid_namespace == me.pid_namespace
                             or not (holder.pid_namespace and me.pid_namespace))
  if same_pids:
    try:
      os.kill(holder.pid, 0)
    except ProcessLookupError:
      return "that process has ended"
    except PermissionError:
      pass  # It exists, under another user.
    start = _process_start(holder.pid)
    if holder.process_start and start and start != holder.process_start:
      return "its pid now belongs to another process"
    return None
  if age_s > stale_after:
    return f"it has not been refreshed for {age_s / 60:.0f} min"
  return None


def _parse(text: str) -> Holder:
  data = json.loads(text)
  if not isinstance(data, dict):
    raise ValueError("not a JSON object")
  fields = {f.name for f in dataclasses.fields(Holder)}
  holder = Holder(**{k: v for k, v in data.items() if k in fields})
  if not (isinstance(holder.host, str) and isinstance(holder.pid, int) and holder.pid > 0
          and isinstance(holder.started, (int, float))):
    raise ValueError("no valid host, pid and start time")
  return holder


class _Seen(NamedTuple):
  """A lock file as read: its text, the holder it names (None if unreadable), its age."""
  text: str
  holder: Holder | None
  age: float
  problem: str | None


def _read(path: str) -> str | None:
  try:
    with open(path) as f:
      return f.read()
  except FileNotFoundError:
    return None


def _token(text: str | None) -> str | None:
  try:
    return _parse(text).token if text is not None else None
  except (ValueError, TypeError):
    return None


class WorkdirLock:
  """`with WorkdirLock(workdir):` holds the workdir's lock, or raises WorkdirLockedError.

  Whose a lock file is is told by its content (a random token per acquisition), never by
  its inode: a removed file's inode is soon given to the next file created. `name` is the
  lock file, `user` what holds it and `instead` what else to do, in messages: a "training
  run" (`train.lock`) or a "sweep" (`.sweep.lock` of a sweep's folder).
  """

  def __init__(self, workdir: str, *, stale_after: float = STALE_AFTER_S,
               name: str = wdir.TRAIN_LOCK_FILE, user: str = "training run",
               instead: str = "train in another --workdir"):
    self.workdir = workdir
    self.path = os.path.join(workdir, name)
    self.user, self.instead = user, instead
    self.stale_after = float(stale_after)
    self._interval = min(_HEARTBEAT_S, self.stale_after / 5)
    self._me: Holder | None = None
    self._held = False
    self._lost: str | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._guard = threading.Lock()

  # Taking and releasing.

  def acquire(self) -> "WorkdirLock":
    """Takes the lock, a stale one included; raises WorkdirLockedError if it is held."""
    self._me = this_process()
    for _ in range(200):
      if self._create():
        self._start_heartbeat()
        return self
      seen = self._inspect()
      if seen is None:
        continue  # It vanished meanwhile: try to create it again.
      self._stale_reason(seen)  # Raises if its holder may be alive.
      if self._take_over():
        self._start_heartbeat()
        return self
      time.sleep(0.02)  # Someone else is taking it over, or created it: look again.
    raise WorkdirLockedError(f"could not take the lock {shown(self.path)}: it keeps changing; "
                             f"check that no other {self.user} uses this workdir")

  def release(self) -> None:
    """Stops the heartbeat and removes the lock file if it is still ours."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    if self._held and self._owns():
      with contextlib.suppress(FileNotFoundError):
        os.unlink(self.path)
    self._held = False

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()

  def refresh(self) -> None:
    """Raises if the heartbeat found the lock lost (a flag read: no I/O, once a step)."""
    if self._lost:
      raise WorkdirLockLostError(self._lost)

  # Internals.

  def _stale_reason(self, seen: _Seen) -> str:
    """Why the lock `seen` may be taken over; raises WorkdirLockedError if it may not."""
    if seen.holder is None:  # Unreadable: being written, or garbage.
      if seen.age <= self.stale_after:
        raise WorkdirLockedError(
            f"workdir {shown(self.workdir)} is locked by {shown(self.path)}, which cannot be "
            f"read ({seen.problem}): if no {self.user} uses this workdir, delete that file")
      return f"it cannot be read ({seen.problem}) and is {seen.age / 60:.0f} min old"
    why = _gone(seen.holder, seen.age, self.stale_after)
    if why is None:
      raise WorkdirLockedError(self._held_message(seen.holder))
    return why

  def _held_message(self, holder: Holder) -> str:
    hint = ""
    if holder.host != socket.gethostname():
      hint = (f"; if it is gone, its lock is taken over once it is "
              f"{self.stale_after / 60:g} min without a heartbeat")
    return (f"workdir {shown(self.workdir)} is in use by another {self.user} "
            f"({holder.describe()}): wait for it to end or stop it, or {self.instead}{hint}")

  def _create(self) -> bool:
    """Creates the lock file holding our JSON, atomically; False if it exists."""
    data = json.dumps(dataclasses.asdict(self._me), indent=1) + "\n"
    tmp = wdir.temp_path(self.path)
    try:
      with open(tmp, "w") as f:  # Inside the try: a failed write leaves no temporary.
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
      try:
        os.link(tmp, self.path)  # Appears complete, and never replaces an existing file.
      except FileExistsError:
        return False
      except OSError as e:  # Filesystems without hard links: exclusive create instead.
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS,
                           errno.EXDEV, errno.EMLINK):
          raise
        try:
          fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
          return False
        with os.fdopen(fd, "w") as f:
          f.write(data)
          f.flush()
          os.fsync(f.fileno())
    finally:
      with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    self._held = True
    self._lost = None
    self._stop.clear()
    return True

  def _inspect(self) -> _Seen | None:
    """The current lock file, or None if there is none."""
    try:
      st = os.stat(self.path)
      with open(self.path) as f:
        text = f.read()
    except FileNotFoundError:
      return None
    age = time.time() - st.st_mtime
    try:
      return _Seen(text, _parse(text), age, None)
    except (ValueError, TypeError) as e:
      return _Seen(text, None, age, f"{type(e).__name__}: {str(e)[:80]}")

  def _take_over(self) -> bool:
    """Replaces a stale lock by ours, under the takeover mutex; False if we did not."""
    mutex = self.path + ".takeover"
    mine = f"{self._me.host} {self._me.pid} {self._me.token}\n"
    try:
      fd = os.open(mutex, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      self._break_abandoned(mutex)
      return False
    try:
      with os.fdopen(fd, "w") as f:
        f.write(mine)
      # Judged again under the mutex: only its holder moves a lock file away.
      seen = self._inspect()
      if seen is None:
        return False
      try:
        why = self._stale_reason(seen)
      except WorkdirLockedError:
        return False  # A live holder now: the caller looks again and says so.
      aside = f"{self.path}.{self._me.token}.stale"
      try:
        os.rename(self.path, aside)
      except FileNotFoundError:
        return False
      if _read(aside) != seen.text:  # Not the file judged (its holder left, a new one came).
        with contextlib.suppress(FileExistsError):
          os.link(aside, self.path)
        os.unlink(aside)
        return False
      os.unlink(aside)
      if not self._create():
        return False
      who = seen.holder.describe() if seen.holder else "unknown holder"
      logging.warning("Took over the lock of workdir %s from a %s that is gone (%s): %s.",
                      self.workdir, self.user, who, why)
      return True
    finally:
      if _read(mutex) == mine:
        with contextlib.suppress(FileNotFoundError):
          os.unlink(mutex)

  def _break_abandoned(self, mutex: str) -> None:
    """Removes a takeover mutex left by a starter that died while holding it."""
    try:
      age = time.time() - os.stat(mutex).st_mtime
    except FileNotFoundError:
      return
    text = _read(mutex)
    if age < _TAKEOVER_STALE_S or text is None:
      return
    aside = f"{mutex}.{self._me.token}"
    try:
      os.rename(mutex, aside)
    except FileNotFoundError:
      return
    if _read(aside) != text:  # A new one: give it back.
      with contextlib.suppress(FileExistsError):
        os.link(aside, mutex)
    os.unlink(aside)

  def _owns(self) -> bool:
    return _token(_read(self.path)) == self._me.token

  def _touch(self) -> None:
    with self._guard:
      if not self._held or self._lost:
        return
      try:
        text = _read(self.path)
      except OSError:
        return  # A passing filesystem error: next heartbeat.
      if text is None:  # Deleted by hand: put it back.
        logging.warning("The lock %s was deleted while this run held it; writing it again.",
                        self.path)
        if not self._create():
          self._lost = self._lost_message()
        return
      if _token(text) != self._me.token:
        self._lost = self._lost_message()
        return
      with contextlib.suppress(OSError):
        os.utime(self.path)

  def _lost_message(self) -> str:
    seen = self._inspect()
    other = seen.holder.describe() if seen and seen.holder else "unknown holder"
    return (f"this run lost the lock of workdir {shown(self.workdir)} to another {self.user} "
            f"({other}), which judged it stale: stopping so that only one run writes there")

  def _start_heartbeat(self) -> None:
    def beat():
      while not self._stop.wait(self._interval):
        self._touch()
        if self._lost:
          logging.error("%s", self._lost)
          return
    self._thread = threading.Thread(target=beat, name="vitcls-workdir-lock", daemon=True)
    self._thread.start()


def live_holder(workdir: str, *, stale_after: float = STALE_AFTER_S) -> Holder | None:
  """The training run holding `workdir`'s lock if it may still be running, else None."""
  lock = WorkdirLock(workdir, stale_after=stale_after)
  seen = lock._inspect()  # pylint: disable=protected-access
  if seen is None:
    return None
  if seen.holder is None:
    return None if seen.age > stale_after else Holder(host="unknown", pid=0, started=0.0)
  return None if _gone(seen.holder, seen.age, stale_after) else seen.holder


class _NotHeld:
  """What processes other than 0 of a multi-process run hold: nothing to refresh."""

  def refresh(self) -> None:
    pass


@contextlib.contextmanager
def hold(workdir: str, *, stale_after: float = STALE_AFTER_S):
  """Holds `workdir`'s lock for a training run; in multi-process runs process 0 takes it
  and every process raises if it could not."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    with WorkdirLock(workdir, stale_after=stale_after) as lock:
      yield lock
    return
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = WorkdirLock(workdir, stale_after=stale_after).acquire()
    except WorkdirLockedError as e:
      error = e
  taken = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
  if error is not None:
    raise error
  if not taken:
    raise WorkdirLockedError(f"workdir {shown(workdir)} is in use by another training run "
                             f"(process 0 names it): stop that run or use another --workdir")
  try:
    yield lock or _NotHeld()
  finally:
    if lock is not None:
      lock.release()
