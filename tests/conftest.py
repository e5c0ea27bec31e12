"""Shared fixtures: one TFDS data dir per session, and a helper to run the CLI."""

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_EXPERIMENT = os.path.join(REPO, "experiments", "mnist5k_vit.py")

# One JAX compilation cache for the whole session, set before JAX is imported: the many
# runs of the same tiny models (in-process, in CLI subprocesses, in xdist workers, which
# inherit this environment) compile each program once. Cached programs are the same
# executables, so results do not change.
if "VITCLS_TEST_JAX_CACHE" not in os.environ:
  os.environ["VITCLS_TEST_JAX_CACHE"] = tempfile.mkdtemp(prefix="vitcls-test-jax-cache-")
  atexit.register(shutil.rmtree, os.environ["VITCLS_TEST_JAX_CACHE"], ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["VITCLS_TEST_JAX_CACHE"]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

# XLA:CPU's backend code generation unoptimised, in this process and every one the tests
# start (`xla_flags`): most programs here run a few steps, so compiling them costs more
# than running them (the suite's compile time halves; measured 15% less wall time on the
# experiment files). XLA's own passes (fusion, layouts) are unchanged, and every result
# compared bit for bit comes from processes under the same flags.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a process the tests start: `devices` fake CPU devices."""
  return f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={devices}"


@pytest.fixture(scope="session", autouse=True)
def tfds_data_dir(tmp_path_factory):
  """Embedded datasets are built once per session into a fresh TFDS data dir."""
  path = str(tmp_path_factory.mktemp("tfds"))
  old = os.environ.get("TFDS_DATA_DIR")
  os.environ["TFDS_DATA_DIR"] = path
  yield path
  if old is None:
    os.environ.pop("TFDS_DATA_DIR", None)
  else:
    os.environ["TFDS_DATA_DIR"] = old


def train_command(workdir, *overrides, config=DEFAULT_EXPERIMENT + ":runlocal=True"):
  return [sys.executable, "-m", "vitcls.train", f"--config={config}",
          f"--workdir={workdir}", *overrides]


def run_train(workdir, *overrides, devices=1, check=True, **kw):
  """Runs `python -m vitcls.train` in a subprocess with `devices` fake CPU devices."""
  env = dict(os.environ, XLA_FLAGS=xla_flags(devices),
             TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.run(train_command(workdir, *overrides, **kw), env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  if check and proc.returncode != 0:
    raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  return proc


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def losses(workdir):
  return {m["step"]: m["loss"] for m in read_metrics(workdir) if "loss" in m}


def flat_arrays(tree, prefix=""):
  """{'/a/b': array} of a nested dict of arrays."""
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(flat_arrays(v, f"{prefix}/{k}"))
    return out
  return {prefix: np.asarray(tree)}


def assert_same_run(straight, workdir, step):
  """Params and EMA at `step`, and the logged loss curve, bitwise equal in both workdirs."""
  from vitcls.run import checkpoint  # pylint: disable=g-import-not-at-top
  for part in (1, 2):  # params, ema
    a = flat_arrays(checkpoint.load_weights(straight, step)[part])
    b = flat_arrays(checkpoint.load_weights(workdir, step)[part])
    assert a.keys() == b.keys() and a
    for name in a:
      assert a[name].tobytes() == b[name].tobytes(), f"{name} differs"
  assert losses(straight) == losses(workdir)  # The logged curve too, step for step.


def write_sweep_experiment(tmp_path, sweep_source):
  """A 10-step experiment file whose get_sweep returns `sweep_source` (Python text)."""
  path = tmp_path / "exp.py"
  path.write_text(
      "from vitcls import configs, sweep\n\n"
      "def get_config(arg=None):\n"
      "  c = configs.defaults()\n"
      "  c.total_steps = 10\n"
      "  return c\n\n"
      f"def get_sweep(arg=None):\n  return {sweep_source}\n")
  return str(path)


def train_runlocal_mnist(tmp_path_factory) -> str:
  """A runlocal mnist5k ViT (28 px, patch 7) trained in this process for 6 steps, with its
  report: the workdir a test module shares (tests copy it before changing it)."""
  from vitcls import configs, train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("mnist"))
  config = configs.resolve(configs.load_experiment(DEFAULT_EXPERIMENT + ":runlocal=True"),
                           ["evals.test.every=100"])
  train.train(config, workdir)
  return workdir
