"""A disk that fails the trainer: saves that cannot be written, bytes that change on disk.

The save failures run the trainer in a subprocess whose checkpoints folder turns read-only
or fills up mid-run (a small tmpfs where this machine may mount one; else a permission
change, or a file-size limit on the process); the flipped byte is checked in-process.
"""

import glob
import os
import re
import resource
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitcls.run import checkpoint, checksums
from conftest import DEFAULT_EXPERIMENT, REPO, train_command, xla_flags

SAVE_EVERY = 20


# Checksums.

def test_checksums_agree_on_device_and_host_and_match_a_direct_computation():
  rng = np.random.default_rng(0)
  tree = {"f32": rng.normal(size=(3, 5, 7)).astype(np.float32),
          "i32": np.arange(6, dtype=np.int32).reshape(2, 3),
          "bf16": rng.normal(size=(4,)).astype(jnp.bfloat16),
          "scalar": np.array(7, np.int32), "bool": np.array([True, False, True])}
  on_host = checksums.of_arrays(tree)
  assert checksums.of_state({k: jnp.asarray(v) for k, v in tree.items()}) == on_host
  # arange(6): sum 15, weighted sum of i * (2i + 1) = 125.
  assert on_host["i32"] == f"{15:08x}:{125:08x}"
  words = tree["f32"].view(np.uint32).ravel().astype(np.uint64)
  weighted = int((words * (2 * np.arange(words.size, dtype=np.uint64) + 1)).sum() % 2**32)
  assert on_host["f32"] == f"{int(words.sum() % 2**32):08x}:{weighted:08x}"


def test_checksums_of_a_sharded_state_equal_the_host_ones():
  """Arrays split over 4 devices (rows, columns, both) sum as the host's whole copy."""
  code = """
import numpy as np, jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from vitcls.run import checksums
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("a", "b"))
x = np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32)
for spec in (P("a"), P(None, "b"), P("a", "b")):
  sharded = jax.device_put(x, NamedSharding(mesh, spec))
  assert len(sharded.addressable_shards) == 4
  assert checksums.of_state({"x": sharded}) == checksums.of_arrays({"x": x}), spec
print("ok")
"""
  env = dict(os.environ, XLA_FLAGS=xla_flags(4))
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_every_single_bit_flip_changes_the_checksum():
  x = np.random.default_rng(1).normal(size=(4, 9)).astype(np.float32)
  stored = checksums.of_arrays({"x": x})
  for index in range(x.size):
    for bit in range(32):
      flipped = x.copy()
      flipped.view(np.uint32).reshape(-1)[index] ^= np.uint32(1 << bit)
      assert checksums.mismatch(stored, checksums.of_arrays({"x": flipped}))
  assert checksums.mismatch(stored, checksums.of_arrays({"x": x})) is None
  assert checksums.mismatch(None, checksums.of_arrays({"x": x})) is None  # Older ones.


# A byte flipped inside a stored chunk.

def _train_in_process(workdir, *overrides):
  from vitcls import configs
  from vitcls.run import loop
  config = configs.resolve(configs.load_experiment(DEFAULT_EXPERIMENT + ":runlocal=True"), [
      "total_steps=30", "checkpoint_every=10", "keep_checkpoints=3", "log_every=10",
      "evals.test.every=1000", "model.depth=1", *overrides])
  return loop.train(config, workdir)


def _read_everything(item_dir):
  """Every array of a checkpoint as orbax alone restores it (no vitcls checks)."""
  import orbax.checkpoint as ocp
  reader = ocp.StandardCheckpointer()
  try:
    restored = reader.restore(item_dir)
  finally:
    reader.close()
  return {checksums.path_name(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(restored)[0]}


def _flip_a_byte_that_still_decodes(step_dir, within=""):
  """Flips one byte of one of the step's data files where orbax still restores the step,
  with changed values of an array whose path starts with `within` (found by trying, the
  files are compressed); the names of the arrays that changed."""
  item = os.path.join(step_dir, "default")
  before = _read_everything(item)
  data_files = sorted(glob.glob(os.path.join(item, "ocdbt.process_*", "d", "*")),
                      key=os.path.getsize, reverse=True)
  for data_file in data_files:
    with open(data_file, "rb") as f:
      original = f.read()
    for fraction in np.linspace(0.05, 0.95, 19):
      damaged = bytearray(original)
      damaged[int(len(original) * fraction)] ^= 0x10
      with open(data_file, "wb") as f:
        f.write(damaged)
      try:
        after = _read_everything(item)
      except Exception:  # pylint: disable=broad-exception-caught
        after = before  # Found by decoding already: not the case under test.
      changed = [k for k in before if before[k].tobytes() != after[k].tobytes()]
      if any(k.startswith(within) for k in changed):
        return changed
    with open(data_file, "wb") as f:
      f.write(original)
  pytest.fail("no byte flip that still decodes was found")


def _reason(workdir, step):
  with open(os.path.join(workdir, "checkpoints_broken", f"{step}.reason.txt")) as f:
    return f.read()


def test_a_flipped_byte_is_found_set_aside_and_the_resume_is_bitwise_equal(tmp_path):
  """Defect: bytes flipped inside a chunk that still decompresses restored as wrong values,
  without a warning (orbax keeps no checksums)."""
  workdir = str(tmp_path / "run")
  _train_in_process(workdir)
  _, reference, _ = checkpoint.load_weights(workdir, 30)
  ckpts = os.path.join(workdir, "checkpoints")
  assert _flip_a_byte_that_still_decodes(os.path.join(ckpts, "30"))

  # Training finds it, moves it aside, resumes from step 20 and ends where it ended.
  _train_in_process(workdir)
  assert "differ from the checksums written with it" in _reason(workdir, 30)
  _, resumed, _ = checkpoint.load_weights(workdir, 30)
  pairs = zip(jax.tree_util.tree_flatten_with_path(reference)[0],
              jax.tree_util.tree_flatten_with_path(resumed)[0])
  for (path, a), (_, b) in pairs:
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), path

  # A reader of the weights (evaluate, predict, export) finds it too and takes step 20.
  shutil.rmtree(os.path.join(workdir, "checkpoints_broken"))
  _flip_a_byte_that_still_decodes(os.path.join(ckpts, "30"), within="params/")
  step, _, _ = checkpoint.load_weights(workdir)
  assert step == 20
  assert "differ from the checksums written with it" in _reason(workdir, 30)


# Saves that cannot be written.

def _can_mount() -> bool:
  return os.geteuid() == 0 and shutil.which("mount") is not None


def _mount_tmpfs(path, size="16M"):
  os.makedirs(path, exist_ok=True)
  proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                        capture_output=True)
  return proc.returncode == 0


def _unmount(path):
  subprocess.run(["umount", "-l", path], capture_output=True)


@pytest.fixture()
def checkpoints_folder(tmp_path):
  """(workdir, how): `how` is 'tmpfs' when a tmpfs is mounted on its checkpoints folder
  (only root may), else 'plain'."""
  workdir = str(tmp_path / "run")
  folder = os.path.join(workdir, "checkpoints")
  mounted = _can_mount() and _mount_tmpfs(folder)
  if not mounted:
    os.makedirs(folder, exist_ok=True)
  yield workdir, "tmpfs" if mounted else "plain"
  if mounted:
    _unmount(folder)


def _make_read_only(folder, how):
  if how == "tmpfs":
    assert subprocess.run(["mount", "-o", "remount,ro", folder]).returncode == 0
  elif os.geteuid() != 0:
    os.chmod(folder, 0o555)
  else:
    pytest.skip("root without mount: no way to make a folder read-only here")


def _fill_up(folder, how, proc):
  if how == "tmpfs":
    with open(os.path.join(folder, "filler"), "wb") as f:
      try:
        while True:
          f.write(b"\0" * (1 << 20))
      except OSError:
        pass
  else:  # A file-size limit on the trainer: its next large write fails like a full disk.
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (32 << 10, 32 << 10))


def _start(workdir, log_path):
  env = dict(os.environ, XLA_FLAGS=xla_flags(1), TF_CPP_MIN_LOG_LEVEL="2")
  command = train_command(workdir, "--config.total_steps=2000",
                          f"--config.checkpoint_every={SAVE_EVERY}", "--config.log_every=10",
                          "--config.evals.test.every=100000", "--config.model.depth=1")
  log = open(log_path, "w")
  return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def _committed(folder):
  return sorted(int(n) for n in os.listdir(folder)
                if n.isdigit() and os.path.exists(os.path.join(folder, n, "commit_success.txt")))


def _wait_for_first_checkpoint(folder, proc, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if _committed(folder):
      return
    time.sleep(0.005)
  pytest.fail(f"no checkpoint appeared (exit code {proc.poll()})")


def _assert_stopped_with_one_line(workdir, log_path, proc, since, folder_good=None):
  """The run exits 2 within 30 s of the fault, with one line naming the cause and the last
  good checkpoint, which is whole."""
  try:
    code = proc.wait(timeout=120)
  except subprocess.TimeoutExpired:
    proc.kill()
    pytest.fail("the run did not stop")
  took = time.time() - since
  with open(log_path) as f:
    log = f.read()
  lines = [line for line in log.splitlines() if line.startswith("vitcls: error: saving")]
  assert code == 2 and len(lines) == 1, log[-3000:]
  assert took < 30, f"stopped {took:.0f} s after the fault"
  assert "Traceback" not in log, log[-3000:]
  line = lines[0]
  assert re.search(r"(read-only|permission denied|no space|file size limit)", line), line
  failed = int(re.search(r"checkpoint of step (\d+)", line).group(1))
  folder = os.path.join(workdir, "checkpoints")
  good = _committed(folder)
  if folder_good is not None:
    assert good == folder_good
  if good:
    assert f"the last good checkpoint is step {good[-1]}" in line, line
    assert failed == good[-1] + SAVE_EVERY
    step, params, _ = checkpoint.load_weights(workdir)  # Whole, and its checksums agree.
    assert step == good[-1] and params
  else:
    assert "no checkpoint was saved before it" in line and failed == SAVE_EVERY
  return line


def test_a_checkpoints_folder_turning_read_only_stops_the_run_at_once(
    checkpoints_folder, tmp_path):
  """Defect: the failed save was noticed one save later, then ~300 s of silence."""
  workdir, how = checkpoints_folder
  folder = os.path.join(workdir, "checkpoints")
  log_path = str(tmp_path / "train.log")
  proc = _start(workdir, log_path)
  _wait_for_first_checkpoint(folder, proc)
  _make_read_only(folder, how)
  since = time.time()
  _assert_stopped_with_one_line(workdir, log_path, proc, since)


def test_a_first_checkpoint_that_cannot_be_written_stops_the_run_there(
    checkpoints_folder, tmp_path):
  """Defect: when the first save failed, the run trained to its end and left nothing."""
  workdir, how = checkpoints_folder
  folder = os.path.join(workdir, "checkpoints")
  _make_read_only(folder, how)
  log_path = str(tmp_path / "train.log")
  proc = _start(workdir, log_path)
  since = time.time()
  _assert_stopped_with_one_line(workdir, log_path, proc, since, folder_good=[])
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    steps = [int(s) for s in re.findall(r'"step": (\d+)', f.read())]
  assert max(steps) <= 2 * SAVE_EVERY  # Not 2000.


def test_a_full_disk_stops_the_run_at_once(checkpoints_folder, tmp_path):
  workdir, how = checkpoints_folder
  folder = os.path.join(workdir, "checkpoints")
  log_path = str(tmp_path / "train.log")
  proc = _start(workdir, log_path)
  _wait_for_first_checkpoint(folder, proc)
  _fill_up(folder, how, proc)
  since = time.time()
  _assert_stopped_with_one_line(workdir, log_path, proc, since)
  if how == "tmpfs":
    os.remove(os.path.join(folder, "filler"))


def test_save_failures_are_named_by_their_cause():
  import errno
  assert checkpoint.write_failure(OSError(errno.ENOSPC, "x")) == (
      "no space left on the device (ENOSPC)")
  wrapped = ValueError("PERMISSION_DENIED: Error writing local file \"a\": Failed to open: "
                       "\"a.__lock\": Read-only file system [os_error_code='30']")
  assert checkpoint.write_failure(wrapped) == "the file system is read-only (EROFS)"
  try:
    try:
      raise OSError(errno.EACCES, "denied")
    except OSError as inner:
      raise RuntimeError("outer") from inner
  except RuntimeError as outer:
    assert checkpoint.write_failure(outer) == "permission denied (EACCES)"
  assert checkpoint.write_failure(RuntimeError("odd\nsecond line")) == "odd"
